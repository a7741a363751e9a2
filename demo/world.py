"""The demo world: coloured shapes on a plain background, with captions and labels, fully deterministic.

A small text-to-image model is trained on this world and an evaluation classifier scores what it generates
against the labels, so every image comes with a caption and a structured record.

Scenes
    * single: one object. pair: two objects related by "left of", "right of", "above" or "below" (the first
      object stands in that relation to the second; they never overlap, and the relation is unambiguous: the
      offset along the relation's axis is at least twice the offset across it). mixed: single or pair, 50/50.
    * an object has a shape (SHAPES), a colour (COLORS, six well separated hues), a size (SIZES), a position
      (POSITIONS: a jittered anchor for single scenes; left/right or top/bottom from the relation for pairs)
      and a small rotation (±10°, circles none). Pair objects differ in colour or shape (or both).
    * the background (BACKGROUNDS) is a neutral grey level with a little seeded low-frequency texture and grain.

Rendering is resolution independent: geometry lives in [0, 1]² and is rasterised from signed distance
functions with a one-pixel linear coverage ramp (anti-aliasing), vectorised over a whole batch with torch.
Images are float32 [3, H, W] in [0, 1]; any square size works (32 by default, 64 for a sharper world).

Captions come from a small grammar with paraphrases ("a red circle", "a large blue square on a white
background", "a blue square to the right of a red circle", ...). Every caption names each object's colour and
shape; `caption_for(labels, v)` gives paraphrase v, `num_variants(labels)` how many there are.

Determinism: a scene depends only on (seed, index, kind, split) through a private torch.Generator (never the
global RNG); its texture adds the image size. So the same scene can be rendered at 32 and at 64 pixels.

Held-out split: a fixed 10% of the (colour, shape, size, background) combinations (`held_out_combos()`,
chosen by a stable hash under balance caps: every colour, shape, size and background gets its share, and no
(colour, shape) pair more than once, so each is still trained in its other contexts). split="train" (the
default) never shows them, split="heldout" only shows scenes with at least one held-out object, split="all"
ignores the split. `held_out_captions()` lists one fully specified caption per held-out combination and
`is_held_out(labels)` tells whether a scene uses one.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
COLOR_RGB = (
    (0.90, 0.10, 0.10),
    (0.10, 0.72, 0.18),
    (0.12, 0.32, 0.95),
    (0.95, 0.88, 0.10),
    (0.60, 0.18, 0.88),
    (1.00, 0.52, 0.00),
)
SIZES = ("small", "large")
SIZE_RADIUS = (0.13, 0.21)  # half-extent of the shape's unit frame, as a fraction of the image side
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_XY = ((0.27, 0.5), (0.73, 0.5), (0.5, 0.27), (0.5, 0.73), (0.5, 0.5))
BACKGROUNDS = ("black", "gray", "white")
BACKGROUND_LEVEL = (0.07, 0.50, 0.93)
RELATIONS = ("left of", "right of", "above", "below")
KINDS = ("single", "pair", "mixed")
SPLITS = ("train", "heldout", "all")

HELD_OUT_FRACTION = 0.1
# furthest extent of each shape from its centre (unit frame, any allowed rotation), used to keep shapes apart
SHAPE_EXTENT = (1.0, 1.02, 1.17, 1.1, 1.07, 1.1)
MARGIN = 0.02  # free border, fraction of the image side
GAP = 0.05  # least free space between the two objects of a pair
MAX_ROTATION = 10.0  # degrees
POSITION_JITTER = 0.05
SIZE_JITTER = 0.06
COLOR_JITTER = 0.03

_POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
_RELATION_PHRASES = {"left of": ("left of", "to the left of", "on the left of"),
                     "right of": ("right of", "to the right of", "on the right of"),
                     "above": ("above",), "below": ("below", "beneath", "under")}
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# {o}: "a red circle", {so}: "a large red circle", {cs}: "red circle", {bg}: "white", {pos}: "on the left"
_SINGLE_TEMPLATES = (
    "{o}", "{so}", "{so} on a {bg} background", "a picture of {so}", "a photo of {o} on a {bg} background",
    "{o} {pos}", "there is {so} {pos}", "{so} {pos} on a {bg} background", "an image of {o}",
    "a {bg} background with {so}", "{cs}",
)
# {a}/{b}: first/second object ("a red circle"), {sa}/{sb} with size; {rel}: a -> b, {irel}: b -> a
_PAIR_TEMPLATES = (
    "{a} {rel} {b}", "there is {a} {rel} {b}", "a picture of {a} {rel} {b}", "{sa} {rel} {sb}",
    "{a} {rel} {b} on a {bg} background", "{b} {irel} {a}", "there is {sb} {irel} {sa}",
    "{sa} {rel} {sb} on a {bg} background", "a picture of {b} {irel} {a}",
)
_HELD_OUT_TEMPLATE = 2  # "{so} on a {bg} background": names all four held-out attributes


def _key_seed(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


class _Draws:
    """Uniform numbers from a private torch.Generator seeded by a key, fetched in blocks (deterministic)."""

    def __init__(self, key: str):
        self._gen = torch.Generator().manual_seed(_key_seed(key))
        self._buf: list[float] = []

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
        if not self._buf:
            self._buf = torch.rand(32, generator=self._gen, dtype=torch.float64).tolist()[::-1]
        return lo + (hi - lo) * self._buf.pop()

    def choice(self, n: int) -> int:
        return min(int(self.uniform() * n), n - 1)


# ----------------------------------------------------------------------------------------------- held-out split

def _all_combos() -> list[tuple[int, int, int, int]]:
    return [(c, s, z, b) for c in range(len(COLORS)) for s in range(len(SHAPES))
            for z in range(len(SIZES)) for b in range(len(BACKGROUNDS))]


def _held_out_indices() -> tuple[tuple[int, int, int, int], ...]:
    """A stable-hash order of all combinations, taken greedily under balance caps: each colour, shape, size and
    background holds about its share of the held-out set, and each (colour, shape) at most one combination, so
    every colour-shape pair is still trained with the other sizes and backgrounds."""
    combos = _all_combos()
    target = round(HELD_OUT_FRACTION * len(combos))
    shares = [target / n for n in (len(COLORS), len(SHAPES), len(SIZES), len(BACKGROUNDS))]

    def rank(t):
        c, s, z, b = t
        return hashlib.blake2b(f"held-out|{COLORS[c]}|{SHAPES[s]}|{SIZES[z]}|{BACKGROUNDS[b]}".encode()).digest()
    chosen, counts, pairs = [], [{} for _ in shares], set()
    for caps in ([max(1, math.floor(x)) for x in shares], [math.ceil(x) for x in shares]):  # even, then fill
        for combo in sorted(combos, key=rank):
            if len(chosen) == target:
                break
            if combo[:2] in pairs or any(count.get(v, 0) >= cap for count, cap, v in zip(counts, caps, combo)):
                continue
            chosen.append(combo)
            pairs.add(combo[:2])
            for count, v in zip(counts, combo):
                count[v] = count.get(v, 0) + 1
    return tuple(sorted(chosen))


_HELD_OUT = _held_out_indices()
_HELD_OUT_SET = frozenset(_HELD_OUT)


def held_out_combos() -> tuple[tuple[str, str, str, str], ...]:
    """The fixed held-out (colour, shape, size, background) combinations, by name, sorted by index."""
    return tuple((COLORS[c], SHAPES[s], SIZES[z], BACKGROUNDS[b]) for c, s, z, b in _HELD_OUT)


def held_out_captions() -> list[str]:
    """One caption per held-out combination (same order as `held_out_combos()`), naming all four attributes,
    e.g. "a large red circle on a white background"."""
    return [_single_caption(color, shape, size, bg, "center", _HELD_OUT_TEMPLATE)
            for color, shape, size, bg in held_out_combos()]


def is_held_out(labels: dict) -> bool:
    """True when any object of the scene has a held-out (colour, shape, size, background) combination."""
    b = labels["background_idx"]
    return any((o["color_idx"], o["shape_idx"], o["size_idx"], b) in _HELD_OUT_SET for o in labels["objects"])


# ------------------------------------------------------------------------------------------------------ scenes

def _check(kind: str, split: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _stream(split: str) -> str:
    """Random stream of a split: "train" and "all" share one (a train scene is the "all" scene with any
    held-out object redrawn), "heldout" has its own."""
    return "heldout" if split == "heldout" else "train"


def _draw_attributes(d: _Draws, background: int, split: str, differ_from=None) -> tuple[int, int, int]:
    """(colour, shape, size) on `background`, outside the held-out set for split "train", differing from
    `differ_from` (colour, shape) in colour or shape."""
    while True:
        attrs = (d.choice(len(COLORS)), d.choice(len(SHAPES)), d.choice(len(SIZES)))
        if differ_from is not None and attrs[:2] == tuple(differ_from):
            continue
        if split == "train" and (*attrs, background) in _HELD_OUT_SET:
            continue
        return attrs


def _make_object(d: _Draws, attrs, position: int, cx: float, cy: float, radius: float) -> dict:
    color, shape, size = attrs
    rgb = [min(1.0, max(0.0, v + d.uniform(-COLOR_JITTER, COLOR_JITTER))) for v in COLOR_RGB[color]]
    rotation = 0.0 if SHAPES[shape] == "circle" else d.uniform(-MAX_ROTATION, MAX_ROTATION)
    return {"shape": SHAPES[shape], "shape_idx": shape, "color": COLORS[color], "color_idx": color,
            "size": SIZES[size], "size_idx": size, "position": POSITIONS[position], "position_idx": position,
            "cx": cx, "cy": cy, "radius": radius, "rotation": rotation, "rgb": rgb}


def _radius(d: _Draws, size: int) -> float:
    return SIZE_RADIUS[size] * d.uniform(1.0 - SIZE_JITTER, 1.0 + SIZE_JITTER)


def _single_objects(d: _Draws, background: int, split: str) -> tuple[list[dict], int]:
    if split == "heldout":
        color, shape, size, background = _HELD_OUT[d.choice(len(_HELD_OUT))]
        attrs = (color, shape, size)
    else:
        attrs = _draw_attributes(d, background, split)
    position = d.choice(len(POSITIONS))
    r = _radius(d, attrs[2])
    e = r * SHAPE_EXTENT[attrs[1]]
    x0, y0 = POSITION_XY[position]
    cx = min(max(x0 + d.uniform(-POSITION_JITTER, POSITION_JITTER), MARGIN + e), 1.0 - MARGIN - e)
    cy = min(max(y0 + d.uniform(-POSITION_JITTER, POSITION_JITTER), MARGIN + e), 1.0 - MARGIN - e)
    return [_make_object(d, attrs, position, cx, cy, r)], background


def _pair_attributes(d: _Draws, background: int, split: str) -> tuple[tuple, tuple, int]:
    if split != "heldout":
        first = _draw_attributes(d, background, split)
        return first, _draw_attributes(d, background, split, differ_from=first[:2]), background
    color, shape, size, background = _HELD_OUT[d.choice(len(_HELD_OUT))]
    held = (color, shape, size)
    other = _draw_attributes(d, background, "all", differ_from=held[:2])
    return (held, other, background) if d.choice(2) == 0 else (other, held, background)


def _place_pair(d: _Draws, ea: float, eb: float, a_first: bool) -> tuple[float, float, float, float]:
    """Centres (a_along, a_across, b_along, b_across) for extents ea, eb (already fitted); `a_first`: a has the
    smaller coordinate along the relation's axis."""
    lo_e, hi_e = (ea, eb) if a_first else (eb, ea)
    slack = max(0.0, 1.0 - 2 * MARGIN - GAP - 2 * (ea + eb))
    t1, t2 = sorted((d.uniform(), d.uniform()))
    lo = MARGIN + lo_e + slack * t1
    hi = lo + lo_e + hi_e + GAP + slack * (t2 - t1)
    c0 = 0.5 + d.uniform(-0.08, 0.08)
    lo_across = min(max(c0 + d.uniform(-0.06, 0.06), MARGIN + lo_e), 1.0 - MARGIN - lo_e)
    hi_across = min(max(c0 + d.uniform(-0.06, 0.06), MARGIN + hi_e), 1.0 - MARGIN - hi_e)
    if a_first:
        return lo, lo_across, hi, hi_across
    return hi, hi_across, lo, lo_across


