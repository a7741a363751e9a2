"""GL_ConceptErase's code (guiders/erasure.py) in the real host: the shipped demo model (SD1-style EPS UNet with
its CLIP), a tiny V-prediction SD1.5-like UNet with a 64-wide random CLIP, and a UNet without cross-attention
(refused). SDXL, SD3 and Flux: test_erasure_families_host.py."""
from __future__ import annotations

import pytest
import torch

from erasure_hooks import check_hooks_case, hooks_case
from hostutil import encode, original_weights, run


def _effective(er, model, key):
    return er.effective_weight(model, key, model.model_state_dict())


def test_the_input_model_is_untouched(er, demo_model):
    patcher, clip, _vae = demo_model
    pos, neg = encode(clip, "a red circle"), encode(clip, "")
    before_w, before = original_weights(patcher), run(patcher, pos, neg, 5.0)
    erased, edit = er.concept_erase(patcher, clip, erase="circle", alternative="square", protect_uncond=False)
    changed = run(erased, pos, neg, 5.0)
    after = run(patcher, pos, neg, 5.0)
    assert torch.equal(before, after)
    assert all(torch.equal(v, before_w[k]) for k, v in original_weights(patcher).items())
    assert not torch.equal(changed, before)
    n_attn2 = sum(1 for k in patcher.model_state_dict() if k.endswith("attn2.to_k.weight"))
    assert n_attn2 >= 4 and len(edit.deltas) == 2 * n_attn2
    assert all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in edit.deltas)


def test_empty_erase_set_is_no_patch_and_strength_zero_is_the_original(er, demo_model):
    patcher, clip, _vae = demo_model
    pos, neg = encode(clip, "a blue circle"), encode(clip, "")
    base = run(patcher, pos, neg, 5.0)
    same, edit = er.concept_erase(patcher, clip, erase=" ; \n")
    assert edit.deltas == {} and same.patches == patcher.patches
    assert torch.equal(run(same, pos, neg, 5.0), base)
    zero, _edit = er.concept_erase(patcher, clip, erase="circle", alternative="square", strength=0.0)
    assert torch.equal(run(zero, pos, neg, 5.0), base)


def test_erased_states_map_to_the_alternative_and_preserved_states_keep_their_outputs(er, demo_model):
    patcher, clip, _vae = demo_model
    m, edit = er.concept_erase(patcher, clip, erase="circle", alternative="square", preserve="triangle; star",
                               lam=0.01, erase_scale=1.0, preserve_scale=1.0, protect_uncond=False)
    c_e, n_e = er.encode(clip, "circle")
    c_a, n_a = er.encode(clip, "square")
    for key, delta in edit.deltas.items():
        w = _effective(er, patcher, key)
        new = _effective(er, m, key)
        torch.testing.assert_close(new, w + delta.float(), rtol=1e-3, atol=1e-4)
        gap_before = torch.linalg.vector_norm(w @ c_e[n_e] - w @ c_a[n_a])
        gap_after = torch.linalg.vector_norm(new @ c_e[n_e] - w @ c_a[n_a])
        assert gap_after < 0.05 * gap_before, key
        for kept in ("triangle", "star"):
            c_p, n_p = er.encode(clip, kept)
            moved = torch.linalg.vector_norm((new - w) @ c_p[n_p]) / torch.linalg.vector_norm(w @ c_p[n_p])
            assert moved < 0.05, (key, kept, float(moved))


def test_protect_uncond_keeps_the_unconditional_prediction(er, demo_model):
    patcher, clip, _vae = demo_model
    empty = encode(clip, "")
    base = run(patcher, empty, empty, 1.0, steps=3)           # cfg 1 with "": only the unconditional branch
    kwargs = dict(erase="circle", alternative="square", token_mode="all", erase_scale=4.0)
    kept, edit = er.concept_erase(patcher, clip, protect_uncond=True, **kwargs)
    free, _edit = er.concept_erase(patcher, clip, protect_uncond=False, **kwargs)
    rel_kept = float((run(kept, empty, empty, 1.0, steps=3) - base).abs().max() / base.abs().max())
    rel_free = float((run(free, empty, empty, 1.0, steps=3) - base).abs().max() / base.abs().max())
    assert rel_kept <= 1e-5 and rel_free > 1e-4, (rel_kept, rel_free)
    assert 0 < edit.metadata["protected_dims"] <= 96 and 0 < edit.metadata["erase_norm_kept"] < 1


def test_stacked_edits_are_solved_on_the_effective_weights(er, demo_model):
    patcher, clip, _vae = demo_model
    first, e1 = er.concept_erase(patcher, clip, erase="circle", alternative="square", protect_uncond=False)
    second, e2 = er.concept_erase(first, clip, erase="star", alternative="cross", protect_uncond=False)
    key = next(iter(e1.deltas))
    assert len(second.patches[key]) == 2 and key not in patcher.patches
    torch.testing.assert_close(_effective(er, second, key),
                               _effective(er, patcher, key) + e1.deltas[key] + e2.deltas[key], rtol=1e-3, atol=1e-4)
    # solved against W + ΔW₁: the same edit solved on the original weights differs
    _m, alone = er.concept_erase(patcher, clip, erase="star", alternative="cross", protect_uncond=False)
    assert not torch.allclose(alone.deltas[key], e2.deltas[key])


