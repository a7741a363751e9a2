"""Hypernetwork personalization (guiders/hypernet.py, guiders/hypernet_train.py) in the real host: the demo model
(SD1-style EPS UNet) and tiny Flux with its own text encoders (flow, residuals added in place). Zero strength and
an untrained hypernetwork give the base model; files round-trip; training lowers the probe loss and leaves the
shared weights as they were; the hook output equals the patched model; bad images and mismatched models get
clear errors."""
from __future__ import annotations

import math

import pytest
import torch

from hostutil import encode, original_weights, run


@pytest.fixture(scope="module")
def hn(host):
    return host.pack("guiders.hypernet")


@pytest.fixture(scope="module")
def ht(host):
    return host.pack("guiders.hypernet_train")


def _images(n=3, h=40, w=48, seed=0):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _untrained(hn, model, layers="attention", nonzero=True, seed=0, **cfg):
    """A fresh hypernetwork for `model`; nonzero: B heads randomised so that ΔW ≠ 0."""
    from_kernels = hn.hk
    torch.manual_seed(seed)
    with torch.inference_mode(False):
        module = from_kernels.HyperNetwork(hn.targets_for(model, layers),
                                           dict(dict(width=32, heads=2, depth=1, encoder_channels=[8, 8, 16]), **cfg))
        if nonzero:
            for head in module.heads_b.values():
                torch.nn.init.normal_(head.weight, std=0.05)
    module.eval().requires_grad_(False)
    return hn.Hypernet(module, hn.family(model), layers, "test")


def test_untrained_and_zero_strength_give_the_base_model(hn, demo_model):
    patcher, clip, _vae = demo_model
    pos, neg = encode(clip, "a red circle"), encode(clip, "")
    base = run(patcher, pos, neg, 5.0)
    fresh = _untrained(hn, patcher, nonzero=False)
    m, _hooks, lora = hn.personalize(patcher, _images(), fresh)
    assert all(float(v.abs().max()) == 0 for k, v in lora.items() if k.endswith("lora_up.weight"))
    assert torch.equal(run(m, pos, neg, 5.0), base)
    net = _untrained(hn, patcher)
    zero, _hooks, _lora = hn.personalize(patcher, _images(), net, strength=0.0)
    assert torch.equal(run(zero, pos, neg, 5.0), base)
    full, _hooks, _lora = hn.personalize(patcher, _images(), net, strength=1.0)
    assert not torch.allclose(run(full, pos, neg, 5.0), base)
    assert torch.equal(run(patcher, pos, neg, 5.0), base)                   # the input model is untouched
    assert len(full.patches) == len(net.targets) == 88


def test_file_round_trip_and_prediction(hn, demo_model, tmp_path):
    patcher, _clip, _vae = demo_model
    net = _untrained(hn, patcher, layers="attention + feed-forward", rank=3)
    path = hn.save(net, tmp_path / "h.safetensors", {"note": "x"})
    back = hn.load(path)
    assert back.family == "UNet" and back.layers == "attention + feed-forward" and back.info["note"] == "x"
    assert back.module.config == net.module.config and back.targets == net.targets
    pics = hn.subject_images(_images(), 32)
    a, b = hn.predict(net, pics), hn.predict(back, pics)
    assert all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)
    assert all(v[0].shape[1] == 3 for v in a.values())
    with pytest.raises(hn.HypernetError, match="not a Guidance Lab hypernetwork"):
        import comfy.utils
        comfy.utils.save_torch_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        hn.load(tmp_path / "other.safetensors")
    with pytest.raises(hn.HypernetError, match="safetensors only"):
        hn.load(tmp_path / "h.pt")


def test_several_images_are_fused_and_sizes_are_normalised(hn, demo_model):
    patcher, _clip, _vae = demo_model
    net = _untrained(hn, patcher)
    imgs = _images(4, 64, 64)
    one = hn.predict(net, hn.subject_images(imgs[:1], 32))
    four = hn.predict(net, hn.subject_images(imgs, 32))
    key = net.targets[0].key
    assert not torch.allclose(one[key][0], four[key][0])
    # a 64×80 RGBA image is centre-cropped to 64×64 and area-resized to 32×32
    rgba = torch.cat([torch.rand(1, 64, 80, 3), torch.ones(1, 64, 80, 1)], -1)
    got = hn.subject_images(rgba, 32)
    want = rgba[0, :, 8:72, :3].permute(2, 0, 1).reshape(3, 32, 2, 32, 2).mean(dim=(2, 4))
    torch.testing.assert_close(got[0], want)


def test_bad_images_and_mismatched_models_get_clear_errors(hn, demo_model, tiny):
    patcher, _clip, _vae = demo_model
    net = _untrained(hn, patcher)
    with pytest.raises(hn.HypernetError, match=r"GL_Personalize: subject images of 6×6 pixels are too small"):
        hn.personalize(patcher, torch.rand(1, 6, 6, 3), net)
    with pytest.raises(hn.HypernetError, match=r"need 3 \(RGB\) or 4 \(RGBA\) channels; got 1"):
        hn.personalize(patcher, torch.rand(1, 32, 32, 1), net)
    with pytest.raises(hn.HypernetError, match=r"IMAGE batch \[N, H, W, C\]"):
        hn.personalize(patcher, torch.rand(32, 32, 3), net)
    with pytest.raises(hn.HypernetError, match=r"trained for a UNet model with 88 attention weights; this Flux "
                                               r"model .* is another family"):
        hn.personalize(tiny("flux"), _images(), net)
    with pytest.raises(hn.HypernetError, match=r"trained for a UNet model .* lacks or reshapes 70 of them \(e.g. "
                                               r"diffusion_model\.input_blocks"):
        hn.personalize(tiny("sd15_eps"), _images(), net)
    with pytest.raises(hn.HypernetError, match="connect a GL_HYPERNET"):
        hn.personalize(patcher, _images(), None)
    with pytest.raises(hn.HypernetError, match=r"layers 'cross-attention k/v \(UNet\)' does not exist on Flux"):
        hn.targets_for(tiny("flux"), "cross-attention k/v (UNet)")