def _pair_objects(d: _Draws, background: int, split: str) -> tuple[list[dict], int, int]:
    attrs_a, attrs_b, background = _pair_attributes(d, background, split)
    relation = d.choice(len(RELATIONS))
    ra, rb = _radius(d, attrs_a[2]), _radius(d, attrs_b[2])
    ea, eb = ra * SHAPE_EXTENT[attrs_a[1]], rb * SHAPE_EXTENT[attrs_b[1]]
    room = 1.0 - 2 * MARGIN - GAP
    if 2 * (ea + eb) > room:  # two large objects: shrink both a little so they fit side by side
        f = room / (2 * (ea + eb))
        ra, rb, ea, eb = ra * f, rb * f, ea * f, eb * f
    name = RELATIONS[relation]
    a_first = name in ("left of", "above")
    a_along, a_across, b_along, b_across = _place_pair(d, ea, eb, a_first)
    horizontal = name in ("left of", "right of")
    lo_pos, hi_pos = ("left", "right") if horizontal else ("top", "bottom")
    pos_a, pos_b = (lo_pos, hi_pos) if a_first else (hi_pos, lo_pos)
    xa, ya = (a_along, a_across) if horizontal else (a_across, a_along)
    xb, yb = (b_along, b_across) if horizontal else (b_across, b_along)
    obj_a = _make_object(d, attrs_a, POSITIONS.index(pos_a), xa, ya, ra)
    obj_b = _make_object(d, attrs_b, POSITIONS.index(pos_b), xb, yb, rb)
    return [obj_a, obj_b], background, relation


