"""Demo world: determinism, image format, coverage of the attribute space, relation and colour correctness from
the labels and from the rendered pixels, the held-out split, captions, speed. Pure torch, no ComfyUI."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from demo import world

torch.set_num_threads(1)

PALETTE = torch.tensor(world.COLOR_RGB)
REPO = Path(__file__).resolve().parents[2]


def _nearest_color(rgb: torch.Tensor) -> int:
    return int(((PALETTE - rgb) ** 2).sum(-1).argmin())


def _color_mask(img: torch.Tensor, color_idx: int, tol: float = 0.2) -> torch.Tensor:
    """[H, W] pixels within `tol` (RGB distance) of the palette colour."""
    return (img - PALETTE[color_idx][:, None, None]).norm(dim=0) < tol


def _centroid(mask: torch.Tensor) -> tuple[float, float]:
    """(x, y) of a mask's centroid as a fraction of the image side (pixel centres)."""
    ys, xs = mask.nonzero(as_tuple=True)
    n = mask.shape[-1]
    return (xs.float().mean().item() + 0.5) / n, (ys.float().mean().item() + 0.5) / n


# ------------------------------------------------------------------------------------------------ determinism

@pytest.mark.parametrize("kind", world.KINDS)
def test_same_arguments_same_scene_and_different_index_differs(kind):
    a_img, a_cap, a_lab = world.sample(11, seed=3, kind=kind)
    b_img, b_cap, b_lab = world.sample(11, seed=3, kind=kind)
    assert torch.equal(a_img, b_img) and a_cap == b_cap and a_lab == b_lab
    c_img, _, _ = world.sample(12, seed=3, kind=kind)
    d_img, _, _ = world.sample(11, seed=4, kind=kind)
    assert not torch.equal(a_img, c_img) and not torch.equal(a_img, d_img)


def test_batch_items_equal_single_samples_wherever_they_sit():
    images, captions, labels = world.batch(5, 12, seed=1, kind="mixed")
    for k in (0, 6, 11):
        img, cap, lab = world.sample(5 + k, seed=1, kind="mixed")
        assert torch.equal(images[k], img) and captions[k] == cap and labels[k] == lab
    shifted, _, _ = world.batch(9, 4, seed=1, kind="mixed")
    assert torch.equal(shifted, images[4:8])


def test_global_rng_neither_used_nor_disturbed():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    img_a, _, _ = world.sample(2, kind="mixed")
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    img_b, _, _ = world.sample(2, kind="mixed")
    assert torch.equal(img_a, img_b)


def test_scene_is_resolution_independent():
    for i in range(20):
        _, cap32, lab32 = world.sample(i, size=32, kind="mixed")
        _, cap64, lab64 = world.sample(i, size=64, kind="mixed")
        assert lab32 == lab64 and cap32 == cap64


def _labels_digest(labels):
    def rounded(x):
        if isinstance(x, float):
            return round(x, 6)
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items()}
        if isinstance(x, list):
            return [rounded(v) for v in x]
        return x
    return hashlib.sha256(json.dumps(rounded(labels), sort_keys=True).encode()).hexdigest()[:16]


def test_frozen_first_scenes():
    """The world is a data set: changing what the first indices draw changes every experiment. Update these
    digests only on purpose (and say so: trained models and held-out numbers stop being comparable)."""
    _, captions, labels = world.batch(0, 10, kind="mixed")
    assert captions[:3] == ["an image of a blue triangle", "an image of a yellow circle",
                            "a picture of a small red circle"]
    assert _labels_digest(labels) == FROZEN_LABELS_DIGEST, _labels_digest(labels)


FROZEN_LABELS_DIGEST = "253adab5f37e9d78"


# --------------------------------------------------------------------------------------------- image format

@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("kind", world.KINDS)
def test_image_shape_dtype_and_range(size, kind):
    images, captions, labels = world.batch(0, 16, size=size, kind=kind)
    assert images.shape == (16, 3, size, size) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert len(captions) == len(labels) == 16
    img, cap, lab = world.sample(0, size=size, kind=kind)
    assert img.shape == (3, size, size) and isinstance(cap, str) and isinstance(lab, dict)


