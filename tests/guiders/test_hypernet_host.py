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


def test_half_storage_halves_the_file_and_loads_back_as_float32(hn, tmp_path):
    """save(half=True): float16 on disk, half the bytes; the loaded network is float32 and predicts the shipped
    file's weight updates to float16 rounding."""
    from pathlib import Path

    from safetensors import safe_open
    net = hn.load(Path(__file__).resolve().parents[2] / "demo" / "weights" / "demo_hypernet.safetensors")
    full, half = hn.save(net, tmp_path / "f.safetensors"), hn.save(net, tmp_path / "h.safetensors", half=True)
    with safe_open(str(half), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert 0.49 < half.stat().st_size / full.stat().st_size < 0.52
    back = hn.load(half)
    assert all(p.dtype == torch.float32 for p in back.module.parameters())
    assert back.module.config == net.module.config and back.info == net.info
    pics = hn.subject_images(_images(), net.module.config["image_size"])
    want, got = hn.hk.deltas(net.module(pics[None])), hn.hk.deltas(back.module(pics[None]))
    assert set(got) == set(want)
    for key in want:
        err = float((got[key] - want[key]).norm() / want[key].norm())
        assert 0 < err < 5e-3, (key, err)


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
    assert all(len(row) == 4 for row in hist) and hist[0][3] == hist[0][1]     # ΔW = 0: the references can't matter
    assert hist[-1][3] != hist[-1][1]                  # trained: another subject's references give another loss
    assert all(math.isfinite(v) for row in hist for v in row[1:])
    assert hist[-1][1] < hist[0][1], hist
    assert all(torch.equal(v, before[k]) for k, v in original_weights(patcher).items())
    assert all(not getattr(m, "weight_function", []) for m in patcher.model.diffusion_model.modules())
    assert all(not p.requires_grad for p in net.module.parameters())


def test_reference_contrast_changes_the_update_and_is_recorded(ht, demo_model):
    """λ > 0 adds the swapped-reference hinge: one step from the same seed and draw gives other weights (the other
    subject is drawn after the step's own draw, so only the hinge can differ); the setting is in the metadata."""
    patcher, clip, vae = demo_model
    kw = dict(steps=1, rank=2, width=32, depth=1, subjects_per_step=1, ref_images=1, target_images=2, seed=6)
    with torch.inference_mode():
        plain = ht.train_hypernet(patcher, clip, vae, **kw)
        contrast = ht.train_hypernet(patcher, clip, vae, reference_contrast=1.0, contrast_margin=0.2, **kw)
    assert "reference_contrast" not in plain.info
    assert contrast.info["reference_contrast"] == 1.0 and contrast.info["contrast_margin"] == 0.2
    assert all(math.isfinite(v) for row in contrast.info["loss_history"] for v in row[1:])
    sd_p, sd_c = plain.module.state_dict(), contrast.module.state_dict()
    assert any(not torch.equal(sd_p[k], sd_c[k]) for k in sd_p)
    with pytest.raises(ht.hn_mod.HypernetError, match=r"GL_HypernetworkTrain: reference_contrast \(-1.0\)"):
        ht.train_hypernet(patcher, clip, vae, reference_contrast=-1.0, **kw)


def test_x0_loss_space_changes_the_loss_and_is_recorded(ht, demo_model):
    """loss_space "x0" weighs ‖D − x0‖² alike at every σ: the probe loss of an untrained ΔW (= 0, the base model) is
    then another number than the native Min-SNR-weighted one, the update differs, the setting is recorded; an unknown
    space is refused by name."""
    patcher, clip, vae = demo_model
    kw = dict(steps=1, rank=2, width=32, depth=1, subjects_per_step=1, ref_images=1, target_images=2, seed=6)
    with torch.inference_mode():
        native = ht.train_hypernet(patcher, clip, vae, **kw)
        x0 = ht.train_hypernet(patcher, clip, vae, loss_space="x0", **kw)
    assert "loss_space" not in native.info and x0.info["loss_space"] == "x0"
    h_n, h_x = native.info["loss_history"][0], x0.info["loss_history"][0]
    assert h_n[2] == h_x[2] == 0.0 and h_n[1] != h_x[1]      # same draws, ΔW = 0: only the weighting differs
    sd_n, sd_x = native.module.state_dict(), x0.module.state_dict()
    assert any(not torch.equal(sd_n[k], sd_x[k]) for k in sd_n)
    with pytest.raises(ht.hn_mod.HypernetError, match=r"GL_HypernetworkTrain: loss_space 'eps'.*native, x0"):
        ht.train_hypernet(patcher, clip, vae, loss_space="eps", **kw)


def test_resume_continues_and_counts_steps(ht, trained, demo_model):
    net, _before = trained
    patcher, clip, vae = demo_model
    with torch.inference_mode():
        more = ht.train_hypernet(patcher, clip, vae, steps=2, subjects_per_step=1, ref_images=1, target_images=2,
                                 resume=net, seed=4)
    assert more.info["steps"] == 52 and more.module.config == net.module.config
    assert more.module is not net.module


def test_subject_query_resume_adds_the_path_at_zero_and_round_trips(ht, trained, demo_model, tmp_path):
    """Resuming a network without the subject-query path adds it zero-initialised: the first probe (same seed, so
    the same four draws) equals the resumed network's last one exactly; the file keeps the setting and needs the
    pretraining head it now reads."""
    net, _before = trained
    patcher, clip, vae = demo_model
    with torch.inference_mode():
        more = ht.train_hypernet(patcher, clip, vae, steps=1, subjects_per_step=1, ref_images=2, target_images=4,
                                 resume=net, seed=3, subject_query=True)
    assert not net.module.config["subject_query"] and more.module.config["subject_query"]
    assert more.info["loss_history"][0][1:] == net.info["loss_history"][-1][1:]
    path = ht.hn_mod.save(more, tmp_path / "sq.safetensors")
    back = ht.hn_mod.load(path)
    assert back.module.config["subject_query"]
    assert all(torch.equal(v, back.module.state_dict()[k]) for k, v in more.module.state_dict().items())
    import comfy.utils
    sd, meta = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    comfy.utils.save_torch_file({k: v for k, v in sd.items() if not k.startswith("project.")},
                                str(tmp_path / "headless.safetensors"), metadata=meta)
    with pytest.raises(ht.hn_mod.HypernetError, match=r"does not match its own metadata \(missing \['project"):
        ht.hn_mod.load(tmp_path / "headless.safetensors")


def _subject_folder(root, size: tuple[int, int], subjects: int = 2, images: int = 3) -> None:
    """`subjects` sub-folders of `images` random RGB images of `size` (H, W), each with the caption "a dog"."""
    from PIL import Image
    import numpy as np
    for s in range(subjects):
        sub = root / f"subject{s}"
        sub.mkdir()
        (sub / "caption.txt").write_text("a dog")
        for i in range(images):
            arr = (np.random.default_rng(10 * s + i).random((*size, 3)) * 255).astype("uint8")
            Image.fromarray(arr).save(sub / f"{i}.png")


def _train_from_folder(ht, model, clip, folder, size: tuple[int, int]):
    """Three training steps on a folder of two random subjects; checks the shared weights were left as they were.
    Returns (the trained hypernetwork, the pixel-space VAE used)."""
    import comfy.sd
    _subject_folder(folder, size)
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    before = original_weights(model)
    with torch.inference_mode():
        net = ht.train_hypernet(model, clip, vae, source="folder", folder=str(folder), layers="attention", rank=2,
                                width=32, depth=1, steps=3, subjects_per_step=2, ref_images=2, target_images=2,
                                resolution=16, seed=0)
    assert net.info["subjects"] == 2 and len(net.info["loss_history"]) == 2
    assert all(math.isfinite(v) for row in net.info["loss_history"] for v in row[1:])
    assert all(torch.equal(v, before[k]) for k, v in original_weights(model).items())
    return net, vae


def test_training_on_flux_from_a_folder(ht, text_model, tmp_path):
    model, clip = text_model("flux")
    net, vae = _train_from_folder(ht, model, clip, tmp_path, (24, 24))
    assert net.family == "Flux"
    with pytest.raises(Exception, match=r"GL_HypernetworkTrain: folder .* is not a directory"):
        ht.train_hypernet(model, clip, vae, source="folder", folder=str(tmp_path / "nope"))
    with pytest.raises(Exception, match="connect the model's CLIP"):
        ht.train_hypernet(model, None, vae)


def test_training_on_sd3_from_a_folder_then_personalizing_batch_two(ht, hn, text_model, tmp_path):
    """SD3 (MMDiT, flow): training reaches the joint blocks' attention and leaves the model clean; the trained
    file personalizes a batch of two, and zero strength gives the base model."""
    model, clip = text_model("sd3")
    before = original_weights(model)
    net, _vae = _train_from_folder(ht, model, clip, tmp_path, (20, 28))
    assert net.family == "SD3" and net.targets and all(".joint_blocks." in t.key for t in net.targets)
    pos, neg = encode(clip, "a dog"), encode(clip, "")
    base = run(model, pos, neg, 3.0, batch=2)
    zero, _hooks, _lora = hn.personalize(model, _images(2, 32, 32), net, strength=0.0)
    assert torch.equal(run(zero, pos, neg, 3.0, batch=2), base)
    m, _hooks, lora = hn.personalize(model, _images(2, 32, 32), net, strength=1.0)
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if k.endswith("lora_up.weight"))  # B moved off 0
    out = run(m, pos, neg, 3.0, batch=2)
    assert out.shape[0] == 2 and torch.isfinite(out).all() and not torch.equal(out, base)
    assert all(torch.equal(v, before[k]) for k, v in original_weights(model).items())


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