def scene(index: int, *, seed: int = 0, kind: str = "single", split: str = "train") -> dict:
    """The labels of scene `index` (no rendering). Depends only on (seed, index, kind, split).

    Record: kind ("single"/"pair"), objects (list of dicts: shape, shape_idx, color, color_idx, size, size_idx,
    position, position_idx, cx, cy in [0, 1] (x right, y down), radius, rotation (degrees, clockwise), rgb),
    relation (objects[0] <relation> objects[1]; None for single) and relation_idx (-1 for single),
    background, background_idx, shape_idx / color_idx (of objects[0]), caption_variant, held_out, and the
    generating seed, index, world_kind (the kind asked for) and split."""
    _check(kind, split)
    d = _Draws(f"scene|{seed}|{kind}|{_stream(split)}|{int(index)}")
    pair = kind == "pair" or (kind == "mixed" and d.uniform() < 0.5)
    background = d.choice(len(BACKGROUNDS))
    relation = -1
    if pair:
        objects, background, relation = _pair_objects(d, background, split)
    else:
        objects, background = _single_objects(d, background, split)
    labels = {"kind": "pair" if pair else "single", "objects": objects,
              "relation": RELATIONS[relation] if pair else None, "relation_idx": relation,
              "background": BACKGROUNDS[background], "background_idx": background,
              "shape_idx": objects[0]["shape_idx"], "color_idx": objects[0]["color_idx"],
              "seed": int(seed), "index": int(index), "world_kind": kind, "split": split}
    labels["caption_variant"] = d.choice(num_variants(labels))
    labels["held_out"] = is_held_out(labels)
    return labels


