"""Closed-form Gaussian experts and product targets for the FKC tests (methods.md Appendix A.2).

Data law of expert i: N(m_i, V_i) per sample (1-D: scalars applied to every element; 2-D: a 2-vector and a 2×2
covariance on the last dim). Under x̃ = x0 + σ̃·n its noisy marginal is q_i,σ̃ = N(m_i, V_i + σ̃²I) and its exact
denoiser is D_i(x̃) = m_i + V_i (V_i + σ̃²I)⁻¹ (x̃ − m_i). The target Π_i q_i,σ̃^{β_i} is Gaussian with precision
Σ_i β_i (V_i + σ̃²I)⁻¹ and mean P⁻¹ Σ_i β_i (V_i + σ̃²I)⁻¹ m_i.
"""
from __future__ import annotations

import math

import torch

from kernels.coords import Coords


def karras(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, final_zero: bool = True):
    """Karras schedule of n noise levels from sigma_max to sigma_min (float list), optionally with a final 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    out = [float(v) for v in s]
    return out + [0.0] if final_zero else out


class Gaussian1D:
    """Expert with data law N(m, v) on every element (independent elements)."""

    def __init__(self, m: float, v: float):
        self.m, self.v = float(m), float(v)

    def denoise_tilde(self, xt: torch.Tensor, st: float) -> torch.Tensor:
        if math.isinf(st):
            return torch.full_like(xt, self.m)
        return self.m + self.v / (self.v + st ** 2) * (xt - self.m)


class Gaussian2D:
    """Expert with data law N(m, V) on the last dim (size 2) of every sample."""

    def __init__(self, m, V):
        self.m = torch.as_tensor(m, dtype=torch.float64)
        self.V = torch.as_tensor(V, dtype=torch.float64)

    def denoise_tilde(self, xt: torch.Tensor, st: float) -> torch.Tensor:
        gain = self.V @ torch.linalg.inv(self.V + st ** 2 * torch.eye(2, dtype=torch.float64))
        return self.m.to(xt.dtype) + (xt - self.m.to(xt.dtype)) @ gain.T.to(xt.dtype)


def target_1d(experts, betas, st: float = 0.0) -> tuple[float, float]:
    """(mean, variance) of Π_i N(m_i, v_i + σ̃²)^{β_i}."""
    prec = sum(b / (e.v + st ** 2) for e, b in zip(experts, betas))
    if prec <= 0:
        raise ValueError("target is not normalisable")
    mean = sum(b * e.m / (e.v + st ** 2) for e, b in zip(experts, betas)) / prec
    return mean, 1.0 / prec


def target_2d(experts, betas, st: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [2], covariance [2, 2]) of Π_i N(m_i, V_i + σ̃²I)^{β_i}."""
    eye = torch.eye(2, dtype=torch.float64)
    precs = [b * torch.linalg.inv(e.V + st ** 2 * eye) for e, b in zip(experts, betas)]
    P = sum(precs)
    cov = torch.linalg.inv(P)
    mean = cov @ sum(p @ e.m for p, e in zip(precs, experts))
    return mean, cov


def experts_fn(experts, coords: Coords):
    """denoise_experts(x, σ) for `kernels.smc.sample_fkc`: maps x → x̃ = x/α and returns every expert's D."""
    def fn(x, sigma):
        a, st = coords.alpha(sigma), coords.tilde(sigma)
        xt = x / a if a > 0 else torch.zeros_like(x)           # D does not depend on x̃ at σ̃ = ∞
        return [e.denoise_tilde(xt, st) for e in experts]
    return fn


def weighted_moments(x: torch.Tensor, log_w: torch.Tensor, k: int) -> tuple[float, float]:
    """Weighted mean and variance of x [images·K, ...] (averaged over elements): weights normalised inside each
    group of K, every group counting 1/images."""
    n = x.shape[0] // k
    w = torch.softmax(log_w.double().reshape(n, k), dim=1).reshape(-1) / n
    flat = x.double().reshape(x.shape[0], -1)
    mean = (w[:, None] * flat).sum(0)
    var = (w[:, None] * (flat - mean) ** 2).sum(0)
    return float(mean.mean()), float(var.mean())