# ------------------------------------------------------------------ encoder clip_vision (ComfyUI's CLIP_VISION)
# A tiny random-weight CLIP ViT from the host's own classes (guiders/tiny_models.build_clip_vision): 32×32 input,
# patch 8, hidden width 32, so its penultimate hidden states are 1 + 16 = 17 tokens × 32. Random weights: these
# tests prove the plumbing (shapes, checks, training mechanics), not that CLIP features help.

@pytest.fixture(scope="module")
def vision(host):
    tm = host.pack("guiders.tiny_models")
    with torch.inference_mode():                 # as CLIPVisionLoader builds it inside the executor
        return tm.build_clip_vision(32, seed=5)


def _untrained_cv(hn, model, layers="attention", nonzero=True, seed=0, feature_dim=32, feature_tokens=17, **cfg):
    return _untrained(hn, model, layers, nonzero, seed, encoder="clip_vision", feature_dim=feature_dim,
                      feature_tokens=feature_tokens, **cfg)


class _Counting:
    """A CLIP_VISION stand-in that forwards to a real one and counts the images it encodes."""

    def __init__(self, cv):
        self.cv, self.image_size, self.images = cv, cv.image_size, 0

    def encode_image(self, image, crop=True):
        self.images += image.shape[0]
        return self.cv.encode_image(image, crop=crop)