# ---------------------------------------------------------------------------------------------------- captions

def _noun_phrase(*words: str) -> str:
    text = " ".join(words)
    return ("an " if text[0] in "aeiou" else "a ") + text


def _single_caption(color: str, shape: str, size: str, background: str, position: str, template: int) -> str:
    return _SINGLE_TEMPLATES[template].format(
        o=_noun_phrase(color, shape), so=_noun_phrase(size, color, shape), cs=f"{color} {shape}",
        bg=background, pos=_POSITION_PHRASE[position])


def _pair_variants(relation: str) -> tuple[tuple[str, str], ...]:
    """(template, relation phrase) for every pair paraphrase: {rel} templates take the relation's phrases,
    {irel} templates (second object first) the inverse relation's."""
    out = []
    for template in _PAIR_TEMPLATES:
        said = relation if "{rel}" in template else _INVERSE[relation]
        out += [(template, phrase) for phrase in _RELATION_PHRASES[said]]
    return tuple(out)


_PAIR_VARIANTS = {relation: _pair_variants(relation) for relation in RELATIONS}


def num_variants(labels: dict) -> int:
    """How many distinct caption paraphrases `caption_for` has for this scene."""
    if labels["relation"] is None:
        return len(_SINGLE_TEMPLATES)
    return len(_PAIR_VARIANTS[labels["relation"]])


