"""Unified coordinates for guidance math on every model family.

A state is x = α(σ)·x0 + σ·n with α = 1 for variance-exploding states (ComfyUI's EPS, V-prediction, EDM and X0
models) and α = 1 − σ for rectified-flow states (ComfyUI's CONST models: SD3, Flux, …). In VE-normalised
coordinates x̃ = x/α, σ̃ = σ/α every family behaves like x̃ = x0 + σ̃·n. At σ = 1 on a flow model α = 0 and
σ̃ = ∞; the functions below return math.inf there and the samplers take the finite α-form limits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

VE = "ve"
FLOW = "flow"


@dataclass(frozen=True)
class Coords:
    """α(σ) and σ̃(σ) of one model family: kind is "ve" (α = 1) or "flow" (α = 1 − σ)."""

    kind: str

    def __post_init__(self):
        if self.kind not in (VE, FLOW):
            raise ValueError(f"unknown coordinate kind {self.kind!r}; expected 've' or 'flow'")

    def alpha(self, sigma: float) -> float:
        return 1.0 if self.kind == VE else 1.0 - float(sigma)

    def tilde(self, sigma: float) -> float:
        """σ̃ = σ/α (math.inf where α = 0)."""
        a = self.alpha(sigma)
        return math.inf if a <= 0.0 else float(sigma) / a

    def sigma_of_tilde(self, sigma_tilde: float) -> float:
        """Inverse of `tilde`."""
        if self.kind == VE:
            return float(sigma_tilde)
        return 1.0 if math.isinf(sigma_tilde) else float(sigma_tilde) / (1.0 + float(sigma_tilde))


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up) of a VE ancestral step σ → σ_next (k-diffusion's rule); σ may be math.inf."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if not eta or sigma_next == 0:
        return float(sigma_next), 0.0
    ratio_sq = 0.0 if math.isinf(sigma) else (sigma_next / sigma) ** 2
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(max(1.0 - ratio_sq, 0.0)))
    sigma_down = math.sqrt(max(sigma_next ** 2 - sigma_up ** 2, 0.0))
    return sigma_down, sigma_up