def test_clip_vision_features_are_the_penultimate_hidden_states(hn, vision):
    imgs = torch.cat([_images(3, 40, 48), torch.ones(3, 40, 48, 1)], -1)          # RGBA: alpha dropped
    with torch.inference_mode():                                                  # as inside the executor
        feats = hn.clip_vision_features(vision, imgs, chunk=2)                    # two chunks
        out = vision.encode_image(imgs[..., :3], crop=True)
    assert feats.shape == (3, 17, 32) and feats.dtype == torch.float32
    assert not feats.is_inference() and not feats.requires_grad                   # usable by autograd in training
    torch.testing.assert_close(feats, out.penultimate_hidden_states.float())
    assert not torch.allclose(feats, out.last_hidden_state.float())               # not the last layer's states
    with torch.enable_grad():                                        # outside inference mode: its own no_grad
        torch.testing.assert_close(hn.clip_vision_features(vision, imgs), feats)


def test_clip_vision_hypernetwork_on_the_demo_model(hn, demo_model, vision):
    patcher, clip, _vae = demo_model
    pos, neg = encode(clip, "a red circle"), encode(clip, "")
    before = original_weights(patcher)
    base = run(patcher, pos, neg, 5.0, batch=2)
    m, _hooks, lora = hn.personalize(patcher, _images(), _untrained_cv(hn, patcher, nonzero=False),
                                     clip_vision=vision)
    assert all(float(v.abs().max()) == 0 for k, v in lora.items() if k.endswith("lora_up.weight"))
    assert torch.equal(run(m, pos, neg, 5.0, batch=2), base)                        # untrained: ΔW = 0
    net = _untrained_cv(hn, patcher)
    zero, _hooks, _lora = hn.personalize(patcher, _images(), net, strength=0.0, clip_vision=vision)
    assert torch.equal(run(zero, pos, neg, 5.0, batch=2), base)                     # strength 0: bit for bit
    full, hooks, _lora = hn.personalize(patcher, _images(), net, clip_vision=vision)
    out = run(full, pos, neg, 5.0, batch=2)
    assert out.shape[0] == 2 and torch.isfinite(out).all() and not torch.allclose(out, base)
    other, _hooks, _lora = hn.personalize(patcher, _images(seed=9), net, clip_vision=vision)
    assert not torch.allclose(run(other, pos, neg, 5.0, batch=2), out)             # the images matter
    assert torch.equal(run(patcher, pos, neg, 5.0, batch=2), base)                  # the input model is untouched
    assert all(torch.equal(v, before[k]) for k, v in original_weights(patcher).items())
    assert not patcher.patches and len(full.patches) == len(net.targets)


def test_clip_vision_hypernetwork_on_flux_batch_two(hn, text_model, vision):
    model, clip = text_model("flux")
    net = _untrained_cv(hn, model)
    m, hooks, _lora = hn.personalize(model, _images(2, 32, 32), net, strength=0.8, clip_vision=vision)
    pos, neg = encode(clip, "a dog"), encode(clip, "")
    base = run(model, pos, neg, 1.0, batch=2)
    patched = run(m, pos, neg, 1.0, batch=2)
    assert patched.shape[0] == 2 and torch.isfinite(patched).all() and not torch.allclose(patched, base)
    import comfy.hooks
    via_hooks = run(model, comfy.hooks.set_hooks_for_conditioning(pos, hooks), neg, 1.0, batch=2)
    torch.testing.assert_close(via_hooks, patched, rtol=1e-4, atol=1e-4)
    zero, _hooks, _lora = hn.personalize(model, _images(2, 32, 32), net, strength=0.0, clip_vision=vision)
    assert torch.equal(run(zero, pos, neg, 1.0, batch=2), base)
    assert torch.equal(run(model, pos, neg, 1.0, batch=2), base)


def test_clip_vision_file_round_trip(hn, demo_model, vision, tmp_path):
    patcher, _clip, _vae = demo_model
    net = _untrained_cv(hn, patcher, rank=3)
    path = hn.save(net, tmp_path / "cv.safetensors")
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        import json
        cfg = json.loads(f.metadata()["config"])
    assert (cfg["encoder"], cfg["feature_dim"], cfg["feature_tokens"]) == ("clip_vision", 32, 17)
    back = hn.load(path)
    assert back.module.reads_features and back.module.config == net.module.config and back.targets == net.targets
    feats = hn.reference_inputs(back, _images(), vision)
    a, b = hn.predict(net, feats), hn.predict(back, feats)
    assert all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)


