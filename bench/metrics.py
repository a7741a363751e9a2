"""Metrics of the demo world's evaluation suite. Images are tensors [N, 3, H, W], RGB in [0, 1] (32×32 for the
evaluator; other sizes are resized by it). The evaluator (bench/evaluator.py, shipped weights by default) only
scores images here; it never guides.

Prompt adherence — `attribute_accuracy(images, prompts)`; a prompt is a caption of the world's grammar or a
world label dict (`demo.world.scene`):
    * single-object prompt ("a large red circle on a white background"): correct when the evaluator's shape AND
      colour heads both give the named ones ("attribute"); "shape", "color" separately; "size" over prompts
      that name a size, "background" over prompts that name a background (labels name both).
    * two-object prompt ("a red circle left of a blue square", any paraphrase; "B right of A" is read as such):
      correct when both named (colour, shape) objects are found by the grid head and the centroid of the first
      stands in the named relation to the second (along the relation's axis, at least as far as across it; see
      bench/evaluator.py) ("relation"); "pair_objects": both objects found, whatever the geometry.
    "correct" holds the per-item verdict, "prompt_adherence" its mean over all items.

Fréchet distance — `frechet_distance(a, b)`: ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½) between Gaussians
    fitted to the evaluator's 128-d penultimate features (`evaluator.features`); computed in float64 with
    symmetric eigen-decompositions (no complex square roots). a, b: feature matrices [N, D] or `feature_stats`.
    Like FID it is biased upwards at small N: compare configurations at equal N (the benchmark uses ≥ 256).
    `frechet_distance_images` does the feature extraction.

Within-prompt diversity — `within_prompt_diversity(images, groups)`: for each group of images generated for the
    same prompt (≥ 2 images), the mean Euclidean distance over all unordered pairs, in evaluator feature space
    (space="features", default) or as per-pixel RMS difference (space="pixels"); averaged over groups, each
    prompt weighing the same. 0 for identical images; larger = more varied.

Colour statistics — `mean_saturation(images)`: mean HSV saturation S = (max − min) / max over the RGB channels
    (0 where max = 0) of every pixel, after clamping to [0, 1]. `clipped_fraction(images)`: the fraction of
    pixels with at least one channel ≤ 0 or ≥ 1, counted on the values as given — clamped images (values at
    exactly 0 or 1) and raw ones (values outside [0, 1]) alike. The real world is not clip-free (its orange is
    (1, 0.52, 0), its black and white backgrounds graze 0 and 1), so read both against `evaluate_images` on
    real images of the same prompts.

`evaluate_images` returns all of them for one set of images (NFEs and seconds per image are the runner's).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Iterable, Sequence

import numpy as np
import torch

from bench.evaluator import Evaluator, load_evaluator
from demo.world import BACKGROUNDS, COLORS, SHAPES, SIZES

_MENTION = re.compile(r"\b(?:(" + "|".join(SIZES) + r")\s+)?(" + "|".join(COLORS) + r")\s+("
                      + "|".join(SHAPES) + r")s?\b")
_BACKGROUND = re.compile(r"\b(" + "|".join(BACKGROUNDS) + r")\s+background\b")
_RELATION_WORDS = (("left", "left of"), ("right", "right of"), ("above", "above"), ("over", "above"),
                   ("below", "below"), ("beneath", "below"), ("under", "below"))


# ------------------------------------------------------------------------------------------------- prompts

def parse_caption(caption: str) -> dict:
    """The target of a caption of the world's grammar: {"objects": [(colour_idx, shape_idx, size_idx or
    None), ...] (one or two, in the order named), "relation": name from RELATIONS (first object → second) or
    None, "background_idx": int or None}. Raises ValueError when no "<colour> <shape>" is named, or two are
    named without a recognisable relation between them."""
    text = caption.lower()
    mentions = list(_MENTION.finditer(text))
    if not mentions:
        raise ValueError(f"caption names no '<colour> <shape>' object of the demo world: {caption!r}")
    objects = [(COLORS.index(m[2]), SHAPES.index(m[3]), SIZES.index(m[1]) if m[1] else None) for m in mentions[:2]]
    relation = None
    if len(objects) == 2:
        between = text[mentions[0].end():mentions[1].start()]
        for word, name in _RELATION_WORDS:
            if re.search(rf"\b{word}\b", between):
                relation = name
                break
        if relation is None:
            raise ValueError(f"caption names two objects but no relation between them: {caption!r}")
    bg = _BACKGROUND.search(text)
    return {"objects": objects, "relation": relation, "background_idx": BACKGROUNDS.index(bg[1]) if bg else None}


def target_of(prompt) -> dict:
    """`parse_caption` for a caption, the same structure from a world label dict (which names everything)."""
    if isinstance(prompt, str):
        return parse_caption(prompt)
    objects = [(o["color_idx"], o["shape_idx"], o["size_idx"]) for o in prompt["objects"]]
    return {"objects": objects, "relation": prompt["relation"], "background_idx": prompt["background_idx"]}


def _key(prompt):
    if isinstance(prompt, str):
        return prompt
    t = target_of(prompt)
    return (tuple(t["objects"]), t["relation"], t["background_idx"])


# ------------------------------------------------------------------------------------------- prompt adherence

def _frac(x: torch.Tensor) -> float | None:
    return float(x.float().mean()) if x.numel() else None


def attribute_accuracy(images: torch.Tensor, prompts: Sequence, evaluator: Evaluator | None = None,
                       batch_size: int = 256) -> dict:
    """Prompt adherence of images [N, 3, H, W] to their prompts (captions or label dicts), see the module
    docstring. Fractions are None where no prompt of that kind is present."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    ev = evaluator or load_evaluator()
    targets = [target_of(p) for p in prompts]
    pred = ev.predict(images, batch_size)
    n = len(targets)
    single = torch.tensor([len(t["objects"]) == 1 for t in targets], dtype=torch.bool)
    pair = ~single
    first = torch.tensor([t["objects"][0][:2] for t in targets], dtype=torch.long).reshape(n, 2)
    shape_ok = pred["shape"] == first[:, 1]
    color_ok = pred["color"] == first[:, 0]
    size_named = torch.tensor([len(t["objects"]) == 1 and t["objects"][0][2] is not None for t in targets],
                              dtype=torch.bool)
    size_ok = pred["size"] == torch.tensor([t["objects"][0][2] or 0 for t in targets], dtype=torch.long)
    bg_named = torch.tensor([t["background_idx"] is not None for t in targets], dtype=torch.bool)
    bg_ok = pred["background"] == torch.tensor([t["background_idx"] or 0 for t in targets], dtype=torch.long)
    correct = shape_ok & color_ok
    relation_ok = torch.zeros(n, dtype=torch.bool)
    both = torch.zeros(n, dtype=torch.bool)
    if pair.any():
        idx = pair.nonzero().flatten()
        a = torch.tensor([targets[i]["objects"][0][:2] for i in idx.tolist()], dtype=torch.long)
        b = torch.tensor([targets[i]["objects"][1][:2] for i in idx.tolist()], dtype=torch.long)
        rel = [targets[i]["relation"] for i in idx.tolist()]
        r = Evaluator.relation_from_grid(pred["grid"][idx], (a[:, 0], a[:, 1]), rel, (b[:, 0], b[:, 1]))
        relation_ok[idx] = r["correct"]
        both[idx] = r["present_a"] & r["present_b"]
        correct[idx] = r["correct"]
    return {"attribute": _frac(correct[single]), "shape": _frac(shape_ok[single]), "color": _frac(color_ok[single]),
            "size": _frac(size_ok[size_named]), "background": _frac(bg_ok[bg_named]),
            "relation": _frac(relation_ok[pair]), "pair_objects": _frac(both[pair]),
            "prompt_adherence": _frac(correct), "n_single": int(single.sum()), "n_pair": int(pair.sum()),
            "correct": correct}


