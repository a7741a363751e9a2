"""Adaptive Guidance kernel: ε from D, per-sample cosine, batch policies, the switch latch."""
import math

import pytest
import torch

from kernels.adaptive import AGState, batch_similarity, cosine_per_sample, expected_nfe, noise_from_denoised


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 4, 3, 8, 8)])
def test_noise_from_denoised_inverts_the_state_equation(shape):
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    sigma = torch.tensor([0.3, 0.7, 0.5][:shape[0]])
    alpha = 1 - sigma                                       # flow state x = α·x0 + σ·n
    x = alpha.view(-1, *[1] * (len(shape) - 1)) * x0 + sigma.view(-1, *[1] * (len(shape) - 1)) * n
    torch.testing.assert_close(noise_from_denoised(x, x0, sigma, alpha), n, rtol=1e-5, atol=1e-5)
    ve = x0 + 2.0 * n                                       # VE state, scalar σ
    torch.testing.assert_close(noise_from_denoised(ve, x0, 2.0, 1.0), n, rtol=1e-5, atol=1e-5)
    half = noise_from_denoised(x.half(), x0.half(), sigma, alpha)
    assert half.dtype == torch.float32


def test_cosine_is_per_sample_over_all_non_batch_dims():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 2, 3, 4, 5, generator=g)
    b = torch.randn(3, 2, 3, 4, 5, generator=g)
    b[1] = 2.5 * a[1]                                        # parallel
    b[2] = -a[2]                                             # opposite
    cos = cosine_per_sample(a, b)
    ref0 = torch.nn.functional.cosine_similarity(a[0].flatten().double(), b[0].flatten().double(), dim=0)
    assert cos.dtype == torch.float64 and cos.shape == (3,)
    assert cos[0] == pytest.approx(float(ref0), abs=1e-12)
    assert cos[1] == pytest.approx(1.0, abs=1e-12) and cos[2] == pytest.approx(-1.0, abs=1e-12)
    z = torch.zeros(2, 4)
    assert cosine_per_sample(z, z).tolist() == [1.0, 1.0]
    assert cosine_per_sample(z, torch.ones(2, 4)).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="shapes differ"):
        cosine_per_sample(torch.zeros(2, 3), torch.zeros(2, 4))


def test_batch_policies():
    gam = torch.tensor([0.999, 0.95, 0.995], dtype=torch.float64)
    assert batch_similarity(gam, "all") == pytest.approx(0.95)
    assert batch_similarity(gam, "mean") == pytest.approx((0.999 + 0.95 + 0.995) / 3)
    with pytest.raises(ValueError, match="batch policy"):
        batch_similarity(gam, "any")


def test_latch_switches_after_the_crossing_step_and_stays_closed():
    st = AGState(threshold=0.99)
    assert not st.observe(0, 0.5, 10.0)
    assert not st.conditional_only(1)
    assert st.observe(1, 0.995, 5.0)
    assert st.switch_step == 1 and not st.forced
    assert not st.conditional_only(1) and st.conditional_only(2)          # the crossing step itself used CFG
    assert st.observe(2, 0.1, 2.0) and st.switch_step == 1               # latched: no reopening
    assert [h[0] for h in st.history] == [0, 1]


def test_threshold_above_one_never_switches_and_minus_one_switches_at_once():
    never = AGState(threshold=1.0001)
    for i, s in enumerate([10.0, 5.0, 1.0, 0.1]):
        never.observe(i, 1.0, s)
    assert not never.switched
    at_once = AGState(threshold=-1.0)
    assert at_once.observe(0, -0.5, 10.0) and at_once.switch_step == 0


def test_start_guard_and_forced_end():
    st = AGState(threshold=0.9, sigma_start=3.0)
    assert not st.observe(0, 0.999, 10.0)                  # too early: σ above the earliest switch
    assert st.observe(1, 0.999, 3.0) and st.switch_step == 1
    forced = AGState(threshold=2.0, sigma_force=1.0)
    assert not forced.observe(0, 0.5, 5.0)
    assert forced.observe(1, None, 0.9) and forced.forced and forced.switch_step == 1
    unmeasured = AGState(threshold=0.5)
    assert not unmeasured.observe(0, None, 5.0)           # no γ (no uncond evaluated): never switches by itself


def test_expected_nfe():
    assert expected_nfe(20, 20) == 40
    assert expected_nfe(20, 1) == 21
    assert expected_nfe(10, 6) == 16
    with pytest.raises(ValueError):
        expected_nfe(5, 6)
    assert math.isclose(1 - expected_nfe(20, 10) / 40, 0.25)