def test_clip_vision_errors(hn, host, demo_model, vision, caplog):
    patcher, _clip, _vae = demo_model
    net = _untrained_cv(hn, patcher)
    with pytest.raises(hn.HypernetError, match=r"GL_Personalize: the hypernetwork 'test' reads CLIP vision features "
                                               r"\(17 tokens × 32 wide\): connect the CLIP vision model it was "
                                               r"trained with \(CLIPVisionLoader\) to the clip_vision input"):
        hn.personalize(patcher, _images(), net)
    wide = _untrained_cv(hn, patcher, feature_dim=64)                     # as a ViT-H file given a ViT-L model
    with pytest.raises(hn.HypernetError, match=r"GL_Personalize: the hypernetwork 'test' was trained on CLIP vision "
                                               r"features of 17 tokens × 64 wide, but the connected CLIP vision "
                                               r"model gives 17 tokens × 32 wide: connect the CLIP vision model it "
                                               r"was trained with \(ViT-L/14 gives 1024-wide"):
        hn.personalize(patcher, _images(), wide, clip_vision=vision)
    tm = host.pack("guiders.tiny_models")
    with torch.inference_mode():
        coarse = tm.build_clip_vision(32, seed=5, patch_size=16)              # 1 + 4 tokens: another input grid
    with pytest.raises(hn.HypernetError, match=r"gives 5 tokens × 32 wide"):
        hn.personalize(patcher, _images(), net, clip_vision=coarse)
    with pytest.raises(hn.HypernetError, match=r"clip_vision must be a CLIP_VISION model \(CLIPVisionLoader\); got "
                                               r"str"):
        hn.personalize(patcher, _images(), net, clip_vision="clip_vision_g.safetensors")
    with pytest.raises(hn.HypernetError, match=r"subject images of 6×6 pixels are too small \(at least 8×8; the "
                                               r"CLIP vision model reads 32 px\)"):
        hn.personalize(patcher, torch.rand(1, 6, 6, 3), net, clip_vision=vision)
    conv = _untrained(hn, patcher)                                            # a conv file ignores CLIP vision
    with caplog.at_level("WARNING"):
        _m, _h, with_cv = hn.personalize(patcher, _images(), conv, clip_vision=vision)
    assert "has its own image encoder (conv); the connected clip_vision is not used" in caplog.text
    _m, _h, without = hn.personalize(patcher, _images(), conv)
    assert all(torch.equal(with_cv[k], without[k]) for k in without)


@pytest.fixture(scope="module")
def trained_cv(ht, demo_model, vision):
    patcher, clip, vae = demo_model
    before = original_weights(patcher)
    vision_before = {k: v.clone() for k, v in vision.model.state_dict().items()}
    counting = _Counting(vision)
    with torch.inference_mode():
        net = ht.train_hypernet(patcher, clip, vae, steps=25, rank=2, width=64, depth=1, subjects_per_step=2,
                                ref_images=2, target_images=4, learning_rate=2e-3, seed=3, clip_vision=counting)
    return net, before, vision_before, counting.images


def test_clip_vision_training_lowers_the_probe_loss(hn, trained_cv, demo_model, vision):
    net, before, vision_before, encoded = trained_cv
    patcher, _clip, _vae = demo_model
    cfg = net.module.config
    assert (cfg["encoder"], cfg["feature_dim"], cfg["feature_tokens"]) == ("clip_vision", 32, 17)
    assert net.info["encoder"] == "clip_vision"
    hist = net.info["loss_history"]
    assert [row[0] for row in hist] == [0, 25] and hist[0][2] == 0.0               # ΔW = 0 before training
    assert all(math.isfinite(v) for row in hist for v in row[1:])
    assert hist[-1][1] < hist[0][1], hist
    # demo subjects are rendered per draw, so their references are encoded per draw: the shape probe (1 image),
    # the 4 probe draws and 25 steps × 2 subjects, 2 references each
    assert encoded == 1 + (4 + 25 * 2) * 2
    assert all(torch.equal(v, before[k]) for k, v in original_weights(patcher).items())
    assert all(torch.equal(v, vision_before[k]) for k, v in vision.model.state_dict().items())   # frozen
    assert all(not getattr(m, "weight_function", []) for m in patcher.model.diffusion_model.modules())
    m, _hooks, lora = hn.personalize(patcher, _images(), net, clip_vision=vision)
    assert len(m.patches) == len(net.targets)
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if k.endswith("lora_up.weight"))   # trained


def test_clip_vision_resume_and_refusals(ht, trained_cv, demo_model, vision, host):
    net, _before, _vb, _n = trained_cv
    patcher, clip, vae = demo_model
    small = dict(steps=1, subjects_per_step=1, ref_images=1, target_images=1, seed=4)
    with torch.inference_mode():
        more = ht.train_hypernet(patcher, clip, vae, resume=net, clip_vision=vision, **small)
    assert more.info["steps"] == 26 and more.module.config == net.module.config
    with pytest.raises(ht.hn_mod.HypernetError, match=r"GL_HypernetworkTrain: resume 'trained' reads CLIP vision "
                                                      r"features \(17 tokens × 32 wide\): connect the CLIP vision "
                                                      r"model it was trained with"):
        ht.train_hypernet(patcher, clip, vae, resume=net, **small)
    tm = host.pack("guiders.tiny_models")
    with torch.inference_mode():
        coarse = tm.build_clip_vision(32, seed=5, patch_size=16)
    with pytest.raises(ht.hn_mod.HypernetError, match=r"GL_HypernetworkTrain: the hypernetwork 'trained' was trained "
                                                      r"on CLIP vision features of 17 tokens × 32 wide, but the "
                                                      r"connected CLIP vision model gives 5 tokens"):
        ht.train_hypernet(patcher, clip, vae, resume=net, clip_vision=coarse, **small)
    with pytest.raises(ht.hn_mod.HypernetError, match=r"GL_HypernetworkTrain: encoder_pretrain_steps \(3\) pretrains "
                                                      r"the pack's own conv image encoder; .* set "
                                                      r"encoder_pretrain_steps to 0"):
        ht.train_hypernet(patcher, clip, vae, clip_vision=vision, encoder_pretrain_steps=3, **small)