# ------------------------------------------------------------------------------------------ Fréchet distance

def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) in float64 of features [N, D] (N ≥ 2)."""
    f = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a, b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets; a, b: features [N, D] (tensor or array)
    or (mean, covariance) from `feature_stats`."""
    mu1, s1 = a if isinstance(a, tuple) else feature_stats(a)
    mu2, s2 = b if isinstance(b, tuple) else feature_stats(b)
    r1 = _psd_sqrt(s1)
    middle = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    return max(d, 0.0)


def frechet_distance_images(images_a: torch.Tensor, images_b, evaluator: Evaluator | None = None) -> float:
    """`frechet_distance` of the evaluator features of two image sets; images_b may also be precomputed
    `feature_stats` (e.g. of held-out real images, computed once)."""
    ev = evaluator or load_evaluator()
    b = images_b if isinstance(images_b, tuple) else ev.features(images_b)
    return frechet_distance(ev.features(images_a), b)


# ------------------------------------------------------------------------------------------------ diversity

def mean_pairwise_distance(vectors: torch.Tensor, groups: Iterable) -> float | None:
    """Mean over groups (≥ 2 members) of the mean Euclidean distance over unordered pairs within the group;
    vectors [N, D], groups: N hashable group keys. None when no group has two members."""
    members: OrderedDict = OrderedDict()
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    v = vectors.detach().double().flatten(1)
    means = []
    for idx in members.values():
        if len(idx) < 2:
            continue
        d = torch.cdist(v[idx], v[idx])
        iu = torch.triu_indices(len(idx), len(idx), offset=1)
        means.append(d[iu[0], iu[1]].mean())
    return float(torch.stack(means).mean()) if means else None