def test_the_edit_does_not_depend_on_which_clone_was_loaded_last(er, demo_model):
    patcher, clip, _vae = demo_model
    _m, before = er.concept_erase(patcher, clip, erase="star", alternative="cross", protect_uncond=False)
    first, _e = er.concept_erase(patcher, clip, erase="circle", alternative="square", protect_uncond=False)
    run(first, encode(clip, "a star"), encode(clip, ""), 5.0)        # loads `first`: its patches go in place
    _m, after = er.concept_erase(patcher, clip, erase="star", alternative="cross", protect_uncond=False)
    assert all(torch.allclose(before.deltas[k], after.deltas[k], rtol=1e-5, atol=1e-7) for k in before.deltas)


def test_lora_export_reloads_through_the_core_loader(er, demo_model, tmp_path):
    import comfy.sd
    import comfy.utils
    patcher, clip, _vae = demo_model
    erased, edit = er.concept_erase(patcher, clip, erase="circle", alternative="square", strength=0.8,
                                    token_mode="all_content", templates="object")
    path, err = er.save_lora(edit, "erase_test", energy=1.0, folder=str(tmp_path))
    assert path.is_file() and path.suffix == ".safetensors" and err < 1e-5
    sd, meta = comfy.utils.load_torch_file(str(path), return_metadata=True)
    assert meta["guidance_lab"] == "concept_erase" and "circle" in meta["settings"]
    loaded, _clip = comfy.sd.load_lora_for_models(patcher, None, sd, 1.0, 0.0)
    for key in edit.deltas:
        torch.testing.assert_close(_effective(er, loaded, key), _effective(er, erased, key), rtol=1e-4, atol=1e-5)
    pos, neg = encode(clip, "a red circle"), encode(clip, "")
    torch.testing.assert_close(run(loaded, pos, neg, 5.0), run(erased, pos, neg, 5.0), rtol=1e-3, atol=1e-3)
    # a truncated export reports its error
    _path, err1 = er.save_lora(edit, "erase_test_r1", rank=1, folder=str(tmp_path))
    assert err1 > 1e-3


def test_v_prediction_unet_with_batch_two(er, tiny, clip64):
    m = tiny("sd15_v")
    pos, neg = encode(clip64, "a photo of a dog"), encode(clip64, "")
    base = run(m, pos, neg, 4.0, batch=2)
    erased, edit = er.concept_erase(m, clip64, erase="dog", alternative="cat", templates="object")
    out = run(erased, pos, neg, 4.0, batch=2)
    assert out.shape[0] == 2 and torch.isfinite(out).all() and not torch.equal(out, base)
    assert len(edit.deltas) == 2 * sum(1 for k in m.model_state_dict() if k.endswith("attn2.to_k.weight"))


def test_a_family_without_text_projections_gets_a_clear_error(er, clip64):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    config = comfy.supported_models.SD15({"in_channels": 3, "out_channels": 3, "model_channels": 32,
                                          "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [0],
                                          "transformer_depth_output": [0, 0], "transformer_depth_middle": -1,
                                          "use_spatial_transformer": False,
                                          "context_dim": None, "adm_in_channels": None, "image_size": 32})
    with torch.inference_mode(False):
        model = comfy.model_base.BaseModel(config)
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"GL_ConceptErase: the model \(BaseModel\) has no UNet cross-attention "
                                         r"K/V projections .* is not SD3 or Flux"):
        er.concept_erase(patcher, clip64, erase="dog")


def test_bad_inputs_get_clear_errors(er, demo_model, tiny, clip64):
    patcher, clip, _vae = demo_model
    with pytest.raises(ValueError, match="connect the CLIP"):
        er.concept_erase(patcher, None, erase="circle")
    with pytest.raises(ValueError, match="alternative has 2 entries for 3"):
        er.concept_erase(patcher, clip, erase="a; b; c", alternative="x; y")
    with pytest.raises(ValueError, match="longer than one text-encoder chunk"):
        er.concept_erase(patcher, clip, erase="circle " * 80)
    with pytest.raises(ValueError, match="custom_templates needs one template per line"):
        er.concept_erase(patcher, clip, erase="circle", templates="custom", custom_templates="a photo")
    with pytest.raises(ValueError, match="attn2.to_k.weight reads 96-wide inputs but the CLIP gives 64"):
        er.concept_erase(patcher, clip64, erase="circle")
    with pytest.raises(ValueError, match="targets 'Q'"):
        er.concept_erase(patcher, clip, erase="circle", targets="Q")
    with pytest.raises(ValueError, match="token mode 'first'"):
        er.concept_erase(patcher, clip, erase="circle", token_mode="first")
    _m, empty = er.concept_erase(patcher, clip, erase="")
    with pytest.raises(ValueError, match="GL_SaveErasureLoRA: the erasure is empty"):
        er.save_lora(empty, "x")


def test_hooks_erase_the_hooked_prompt_and_keep_the_unconditional_branch_bit_identical(er, demo_model):
    patcher, clip, _vae = demo_model
    before = original_weights(patcher)
    check_hooks_case(*hooks_case(er, patcher, clip, "a red circle", erase="circle", alternative="square",
                                 token_mode="all", erase_scale=4.0, protect_uncond=False))
    assert all(torch.equal(v, before[k]) for k, v in original_weights(patcher).items())


def test_an_empty_erasure_has_no_hooks(er, demo_model):
    patcher, clip, _vae = demo_model
    _m, edit = er.concept_erase(patcher, clip, erase="")
    assert er.erasure_hooks(edit, patcher) is None
