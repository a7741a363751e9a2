"""CFG++ kernels: λ↔ω identity, α-form on flow states, DPM++ 2M against the published VE form."""
import math

import pytest
import torch

from kernels import cfgpp
from kernels.coords import FLOW, VE, Coords, ancestral_step


def _karras(n, smin=0.0292, smax=14.6146, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


def _flow_sigmas(n, shift=3.0):
    t = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


class LinearDenoiser:
    """D_c and D_u as fixed affine maps of x (deterministic, depends on σ) — enough for exact algebra."""

    def __init__(self, shape, seed=0, lam=0.6):
        g = torch.Generator().manual_seed(seed)
        self.mc = torch.randn(shape, generator=g, dtype=torch.float64)
        self.mu = torch.randn(shape, generator=g, dtype=torch.float64)
        self.lam, self.calls = lam, 0

    def branches(self, x, sigma):
        k = 1.0 / (1.0 + sigma ** 2)
        return self.mc + 0.3 * k * x, self.mu + 0.2 * k * x

    def __call__(self, x, sigma):
        self.calls += 1
        dc, du = self.branches(x, sigma)
        return du + self.lam * (dc - du), du


def _euler_cfg(den, x, sigmas, coords, omegas):
    """Ordinary Euler with per-step CFG scale ω_t, in (x̃, σ̃) coordinates."""
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        dc, du = den.branches(x, s)
        d = du + omegas[i] * (dc - du)
        if sn == 0:
            return d
        st, stn = coords.tilde(s), coords.tilde(sn)
        x = coords.alpha(sn) * (x / coords.alpha(s) + (stn - st) * (x / coords.alpha(s) - d) / st)
    return x


@pytest.mark.parametrize("kind,sigmas", [(VE, _karras(10)), (VE, _karras(30)), (FLOW, _flow_sigmas(12)[1:])])
def test_euler_cfgpp_equals_euler_cfg_with_omega(kind, sigmas):
    coords = Coords(kind)
    den = LinearDenoiser((2, 3, 4, 4))
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * float(sigmas[0])
    omegas = cfgpp.equivalent_cfg(sigmas, den.lam, coords)
    ours = cfgpp.sample_ancestral(den, x0, sigmas, coords=coords, eta=0.0)
    ref = _euler_cfg(den, x0, sigmas, coords, omegas)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    assert omegas[-1] == pytest.approx(den.lam)
    assert min(omegas[:-1]) > den.lam


def test_omega_table_matches_reference_values():
    # methods.md A.1: SD1.5 Karras, λ = 0.6, 10 steps: ω min/median/max (last step excluded) 0.93/1.26/1.59
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    s = ((1 - ac) / ac) ** 0.5
    om = cfgpp.equivalent_cfg(_karras(10, float(s.min()), float(s.max())), 0.6, Coords(VE))[:-1]
    om = sorted(om)
    assert om[0] == pytest.approx(0.93, abs=0.01) and om[-1] == pytest.approx(1.59, abs=0.01)
    assert len(om) == 9 and om[4] == pytest.approx(1.26, abs=0.01)


def test_flow_step_uses_alpha_not_ve_algebra():
    coords = Coords(FLOW)
    g = torch.Generator().manual_seed(1)
    x, dl, du = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    s, sn = 0.8, 0.6
    ours = cfgpp.ancestral_cfgpp_step(x, dl, du, s, sn, coords)
    alpha_form = (1 - sn) * dl + sn * (x - (1 - s) * du) / s
    ve_form = dl + (sn / s) * (x - du)
    torch.testing.assert_close(ours, alpha_form)
    assert (ours - ve_form).abs().max() > 1e-2


def test_flow_first_step_at_sigma_one_is_finite():
    coords = Coords(FLOW)
    den = LinearDenoiser((1, 3, 4, 4))
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    sig = _flow_sigmas(6)
    assert float(sig[0]) == 1.0
    for fn in (cfgpp.sample_dpmpp_2m, cfgpp.sample_ancestral):
        assert torch.isfinite(fn(den, x, sig, coords=coords)).all()
    out = cfgpp.sample_dpmpp_2s_ancestral(den, x, sig, coords=coords, eta=1.0,
                                          noise_sampler=lambda a, b: torch.zeros_like(x))
    assert torch.isfinite(out).all()


def _core_dpmpp_2m_cfgpp(den, x, sigmas):
    """The published VE form (official solver / ComfyUI core) written out for the comparison."""
    old = None
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        dl, du = den(x, s)
        if sn == 0:
            return dl
        h = math.log(s / sn)
        x_new = dl + math.exp(-h) * (x - du)
        if old is not None:
            r = math.log(float(sigmas[i - 1]) / s) / h
            x_new = x_new + (1 - math.exp(-h)) / (2 * r) * (dl - old)
        x, old = x_new, du
    return x


def test_dpmpp_2m_equals_published_form_on_ve():
    den = LinearDenoiser((2, 3, 4, 4), seed=3)
    sig = _karras(8)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * float(sig[0])
    torch.testing.assert_close(cfgpp.sample_dpmpp_2m(den, x, sig, coords=Coords(VE)), _core_dpmpp_2m_cfgpp(den, x, sig))


def test_dpmpp_2s_ancestral_nfe_and_official_update():
    den = LinearDenoiser((1, 3, 4, 4), seed=4)
    sig = _karras(5)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64) * float(sig[0])
    zeros = lambda a, b: torch.zeros_like(x)  # noqa: E731
    cfgpp.sample_dpmpp_2s_ancestral(den, x, sig, coords=Coords(VE), eta=0.0, noise_sampler=zeros)
    assert den.calls == 2 * 4 + 1                    # last step (σ' = 0) is a single evaluation
    # one step by hand, eta = 0: midpoint with D_u, update with D_λ and D_u at the midpoint
    s, sn = float(sig[0]), float(sig[1])
    dl, du = den(x, s)
    sm = math.sqrt(s * sn)
    x2 = (sm / s) * x + (1 - sm / s) * du
    dl2, du2 = den(x2, sm)
    expect = dl2 + (sn / s) * (x - du2)
    got = cfgpp.sample_dpmpp_2s_ancestral(den, x, sig[:2], coords=Coords(VE), eta=0.0, noise_sampler=zeros)
    torch.testing.assert_close(got, expect)


