"""The shipped demo model (demo/weights/) against a small-N version of its quality bar, through core nodes:
GL_DemoModelLoader's files → CLIPTextEncode → KSampler (euler, normal, 20 steps) → VAEDecode, scored by the
evaluator of bench/ (which only scores). Every held-out single-object caption (combinations never shown in
training) is sampled twice. The full figures (256 images per configuration) are in BENCHMARKS.md."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import host as host_module

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "demo" / "weights"
PER_PROMPT = 2
STEPS = 20
TOLERANT_BAR = 0.75          # the benchmark's bar is 0.90 at 256 images; 44 images are coarse


@pytest.fixture(scope="module")
def booted():
    return host_module.boot()


@pytest.fixture(scope="module")
def model(booted):
    dm = booted.pack("guiders.demo_model")
    return dm.load_demo_model(WEIGHTS / "demo_model.safetensors")


@pytest.fixture(scope="module")
def captions(booted):
    from demo import world
    return world.held_out_captions()


def _sample(model, captions, cfg):
    import nodes
    patcher, clip, vae = model
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    images = []
    with torch.inference_mode():
        for k, caption in enumerate(captions):
            pos = nodes.CLIPTextEncode().encode(clip, caption)[0]
            latent = nodes.EmptyLatentImage().generate(256, 256, PER_PROMPT)[0]
            out = nodes.KSampler().sample(patcher, 100 + k, STEPS, cfg, "euler", "normal", pos, neg, latent)[0]
            images.append(nodes.VAEDecode().decode(vae, out)[0].movedim(-1, 1))
    return torch.cat(images).float()


def _accuracy(images, captions):
    from bench import metrics
    prompts = [c for c in captions for _ in range(PER_PROMPT)]
    return metrics.attribute_accuracy(images, prompts)["attribute"]


def test_shipped_files_fit_the_budget(booted):
    final = WEIGHTS / "demo_model.safetensors"
    assert final.is_file(), "the demo model weights are part of the pack"
    files = [f for f in (final, WEIGHTS / "demo_model_weak.safetensors") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 25 * 10**6


def test_weak_checkpoint_shares_the_text_encoder(booted):
    from safetensors import safe_open
    files = [WEIGHTS / "demo_model.safetensors", WEIGHTS / "demo_model_weak.safetensors"]
    if not files[1].is_file():
        pytest.skip("no weak checkpoint is shipped yet (issue 3: both files must fit 25 MB together)")
    metas, texts = [], []
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            metas.append(h.metadata())
            texts.append({k: h.get_tensor(k) for k in h.keys() if k.startswith("cond_stage_model.")})
    assert [m["checkpoint"] for m in metas] == ["final", "weak"]
    assert int(metas[1]["train_steps"]) < int(metas[0]["train_steps"])
    assert metas[0]["train_seed"] == metas[1]["train_seed"]
    assert json.loads(metas[0]["config"]) == json.loads(metas[1]["config"])
    assert texts[0].keys() == texts[1].keys() and all(torch.equal(texts[0][k], texts[1][k]) for k in texts[0])


def test_prompts_are_followed_at_moderate_cfg_and_less_at_cfg_1(model, captions):
    guided = _accuracy(_sample(model, captions, 5.0), captions)
    unguided = _accuracy(_sample(model, captions, 1.0), captions)
    assert guided >= TOLERANT_BAR, f"attribute accuracy at cfg 5: {guided:.3f}"
    # 44 images resolve a 10-point gap poorly (the benchmark measures it on 256: 11.9 points); here cfg 1 must
    # simply do worse than cfg 5 on the same seeds
    assert unguided < guided, f"cfg 1 {unguided:.3f} vs cfg 5 {guided:.3f}"
