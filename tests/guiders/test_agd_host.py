"""Adapter guidance distillation's apply side (guiders/agd.py) in the real host on the demo model (SD1-style EPS
UNet): adapters on every cross-attention, zero-initialised adapters leave sampling bit-identical, a trained-looking
adapter changes it, one model call per step at cfg 1, the input model untouched, clear errors."""
from __future__ import annotations

import pytest
import torch

from hostutil import count_rows, encode, run


@pytest.fixture(scope="module")
def agd(host):
    return host.pack("guiders.agd")


def test_sites_are_every_cross_attention(agd, demo_model):
    patcher, _clip, _vae = demo_model
    s = agd.sites(patcher)
    n_attn2 = sum(1 for k in patcher.model_state_dict() if k.endswith("attn2.to_q.weight"))
    assert len(s) == n_attn2 == 11
    assert all(ctx == 96 for _w, ctx in s.values()) and {w for w, _c in s.values()} == {64}
    assert "middle.0.0" in s and "input.4.0" in s


def test_zero_adapters_are_the_base_model_and_one_call_per_step(agd, demo_model):
    patcher, clip, _vae = demo_model
    pos, neg = encode(clip, "a red circle"), encode(clip, "")
    base = run(patcher, pos, neg, 1.0, batch=2, steps=4)
    adapters = agd.build_adapters(patcher, hidden=32)
    m = agd.apply_adapters(patcher, adapters, 5.0)
    counted, counter = count_rows(m)
    out = run(counted, pos, neg, 1.0, batch=2, steps=4)
    assert torch.equal(out, base)
    assert counter["rows"] == 2 * 4 and counter["calls"] == 4            # cfg 1: one row per image per step
    with torch.no_grad():
        for a in adapters.values():
            a.out.weight.normal_(std=0.05)
    moved = run(agd.apply_adapters(patcher, adapters, 5.0), pos, neg, 1.0, batch=2, steps=4)
    other_scale = run(agd.apply_adapters(patcher, adapters, 9.0), pos, neg, 1.0, batch=2, steps=4)
    assert not torch.allclose(moved, base) and not torch.allclose(moved, other_scale)
    assert torch.equal(run(patcher, pos, neg, 1.0, batch=2, steps=4), base)        # the input model is untouched


def test_mismatched_models_get_clear_errors(agd, demo_model, tiny):
    patcher, _clip, _vae = demo_model
    adapters = agd.build_adapters(patcher, hidden=16)
    with pytest.raises(agd.AGDError, match=r"GL_AGDApply: the adapter was made for another model: its 11 sites"):
        agd.apply_adapters(tiny("sd15_eps"), adapters, 5.0)
    with pytest.raises(agd.AGDError, match=r"GL_AGDApply: the model \(Flux\) has no UNet cross-attention"):
        agd.sites(tiny("flux"))