def test_clip_vision_freeze_encoder_and_conv_resume(ht, trained, demo_model, vision, caplog):
    patcher, clip, vae = demo_model
    small = dict(steps=2, subjects_per_step=1, ref_images=1, target_images=1, rank=2, width=64, depth=1, seed=6,
                 learning_rate=1e-2, warmup=1)
    with torch.inference_mode():
        frozen = ht.train_hypernet(patcher, clip, vae, clip_vision=vision, freeze_encoder=True, **small)
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):          # the same seeded initialisation
        torch.manual_seed(6)
        fresh = ht.hk.HyperNetwork(frozen.targets, frozen.module.config)
    for k, v in fresh.encoder.state_dict().items():                               # the projection stayed fixed
        assert torch.equal(frozen.module.encoder.state_dict()[k], v), k
    assert not torch.equal(frozen.module.queries, fresh.queries)                  # the rest trained
    conv, _before = trained                                                        # a conv file ignores CLIP vision
    with caplog.at_level("WARNING"), torch.inference_mode():
        more = ht.train_hypernet(patcher, clip, vae, resume=conv, clip_vision=vision, steps=1, subjects_per_step=1,
                                 ref_images=1, target_images=1, seed=4)
    assert "resume has its own image encoder (conv); the connected clip_vision is not used" in caplog.text
    assert more.module.config["encoder"] == "conv" and more.info["encoder"] == "conv"


def test_clip_vision_training_on_flux_from_a_folder_encodes_each_image_once(ht, text_model, vision, tmp_path):
    from PIL import Image
    import numpy as np
    import comfy.sd
    model, clip = text_model("flux")
    _subject_folder(tmp_path, (40, 48))
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    before = original_weights(model)
    counting = _Counting(vision)
    with torch.inference_mode():
        net = ht.train_hypernet(model, clip, vae, source="folder", folder=str(tmp_path), layers="attention", rank=2,
                                width=32, depth=1, steps=3, subjects_per_step=2, ref_images=2, target_images=2,
                                resolution=16, seed=0, clip_vision=counting)
    assert net.family == "Flux" and net.module.reads_features and net.info["encoder"] == "clip_vision"
    assert counting.images == 1 + 6                         # the shape probe, then each of the 6 images once
    assert all(math.isfinite(v) for row in net.info["loss_history"] for v in row[1:])
    assert all(torch.equal(v, before[k]) for k, v in original_weights(model).items())
    # the folder's full-size images are what the hypernetwork read, as GL_Personalize would read them
    data = ht.FolderSubjects(str(tmp_path), 16, featurize=lambda x: ht.hn_mod.clip_vision_features(vision, x))
    full = torch.from_numpy(np.asarray(Image.open(tmp_path / "subject0" / "0.png"), dtype=np.float32) / 255.0)
    torch.testing.assert_close(data.features[0][0], ht.hn_mod.clip_vision_features(vision, full[None])[0])


def test_direct_lora_fit_lowers_its_loss_and_leaves_the_model_clean(ht, hn, demo_model):
    """fit_lora (a subject's LoRA optimised directly, the ceiling of a hypernetwork): on a demo subject's images the
    probe loss falls, the shared weights stay as they were, and the factors patch a model that then differs."""
    import comfy.lora
    from demo import subjects as sj
    patcher, clip, vae = demo_model
    before = original_weights(patcher)
    images, captions, _labels = sj.images(sj.subject(0), 0, 6, size=32)
    with torch.inference_mode():
        factors, info = ht.fit_lora(patcher, clip, vae, images, captions, layers="cross-attention k/v (UNet)",
                                    rank=2, steps=30, learning_rate=1e-2, batch=3, train_down=False, seed=0)
    assert info["probe_loss"][1] < info["probe_loss"][0], info
    assert set(factors) == {t.key for t in hn.targets_for(patcher, "cross-attention k/v (UNet)")}
    assert all(b.shape[1] == 2 and a.shape[0] == 2 and float(b.abs().max()) > 0 for b, a in factors.values())
    assert all(torch.equal(v, before[k]) for k, v in original_weights(patcher).items())
    assert all(not getattr(m, "weight_function", []) for m in patcher.model.diffusion_model.modules())
    m = patcher.clone()
    patches = comfy.lora.load_lora(hn.lora_state_dict(factors), comfy.lora.model_lora_keys_unet(patcher.model, {}),
                                   log_missing=False)
    assert len(m.add_patches(patches, 1.0)) == len(factors)
    pos, neg = encode(clip, captions[0]), encode(clip, "")
    out, base = run(m, pos, neg, 3.0, batch=2), run(patcher, pos, neg, 3.0, batch=2)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    with pytest.raises(Exception, match=r"fit_lora: images must be \[N, 3, H, W\] with one caption each"):
        ht.fit_lora(patcher, clip, vae, images, captions[:2])
    # fits with a fixed, shared down-projection (weight-space targets): same A, their own B
    with torch.inference_mode():
        one, _ = ht.fit_lora(patcher, clip, vae, images[:3], captions[:3], layers="cross-attention k/v (UNet)",
                             rank=2, steps=2, train_down=False, seed=1, down_seed=0)
        two, _ = ht.fit_lora(patcher, clip, vae, images[3:], captions[3:], layers="cross-attention k/v (UNet)",
                             rank=2, steps=2, train_down=False, seed=2, down_seed=0)
    assert all(torch.equal(one[k][1], two[k][1]) and not torch.equal(one[k][0], two[k][0]) for k in one)


def test_direct_lora_fit_on_flux_batch_of_images(ht, text_model):
    import comfy.sd
    model, clip = text_model("flux")
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    before = original_weights(model)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        factors, info = ht.fit_lora(model, clip, vae, images, ["a dog"] * 3, rank=2, steps=3, batch=2)
    assert factors and all(math.isfinite(v) for v in info["probe_loss"])
    assert all(torch.equal(v, before[k]) for k, v in original_weights(model).items())


