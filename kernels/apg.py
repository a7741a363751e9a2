"""Adaptive Projected Guidance (APG) — Sadat, Hilliges, Weber, ICLR 2025, arXiv:2410.02416, Algorithm 1.

Implemented in x0 ("denoised") space, per sample over all non-batch dims, projections in float64:

    Δ  = D_c − D_u
    m  ← Δ + β·m ;  Δ ← m                  (reverse momentum, β < 0; skipped when β = 0)
    Δ  ← Δ·min(1, r/‖Δ‖)                   (norm clamp; skipped when r = 0)
    Δ∥ = <Δ, D_c>/‖D_c‖²·D_c ;  Δ⊥ = Δ − Δ∥
    D̂  = D_c + (w − 1)·(Δ⊥ + η·Δ∥)

With η = 1, r = 0, β = 0 this is exactly CFG, D_u + w·Δ (ComfyUI core's APG node gives CFG at w + 1 there).
"""
from __future__ import annotations

import math

import torch

from ._tensor import per_sample_dot, per_sample_norm

# d_ref of the optional resolution-aware threshold: an SDXL latent at 1024² (4 × 128 × 128), for which the
# paper's r = 15 was tuned. Guidance Lab design, not the paper's.
REFERENCE_ELEMENTS = 4 * 128 * 128


class APGMomentum:
    """Reverse-momentum buffer of one sampling run, advanced once per sampler step index.

    `update(delta, step)` returns m_k = Δ + β·m_{k−1}. A second evaluation at the same step index (Heun, DPM-2)
    recomputes m_k from the same committed m_{k−1} instead of advancing the buffer twice.
    """

    def __init__(self, beta: float):
        self.beta = float(beta)
        self._committed: torch.Tensor | None = None   # m_{k-1}
        self._pending: torch.Tensor | None = None     # m_k of the current step
        self._pending_step: int | None = None

    def reset(self) -> None:
        self._committed = self._pending = self._pending_step = None

    def update(self, delta: torch.Tensor, step: int) -> torch.Tensor:
        if self._pending_step is not None and step != self._pending_step:
            self._committed = self._pending
        prev = self._committed
        if prev is not None and prev.shape != delta.shape:
            prev = None                                  # a new batch layout starts a fresh buffer
        m = delta if prev is None else delta + self.beta * prev.to(delta)
        self._pending, self._pending_step = m, step
        return m


def effective_threshold(norm_threshold: float, elements: int, *, scale_by_size: bool) -> float:
    """r, or r·√(d/d_ref) when the threshold is to transfer across resolutions (Guidance Lab design)."""
    if norm_threshold < 0:
        raise ValueError(f"norm_threshold must be >= 0, got {norm_threshold}")
    if not scale_by_size:
        return float(norm_threshold)
    return float(norm_threshold) * math.sqrt(elements / REFERENCE_ELEMENTS)


def apg_guidance(cond: torch.Tensor, uncond: torch.Tensor, *, momentum: APGMomentum | None = None,
                 step: int = 0, norm_threshold: float = 0.0, eta: float = 0.0) -> tuple[torch.Tensor, ...]:
    """The modified guidance direction Δ'' = Δ⊥ + η·Δ∥ (float64) and, for tests, (Δ_clamped, Δ⊥, Δ∥)."""
    if cond.shape != uncond.shape:
        raise ValueError(f"cond and uncond shapes differ: {tuple(cond.shape)} vs {tuple(uncond.shape)}")
    c = cond.double()
    delta = c - uncond.double()                                      # [B, C, ...]
    if momentum is not None and momentum.beta != 0.0:
        delta = momentum.update(delta, step)
    if norm_threshold > 0:
        scale = (norm_threshold / per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * scale                                        # ‖Δ_i‖ ≤ r per sample
    c_sq = per_sample_dot(c, c)
    coef = torch.where(c_sq > 0, per_sample_dot(delta, c) / c_sq.clamp_min(1e-300), torch.zeros_like(c_sq))
    parallel = coef * c                                              # Δ∥ along D_c
    orthogonal = delta - parallel                                    # Δ⊥, <Δ⊥, D_c> = 0
    return orthogonal + eta * parallel, delta, orthogonal, parallel


def apg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, *, eta: float = 0.0, norm_threshold: float = 0.0,
        momentum: APGMomentum | None = None, step: int = 0) -> torch.Tensor:
    """Guided x0 D̂ = D_c + (w − 1)·(Δ⊥ + η·Δ∥), in the dtype of `cond`."""
    guidance = apg_guidance(cond, uncond, momentum=momentum, step=step, norm_threshold=norm_threshold, eta=eta)[0]
    return (cond.double() + (scale - 1.0) * guidance).to(cond.dtype)


def apg_as_cond(cond: torch.Tensor, uncond: torch.Tensor, scale: float, **kwargs) -> torch.Tensor:
    """The conditional prediction c' for which the standard combine u + w·(c' − u) returns APG's D̂.

    This lets APG live in ComfyUI's pre-CFG list and compose with whatever runs after it. w = 0 is not
    representable (the combine ignores c' there).
    """
    if scale == 0:
        raise ValueError("APG cannot be expressed through the CFG combine at cfg = 0; use cfg > 0")
    guided = apg(cond, uncond, scale, **kwargs).double()
    u = uncond.double()
    return (u + (guided - u) / scale).to(cond.dtype)