def test_flux_personalization_batch_two_and_hooks_equal_the_patched_model(hn, text_model):
    model, clip = text_model("flux")
    net = _untrained(hn, model)
    assert net.family == "Flux" and all(".double_blocks." in t.key or ".single_blocks." in t.key for t in net.targets)
    m, hooks, _lora = hn.personalize(model, _images(2, 32, 32), net, strength=0.8)
    pos, neg = encode(clip, "a dog"), encode(clip, "")
    base = run(model, pos, neg, 1.0, batch=2)
    patched = run(m, pos, neg, 1.0, batch=2)
    assert patched.shape[0] == 2 and torch.isfinite(patched).all() and not torch.allclose(patched, base)
    import comfy.hooks
    hooked = comfy.hooks.set_hooks_for_conditioning(pos, hooks)
    via_hooks = run(model, hooked, neg, 1.0, batch=2)          # cfg 1: only the hooked positive is evaluated
    torch.testing.assert_close(via_hooks, patched, rtol=1e-4, atol=1e-4)
    assert torch.equal(run(model, pos, neg, 1.0, batch=2), base)


@pytest.fixture(scope="module")
def trained(ht, demo_model):
    patcher, clip, vae = demo_model
    before = original_weights(patcher)
    with torch.inference_mode():
        net = ht.train_hypernet(patcher, clip, vae, steps=50, rank=2, width=64, depth=1, subjects_per_step=2,
                                ref_images=2, target_images=4, learning_rate=1e-3, seed=3)
    return net, before


def test_training_lowers_the_probe_loss_and_leaves_the_model_clean(trained, demo_model):
    net, before = trained
    patcher, _clip, _vae = demo_model
    hist = net.info["loss_history"]
    assert [row[0] for row in hist] == [0, 25, 50] and hist[0][2] == 0.0          # ΔW = 0 before training
    assert all(math.isfinite(v) for row in hist for v in row[1:])
    assert hist[-1][1] < hist[0][1], hist
    assert all(torch.equal(v, before[k]) for k, v in original_weights(patcher).items())
    assert all(not getattr(m, "weight_function", []) for m in patcher.model.diffusion_model.modules())
    assert all(not p.requires_grad for p in net.module.parameters())


def test_resume_continues_and_counts_steps(ht, trained, demo_model):
    net, _before = trained
    patcher, clip, vae = demo_model
    with torch.inference_mode():
        more = ht.train_hypernet(patcher, clip, vae, steps=2, subjects_per_step=1, ref_images=1, target_images=2,
                                 resume=net, seed=4)
    assert more.info["steps"] == 52 and more.module.config == net.module.config
    assert more.module is not net.module


def test_training_on_flux_from_a_folder(ht, text_model, tmp_path):
    from PIL import Image
    import numpy as np
    import comfy.sd
    model, clip = text_model("flux")
    for s in range(2):
        sub = tmp_path / f"subject{s}"
        sub.mkdir()
        (sub / "caption.txt").write_text("a dog")
        for i in range(3):
            arr = (np.random.default_rng(10 * s + i).random((24, 24, 3)) * 255).astype("uint8")
            Image.fromarray(arr).save(sub / f"{i}.png")
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    before = original_weights(model)
    with torch.inference_mode():
        net = ht.train_hypernet(model, clip, vae, source="folder", folder=str(tmp_path), layers="attention", rank=2,
                                width=32, depth=1, steps=3, subjects_per_step=2, ref_images=2, target_images=2,
                                resolution=16, seed=0)
    assert net.family == "Flux" and net.info["subjects"] == 2 and len(net.info["loss_history"]) == 2
    assert all(math.isfinite(v) for row in net.info["loss_history"] for v in row[1:])
    assert all(torch.equal(v, before[k]) for k, v in original_weights(model).items())
    with pytest.raises(Exception, match=r"GL_HypernetworkTrain: folder .* is not a directory"):
        ht.train_hypernet(model, clip, vae, source="folder", folder=str(tmp_path / "nope"))
    with pytest.raises(Exception, match="connect the model's CLIP"):
        ht.train_hypernet(model, None, vae)


def test_encoder_pretraining_then_frozen_encoder(ht, demo_model):
    patcher, clip, vae = demo_model
    with torch.inference_mode():
        net = ht.train_hypernet(patcher, clip, vae, steps=2, rank=2, width=64, depth=1, subjects_per_step=1,
                                ref_images=2, target_images=2, encoder_pretrain_steps=3, freeze_encoder=True, seed=5)
    assert net.info["encoder_pretrain_steps"] == 3 and math.isfinite(net.info["encoder_pretrain_loss"])
    # the same pretraining alone (same seed and draws) gives the same encoder: the main training left it fixed
    import torch as t
    hk = ht.hk
    data = ht.DemoSubjects(2000, 32, 5)
    with t.inference_mode(False):
        with t.random.fork_rng(devices=[]):
            t.manual_seed(5)
            fresh = hk.HyperNetwork(net.targets, {"rank": 2, "width": 64, "depth": 1})
        ht.pretrain_encoder(fresh, data, 3, t.Generator().manual_seed(5), img_size=32)
    for (k, a), (_k, b) in zip(net.module.encoder.state_dict().items(), fresh.encoder.state_dict().items()):
        assert t.equal(a, b), k