def test_lambda_zero_is_unconditional_euler():
    den = LinearDenoiser((1, 3, 4, 4), lam=0.0)
    sig = _karras(6)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64) * float(sig[0])
    ref = x.clone()
    for i in range(len(sig) - 1):
        s, sn = float(sig[i]), float(sig[i + 1])
        du = den.branches(ref, s)[1]
        ref = du if sn == 0 else ref + (sn - s) * (ref - du) / s
    torch.testing.assert_close(cfgpp.sample_ancestral(den, x, sig, coords=Coords(VE), eta=0.0), ref)


def test_ancestral_step_limits():
    assert ancestral_step(2.0, 1.0, 0.0) == (1.0, 0.0)
    down, up = ancestral_step(math.inf, 1.0, 1.0)
    assert up == pytest.approx(1.0) and down == pytest.approx(0.0)
    down, up = ancestral_step(2.0, 1.0, 1.0)
    assert down ** 2 + up ** 2 == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ancestral_step(2.0, 1.0, -1.0)


def test_coords_roundtrip():
    f = Coords(FLOW)
    assert f.tilde(1.0) == math.inf and f.sigma_of_tilde(math.inf) == 1.0
    assert f.sigma_of_tilde(f.tilde(0.3)) == pytest.approx(0.3)
    assert Coords(VE).tilde(3.0) == 3.0
    with pytest.raises(ValueError):
        Coords("edm")