def test_weight_space_pretraining_on_fitted_subjects(ht, hn, demo_model, tmp_path):
    """Experimental weight-space pretraining: fitted demo subjects (shared A, own B) round-trip through their file;
    regressing a network onto them lowers its distance to the fitted ΔW (1 at the start: ΔW = 0), the held-out
    subjects are scored but never trained on, the input network is not changed, and other settings are refused."""
    patcher, clip, vae = demo_model
    layers = "cross-attention k/v (UNet)"
    with torch.inference_mode():
        fits = ht.fit_demo_subjects(patcher, clip, vae, [0, 1, 2], layers=layers, rank=2, steps=6, images=4,
                                    learning_rate=3e-2)
    path = ht.save_fits(fits, tmp_path / "fits.safetensors")
    back = ht.load_fits(path)
    assert sorted(back["B"]) == [0, 1, 2] and back["info"]["rank"] == 2
    assert all(torch.equal(back["A"][k], fits["A"][k]) for k in fits["A"])
    assert all(torch.equal(back["B"][i][k], fits["B"][i][k]) for i in fits["B"] for k in fits["A"])
    with pytest.raises(Exception, match="made with other settings"):
        ht.fit_demo_subjects(patcher, clip, vae, [3], layers=layers, rank=2, steps=5, images=4, fits=back)
    net = _untrained(hn, patcher, layers)
    before = {k: v.clone() for k, v in net.module.state_dict().items()}
    out = ht.regress_hypernet(net, back, steps=100, learning_rate=1e-3, subjects_per_step=2, held_out=0.34)
    hist = out.info["weight_space"]["history"]
    assert out.info["weight_space"]["train_subjects"] == 2 and out.info["weight_space"]["held_out_subjects"] == 1
    assert hist[-1][1] < 0.9 * hist[0][1], hist
    assert all(torch.equal(v, before[k]) for k, v in net.module.state_dict().items())
    assert all(not p.requires_grad for p in out.module.parameters())
    bad = {**back, "A": {**back["A"], "diffusion_model.nowhere.weight": torch.zeros(2, 3)}}
    with pytest.raises(Exception, match=r"regress_hypernet: 1 fitted weights are not the network's targets"):
        ht.regress_hypernet(net, bad, steps=1)


def test_batched_fits_match_patched_models_and_lower_every_subjects_loss(ht, hn, demo_model):
    """fit_loras_together (several subjects' LoRAs in one batched forward, shared A): its row hooks give each row
    exactly the output of the model patched with that row's subject LoRA (attention, feed-forward and 3×3
    convolutions); a fit lowers every subject's probe loss, shares fit_lora's A and leaves no hook behind."""
    import comfy.lora
    from demo import subjects as sj
    patcher, clip, vae = demo_model
    layers = "attention + feed-forward + convolutions (UNet)"
    targets = hn.targets_for(patcher, layers)
    assert any(".in_layers.2." in t.key for t in targets)
    before = original_weights(patcher)
    g = torch.Generator().manual_seed(3)
    downs = dict(zip([t.key for t in targets], hn.hk.DirectLoRA(targets, 2, train_down=False, seed=0).downs()))
    ups = {t.key: torch.randn(2, t.out_dim, 2, generator=g) * 0.05 for t in targets}
    images, captions, _labels = sj.images(sj.subject(0), 0, 3, size=32)
    x0 = ht._latent(vae, patcher, images)
    sigma = torch.tensor([2.0, 0.7, 5.0])
    x = x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=g)
    cond = ht.tr.cat_conds([ht.tr.model_conds(patcher.model, clip, clip.tokenize(c), 1, "cpu", x0[:1], "t")
                            for c in captions])
    rows = torch.tensor([0, 1, 0])
    with torch.inference_mode():
        hooks = ht._RowLoRAs(patcher.model.diffusion_model, targets, downs, ups, "test")
        hooks.rows = rows
        with hooks:
            got = patcher.model.apply_model(x, sigma, **cond)
        assert all(not m._forward_hooks for m in patcher.model.diffusion_model.modules())
        keys = comfy.lora.model_lora_keys_unet(patcher.model, {})
        for s in (0, 1):
            m = patcher.clone()
            m.add_patches(comfy.lora.load_lora(hn.lora_state_dict({k: (ups[k][s], downs[k]) for k in ups}), keys,
                                               log_missing=False), 1.0)
            m.patch_model()
            try:
                want = m.model.apply_model(x, sigma, **cond)
            finally:
                m.unpatch_model()
            sel = rows == s
            torch.testing.assert_close(got[sel], want[sel], rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in original_weights(patcher).items())
    # a batched fit of three subjects
    sets = [sj.images(sj.subject(i), 0, 6, size=32)[:2] for i in range(3)]
    with torch.inference_mode():
        a, bs, info = ht.fit_loras_together(patcher, clip, vae, sets, layers=layers, rank=2, steps=30,
                                            learning_rate=1e-2, batch=3, down_seed=0)
        one, _ = ht.fit_lora(patcher, clip, vae, sets[0][0], sets[0][1], layers=layers, rank=2, steps=1,
                             train_down=False, seed=5, down_seed=0)
    assert len(bs) == 3 and all(after < before for before, after in info["probe_loss"]), info["probe_loss"]
    assert all(torch.equal(a[k], one[k][1]) for k in a)
    assert all(not torch.equal(bs[0][k], bs[1][k]) and float(bs[2][k].abs().max()) > 0 for k in a)
    assert all(not m._forward_hooks for m in patcher.model.diffusion_model.modules())
    assert all(torch.equal(v, before[k]) for k, v in original_weights(patcher).items())
    with pytest.raises(Exception, match=r"fit_loras_together: images must be \[N, 3, H, W\] with one caption each"):
        ht.fit_loras_together(patcher, clip, vae, [(sets[0][0], sets[0][1][:2])], layers=layers)
    with torch.inference_mode():
        fits = ht.fit_demo_subjects(patcher, clip, vae, [0, 1, 2], layers="cross-attention k/v (UNet)", rank=2,
                                    steps=3, images=4, parallel=2)
    kv = {t.key for t in hn.targets_for(patcher, "cross-attention k/v (UNet)")}
    assert sorted(fits["B"]) == [0, 1, 2] and set(fits["A"]) == kv and set(fits["B"][2]) == kv
    assert all(not torch.equal(fits["B"][0][k], fits["B"][2][k]) for k in kv)