def test_backgrounds_are_textured_and_neutral():
    images, _, labels = world.batch(0, 30, kind="single")
    for img, lab in zip(images, labels):
        corner = img[:, :4, :4]  # objects keep clear of the corners
        assert corner.std() > 0.003, "background should not be flat"
        assert (corner - world.BACKGROUND_LEVEL[lab["background_idx"]]).abs().max() < 0.12
        assert (corner[0] - corner[1]).abs().max() < 1e-6 and (corner[1] - corner[2]).abs().max() < 1e-6


def test_labels_are_json_and_complete():
    for kind in ("single", "pair"):
        lab = world.scene(3, kind=kind)
        assert json.loads(json.dumps(lab)) == lab
        assert {"kind", "objects", "relation", "relation_idx", "background", "background_idx", "shape_idx",
                "color_idx", "caption_variant", "held_out"} <= set(lab)
        for o in lab["objects"]:
            assert world.SHAPES[o["shape_idx"]] == o["shape"] and world.COLORS[o["color_idx"]] == o["color"]
            assert world.SIZES[o["size_idx"]] == o["size"] and world.POSITIONS[o["position_idx"]] == o["position"]
        assert len(lab["objects"]) == (1 if kind == "single" else 2)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        world.sample(0, kind="triple")
    with pytest.raises(ValueError):
        world.sample(0, split="test")


# -------------------------------------------------------------------------------------- coverage of the space

def test_constants():
    assert len(world.SHAPES) >= 5 and world.COLORS == ("red", "green", "blue", "yellow", "purple", "orange")
    assert world.SIZES == ("small", "large") and world.RELATIONS == ("left of", "right of", "above", "below")
    assert set(world.POSITIONS) == {"left", "right", "top", "bottom", "center"} and len(world.BACKGROUNDS) >= 3
    for name in ("SHAPES", "COLORS", "SIZES", "POSITIONS", "BACKGROUNDS", "RELATIONS"):
        assert isinstance(getattr(world, name), tuple)


def test_every_shape_colour_and_attribute_is_produced():
    images, _, labels = world.batch(0, 500, kind="mixed")
    assert images.shape[0] == 500
    objects = [(o, lab) for lab in labels for o in lab["objects"]]
    assert {(o["shape"], o["color"]) for o, _ in objects} == {(s, c) for s in world.SHAPES for c in world.COLORS}
    assert {o["size"] for o, _ in objects} == set(world.SIZES)
    assert {o["position"] for o, _ in objects} == set(world.POSITIONS)
    assert {lab["background"] for lab in labels} == set(world.BACKGROUNDS)
    assert {lab["relation"] for lab in labels} == {None, *world.RELATIONS}
    assert 0.35 < sum(lab["kind"] == "pair" for lab in labels) / 500 < 0.65


def test_single_positions_follow_their_anchor_and_stay_inside():
    for i in range(300):
        o = world.scene(i, kind="single")["objects"][0]
        x0, y0 = world.POSITION_XY[o["position_idx"]]
        e = o["radius"] * world.SHAPE_EXTENT[o["shape_idx"]]
        for value, anchor in ((o["cx"], x0), (o["cy"], y0)):
            assert world.MARGIN + e - 1e-9 <= value <= 1 - world.MARGIN - e + 1e-9
            # jittered around the anchor, or pushed towards the centre to keep the shape inside
            assert abs(value - anchor) <= world.POSITION_JITTER + 1e-9 or abs(value - 0.5) < abs(anchor - 0.5)
        assert {"left": o["cx"] < 0.34, "right": o["cx"] > 0.66, "top": o["cy"] < 0.34, "bottom": o["cy"] > 0.66,
                "center": max(abs(o["cx"] - 0.5), abs(o["cy"] - 0.5)) < 0.06}[o["position"]]


# ------------------------------------------------------------------------------------------------ relations

