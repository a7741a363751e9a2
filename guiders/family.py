"""Which model family a ComfyUI model belongs to, in the terms the kernels need."""
from __future__ import annotations

import comfy.model_sampling as ms

from ..kernels.coords import FLOW, VE, Coords


class UnsupportedModelError(ValueError):
    """A method was given a model whose parameterisation it cannot serve."""


def coords_for(model_sampling, *, node: str) -> Coords:
    """Coords for a `model_sampling` object; flow (CONST) is tested first, V_PREDICTION subclasses EPS."""
    if isinstance(model_sampling, ms.CONST):
        return Coords(FLOW)
    if isinstance(model_sampling, ms.EPS):          # EPS, V_PREDICTION, EDM, X0: x = x0 + σ·n
        return Coords(VE)
    raise UnsupportedModelError(
        f"{node}: model parameterisation {type(model_sampling).__name__} is not supported "
        "(supported: EPS, V-prediction and flow/CONST models such as SD1.5, SDXL, SD3 and Flux)")


def family_name(model_sampling) -> str:
    """'flow', 'v_prediction' or 'eps' (used in messages and tests)."""
    if isinstance(model_sampling, ms.CONST):
        return "flow"
    if isinstance(model_sampling, ms.V_PREDICTION):
        return "v_prediction"
    if isinstance(model_sampling, ms.EPS):
        return "eps"
    return type(model_sampling).__name__


def in_window(model_sampling, sigma: float, start_percent: float, end_percent: float) -> bool:
    """Whether σ lies in the schedule window [start_percent, end_percent] (0 = noisiest), inclusive."""
    return (float(model_sampling.percent_to_sigma(end_percent)) <= float(sigma)
            <= float(model_sampling.percent_to_sigma(start_percent)))