def test_basis_hypernetwork_from_prototype_fits(ht, hn, demo_model, tmp_path):
    """Basis decoder built from directly fitted prototype subjects: the prototypes are distinct training subjects;
    at a small temperature a prototype's own references give back its fitted ΔW; the file round-trips; it
    personalizes a batch of 2 and resumes end-to-end training; bad inputs get clear errors."""
    from pathlib import Path
    patcher, clip, vae = demo_model
    # the shipped network: an encoder that tells subjects apart
    net = hn.load(Path(__file__).resolve().parents[2] / "demo" / "weights" / "demo_hypernet.safetensors")
    layers = net.layers
    protos = ht.choose_prototypes(net, 3, pool=12)
    assert len(protos) == len(set(protos)) >= 2 and all(0 <= i < 12 for i in protos)
    with torch.inference_mode():
        fits = ht.fit_demo_subjects(patcher, clip, vae, protos, layers=layers, rank=2, steps=4, images=4,
                                    learning_rate=3e-2, parallel=3)
    basis = ht.basis_from_fits(net, fits, protos, temperature=1e-4)
    assert basis.module.config["decoder"] == "basis" and basis.module.config["basis_size"] == len(protos)
    for k, i in enumerate(protos):
        refs = ht._demo_references(net, i, 0, 3)[None]
        c = basis.module.basis_weights(basis.module.encode(refs))
        assert int(c.argmax()) == k and float(c.max()) > 0.99, c
        got = hn.hk.deltas(basis.module(refs))
        for key, a in fits["A"].items():
            torch.testing.assert_close(got[key], fits["B"][i][key] @ a, rtol=2e-2, atol=1e-6)
    path = hn.save(basis, tmp_path / "basis.safetensors")
    back = hn.load(path)
    refs = ht._demo_references(net, protos[0], 5, 3)[None]
    torch.testing.assert_close(hn.hk.deltas(back.module(refs)), hn.hk.deltas(basis.module(refs)))
    pos, neg = encode(clip, "a red circle"), encode(clip, "")
    m, _hooks, _lora = hn.personalize(patcher, refs[0].permute(0, 2, 3, 1), back)
    out, base = run(m, pos, neg, 3.0, batch=2, size=32), run(patcher, pos, neg, 3.0, batch=2, size=32)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    with torch.inference_mode():
        more = ht.train_hypernet(patcher, clip, vae, layers=layers, steps=2, resume=back, subjects=8,
                                 subjects_per_step=1, target_images=2, learning_rate=1e-3, warmup=0)
    assert more.module.config["decoder"] == "basis"
    assert any(not torch.equal(a, b) for a, b in zip(more.module.ups, back.module.ups))
    with pytest.raises(Exception, match="has the basis decoder, which has no decoder queries"):
        ht.train_hypernet(patcher, clip, vae, layers=layers, steps=1, resume=back, subject_query=True)
    with pytest.raises(Exception, match="basis_from_fits: prototypes \\[999\\] have no fitted LoRA"):
        ht.basis_from_fits(net, fits, [999])
    with pytest.raises(Exception, match="temperature must be > 0"):
        ht.basis_from_fits(net, fits, protos, temperature=0)
    with pytest.raises(Exception, match="need 1 <= count <= pool"):
        ht.choose_prototypes(net, 20, pool=12)


