"""Subjects for personalization in the demo world: textured objects the demo model never saw.

The demo model was trained on flat-coloured shapes only. A *subject* here is a coarse surface pattern — stripes, a
checkerboard, dots or rings, with its own angle, period, phase and duty cycle (about 1.5–2 periods across a shape,
so that a 32-pixel image shows it) — painted on whatever shape and colour
the prompt asks for: the pattern's bright parts have the object's colour, its dark parts the same colour at
SHADE of its brightness. The pattern lives in the object's own frame (its half-extent is 1, it turns with the
object), so a subject looks the same on a small or a large, rotated circle or star. Captions name colour and shape
as in the world (the pattern is not in the caption: it is what a personalized model has to add).

Subjects are drawn from a seeded stream per split: split="train" for training a hypernetwork, split="heldout" for
evaluation — subjects from a different stream, never seen in training (`subject(i, split)` depends only on its
arguments). Images of a subject are single-object scenes of the world (`world.scene`, split "all"), so the same
scene index renders the same shape, colour and background with any subject or flat (`render(None, …)`).

Rendering: the pattern is evaluated at 4× the resolution and area-averaged (anti-aliased); the object's coverage
and the background are the world's own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import world

PATTERNS = ("stripes", "checker", "dots", "rings")
SPLITS = ("train", "heldout")
SHADE = 0.2                  # the dark parts of a pattern: the object's colour at this brightness
PERIOD = (0.9, 1.4)          # in the object's frame (half-extent 1): coarse, about 1.5–2 periods across a shape
DUTY = (0.4, 0.6)            # bright share of a period
SUPERSAMPLE = 4


def subject(index: int, *, split: str = "train") -> dict:
    """The parameters of subject `index` of a split: pattern, pattern_idx, angle (degrees), period, phase, duty."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    return from_stream(split, index, split=split)


def from_stream(stream: str, index: int, *, split: str = "train") -> dict:
    """Subject `index` of a named seeded stream (the splits are streams; an evaluator may use its own, disjoint
    one); `split` only labels the record (it picks the scene sequence in `scenes`)."""
    d = world._Draws(f"subject|{stream}|{int(index)}")
    k = d.choice(len(PATTERNS))
    return {"pattern": PATTERNS[k], "pattern_idx": k, "angle": d.uniform(0.0, 180.0),
            "period": d.uniform(*PERIOD), "phase": d.uniform(0.0, 1.0), "duty": d.uniform(*DUTY),
            "index": int(index), "split": split}


def _square_wave(w: torch.Tensor, duty: float) -> torch.Tensor:
    return ((w - torch.floor(w)) < duty).float()


def pattern(subj: dict, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The pattern's brightness (1 bright, 0 dark) at object-frame points (u, v), not anti-aliased."""
    a = torch.tensor(subj["angle"] * torch.pi / 180.0)
    along, across = u * torch.cos(a) + v * torch.sin(a), -u * torch.sin(a) + v * torch.cos(a)
    p, phase, duty = subj["period"], subj["phase"], subj["duty"]
    name = subj["pattern"]
    if name == "stripes":
        return _square_wave(along / p + phase, duty)
    if name == "checker":
        s1, s2 = _square_wave(along / (2 * p) + phase, 0.5), _square_wave(across / (2 * p) + phase, 0.5)
        return s1 * s2 + (1 - s1) * (1 - s2)
    if name == "dots":
        fu = along / p + phase
        fv = across / p + phase
        du, dv = fu - torch.floor(fu) - 0.5, fv - torch.floor(fv) - 0.5
        return ((du * du + dv * dv).sqrt() > 0.5 * duty).float()        # dark dots of diameter duty·period
    if name == "rings":
        return _square_wave((u * u + v * v).sqrt() / p + phase, duty)
    raise ValueError(f"unknown pattern {name!r}")


def render(subj: dict | None, labels_list: list[dict], size: int = 32) -> torch.Tensor:
    """Images [N, 3, size, size] in [0, 1] of single-object scenes with the subject's pattern (None: flat, as the
    world renders them)."""
    if subj is None:
        return world.render(labels_list, size)
    if any(len(lab["objects"]) != 1 for lab in labels_list):
        raise ValueError("subjects are rendered on single-object scenes")
    objects = [lab["objects"][0] for lab in labels_list]
    img = world._backgrounds(labels_list, size)
    alpha = world._coverage(objects, size)[:, None]
    u, v, _r = world.object_frame(objects, size * SUPERSAMPLE)
    bright = F.avg_pool2d(pattern(subj, u, v)[:, None], SUPERSAMPLE)
    rgb = torch.tensor([o["rgb"] for o in objects], dtype=torch.float32)[:, :, None, None]
    colour = rgb * (SHADE + (1 - SHADE) * bright)
    return (img * (1 - alpha) + colour * alpha).clamp_(0.0, 1.0)


def scenes(subj: dict, start: int, count: int, *, seed: int = 0) -> list[dict]:
    """Scene records start .. start+count-1 for a subject: single-object scenes of the world (split "all"); each
    subject sees its own sequence of scenes."""
    offset = 100_000 * (subj["index"] + (0 if subj["split"] == "train" else 50_000))
    return [world.scene(offset + i, seed=seed, kind="single", split="all") for i in range(start, start + count)]


def images(subj: dict, start: int, count: int, *, seed: int = 0, size: int = 32,
           caption_variant: int | None = None) -> tuple[torch.Tensor, list[str], list[dict]]:
    """(images, captions, labels) of scenes start .. start+count-1 of a subject. Captions are the world's
    paraphrases (`caption_variant` None = each scene's own; an int = that paraphrase for all)."""
    labels = scenes(subj, start, count, seed=seed)
    captions = [world.caption_for(lab, lab["caption_variant"] if caption_variant is None else caption_variant)
                for lab in labels]
    return render(subj, labels, size), captions, labels