def target(experts, betas, st: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [d], covariance [d, d]) of Π_i q_i,σ̃^{β_i} for 1-D (d = 1) or 2-D (d = 2) experts."""
    if isinstance(experts[0], Gaussian2D):
        return target_2d(experts, betas, st)
    m, v = target_1d(experts, betas, st)
    return torch.tensor([m], dtype=torch.float64), torch.tensor([[v]], dtype=torch.float64)


def _quadratic(f, d: int):
    """(A [d, d] symmetric, b [d]) with f(x) = xᵀA x + bᵀx + f(0), read off at 0, ±e_i, e_i + e_j; f maps [P, d]
    points to [P] values. The fit is checked at one extra point."""
    eye = torch.eye(d, dtype=torch.float64)
    pairs = [(i, j) for i in range(d) for j in range(i + 1, d)]
    pts = [torch.zeros(d, dtype=torch.float64)] + [eye[i] for i in range(d)] + [-eye[i] for i in range(d)]
    pts += [eye[i] + eye[j] for i, j in pairs] + [torch.linspace(0.5, -1.5, d, dtype=torch.float64)]
    val = f(torch.stack(pts))
    f0, fp, fm = val[0], val[1:1 + d], val[1 + d:1 + 2 * d]
    A = torch.diag((fp + fm - 2 * f0) / 2)
    b = (fp - fm) / 2
    for n, (i, j) in enumerate(pairs):
        A[i, j] = A[j, i] = (val[1 + 2 * d + n] - f0 - A[i, i] - A[j, j] - b[i] - b[j]) / 2
    probe = pts[-1]
    assert abs(float(val[-1] - (probe @ A @ probe + b @ probe + f0))) <= 1e-8 * (1 + abs(float(val[-1])))
    return A, b


def _affine(f, d: int):
    """(M [d, d], c [d]) with f(x) = M x + c for an affine map of [P, d] points."""
    pts = torch.cat([torch.zeros(1, d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)])
    out = f(pts)
    return (out[1:] - out[0]).T, out[0]


def exact_fkc_law(experts, betas, sigmas, *, smc, coords: Coords, propagation: str, weighted: bool = True,
                  quadrature: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [d], covariance [d, d]) of the N → ∞ limit of the FKC particle loop on Gaussian experts, exactly.

    Every D_i is affine in x̃, so the kernel's log-weight increment is a quadratic xᵀA x + bᵀx + c of the particle
    and its propagation is x' = M x + c' + s·z: a Gaussian law N(m, C) stays Gaussian under reweighting (precision
    C⁻¹ − 2A, mean (C⁻¹ − 2A)⁻¹(C⁻¹m + b)) and under propagation. Resampling does not change the law, so this is
    what `smc.sample_fkc` converges to, without Monte Carlo noise. All coefficients are read from the kernel
    functions (`smc.log_weight_increment`, `smc.propagate`) at a few points, in `sample_fkc`'s order (weight at the
    current particle, then move). Starts from the target's marginal at σ_0; VE or flow coordinates.
    """
    quadrature = smc.matched_quadrature(propagation) if quadrature is None else quadrature
    fn = experts_fn(experts, coords)
    m_t, c_t = target(experts, betas, coords.tilde(sigmas[0]))
    d = m_t.shape[0]
    a0 = coords.alpha(sigmas[0])
    m, C = a0 * m_t, a0 ** 2 * c_t
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        if weighted and smc.weights_active(i, sigmas):
            A, b = _quadratic(lambda p: smc.log_weight_increment(p, fn(p, s), betas, s, s_next, coords=coords,
                                                                 quadrature=quadrature), d)
            C_inv = torch.linalg.inv(C)
            P = C_inv - 2 * A
            assert bool((torch.linalg.eigvalsh(P) > 0).all()), "reweighted law is not normalisable"
            C = torch.linalg.inv(P)
            m = C @ (C_inv @ m + b)
        M, c = _affine(lambda p: smc.propagate(p, fn(p, s), betas, s, s_next, torch.zeros_like(p), coords=coords,
                                                method=propagation), d)
        noise_var = 0.0
        if s_next > 0 and propagation in smc.STOCHASTIC_PROPAGATIONS:
            p = torch.zeros(1, d, dtype=torch.float64)
            kick = smc.propagate(p, fn(p, s), betas, s, s_next, torch.ones_like(p), coords=coords,
                                 method=propagation) - smc.propagate(p, fn(p, s), betas, s, s_next,
                                                                     torch.zeros_like(p), coords=coords,
                                                                     method=propagation)
            noise_var = float(kick[0, 0]) ** 2
        m, C = M @ m + c, M @ C @ M.T + noise_var * torch.eye(d, dtype=torch.float64)
    return m, C