def test_basis_builder_on_demo_subjects_is_its_three_parts(ht, hn, demo_model):
    """build_basis (GL_HypernetworkBasis) on demo subjects gives the network of choose_prototypes + fit_demo_subjects
    + basis_from_fits with the same settings, records its source, and leaves the shared weights as they were."""
    from pathlib import Path
    patcher, clip, vae = demo_model
    net = hn.load(Path(__file__).resolve().parents[2] / "demo" / "weights" / "demo_hypernet.safetensors")
    before = original_weights(patcher)
    with torch.inference_mode():
        built = ht.build_basis(patcher, clip, vae, net, subjects=10, prototypes=2, rank=2, fit_steps=3,
                               fit_parallel=2, temperature=0.05, seed=1)
        protos = ht.choose_prototypes(net, 2, pool=10, seed=1)
        fits = ht.fit_demo_subjects(patcher, clip, vae, protos, layers=net.layers, rank=2, steps=3, parallel=2)
    parts = ht.basis_from_fits(net, fits, protos, temperature=0.05)
    assert all(torch.equal(v, before[k]) for k, v in original_weights(patcher).items())
    assert built.info["basis"]["prototypes"] == protos and built.info["basis"]["source"] == "demo subjects"
    assert built.module.config["basis_size"] == 2 and built.module.config["rank"] == 2
    refs = ht._demo_references(net, 11, 0, 3)[None]
    got, want = hn.hk.deltas(built.module(refs)), hn.hk.deltas(parts.module(refs))
    assert set(got) == set(want) and all(float(v.abs().max()) > 0 for v in got.values())
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_basis_builder_from_a_folder_on_flux(ht, hn, text_model, tmp_path):
    """Folder subjects on Flux (flow): the prototypes are sub-folders; at a small temperature each prototype's own
    images pick its own fitted up-projection; the model is left clean; the result personalizes a batch of 2 and
    resumes end-to-end training; too many prototypes get a clear error."""
    import comfy.sd
    model, clip = text_model("flux")
    _subject_folder(tmp_path, (20, 20), subjects=3, images=3)
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    net = _untrained(hn, model, nonzero=False)
    before = original_weights(model)
    with torch.inference_mode():
        basis = ht.build_basis(model, clip, vae, net, source="folder", folder=str(tmp_path), prototypes=2, rank=2,
                               fit_steps=3, fit_learning_rate=3e-2, fit_parallel=1, resolution=16, temperature=1e-3)
    assert all(torch.equal(v, before[k]) for k, v in original_weights(model).items())
    info = basis.info["basis"]
    assert info["source"] == "folder" and len(set(info["prototypes"])) == 2
    assert set(info["prototypes"]) <= {"subject0", "subject1", "subject2"}
    assert basis.family == "Flux" and basis.module.config["decoder"] == "basis"
    assert all(float(up.abs().max()) > 0 for up in basis.module.ups)          # fitted B moved off zero
    data = ht.FolderSubjects(str(tmp_path), 16)
    names = [name for name, _pics, _caps in data.items]
    size = basis.module.config["image_size"]
    for k, name in enumerate(info["prototypes"]):
        inputs = hn.hk.resize_images(data.items[names.index(name)][1], size)[None]
        with torch.no_grad():
            c = basis.module.basis_weights(basis.module.encode(inputs))
        assert int(c.argmax()) == k, c
    pos, neg = encode(clip, "a dog"), encode(clip, "")
    m, _hooks, _lora = hn.personalize(model, _images(2, 32, 32), basis)
    out, base = run(m, pos, neg, 3.0, batch=2), run(model, pos, neg, 3.0, batch=2)
    assert out.shape[0] == 2 and torch.isfinite(out).all() and not torch.equal(out, base)
    with torch.inference_mode():
        more = ht.train_hypernet(model, clip, vae, source="folder", folder=str(tmp_path), resume=basis, steps=1,
                                 subjects_per_step=1, ref_images=2, target_images=1, resolution=16, warmup=0)
    assert more.module.config["decoder"] == "basis" and more.info["steps"] == 1
    with pytest.raises(Exception, match=r"GL_HypernetworkBasis: prototypes \(4\) must not exceed the 3 subject "
                                        r"folders"):
        ht.build_basis(model, clip, vae, net, source="folder", folder=str(tmp_path), prototypes=4)
    with pytest.raises(Exception, match=r"GL_HypernetworkBasis: fit_steps must be at least 1, got 0"):
        ht.build_basis(model, clip, vae, net, source="folder", folder=str(tmp_path), fit_steps=0)
    with pytest.raises(Exception, match=r"GL_HypernetworkBasis: connect a hypernetwork"):
        ht.build_basis(model, clip, vae, None)
    with pytest.raises(Exception, match=r"GL_HypernetworkBasis: connect the model's CLIP \(captions\) and VAE"):
        ht.build_basis(model, clip, None, net, source="folder", folder=str(tmp_path))
    with pytest.raises(Exception, match=r"GL_HypernetworkBasis: source 'web': choose one of demo subjects, folder"):
        ht.build_basis(model, clip, vae, net, source="web")
    with pytest.raises(Exception, match=r"GL_HypernetworkBasis: a saved collection of fits .* demo subjects only"):
        ht.build_basis(model, clip, vae, net, source="folder", folder=str(tmp_path), fits={"A": None, "B": {}})


def test_basis_builder_with_a_clip_vision_hypernetwork(ht, hn, text_model, vision, tmp_path):
    """A clip_vision source network on tiny Flux: the folder subjects' features pick the prototypes and the basis
    keeps the feature encoder (each prototype's own images select its up-projection); without the CLIP vision model,
    or on demo subjects, a clear error."""
    import comfy.sd
    model, clip = text_model("flux")
    _subject_folder(tmp_path, (20, 20), subjects=3, images=3)
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    net = _untrained_cv(hn, model, nonzero=False)
    with torch.inference_mode():
        basis = ht.build_basis(model, clip, vae, net, source="folder", folder=str(tmp_path), prototypes=2, rank=1,
                               fit_steps=1, resolution=16, temperature=1e-3, clip_vision=vision)
    assert basis.module.reads_features and basis.module.config["decoder"] == "basis"
    data = ht.FolderSubjects(str(tmp_path), 16, featurize=lambda im: hn.clip_vision_features(vision, im))
    names = [name for name, _pics, _caps in data.items]
    for k, name in enumerate(basis.info["basis"]["prototypes"]):
        with torch.no_grad():
            c = basis.module.basis_weights(basis.module.encode(data.features[names.index(name)][None]))
        assert int(c.argmax()) == k, c
    with pytest.raises(Exception, match=r"GL_HypernetworkBasis: the hypernetwork 'test' reads CLIP vision features"):
        ht.build_basis(model, clip, vae, net, source="folder", folder=str(tmp_path), prototypes=2)
    with pytest.raises(Exception, match=r"source demo subjects needs a hypernetwork with its own conv encoder"):
        ht.build_basis(model, clip, vae, net, prototypes=2, clip_vision=vision)
