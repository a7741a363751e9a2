"""The unified multi-term guidance family (methods.md §1) and its two-model members.

A guided prediction is a weighted sum of denoised predictions of possibly different weights θ_j and conditions
c_j whose weights sum to 1. Written around a reference term (the one whose weight is "the rest"):

    D̃ = D_ref + Σ_k c_k·(D_k − D_ref)          (Σ over the terms active at this σ; weight of D_ref = 1 − Σ c_k)

Members, as (model, condition): coefficient, reference first:

* CFG                 ref (θ, c);   (θ, ∅): 1 − w
* autoguidance        ref (θ, c);   (θ_weak, c): 1 − w                       Karras et al., arXiv 2406.02507
* CFG + autoguidance  ref (θ, c);   (θ_weak, c): 1 − w_a;  (θ, ∅): 1 − w      (design)
* NPO                 ref (θ⁺, c);  (θ⁻, c_neg): 1 − w                       Diffusion-NPO, ICLR 2025
* SINE                ref (θ_pre, c_edit);  (θ_ft, ĉ): w·v in its window;  (θ_pre, ∅): 1 − w    Zhang et al., CVPR 2023
* hybrid-model CFG    ref (θ_b, c); (θ_p, c): w_p;  (θ_b, ∅): 1 − w_b         design (paper form not confirmed)

Every member keeps its meaning when a windowed term drops out: the reference takes its weight back (SINE after
its window is CFG at w; hybrid-model CFG outside the personal model's window is CFG at w_b).

Tensors are denoised (x0) predictions [B, C, *spatial]; sums are taken in float32 and cast back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ._tensor import append_dims, per_sample_norm

MAIN, SECOND = "main", "second"
POSITIVE, NEGATIVE, POSITIVE_2 = "positive", "negative", "positive_2"

MODES = ("autoguidance", "cfg+autoguidance", "npo", "sine", "hybrid", "cfg")


@dataclass(frozen=True)
class Term:
    """One term of the family: which model, which conditioning, its coefficient c_k, its σ-window.

    `pair` marks the term shown to other nodes' CFG hooks as the "uncond" (position 1 of the host's conds list)."""

    model: str
    cond: str
    coefficient: float
    start_percent: float = 0.0
    end_percent: float = 1.0
    pair: bool = False


@dataclass(frozen=True)
class Recipe:
    """A reference term (model, conditioning) and the other terms."""

    ref_model: str
    ref_cond: str
    terms: tuple[Term, ...]

    @property
    def pair(self) -> Term | None:
        return next((t for t in self.terms if t.pair), None)


def preset(mode: str, *, cfg: float, scale_2: float = 1.0, start_percent: float = 0.0,
           end_percent: float = 1.0) -> Recipe:
    """The terms of one member. `cfg` is w (w_b for hybrid); `scale_2` is w_a (cfg+autoguidance), v (SINE) or
    w_p (hybrid); the window applies to the second model's term. The second model's term reads the conditioning
    "positive_2" (ĉ of SINE; elsewhere the caller makes it the positive unless a separate one is given, e.g. the
    positive with a LoRA hook standing in for the second model), NPO's reads "negative"."""
    win = {"start_percent": start_percent, "end_percent": end_percent}
    w = float(cfg)
    if mode == "cfg":
        terms = (Term(MAIN, NEGATIVE, 1.0 - w, pair=True),)
    elif mode == "autoguidance":
        terms = (Term(SECOND, POSITIVE_2, 1.0 - w, pair=True, **win),)
    elif mode == "cfg+autoguidance":
        terms = (Term(MAIN, NEGATIVE, 1.0 - w, pair=True), Term(SECOND, POSITIVE_2, 1.0 - float(scale_2), **win))
    elif mode == "npo":
        terms = (Term(SECOND, NEGATIVE, 1.0 - w, pair=True, **win),)
    elif mode == "sine":
        terms = (Term(MAIN, NEGATIVE, 1.0 - w, pair=True), Term(SECOND, POSITIVE_2, w * float(scale_2), **win))
    elif mode == "hybrid":
        terms = (Term(MAIN, NEGATIVE, 1.0 - w, pair=True), Term(SECOND, POSITIVE_2, float(scale_2), **win))
    else:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return Recipe(MAIN, POSITIVE, terms)


def weights(coefficients: Sequence[float]) -> list[float]:
    """Full weights [a_ref, a_1, …] of D_ref and the other terms: they sum to 1 by construction."""
    return [1.0 - float(sum(coefficients)), *[float(c) for c in coefficients]]


def cap_ratio(delta: torch.Tensor, ref: torch.Tensor, max_ratio: float) -> torch.Tensor:
    """Scale Δ_k per sample so that ‖Δ_k‖ ≤ r·‖D_ref‖ (r = max_ratio; 0 = no cap). Returns a new tensor."""
    if max_ratio <= 0:
        return delta
    d, r = delta.float(), ref.float()
    limit = float(max_ratio) * per_sample_norm(r)
    norm = per_sample_norm(d)
    factor = torch.where(norm > limit, limit / norm.clamp_min(1e-12), torch.ones_like(norm))
    return (d * factor).to(delta.dtype)


def term_sum(d_ref: torch.Tensor, others: Sequence[torch.Tensor], coefficients: Sequence,
             *, max_ratio: float = 0.0) -> torch.Tensor:
    """Σ_k c_k·(D_k − D_ref) in float32; a coefficient may be a float or a per-sample [B] tensor."""
    if len(others) != len(coefficients):
        raise ValueError(f"{len(others)} predictions but {len(coefficients)} coefficients")
    ref = d_ref.float()
    out = torch.zeros_like(ref)
    for d_k, c_k in zip(others, coefficients):
        delta = cap_ratio(d_k.float() - ref, ref, max_ratio)
        c = append_dims(c_k.to(device=ref.device, dtype=torch.float32), ref.ndim) if torch.is_tensor(c_k) \
            else float(c_k)
        out = out + c * delta
    return out


def reference_combine(d_ref: torch.Tensor, others: Sequence[torch.Tensor], coefficients: Sequence,
                      *, max_ratio: float = 0.0) -> torch.Tensor:
    """D̃ = D_ref + Σ_k c_k·(D_k − D_ref), returned in the dtype of D_ref."""
    return (d_ref.float() + term_sum(d_ref, others, coefficients, max_ratio=max_ratio)).to(d_ref.dtype)
