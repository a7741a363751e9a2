"""kernels/diffier.py (iterative error reduction, Guidance Lab design inspired by DiffIER): the gap, the correction,
the backtracking loop, on the analytic Gaussian setup of methods.md §9."""
from __future__ import annotations

import pytest
import torch

from kernels import diffier as dk


def _gauss(m, v):
    return lambda x, s: m + v / (v + s ** 2) * (x - m)


D_C, D_U = _gauss(2.0, 0.25), _gauss(0.0, 2.25)         # q_c = N(2, 0.25·I), q_u = N(0, 2.25·I)


def _setup(sigma, w, seed=0, d=1000):
    g = torch.Generator().manual_seed(seed)
    x0 = 2 + 0.5 * torch.randn(1, d, generator=g)
    x = x0 + sigma * torch.randn(1, d, generator=g)
    calls = []

    def denoise(xx):
        calls.append(1)
        c, u = D_C(xx, sigma), D_U(xx, sigma)
        return u + w * (c - u), c
    return x, denoise, calls


def test_no_gap_no_move_and_the_neutral_settings_change_nothing():
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    assert torch.equal(dk.gap(x, d, d, 2.0, 1.0), torch.zeros(2))            # w = 1: D̂ = D_c
    assert torch.equal(dk.correct(x, d, d, 2.0, 1.0, eta=0.5), x)
    x1, _d, calls = _setup(3.0, 3.0)
    for kw in ({"iterations": 0, "eta": 0.5}, {"iterations": 3, "eta": 0.0}):
        out, _pair, gaps, used = dk.reduce_error(_d, x1, 3.0, 1.0, **kw)
        assert out is x1 and used == 0 and gaps.shape == (1, 1)
    assert len(calls) == 2                                                  # only the first evaluation, twice


def test_one_iteration_shrinks_the_gap_as_methods_md_observed():
    reference = {10.0: (0.245, 0.221), 3.0: (1.87, 0.93), 1.0: (4.39, 0.79), 0.3: (2.01, 1.18)}
    for sigma, (before, after) in reference.items():
        x, denoise, calls = _setup(sigma, 3.0)
        _x, _pair, gaps, used = dk.reduce_error(denoise, x, sigma, 1.0, iterations=1, eta=0.5)
        e0, e1 = float(gaps[0]), float(gaps[1])
        assert used == 1 and len(calls) == 2 and abs(e1) < abs(e0)
        assert e0 == pytest.approx(before, rel=0.2) and e1 == pytest.approx(after, rel=0.2)   # another noise draw


@pytest.mark.parametrize("w", [3.0, 7.5, 15.0])
def test_the_gap_never_grows_with_iterations_and_backtracking_prevents_divergence(w):
    for sigma in (10.0, 3.0, 1.0, 0.3):
        x, denoise, _calls = _setup(sigma, w, seed=1)
        _x, _pair, gaps, _used = dk.reduce_error(denoise, x, sigma, 1.0, iterations=5, eta=0.5, tol=0.0)
        mags = gaps.abs().reshape(-1).tolist()
        assert all(b <= a for a, b in zip(mags, mags[1:])), (sigma, mags)
        assert mags[-1] < mags[0]
    x, denoise, _calls = _setup(1.0, 15.0, seed=0)                  # a plain full step overshoots here
    guided, cond = denoise(x)
    plain = dk.correct(x, guided, cond, 1.0, 1.0, eta=0.5)
    assert abs(float(dk.gap(plain, *denoise(plain), 1.0, 1.0))) > 5 * abs(float(dk.gap(x, guided, cond, 1.0, 1.0)))


def test_correction_keeps_the_x0_estimate_on_ve_and_flow_states():
    g = torch.Generator().manual_seed(3)
    x, dh, dc = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    for sigma, alpha in ((torch.tensor([0.5, 2.0, 9.0]), torch.ones(3)),
                         (torch.tensor([0.2, 0.6, 1.0]), 1 - torch.tensor([0.2, 0.6, 1.0]))):
        eta = 0.4
        new = dk.correct(x, dh, dc, sigma, alpha, eta=eta)
        s, a = sigma.reshape(-1, 1, 1, 1), alpha.reshape(-1, 1, 1, 1)
        eps_hat, eps_c = (x - a * dh) / s, (x - a * dc) / s
        rho = eps_c.flatten(1).norm(dim=1) / eps_hat.flatten(1).norm(dim=1)
        want = (1 - eta) * x + eta * (a * dh + s * rho.reshape(-1, 1, 1, 1) * eps_hat)
        torch.testing.assert_close(new, want)
        assert torch.isfinite(new).all()                                    # flow σ = 1: α = 0, still finite
        # the implied x0 estimate under D̂ is unchanged: the move is along ε̂ only
        torch.testing.assert_close(dk.implied_noise(new, dh, sigma, alpha).flatten(1).norm(dim=1),
                                   ((1 - eta) + eta * rho) * eps_hat.flatten(1).norm(dim=1))


def test_per_sample_batch_independence_5d_dtype_and_inputs_untouched():
    g = torch.Generator().manual_seed(4)
    x, dh, dc = (torch.randn(3, 2, 2, 4, 4, generator=g) for _ in range(3))
    copies = [t.clone() for t in (x, dh, dc)]
    sigma, alpha = torch.tensor([0.5, 2.0, 9.0]), torch.ones(3)
    out = dk.correct(x, dh, dc, sigma, alpha, eta=0.5, active=torch.tensor([True, False, True]))
    assert torch.equal(out[1], x[1])
    for i in (0, 2):
        torch.testing.assert_close(out[i:i + 1], dk.correct(x[i:i + 1], dh[i:i + 1], dc[i:i + 1], sigma[i:i + 1],
                                                            alpha[i:i + 1], eta=0.5))
    assert all(torch.equal(a, b) for a, b in zip((x, dh, dc), copies))
    assert dk.correct(x.half(), dh.half(), dc.half(), sigma, alpha, eta=0.5).dtype == torch.float16
    e = dk.gap(x, dh, dc, sigma, alpha)
    torch.testing.assert_close(e[1:2], dk.gap(x[1:2], dh[1:2], dc[1:2], sigma[1:2], alpha[1:2]))
    with pytest.raises(ValueError, match="eta must be >= 0"):
        dk.correct(x, dh, dc, sigma, alpha, eta=-0.1)
