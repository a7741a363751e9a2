"""Multi-condition classifier-free guidance with one scale per condition (SpaText-style; methods.md §10, DESIGN).

SpaText (Avrahami et al., CVPR 2023, arXiv 2211.14305) gives each condition its own guidance scale; its exact formula
is not confirmed. Two forms over N conditions, N + 1 predictions:

    nested      D̂ = D(∅) + Σ_i s_i·(D(c_≤i) − D(c_<i))         c_≤i = conditions 1…i, c_<1 = ∅
    composable  D̂ = D(∅) + Σ_i s_i·(D(c_i) − D(∅))

Both are written here as D(∅) + Σ_i e_i·(D(k_i) − D(∅)) over the evaluated conditions k_i (c_≤i or c_i) with
effective coefficients e_i = s_i − s_(i+1) (nested, s_(N+1) = 0) or e_i = s_i (composable). A condition whose e_i
is 0 needs no model call. The nested form telescopes: with all s_i = s it is CFG at s on c_≤N.

Accelerated nested variant (DESIGN): refresh every prediction every m steps; in between evaluate only D(∅) and
D(c_≤N) and reuse the last measured partial differences E_i = D(c_≤i) − D(∅), i < N. With equal scales this equals
CFG on every step; with m = 1 it is the exact form.

Tensors are denoised (x0) predictions [B, C, *spatial]; sums in float32, cast back to the dtype of D(∅).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

NESTED, COMPOSABLE = "nested", "composable"
FORMS = (NESTED, COMPOSABLE)


def effective_coefficients(scales: Sequence[float], form: str) -> list[float]:
    """e_i, the coefficient of D(k_i) − D(∅) for every condition i (scales of inactive terms given as 0)."""
    s = [float(v) for v in scales]
    if form == COMPOSABLE:
        return s
    if form == NESTED:
        return [s[i] - (s[i + 1] if i + 1 < len(s) else 0.0) for i in range(len(s))]
    raise ValueError(f"unknown form {form!r}; choose one of {', '.join(FORMS)}")


def term_sum(d_uncond: torch.Tensor, d_conds: Sequence[torch.Tensor | None], coefficients: Sequence[float]
             ) -> torch.Tensor:
    """Σ_i e_i·(D(k_i) − D(∅)) in float32; entries with e_i == 0 may be None (not evaluated)."""
    if len(d_conds) != len(coefficients):
        raise ValueError(f"{len(d_conds)} predictions but {len(coefficients)} coefficients")
    base = d_uncond.float()
    out = torch.zeros_like(base)
    for d_i, e_i in zip(d_conds, coefficients):
        if e_i == 0.0:
            continue
        if d_i is None:
            raise ValueError("a condition with a non-zero coefficient was not evaluated")
        out = out + float(e_i) * (d_i.float() - base)
    return out


def combine(d_uncond: torch.Tensor, d_conds: Sequence[torch.Tensor | None], coefficients: Sequence[float]
            ) -> torch.Tensor:
    """D(∅) + Σ_i e_i·(D(k_i) − D(∅)), in the dtype of D(∅); entries with e_i == 0 may be None."""
    return (d_uncond.float() + term_sum(d_uncond, d_conds, coefficients)).to(d_uncond.dtype)


def refresh_due(step: int | None, every: int) -> bool:
    """Whether step `step` of the accelerated variant evaluates every condition (always when every <= 1)."""
    return every <= 1 or step is None or step % every == 0


@dataclass
class PartialDifferences:
    """E_i = D(c_≤i) − D(∅) for i < N, measured at the last refresh step (one sampling run)."""

    step: int | None = None
    partials: list = field(default_factory=list)

    def store(self, step: int | None, d_uncond: torch.Tensor, d_conds: Sequence[torch.Tensor]) -> None:
        base = d_uncond.float()
        self.step = step
        self.partials = [d.float() - base for d in d_conds[:-1]]

    def ready(self, n_conditions: int, batch: int) -> bool:
        return (len(self.partials) == n_conditions - 1
                and all(p.shape[0] == batch for p in self.partials))

    def fill(self, d_uncond: torch.Tensor, d_top: torch.Tensor) -> list[torch.Tensor]:
        """Predictions [D(∅) + E_1, …, D(∅) + E_(N−1), D(c_≤N)] for a step that evaluated only ∅ and c_≤N."""
        base = d_uncond.float()
        return [(base + p.to(base.device)).to(d_uncond.dtype) for p in self.partials] + [d_top]
