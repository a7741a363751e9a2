"""Evaluation suite of the demo world: the shipped evaluator's weights load and read real generated images of an
unseen seed correctly (attributes ≥ 98%, relations), and the metrics give known values on synthetic inputs.
Pure torch; no ComfyUI."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import metrics
from bench.evaluator import DEFAULT_WEIGHTS, PRESENCE_MASS, Evaluator, load_evaluator
from demo import world

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
SEED = 31337  # neither the training seed (1000) nor the training script's evaluation seed (2024)
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@pytest.fixture(scope="module")
def evaluator():
    return load_evaluator()


@pytest.fixture(scope="module")
def singles():
    return world.batch(0, 512, seed=SEED, kind="single", split="all")


@pytest.fixture(scope="module")
def pairs():
    return world.batch(0, 256, seed=SEED, kind="pair", split="all")


# ------------------------------------------------------------------------------------------------ weights

def test_shipped_weights_load_with_metadata(evaluator):
    assert DEFAULT_WEIGHTS.is_file() and DEFAULT_WEIGHTS.stat().st_size <= 2_000_000
    meta = evaluator.metadata
    assert int(meta["steps"]) > 0 and meta["seed"] == "0" and float(meta["train_seconds"]) > 0
    accuracy = json.loads(meta["accuracy"])
    assert accuracy["single_all"]["shape_and_color"] >= 0.98 and accuracy["pair_all"]["relation"] >= 0.95
    assert not evaluator.training
    again = Evaluator.load()
    for k, v in evaluator.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_round_trip_and_wrong_world_refused(tmp_path, evaluator):
    path = tmp_path / "e.safetensors"
    evaluator.save(path, {"seed": 5, "note": "x"})
    loaded = Evaluator.load(path)
    assert loaded.metadata["seed"] == "5" and loaded.metadata["note"] == "x"
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(loaded.features(x), evaluator.features(x))
    from safetensors.torch import load_file, save_file
    meta = dict(loaded.metadata, world=json.dumps({"shapes": ["blob"]}))
    save_file(load_file(str(path)), str(tmp_path / "w.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="another demo world"):
        Evaluator.load(tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError):
        Evaluator.load(tmp_path / "missing.safetensors")


def test_outputs_have_the_documented_shapes(evaluator):
    pred = evaluator.predict(torch.rand(3, 3, 32, 32))
    assert pred["shape"].shape == (3,) and pred["color_probs"].shape == (3, len(world.COLORS))
    assert pred["grid"].shape == (3, 1 + len(world.COLORS) * len(world.SHAPES), 8, 8)
    assert torch.allclose(pred["grid"].sum(1), torch.ones(3, 8, 8), atol=1e-5)
    assert evaluator.features(torch.rand(5, 3, 64, 64)).shape == (5, 128)  # other sizes are resized
    assert evaluator.features(torch.rand(0, 3, 32, 32)).shape == (0, 128)


# --------------------------------------------------------------------------------------- accuracy on real images

def test_single_object_attribute_accuracy_on_an_unseen_seed(evaluator, singles):
    images, captions, labels = singles
    acc = metrics.attribute_accuracy(images, captions, evaluator)
    assert acc["n_single"] == 512 and acc["n_pair"] == 0 and acc["relation"] is None
    assert acc["attribute"] >= 0.98, acc
    by_labels = metrics.attribute_accuracy(images, labels, evaluator)
    assert by_labels["attribute"] == acc["attribute"]
    assert by_labels["size"] >= 0.98 and by_labels["background"] >= 0.98


def test_held_out_combinations_are_read_too(evaluator):
    images, captions, _ = world.batch(0, 256, seed=SEED, kind="single", split="heldout")
    assert metrics.attribute_accuracy(images, captions, evaluator)["attribute"] >= 0.98


def test_relation_accuracy_on_pair_scenes_and_wrong_captions_fail(evaluator, pairs):
    images, captions, labels = pairs
    acc = metrics.attribute_accuracy(images, captions, evaluator)
    assert acc["n_pair"] == 256 and acc["attribute"] is None
    assert acc["relation"] >= 0.97 and acc["pair_objects"] >= 0.98, acc
    inverted = [world.caption_for(dict(lab, relation=INVERSE[lab["relation"]]), lab["caption_variant"])
                for lab in labels]
    assert metrics.attribute_accuracy(images, inverted, evaluator)["relation"] <= 0.03
    # a scene judged against another scene's caption mostly fails (its objects are not there)
    shuffled = captions[1:] + captions[:1]
    assert metrics.attribute_accuracy(images, shuffled, evaluator)["relation"] <= 0.1


def test_single_object_images_do_not_pass_pair_captions(evaluator, singles, pairs):
    images = singles[0][:256]
    assert metrics.attribute_accuracy(images, pairs[1], evaluator)["relation"] <= 0.05


def test_empty_backgrounds_hold_no_object(evaluator, pairs):
    blank = world.render([dict(lab, objects=[]) for lab in pairs[2][:64]])  # the same scenes, objects removed
    grid = evaluator.predict(blank)["grid"]
    assert float(grid[:, 1:].sum((2, 3)).max()) < PRESENCE_MASS
    assert metrics.attribute_accuracy(blank, pairs[1][:64], evaluator)["pair_objects"] == 0.0


# ---------------------------------------------------------------------------------------------------- captions

def test_every_paraphrase_parses_to_the_scene():
    for i in range(40):
        _, _, lab = world.sample(i, seed=SEED, kind="mixed")
        a = (lab["objects"][0]["color_idx"], lab["objects"][0]["shape_idx"])
        for v in range(world.num_variants(lab)):
            t = metrics.parse_caption(world.caption_for(lab, v))
            got = [o[:2] for o in t["objects"]]
            if lab["relation"] is None:
                assert got == [a] and t["relation"] is None
            else:
                b = (lab["objects"][1]["color_idx"], lab["objects"][1]["shape_idx"])
                assert (got, t["relation"]) in (([a, b], lab["relation"]), ([b, a], INVERSE[lab["relation"]]))
    t = metrics.parse_caption("a large red circle on a white background")
    assert t == {"objects": [(0, 0, 1)], "relation": None, "background_idx": 2}
    held = world.held_out_captions()
    assert held and all(metrics.parse_caption(c)["background_idx"] is not None for c in held)
    with pytest.raises(ValueError):
        metrics.parse_caption("a cat")


# ------------------------------------------------------------------------------------------ Fréchet distance

def test_frechet_distance_of_known_gaussians():
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    expected = 5.0 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert metrics.frechet_distance((mu1, s1), (mu2, s2)) == pytest.approx(expected, rel=1e-9)
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]  # invariant under a common rotation
    assert metrics.frechet_distance((rot @ mu1, rot @ s1 @ rot.T), (rot @ mu2, rot @ s2 @ rot.T)) == \
        pytest.approx(expected, rel=1e-9)


def test_frechet_distance_self_zero_real_small_corrupted_large(evaluator, singles, pairs):
    real = torch.cat([singles[0][:256], pairs[0][:128]])
    other, _, _ = world.batch(0, 384, seed=SEED + 1, kind="mixed", split="all")
    feats = evaluator.features(real)
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6 * float(feats.var(0).sum()))
    real_real = metrics.frechet_distance_images(other, metrics.feature_stats(feats), evaluator)
    gen = torch.Generator().manual_seed(0)
    noisy = (real + 0.15 * torch.randn(real.shape, generator=gen)).clamp(0, 1)
    washed = 0.5 + 0.4 * (real - 0.5)  # low contrast, desaturated
    for bad in (noisy, washed):
        assert metrics.frechet_distance_images(bad, real, evaluator) > 5 * real_real > 0


# ------------------------------------------------------------------------------------------------ diversity

def test_diversity_zero_for_identical_images_and_known_in_pixels(evaluator, singles):
    img = singles[0][:1].expand(6, -1, -1, -1)
    assert metrics.within_prompt_diversity(img, ["p"] * 6, evaluator) == pytest.approx(0.0, abs=1e-5)
    assert metrics.within_prompt_diversity(img, ["p"] * 6, space="pixels") == 0.0
    varied = singles[0][:6]
    assert metrics.within_prompt_diversity(varied, ["p"] * 6, evaluator) > 0.1
    black, white = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    two = torch.cat([black, white, black, black])
    # group "a": black vs white (RMS 1); group "b": identical (0); single-member groups are skipped
    assert metrics.within_prompt_diversity(two, ["a", "a", "b", "b"], space="pixels") == pytest.approx(0.5)
    assert metrics.within_prompt_diversity(two, ["a", "b", "c", "d"], space="pixels") is None


# -------------------------------------------------------------------------------------------- colour statistics

def test_saturation_of_synthetic_images():
    def solid(rgb):
        return torch.tensor(rgb, dtype=torch.float32)[None, :, None, None].expand(1, 3, 4, 4)
    assert metrics.mean_saturation(solid((1.0, 0.0, 0.0))) == pytest.approx(1.0)
    assert metrics.mean_saturation(solid((0.5, 0.5, 0.5))) == pytest.approx(0.0)
    assert metrics.mean_saturation(solid((0.0, 0.0, 0.0))) == 0.0
    assert metrics.mean_saturation(solid((0.8, 0.4, 0.4))) == pytest.approx(0.5)
    assert metrics.mean_saturation(solid((1.6, 0.8, 0.0))) == pytest.approx(1.0)  # clamped to (1, 0.8, 0)
    half = torch.cat([solid((0.8, 0.4, 0.4)), solid((0.2, 0.2, 0.2))])
    assert metrics.mean_saturation(half) == pytest.approx(0.25)


def test_clipped_fraction_counts_bounds_and_raw_excursions():
    x = torch.full((2, 3, 4, 4), 0.5)
    assert metrics.clipped_fraction(x) == 0.0
    x[0, 0, 0, 0] = 1.0       # at the bound (clamped image)
    x[0, 1, 0, 0] = 0.0       # same pixel: counted once
    x[0, 2, 1, 1] = -0.2      # below (raw)
    x[1, 0, 3, 3] = 1.3       # above (raw)
    x[1, 1, 2, 2] = 0.999
    assert metrics.clipped_fraction(x) == pytest.approx(3 / 32)
    assert metrics.clipped_fraction(x.clamp(0, 1)) == pytest.approx(3 / 32)


# ------------------------------------------------------------------------------------------------ all at once

def test_evaluate_images_on_real_images(evaluator, singles, pairs):
    images = torch.cat([singles[0][:64], pairs[0][:64]])
    prompts = singles[1][:64] + pairs[1][:64]
    ref = metrics.feature_stats(evaluator.features(world.batch(0, 256, seed=SEED + 2, kind="mixed")[0]))
    out = metrics.evaluate_images(images, prompts, reference=ref, evaluator=evaluator)
    assert out["n"] == 128 and out["n_single"] == 64 and out["n_pair"] == 64
    assert out["attribute"] >= 0.95 and out["relation"] >= 0.9 and out["prompt_adherence"] >= 0.9
    assert out["fd"] is not None and math.isfinite(out["fd"])
    # short captions ("a red circle") recur, so some prompts have several images
    assert out["diversity"] > 0
    assert out["diversity"] == pytest.approx(metrics.within_prompt_diversity(images, prompts, evaluator))
    assert 0.0 < out["saturation"] < 1.0 and 0.0 <= out["clipped"] < 0.5


def test_modules_import_no_comfyui():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import bench.metrics, bench.evaluator; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_extras', 'nodes', 'folder_paths')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, str(REPO)], check=True, timeout=120)
