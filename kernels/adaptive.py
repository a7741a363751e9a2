"""Adaptive Guidance (Castillo et al., AAAI 2025, arXiv:2312.12487): the switch criterion and its per-run latch.

CFG runs until the conditional and unconditional predictions agree; from then on only the conditional branch is
evaluated (one model call per step instead of two). Agreement is the cosine similarity of the two predictions, per
sample over all non-batch dimensions, in one of two spaces (DESIGN: the paper's exact space and threshold are not
confirmed):

* "denoised" (default): D_c vs D_u. Measured on the pack's demo model, it rises over the run from ≈ 0.9 to 1 —
  the "increasing alignment" the paper describes — so a threshold near 0.99 switches in the second half.
* "noise": ε = (x − α·D)/σ. Both ε predictions are dominated by the input noise at high σ (cosine ≈ 0.9999 from
  the first step) and their difference is amplified by 1/σ at the end (the cosine falls), so with thresholds
  below ~0.9999 it switches at once; kept for experiments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


BATCH_POLICIES = ("all", "mean")
SPACES = ("denoised", "noise")


def noise_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma, alpha) -> torch.Tensor:
    """ε(D) = (x − α·D)/σ in float32; `sigma` and `alpha` are scalars or per-sample tensors [B]."""
    x32, d32 = x.float(), denoised.float()
    shape = (-1,) + (1,) * (x.ndim - 1)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).reshape(shape)
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=x.device).reshape(-1).reshape(shape)
    return (x32 - alpha * d32) / sigma


def cosine_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of a[i] and b[i] over all non-batch dims, float64 [B]. Two zero vectors count as
    identical (1); one zero vector against a non-zero one as orthogonal (0)."""
    if a.shape != b.shape:
        raise ValueError(f"cosine_per_sample: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    fa, fb = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    dot = (fa * fb).sum(1)
    na, nb = fa.norm(dim=1), fb.norm(dim=1)
    both_zero = (na == 0) & (nb == 0)
    cos = dot / (na * nb).clamp_min(1e-300)
    cos = torch.where(both_zero, torch.ones_like(cos), cos)
    return cos.clamp(-1.0, 1.0)


def batch_similarity(gammas: torch.Tensor, policy: str = "all") -> float:
    """One number for the batch: "all" = the smallest γ (the batch switches once every sample agrees),
    "mean" = the mean γ (switches earlier; samples that have not converged lose their guidance)."""
    if policy not in BATCH_POLICIES:
        raise ValueError(f"unknown batch policy {policy!r}; expected one of {BATCH_POLICIES}")
    if gammas.numel() == 0:
        raise ValueError("batch_similarity: no samples")
    return float(gammas.min() if policy == "all" else gammas.mean())


@dataclass
class AGState:
    """Per-run latch of Adaptive Guidance, keyed by the sampler's schedule index.

    `observe(step, gamma, sigma)` is called after each step evaluated with CFG; once γ > threshold (and σ is at or
    below `sigma_start`, the earliest allowed switch), or σ ≤ `sigma_force` (the latest switch), the latch closes
    and every later schedule index is evaluated conditional-only. The step that closed it still used CFG."""

    threshold: float
    sigma_start: float = math.inf    # never switch while σ > sigma_start
    sigma_force: float = -1.0        # switch regardless once σ ≤ sigma_force (−1: never forced)
    switch_step: int | None = None   # schedule index of the last CFG step
    forced: bool = False
    history: list = field(default_factory=list)   # (step, γ of the batch, σ)

    @property
    def switched(self) -> bool:
        return self.switch_step is not None

    def conditional_only(self, step: int) -> bool:
        """True when schedule index `step` comes after the switch."""
        return self.switch_step is not None and step > self.switch_step

    def observe(self, step: int, gamma: float | None, sigma: float) -> bool:
        """Record the CFG step `step` (γ of the batch, None when it could not be measured); returns whether the
        latch is closed after it."""
        if self.switched:
            return True
        self.history.append((int(step), None if gamma is None else float(gamma), float(sigma)))
        if sigma <= self.sigma_force:
            self.switch_step, self.forced = int(step), True
        elif gamma is not None and gamma > self.threshold and sigma <= self.sigma_start * (1 + 1e-6):
            self.switch_step = int(step)
        return self.switched


def expected_nfe(steps: int, cfg_steps: int) -> int:
    """Model evaluations per image of a first-order sampler: 2 per CFG step (switch step included), 1 after."""
    if not 0 <= cfg_steps <= steps:
        raise ValueError(f"cfg_steps ({cfg_steps}) must lie in [0, steps={steps}]")
    return 2 * cfg_steps + (steps - cfg_steps)
