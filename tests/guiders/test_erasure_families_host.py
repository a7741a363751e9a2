"""GL_ConceptErase and GL_ConceptEraseTrain on the families beyond SD1: tiny SDXL, SD3 and Flux models with the
host's own text-encoder classes (SDXLClipModel; SD3ClipModel with CLIP-L, CLIP-G and T5; FluxClipModel with
CLIP-L and T5), shrunk. What is checked: which weights are edited, that the erased prompt's states reach the
alternative through them, that preserved prompts and (with protect_uncond) the unconditional prediction stay,
batch-2 sampling, the untouched input model, the LoRA round trip and the clear errors."""
from __future__ import annotations

import math

import pytest
import torch

from erasure_hooks import check_hooks_case, hooks_case
from hostutil import encode
from hostutil import original_weights, run

EDITED = {
    "sdxl": None,                                   # every attn2 K/V: counted from the model
    "sd3": {"diffusion_model.context_embedder.weight", "diffusion_model.y_embedder.mlp.0.weight"},
    "flux": {"diffusion_model.txt_in.weight", "diffusion_model.vector_in.in_layer.weight"},
}


def _family(er, model, clip):
    return er.family_of(model, "K+V", clip)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_edited_weights_map_the_erased_states_to_the_alternative(er, text_model, family):
    model, clip = text_model(family)
    before = original_weights(model)
    m, edit = er.concept_erase(model, clip, erase="dog", alternative="cat", preserve="tree; house", lam=0.01,
                               protect_uncond=False)
    expected = EDITED[family] or {k for k in model.model_state_dict() if k.endswith(("attn2.to_k.weight",
                                                                                      "attn2.to_v.weight"))}
    assert set(edit.deltas) == expected and len(expected) >= 2
    fam = _family(er, model, clip)
    e, a = er.encode_text(clip, "dog", fam), er.encode_text(clip, "cat", fam)
    pairs = er.positions("last_content", e, a)
    assert len(pairs) == len(fam.layout)                       # one paired token per part of the sequence
    state = m.model_state_dict()
    for key, delta in edit.deltas.items():
        w = er.effective_weight(model, key, state)
        new = er.effective_weight(m, key, state)
        torch.testing.assert_close(new, w + delta, rtol=1e-3, atol=1e-4)
        if key == fam.pooled_key:
            cols = [(e.pooled, a.pooled)]
            kept = [er.encode_text(clip, p, fam).pooled for p in ("tree", "house")]
        else:
            cols = [(e.states[i], a.states[j]) for i, j in pairs]
            kept = []
            for p in ("tree", "house"):
                t = er.encode_text(clip, p, fam)
                kept += [t.states[i] for i, _j in er.positions("last_content", t, t)]
        for ce, ca in cols:
            gap_before = torch.linalg.vector_norm(w @ ce - w @ ca)
            gap_after = torch.linalg.vector_norm(new @ ce - w @ ca)
            assert gap_after < 0.1 * gap_before, (key, float(gap_after), float(gap_before))
        for cp in kept:
            moved = torch.linalg.vector_norm((new - w) @ cp) / torch.linalg.vector_norm(w @ cp)
            assert moved < 0.1, (key, float(moved))
    pos, neg = encode(clip, "a photo of a dog"), encode(clip, "")
    base = run(model, pos, neg, 4.0, batch=2)
    out = run(m, pos, neg, 4.0, batch=2)
    assert out.shape[0] == 2 and torch.isfinite(out).all() and not torch.allclose(out, base)
    assert torch.equal(run(model, pos, neg, 4.0, batch=2), base)
    assert all(torch.equal(v, before[k]) for k, v in original_weights(model).items())


def test_sd3_sequence_is_clip_then_t5(er, text_model):
    model, clip = text_model("sd3")
    fam = _family(er, model, clip)
    assert fam.layout == ("clip", "t5")
    t = er.encode_text(clip, "a dog", fam)
    # CLIP chunk: start token, 2 content tokens, 77 long; T5 after it: no start token, 3 content tokens
    # (T5 splits "a dog" into '▁', 'a', '▁dog'), padded to 77
    assert t.segments == [(0, 1, 2, 77), (77, 0, 3, 77)] and t.states.shape == (154, 4096)
    assert t.pooled.shape == (64,)
    # paired with "": CLIP's last content token with the start token, T5's with the end token
    assert er.positions("last_content", t, er.encode_text(clip, "", fam)) == [(2, 0), (77 + 2, 77 + 0)]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_protect_uncond_keeps_the_unconditional_prediction(er, text_model, family):
    model, clip = text_model(family)
    empty = encode(clip, "")
    base = run(model, empty, empty, 1.0, steps=3)
    kwargs = dict(erase="dog", alternative="cat", token_mode="all_content", erase_scale=4.0)
    kept, edit = er.concept_erase(model, clip, protect_uncond=True, **kwargs)
    free, _edit = er.concept_erase(model, clip, protect_uncond=False, **kwargs)
    rel_kept = float((run(kept, empty, empty, 1.0, steps=3) - base).abs().max() / base.abs().max())
    rel_free = float((run(free, empty, empty, 1.0, steps=3) - base).abs().max() / base.abs().max())
    assert rel_kept <= 1e-5 and rel_free > 1e-4, (rel_kept, rel_free)
    assert any(float(d.abs().max()) > 0 for d in edit.deltas.values())


