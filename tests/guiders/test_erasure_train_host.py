"""GL_ConceptEraseTrain's code (guiders/erasure_train.py) in the real host on the demo model (SD1-style EPS UNet)
and a tiny V-prediction SD1.5-like UNet: the loss falls, only the adapters learn, the input model and the shared
modules are left as they were (also after an interruption), the export reloads, bad input is refused clearly."""
from __future__ import annotations

import math

import pytest
import torch

from erasure_hooks import check_hooks_case, edit_hooks_case
from hostutil import encode
from hostutil import original_weights, run


@pytest.fixture(scope="module")
def ert(host):
    return host.pack("guiders.erasure_train")


def _latent(channels=3, size=32):
    return {"samples": torch.zeros(1, channels, size, size)}


def _no_weight_functions(patcher) -> bool:
    return all(not getattr(m, "weight_function", []) for m in patcher.model.diffusion_model.modules())


@pytest.fixture(scope="module")
def trained(ert, demo_model):
    patcher, clip, _vae = demo_model
    before = original_weights(patcher)
    pos, neg = encode(clip, "a red circle"), encode(clip, "")
    out_before = run(patcher, pos, neg, 5.0)
    with torch.inference_mode():             # as a node runs
        m, edit = ert.train_erasure(patcher, clip, _latent(), erase="circle", alternative="square",
                                    preserve="triangle", steps=60, learning_rate=3e-3, batch=2, trajectories=2,
                                    trajectory_steps=8, seed=1)
    return m, edit, before, out_before


def test_losses_are_finite_and_the_guidance_loss_falls(trained):
    _m, edit, _before, _out = trained
    hist = edit.metadata["loss_history"]
    assert [row[0] for row in hist] == [0, 25, 50, 60]          # probe losses: before training, every 25, last
    assert all(math.isfinite(v) for row in hist for v in row[1:])
    assert hist[0][2] == 0.0 and hist[0][3] == 0.0          # adapters start at zero: no drift before step 1
    assert hist[-1][1] < hist[0][1], hist


def test_only_adapters_learn_and_the_input_model_is_untouched(trained, demo_model):
    m, edit, before, out_before = trained
    patcher, clip, _vae = demo_model
    assert all(torch.equal(v, before[k]) for k, v in original_weights(patcher).items())
    assert all(not p.requires_grad and p.grad is None for p in patcher.model.parameters())
    assert _no_weight_functions(patcher)
    pos, neg = encode(clip, "a red circle"), encode(clip, "")
    assert torch.equal(run(patcher, pos, neg, 5.0), out_before)
    assert not torch.equal(run(m, pos, neg, 5.0), out_before)
    keys = set(edit.deltas)
    assert keys and all(".attn2.to_" in k for k in keys)
    assert {k.rsplit(".attn2.", 1)[1] for k in keys} == {"to_q.weight", "to_k.weight", "to_v.weight",
                                                          "to_out.0.weight"}
    assert all(torch.linalg.matrix_rank(d) <= 8 for d in edit.deltas.values())


def test_trained_erasure_through_hooks_keeps_the_unconditional_branch_bit_identical(trained, er, demo_model):
    """GL_ConceptEraseTrain's hooks output: the trained ΔW reaches only the hooked prompt's calls, so the training's
    unconditional drift does not reach the negative branch (batch 2, 3 steps, cfg 5)."""
    m, edit, _before, _out = trained
    patcher, clip, _vae = demo_model
    check_hooks_case(*edit_hooks_case(er, patcher, clip, "a red circle", m, edit))


def test_trained_erasure_exports_as_a_lora(trained, er, demo_model, tmp_path):
    import comfy.sd
    import comfy.utils
    m, edit, _before, _out = trained
    patcher, clip, _vae = demo_model
    path, err = er.save_lora(edit, "trained", rank=8, folder=str(tmp_path))
    assert err < 1e-4
    sd = comfy.utils.load_torch_file(str(path))
    loaded, _c = comfy.sd.load_lora_for_models(patcher, None, sd, 1.0, 0.0)
    pos, neg = encode(clip, "a red circle"), encode(clip, "")
    torch.testing.assert_close(run(loaded, pos, neg, 5.0), run(m, pos, neg, 5.0), rtol=1e-3, atol=1e-3)


def test_v_prediction_model_trains_with_batch_two(ert, tiny, clip64):
    clip = clip64
    m = tiny("sd15_v")
    with torch.inference_mode():
        out, edit = ert.train_erasure(m, clip, _latent(4, 16), erase="dog", alternative="cat", steps=5, batch=2,
                                      trajectories=2, trajectory_steps=3, trainable="attn2 k/v")
    assert edit.deltas and all(k.endswith(("to_k.weight", "to_v.weight")) for k in edit.deltas)
    pos, neg = encode(clip, "a dog"), encode(clip, "")
    assert torch.isfinite(run(out, pos, neg, 4.0, batch=2)).all()
    assert _no_weight_functions(m)


def test_interrupt_stops_training_and_cleans_up(ert, demo_model):
    import comfy.model_management as mm
    patcher, clip, _vae = demo_model
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException), torch.inference_mode():
            ert.train_erasure(patcher, clip, _latent(), erase="circle", steps=50, trajectories=1,
                              trajectory_steps=3)
    finally:
        mm.interrupt_current_processing(False)
    assert _no_weight_functions(patcher)


def test_bad_inputs_get_clear_errors(ert, demo_model, tiny, clip64):
    patcher, clip, _vae = demo_model
    with pytest.raises(ValueError, match="GL_ConceptEraseTrain: erase is empty"):
        ert.train_erasure(patcher, clip, _latent(), erase=" ")
    with pytest.raises(ValueError, match="latent must be a LATENT"):
        ert.train_erasure(patcher, clip, {"x": 1}, erase="circle")
    with pytest.raises(ValueError, match="alternative has 2 entries for 1"):
        ert.train_erasure(patcher, clip, _latent(), erase="circle", alternative="a; b")
    with pytest.raises(ValueError, match="steps must be at least 1"):
        ert.train_erasure(patcher, clip, _latent(), erase="circle", steps=0)
    with pytest.raises(ValueError, match=r"GL_ConceptEraseTrain: the CLIP gives no T5 tokens, which this model reads"):
        ert.train_erasure(tiny("flux"), clip, _latent(), erase="circle")
    with pytest.raises(ValueError, match=r"GL_ConceptEraseTrain: .*attn2.to_k.weight reads 96-wide inputs but the "
                                         r"CLIP gives 64"):
        ert.train_erasure(patcher, clip64, _latent(), erase="circle")