def caption_for(labels: dict, variant: int = 0) -> str:
    """Caption paraphrase `variant` (taken modulo `num_variants(labels)`) of a scene's labels."""
    variant = int(variant) % num_variants(labels)
    objects, background = labels["objects"], labels["background"]
    if labels["relation"] is None:
        o = objects[0]
        return _single_caption(o["color"], o["shape"], o["size"], background, o["position"], variant)
    a, b = objects
    template, phrase = _PAIR_VARIANTS[labels["relation"]][variant]
    return template.format(
        a=_noun_phrase(a["color"], a["shape"]), b=_noun_phrase(b["color"], b["shape"]),
        sa=_noun_phrase(a["size"], a["color"], a["shape"]), sb=_noun_phrase(b["size"], b["color"], b["shape"]),
        rel=phrase, irel=phrase, bg=background)


# --------------------------------------------------------------------------------------------------- rendering

def _sdf_box(u: torch.Tensor, v: torch.Tensor, hu: float, hv: float) -> torch.Tensor:
    qu, qv = u.abs() - hu, v.abs() - hv
    outside = torch.sqrt(qu.clamp(min=0) ** 2 + qv.clamp(min=0) ** 2)
    return outside + torch.maximum(qu, qv).clamp(max=0)


def _sdf_star(u: torch.Tensor, v: torch.Tensor, r: float = 1.1, n: int = 5, m: float = 3.0) -> torch.Tensor:
    """Inigo Quilez's n-pointed star (m in [2, n] sets how fat it is), pointing up."""
    an, en = math.pi / n, math.pi / m
    acs, ecs = (math.cos(an), math.sin(an)), (math.cos(en), math.sin(en))
    x, y = u.abs(), -v
    bn = torch.remainder(torch.atan2(x, y), 2 * an) - an
    length = torch.sqrt(x * x + y * y)
    px, py = length * torch.cos(bn) - r * acs[0], length * torch.sin(bn).abs() - r * acs[1]
    t = (-(px * ecs[0] + py * ecs[1])).clamp(0.0, r * acs[1] / ecs[1])
    px, py = px + ecs[0] * t, py + ecs[1] * t
    return torch.sqrt(px * px + py * py) * torch.sign(px)


