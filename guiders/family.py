"""Which model family a ComfyUI model belongs to, in the terms the kernels need."""
from __future__ import annotations

import comfy.model_base
import comfy.model_sampling as ms
import numpy as np

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
        f"{node}: model parameterisation {type(model_sampling).__name__}{_kind(model_sampling)} is not supported "
        "(supported: EPS, V-prediction and flow/CONST models such as SD1.5, SDXL, SD3 and Flux); connect such a "
        "model, or remove the ModelSampling node that changed its parameterisation")


def _kind(model_sampling) -> str:
    """' (COSMOS_RFLOW)': the host's parameterisation class behind a model_sampling object (core ModelSampling…
    nodes build a local class named ModelSamplingAdvanced, which says nothing)."""
    for cls in type(model_sampling).__mro__:
        if cls.__module__ == ms.__name__ and cls.__name__.isupper():
            return f" ({cls.__name__})"
    return ""


def check_latent(model, samples, *, node: str, input_name: str = "latent") -> None:
    """A clear error when a LATENT input cannot be sampled by `model` (a ModelPatcher): a video or audio latent for
    an image model, or a latent with content and another channel count (empty latents the host converts itself)."""
    import torch
    if not torch.is_tensor(samples) or samples.is_nested:
        return
    fmt = model.get_model_object("latent_format")
    channels, dims = fmt.latent_channels, getattr(fmt, "latent_dimensions", 2)
    layout = f"[B, {channels}, {({1: 'L', 3: 'T, H, W'}).get(dims, 'H, W')}]"
    ndim_ok = samples.ndim == dims + 2 or (dims == 3 and samples.ndim == 4)    # the host adds T to image latents
    if not ndim_ok or (samples.shape[1] != channels and bool(samples.count_nonzero())):
        raise ValueError(f"{node}: {input_name} has shape {list(samples.shape)}, but this model samples "
                         f"{channels}-channel latents {layout}; connect EmptyLatentImage (or the empty-latent node "
                         "of the model's family) at the size you sample")


def family_name(model_sampling) -> str:
    """'flow', 'v_prediction' or 'eps' (used in messages and tests)."""
    if isinstance(model_sampling, ms.CONST):
        return "flow"
    if isinstance(model_sampling, ms.V_PREDICTION):
        return "v_prediction"
    if isinstance(model_sampling, ms.EPS):
        return "eps"
    return type(model_sampling).__name__


def window_bounds(model_sampling, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(σ_low, σ_high) of the schedule window [start_percent, end_percent] (0 = noisiest), rounded to float32, the
    precision of the sigma schedules the samplers walk: a step whose σ is the bound itself (start_percent 0.5 of a
    float32 schedule, say) falls inside, as in core's own float32 comparisons, instead of outside by float64
    rounding of the same number. Rounding is monotone, so no σ inside the float64 window falls out."""
    def f32(p):
        return float(np.float32(float(model_sampling.percent_to_sigma(p))))
    return f32(end_percent), f32(start_percent)


def in_window(model_sampling, sigma: float, start_percent: float, end_percent: float) -> bool:
    """Whether σ lies in the schedule window [start_percent, end_percent] (0 = noisiest), inclusive (see
    window_bounds)."""
    lo, hi = window_bounds(model_sampling, start_percent, end_percent)
    return lo <= float(sigma) <= hi


def network_family(model) -> str:
    """The network layout of a ModelPatcher's model: "Flux", "SD3" or "UNet" (SD1.x, SD2.x, SDXL, the demo model) —
    the family names the adapter and hypernetwork files record."""
    inner = model.model
    if isinstance(inner, comfy.model_base.Flux):
        return "Flux"
    if isinstance(inner, comfy.model_base.SD3):
        return "SD3"
    return "UNet"