def _relation_holds(relation, a, b):
    """a <relation> b for (x, y) points, y down; the offset along the axis must dominate the other one."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    return {"left of": dx > 2 * abs(dy), "right of": -dx > 2 * abs(dy),
            "above": dy > 2 * abs(dx), "below": -dy > 2 * abs(dx)}[relation]


def test_pair_relations_hold_on_the_labels_and_objects_do_not_touch():
    for i in range(400):
        lab = world.scene(i, kind="pair")
        a, b = lab["objects"]
        assert (a["shape"], a["color"]) != (b["shape"], b["color"])
        assert _relation_holds(lab["relation"], (a["cx"], a["cy"]), (b["cx"], b["cy"])), lab
        ea = a["radius"] * world.SHAPE_EXTENT[a["shape_idx"]]
        eb = b["radius"] * world.SHAPE_EXTENT[b["shape_idx"]]
        axis = "cx" if lab["relation"] in ("left of", "right of") else "cy"
        assert abs(a[axis] - b[axis]) >= ea + eb + world.GAP - 1e-9
        for o, e in ((a, ea), (b, eb)):
            assert e - 1e-9 <= o["cx"] <= 1 - e + 1e-9 and e - 1e-9 <= o["cy"] <= 1 - e + 1e-9


@pytest.mark.parametrize("size", [32, 64])
def test_pair_relations_hold_on_the_pixels(size):
    images, _, labels = world.batch(0, 240, size=size, kind="pair")
    checked = 0
    for img, lab in zip(images, labels):
        a, b = lab["objects"]
        if a["color_idx"] == b["color_idx"]:
            continue  # colour masks cannot tell them apart
        mask_a, mask_b = _color_mask(img, a["color_idx"]), _color_mask(img, b["color_idx"])
        assert mask_a.sum() >= 4 and mask_b.sum() >= 4, lab
        ca, cb = _centroid(mask_a), _centroid(mask_b)
        assert _relation_holds(lab["relation"], ca, cb), (lab, ca, cb)
        for (x, y), o in ((ca, a), (cb, b)):  # the mask sits on the labelled object
            assert abs(x - o["cx"]) < o["radius"] and abs(y - o["cy"]) < o["radius"]
        checked += 1
    assert checked > 150


# --------------------------------------------------------------------------------------------------- colours

def _object_pixels(img, lab):
    """Per object: the pixels clearly off the background, given to the nearest labelled object."""
    bg = world.BACKGROUND_LEVEL[lab["background_idx"]]
    off = (img - bg).norm(dim=0) > 0.35
    n = img.shape[-1]
    grid = (torch.arange(n) + 0.5) / n
    dist = torch.stack([((grid[None, :] - o["cx"]) ** 2 + (grid[:, None] - o["cy"]) ** 2).sqrt() / o["radius"]
                        for o in lab["objects"]])
    owner = dist.argmin(0)
    return [off & (owner == k) for k in range(len(lab["objects"]))]


@pytest.mark.parametrize("kind", ["single", "pair"])
def test_object_colour_is_the_named_colour(kind):
    images, _, labels = world.batch(0, 200, kind=kind)
    for img, lab in zip(images, labels):
        for o, mask in zip(lab["objects"], _object_pixels(img, lab)):
            assert mask.sum() >= 4, lab
            mean = img[:, mask].mean(dim=1)
            assert _nearest_color(mean) == o["color_idx"], (lab, mean)


def test_large_objects_are_clearly_larger_than_small_ones():
    images, _, labels = world.batch(0, 400, size=64, kind="single")
    areas = {}
    for img, lab in zip(images, labels):
        o = lab["objects"][0]
        areas.setdefault((o["shape"], o["size"]), []).append(_object_pixels(img, lab)[0].sum().item())
    for shape in world.SHAPES:
        small, large = max(areas[(shape, "small")]), min(areas[(shape, "large")])
        assert large > 1.8 * small, (shape, small, large)


# ------------------------------------------------------------------------------------------- held-out split

def test_held_out_split_is_a_fixed_tenth_of_the_combinations():
    combos = world.held_out_combos()
    total = len(world.COLORS) * len(world.SHAPES) * len(world.SIZES) * len(world.BACKGROUNDS)
    assert len(combos) == round(0.1 * total) and len(set(combos)) == len(combos)
    assert combos == world.held_out_combos()
    digest = hashlib.sha256(repr(combos).encode()).hexdigest()[:16]
    assert digest == FROZEN_HELD_OUT_DIGEST, digest
    for c, s, z, b in combos:
        assert c in world.COLORS and s in world.SHAPES and z in world.SIZES and b in world.BACKGROUNDS
    # balanced: each value of each attribute holds about its share; a (colour, shape) pair at most once, so
    # every colour-shape pair is still trained with its other sizes and backgrounds
    assert len({(c, s) for c, s, _, _ in combos}) == len(combos)
    for k, values in enumerate((world.COLORS, world.SHAPES, world.SIZES, world.BACKGROUNDS)):
        counts = [sum(combo[k] == v for combo in combos) for v in values]
        share = len(combos) / len(values)
        assert int(share) <= min(counts) and max(counts) <= -(-len(combos) // len(values)), (values, counts)


FROZEN_HELD_OUT_DIGEST = "ca59ea8d4fa890f5"


def test_train_never_shows_held_out_combos_and_heldout_always_does():
    combos = set(world.held_out_combos())
    for kind in ("single", "pair", "mixed"):
        for i in range(300):
            train = world.scene(i, kind=kind, split="train")
            assert not world.is_held_out(train) and not train["held_out"]
            assert not any((o["color"], o["shape"], o["size"], train["background"]) in combos
                           for o in train["objects"])
            held = world.scene(i, kind=kind, split="heldout")
            assert world.is_held_out(held) and held["held_out"]
    seen = {(o["color"], o["shape"], o["size"], lab["background"])
            for lab in (world.scene(i, kind="single", split="heldout") for i in range(400)) for o in lab["objects"]}
    assert seen == combos
    everything = [world.scene(i, kind="single", split="all") for i in range(1000)]
    assert 0.04 < sum(map(world.is_held_out, everything)) / 1000 < 0.18


def test_held_out_captions_name_all_four_attributes():
    captions = world.held_out_captions()
    assert len(captions) == len(world.held_out_combos()) and len(set(captions)) == len(captions)
    for caption, (c, s, z, b) in zip(captions, world.held_out_combos()):
        words = caption.split()
        assert {c, s, z, b} <= set(words), caption
    train_captions = {world.sample(i, split="train")[1] for i in range(400)}
    assert not train_captions & set(captions)


# --------------------------------------------------------------------------------------------------- captions

def _relation_word(caption):
    for word, relation in (("left", "left of"), ("right", "right of"), ("above", "above"), ("below", "below"),
                           ("beneath", "below"), ("under", "below")):
        if f" {word} " in f" {caption} ":
            return relation
    raise AssertionError(f"no relation in {caption!r}")


def test_captions_mention_colour_shape_and_a_correct_relation_in_every_paraphrase():
    for i in range(150):
        lab = world.scene(i, kind="mixed")
        variants = {world.caption_for(lab, v) for v in range(world.num_variants(lab))}
        assert len(variants) == world.num_variants(lab)
        for caption in variants:
            for o in lab["objects"]:
                assert f"{o['color']} {o['shape']}" in caption, (caption, lab)
            if lab["relation"] is not None:
                a, b = lab["objects"]
                first_a = caption.index(f"{a['color']} {a['shape']}") < caption.index(f"{b['color']} {b['shape']}")
                expected = lab["relation"] if first_a else {"left of": "right of", "right of": "left of",
                                                            "above": "below", "below": "above"}[lab["relation"]]
                assert _relation_word(caption) == expected, (caption, lab)
            assert " a a" not in caption and " a o" not in caption and not caption.startswith("a o")


def test_captions_use_several_templates_and_correct_articles():
    captions = world.batch(0, 200, kind="mixed")[1]
    assert len({c.split()[0] for c in captions}) >= 3 and len(set(captions)) > 120
    assert any(" to the right of " in c or " to the left of " in c for c in captions)
    assert any(c.startswith("there is ") for c in captions)
    assert any(" background" in c for c in captions)
    assert world.caption_for(world.scene(0), 10_000) == world.caption_for(world.scene(0), 10_000)
    orange = next(lab for lab in (world.scene(i) for i in range(200)) if lab["objects"][0]["color"] == "orange")
    assert world.caption_for(orange, 0) == f"an orange {orange['objects'][0]['shape']}"


# ----------------------------------------------------------------------------------------- speed, isolation

def test_rendering_is_fast():
    world.batch(0, 32, kind="mixed")  # warm-up
    start = time.perf_counter()
    images, _, _ = world.batch(0, 512, kind="mixed")
    elapsed = time.perf_counter() - start
    assert images.shape[0] == 512
    assert elapsed < 3.0, f"512 images took {elapsed:.2f}s ({512 / elapsed:.0f} images/s)"


def test_module_imports_nothing_but_torch_and_the_standard_library():
    code = ("import json, sys; sys.path.append(sys.argv[1]); from demo import world; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('comfy', 'comfy_extras', 'nodes', 'folder_paths', 'PIL', 'kernels', 'guiders'))))")
    out = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, timeout=120,
                         check=True)
    assert json.loads(out.stdout) == []