def _sdf(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance in the shape's unit frame (u right, v down); every shape spans about [-1, 1]²."""
    if shape == "circle":
        return torch.sqrt(u * u + v * v) - 1.0
    if shape == "square":
        return _sdf_box(u, v, 0.85, 0.85)
    if shape == "diamond":
        s = math.sqrt(0.5)
        return _sdf_box((u + v) * s, (v - u) * s, 1.1 * s, 1.1 * s)
    if shape == "triangle":  # equilateral, pointing up, inradius 0.64, bounding box centred on the origin
        rho = 0.64
        w = v - rho / 2
        c, s = math.cos(math.pi / 6), 0.5
        return torch.maximum(torch.maximum(w - rho, c * u - s * w - rho), -c * u - s * w - rho)
    if shape == "cross":
        return torch.minimum(_sdf_box(u, v, 1.0, 0.34), _sdf_box(u, v, 0.34, 1.0))
    if shape == "star":
        return _sdf_star(u, v)
    raise ValueError(f"unknown shape {shape!r}")


def object_frame(objects: list[dict], size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every pixel centre of a size×size image in each object's unit frame: (u, v) [M, size, size] (the shape's
    half-extent is 1, rotated with the object) and the radius r [M, 1, 1] (fraction of the image side)."""
    p = torch.tensor([[o["cx"], o["cy"], o["radius"], math.radians(o["rotation"])] for o in objects],
                     dtype=torch.float32)
    cx, cy, r, rot = (p[:, k, None, None] for k in range(4))
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    dx, dy = grid[None, None, :] - cx, grid[None, :, None] - cy
    cos, sin = torch.cos(rot), torch.sin(rot)
    return (dx * cos + dy * sin) / r, (dy * cos - dx * sin) / r, r


def _coverage(objects: list[dict], size: int) -> torch.Tensor:
    """Anti-aliased coverage [M, size, size] of the objects (signed distance -> one-pixel linear ramp)."""
    u, v, r = object_frame(objects, size)
    dist = torch.empty(len(objects), size, size)
    shapes = torch.tensor([o["shape_idx"] for o in objects])
    for k, name in enumerate(SHAPES):
        rows = (shapes == k).nonzero().flatten()
        if len(rows) == len(objects):
            dist = _sdf(name, u, v)
        elif len(rows):
            dist[rows] = _sdf(name, u[rows], v[rows])
    return (0.5 - dist * (r * size)).clamp_(0.0, 1.0)


def _backgrounds(labels_list: list[dict], size: int) -> torch.Tensor:
    """Neutral grey level per background, with seeded low-frequency texture and fine grain: [N, 3, H, W]."""
    noise = []
    for lab in labels_list:
        key = f"texture|{lab['seed']}|{lab['world_kind']}|{_stream(lab['split'])}|{lab['index']}|{size}"
        g = torch.Generator().manual_seed(_key_seed(key))
        noise.append(torch.rand(17 + size * size, generator=g) * 2 - 1)
    noise = torch.stack(noise)
    level = torch.tensor([BACKGROUND_LEVEL[lab["background_idx"]] for lab in labels_list])
    coarse = F.interpolate(noise[:, 1:17].reshape(-1, 1, 4, 4), size=(size, size), mode="bilinear",
                           align_corners=False)
    grain = noise[:, 17:].reshape(-1, 1, size, size)
    base = level + 0.025 * noise[:, 0]
    img = base[:, None, None, None] + 0.05 * coarse + 0.02 * grain
    return img.expand(-1, 3, -1, -1).contiguous()


def render(labels_list: list[dict], size: int = 32) -> torch.Tensor:
    """Images [N, 3, size, size] in [0, 1] for scene records from `scene` (any size; same scene, any size)."""
    if not labels_list:
        return torch.empty(0, 3, size, size)
    img = _backgrounds(labels_list, size)
    for slot in (0, 1):  # painter's order; objects do not overlap anyway
        rows = [i for i, lab in enumerate(labels_list) if len(lab["objects"]) > slot]
        if not rows:
            continue
        objects = [labels_list[i]["objects"][slot] for i in rows]
        alpha = _coverage(objects, size)[:, None]
        rgb = torch.tensor([o["rgb"] for o in objects], dtype=torch.float32)[:, :, None, None]
        idx = torch.tensor(rows)
        img[idx] = img[idx] * (1 - alpha) + rgb * alpha
    return img.clamp_(0.0, 1.0)


# -------------------------------------------------------------------------------------------------- public API

def batch(start: int, count: int, *, seed: int = 0, size: int = 32, kind: str = "single",
          split: str = "train") -> tuple[torch.Tensor, list[str], list[dict]]:
    """Scenes start .. start+count-1: (images [count, 3, size, size], captions, labels). Each item equals
    `sample(index, ...)` for its index, whatever the batch it is rendered in."""
    labels = [scene(i, seed=seed, kind=kind, split=split) for i in range(start, start + count)]
    captions = [caption_for(lab, lab["caption_variant"]) for lab in labels]
    return render(labels, size), captions, labels


def sample(index: int, *, seed: int = 0, size: int = 32, kind: str = "single",
           split: str = "train") -> tuple[torch.Tensor, str, dict]:
    """One scene: (image [3, size, size] in [0, 1], caption, labels); depends only on the arguments."""
    images, captions, labels = batch(index, 1, seed=seed, size=size, kind=kind, split=split)
    return images[0], captions[0], labels[0]