def within_prompt_diversity(images: torch.Tensor, groups: Sequence, evaluator: Evaluator | None = None,
                            space: str = "features") -> float | None:
    """Within-prompt diversity (module docstring). groups: one key per image (its prompt, or a prompt id)."""
    if len(groups) != len(images):
        raise ValueError(f"{len(images)} images but {len(groups)} group keys")
    keys = [_key(g) if isinstance(g, dict) else g for g in groups]
    if space == "features":
        return mean_pairwise_distance((evaluator or load_evaluator()).features(images), keys)
    if space == "pixels":
        x = images.detach().float().clamp(0.0, 1.0).flatten(1)
        d = mean_pairwise_distance(x, keys)
        return None if d is None else d / float(x.shape[1]) ** 0.5
    raise ValueError(f"space must be 'features' or 'pixels', got {space!r}")


# ---------------------------------------------------------------------------------------- colour statistics

def mean_saturation(images: torch.Tensor) -> float:
    """Mean HSV saturation (module docstring) of images [N, 3, H, W]."""
    x = images.detach().float().clamp(0.0, 1.0)
    mx, mn = x.amax(1), x.amin(1)
    s = torch.where(mx > 0, (mx - mn) / mx.clamp(min=1e-12), torch.zeros_like(mx))
    return float(s.mean())


def clipped_fraction(images: torch.Tensor) -> float:
    """Fraction of pixels of images [N, 3, H, W] with a channel ≤ 0 or ≥ 1 (module docstring)."""
    x = images.detach().float()
    return float(((x <= 0.0) | (x >= 1.0)).any(1).float().mean())


# ------------------------------------------------------------------------------------------------ all at once

def evaluate_images(images: torch.Tensor, prompts: Sequence, reference=None,
                    evaluator: Evaluator | None = None) -> dict:
    """Every metric for one set of images and their prompts: the `attribute_accuracy` fractions (without the
    per-item tensor), "fd" (Fréchet distance to `reference`: real images [M, 3, H, W] or their
    `feature_stats`; None without one), "diversity" (within-prompt, feature space; None if no prompt has two
    images), "saturation", "clipped", "n"."""
    ev = evaluator or load_evaluator()
    acc = attribute_accuracy(images, prompts, ev)
    acc.pop("correct")
    feats = ev.features(images)
    fd = None
    if reference is not None:
        ref = reference if isinstance(reference, tuple) else feature_stats(ev.features(reference))
        fd = frechet_distance(feats, ref)
    return {**acc, "fd": fd, "diversity": mean_pairwise_distance(feats, [_key(p) for p in prompts]),
            "saturation": mean_saturation(images), "clipped": clipped_fraction(images), "n": len(images)}


__all__ = ["parse_caption", "target_of", "attribute_accuracy", "feature_stats", "frechet_distance",
           "frechet_distance_images", "mean_pairwise_distance", "within_prompt_diversity", "mean_saturation",
           "clipped_fraction", "evaluate_images"]