def test_flux_lora_export_reloads_through_the_core_loader(er, text_model, tmp_path):
    import comfy.sd
    import comfy.utils
    model, clip = text_model("flux")
    erased, edit = er.concept_erase(model, clip, erase="dog", alternative="cat", protect_uncond=False,
                                    templates="object", strength=0.7)
    path, err = er.save_lora(edit, "flux_erase", energy=1.0, folder=str(tmp_path))
    assert err < 1e-5
    sd, meta = comfy.utils.load_torch_file(str(path), return_metadata=True)
    assert meta["family"] == "Flux"
    loaded, _clip = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0.0)
    assert set(loaded.patches) >= set(edit.deltas)
    pos, neg = encode(clip, "a dog"), encode(clip, "")
    torch.testing.assert_close(run(loaded, pos, neg, 3.0), run(erased, pos, neg, 3.0), rtol=1e-3, atol=1e-3)


def test_mmdit_errors_name_the_fix(er, text_model, tiny, clip64):
    sd3, sd3_clip = text_model("sd3")
    _flux, flux_clip = text_model("flux")
    with pytest.raises(ValueError, match=r"GL_ConceptErase: targets 'K only' splits cross-attention K and V, which "
                                         r"SD3 does not have.*choose K\+V"):
        er.concept_erase(sd3, sd3_clip, erase="dog", targets="K only")
    with pytest.raises(ValueError, match=r"GL_ConceptErase: the CLIP gives 256 token states .* where a SD3 text "
                                         r"encoder gives 333 \(clip \+ t5\).*connect the text encoder"):
        er.concept_erase(sd3, flux_clip, erase="dog")
    with pytest.raises(ValueError, match=r"GL_ConceptErase: the CLIP gives no T5 tokens, which this model reads: "
                                         r"connect the text encoder"):
        er.concept_erase(tiny("flux"), clip64, erase="dog")
    with pytest.raises(ValueError, match=r"the CLIP gives 154 token states .* where a Flux text encoder gives 77 "
                                         r"\(t5\)"):
        er.concept_erase(tiny("flux"), sd3_clip, erase="dog")


@pytest.fixture(scope="module")
def ert(host):
    return host.pack("guiders.erasure_train")


@pytest.mark.parametrize("family,trainable,pattern", [
    ("flux", "auto", r"^diffusion_model\.double_blocks\.\d+\.txt_attn\.qkv\.weight$"),
    ("sd3", "text input (SD3/Flux)", r"^diffusion_model\.(context_embedder|y_embedder\.mlp\.0)\.weight$"),
])
def test_fine_tuning_on_flow_transformers(ert, text_model, family, trainable, pattern):
    import re
    model, clip = text_model(family)
    before = original_weights(model)
    with torch.inference_mode():
        m, edit = ert.train_erasure(model, clip, {"samples": torch.zeros(1, 3, 16, 16)}, erase="dog",
                                    alternative="cat", steps=40, learning_rate=1e-3, batch=2, trajectories=2,
                                    trajectory_steps=6, trainable=trainable, seed=0)
    hist = edit.metadata["loss_history"]
    assert all(math.isfinite(v) for row in hist for v in row[1:]) and hist[-1][1] < hist[0][1], hist
    assert edit.deltas and all(re.match(pattern, k) for k in edit.deltas)
    assert all(torch.equal(v, before[k]) for k, v in original_weights(model).items())
    pos, neg = encode(clip, "a dog"), encode(clip, "")
    out = run(m, pos, neg, 3.0, batch=2)
    assert torch.isfinite(out).all() and not torch.allclose(out, run(model, pos, neg, 3.0, batch=2))


def test_fine_tuning_refuses_a_unet_choice_on_flux(ert, text_model):
    model, clip = text_model("flux")
    with pytest.raises(ValueError, match=r"GL_ConceptEraseTrain: trainable 'attn2 k/v' names UNet cross-attention, "
                                         r"which Flux does not have"):
        ert.train_erasure(model, clip, {"samples": torch.zeros(1, 3, 16, 16)}, erase="dog", trainable="attn2 k/v")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_hooks_erase_the_hooked_prompt_and_keep_the_unconditional_branch_bit_identical(er, text_model, family):
    model, clip = text_model(family)
    check_hooks_case(*hooks_case(er, model, clip, "a dog", erase="dog", alternative="cat",
                                 token_mode="all_content", erase_scale=4.0, protect_uncond=False))
