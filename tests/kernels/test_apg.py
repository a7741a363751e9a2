"""APG kernel: the paper's algebra, per-sample reductions, momentum semantics."""
import math

import pytest
import torch

from kernels.apg import APGMomentum, apg, apg_as_cond, apg_guidance, effective_threshold
from kernels._tensor import per_sample_dot, per_sample_norm


def _pair(shape=(3, 4, 8, 8), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 4, 3, 8, 8)])
def test_neutral_settings_equal_cfg(shape):
    c, u = _pair(shape)
    w = 7.0
    out = apg(c, u, w, eta=1.0, norm_threshold=0.0, momentum=None)
    torch.testing.assert_close(out, u + w * (c - u), rtol=1e-5, atol=1e-5)


def test_core_node_form_is_cfg_at_w_plus_one_but_ours_is_not():
    c, u = _pair()
    w = 7.0
    ours = apg(c, u, w, eta=1.0)
    assert not torch.allclose(ours, u + (w + 1) * (c - u), atol=1e-3)


def test_orthogonal_part_is_orthogonal_per_sample():
    c, u = _pair((4, 4, 16, 16), seed=1)
    _, _, orth, par = apg_guidance(c, u, eta=0.0)
    cos = per_sample_dot(orth, c.double()) / (per_sample_norm(orth) * per_sample_norm(c.double()))
    assert cos.abs().max() < 1e-10
    # parallel part is collinear with D_c
    resid = par - per_sample_dot(par, c.double()) / per_sample_dot(c.double(), c.double()) * c.double()
    assert resid.abs().max() < 1e-10


def test_norm_clamp_bounds_every_sample():
    c, u = _pair((4, 4, 8, 8), seed=2)
    u[1] = c[1] + 1e-3 * u[1]              # one sample with a tiny Δ stays unclamped
    r = 2.0
    _, delta, _, _ = apg_guidance(c, u, norm_threshold=r)
    norms = per_sample_norm(delta).flatten()
    assert (norms <= r * (1 + 1e-9)).all()
    torch.testing.assert_close(delta[1], (c[1] - u[1]).double())


def test_scale_one_is_identity():
    c, u = _pair()
    torch.testing.assert_close(apg(c, u, 1.0, eta=0.0, norm_threshold=5.0), c)


def test_batch_independence():
    c, u = _pair((3, 4, 8, 8), seed=3)
    full = apg(c, u, 9.0, eta=0.0, norm_threshold=3.0)
    for i in range(3):
        torch.testing.assert_close(full[i:i + 1], apg(c[i:i + 1], u[i:i + 1], 9.0, eta=0.0, norm_threshold=3.0))


def test_inputs_unchanged_and_dtype_preserved():
    c, u = _pair(dtype=torch.float16)
    c0, u0 = c.clone(), u.clone()
    out = apg(c, u, 5.0, eta=0.0, norm_threshold=2.0, momentum=APGMomentum(-0.5), step=0)
    assert out.dtype == torch.float16 and out.shape == c.shape
    assert torch.equal(c, c0) and torch.equal(u, u0)


def test_as_cond_reproduces_guided_through_standard_combine():
    c, u = _pair(seed=4)
    w = 11.0
    cprime = apg_as_cond(c, u, w, eta=0.0, norm_threshold=4.0)
    torch.testing.assert_close(u + w * (cprime - u), apg(c, u, w, eta=0.0, norm_threshold=4.0), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cfg = 0"):
        apg_as_cond(c, u, 0.0)


def test_momentum_advances_once_per_step_index():
    c, u = _pair(seed=5)
    d = (c - u).double()
    m = APGMomentum(-0.5)
    m0 = m.update(d, 0)
    torch.testing.assert_close(m0, d)
    m1 = m.update(2 * d, 1)
    torch.testing.assert_close(m1, 2 * d - 0.5 * d)
    again = m.update(3 * d, 1)                      # second evaluation of step 1 (Heun): same m_0 used
    torch.testing.assert_close(again, 3 * d - 0.5 * d)
    m2 = m.update(d, 2)                             # commits the last step-1 value
    torch.testing.assert_close(m2, d - 0.5 * again)


def test_momentum_enters_the_paper_formula():
    c, u = _pair(seed=6)
    mom = APGMomentum(-0.5)
    apg(c, u, 5.0, eta=1.0, momentum=mom, step=0)
    second = apg(c, u, 5.0, eta=1.0, momentum=mom, step=1)   # Δ_eff = Δ − 0.5Δ = 0.5Δ
    torch.testing.assert_close(second, c + 4.0 * 0.5 * (c - u), rtol=1e-5, atol=1e-5)


def test_threshold_scaling_option():
    assert effective_threshold(15.0, 4 * 128 * 128, scale_by_size=True) == pytest.approx(15.0)
    assert effective_threshold(15.0, 4 * 64 * 64, scale_by_size=True) == pytest.approx(7.5)
    assert effective_threshold(15.0, 10, scale_by_size=False) == 15.0
    with pytest.raises(ValueError):
        effective_threshold(-1.0, 10, scale_by_size=False)
    assert math.isfinite(effective_threshold(0.0, 1, scale_by_size=True))


def test_zero_cond_sample_has_no_parallel_part():
    c, u = _pair((2, 4, 4, 4), seed=7)
    c[0] = 0
    out = apg(c, u, 3.0, eta=0.0)
    assert torch.isfinite(out).all()
