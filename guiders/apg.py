"""APG as a MODEL patch: one pre-CFG hook, 0 extra NFE, composes with every other pre/post-CFG node.

The hook replaces the conditional prediction by c' = D_u + (D̂ − D_u)/w, so the host's standard combine
D_u + w·(c' − D_u) — or whatever cfg function / post-CFG node follows — receives exactly APG's D̂.
Reverse momentum lives in a per-run state object (OUTER_SAMPLE wrapper) keyed by sampler step index.
"""
from __future__ import annotations

from ..kernels.apg import APGMomentum, apg_as_cond, effective_threshold
from ..kernels._tensor import elements_per_sample
from .family import in_window
from .nfe import install_nfe_counter
from .run_state import install_run_state, run_state, step_index

NODE = "GL_APG (Adaptive Projected Guidance)"
STATE_KEY = "apg"


def check_settings(*, eta, norm_threshold, momentum, start_percent, end_percent) -> None:
    """Raise ValueError naming the node, the input and the fix."""
    if not 0.0 <= start_percent < end_percent <= 1.0:
        raise ValueError(f"{NODE}: start_percent ({start_percent}) must be smaller than end_percent "
                         f"({end_percent}), both in [0, 1]; set e.g. start_percent=0, end_percent=1")
    if norm_threshold < 0:
        raise ValueError(f"{NODE}: norm_threshold ({norm_threshold}) must be >= 0 (0 disables the clamp)")
    if not -1.0 < momentum < 1.0:
        raise ValueError(f"{NODE}: momentum ({momentum}) must lie in (-1, 1); the paper uses negative values")
    if eta < 0:
        raise ValueError(f"{NODE}: eta ({eta}) must be >= 0 (0 drops the parallel component, 1 keeps it)")


def patch_apg(model, *, eta: float = 0.0, norm_threshold: float = 15.0, momentum: float = -0.5,
              start_percent: float = 0.0, end_percent: float = 1.0, scale_threshold_by_size: bool = False):
    """A clone of `model` whose guidance is APG (Sadat et al. 2024) inside the σ-window."""
    check_settings(eta=eta, norm_threshold=norm_threshold, momentum=momentum, start_percent=start_percent,
                   end_percent=end_percent)
    m = model.clone()
    install_nfe_counter(m)
    install_run_state(m, STATE_KEY, lambda guider: APGMomentum(momentum) if momentum != 0 else None)

    def pre_cfg(args):
        out, scale = args["conds_out"], float(args["cond_scale"])
        if args["conds"][1] is None or len(out) < 2:     # cfg = 1: no uncond was evaluated; APG is the identity
            return out
        ms = args["model"].model_sampling
        sigma = float(args["sigma"].max())
        if not in_window(ms, sigma, start_percent, end_percent):
            return out
        if scale == 0:
            raise ValueError(f"{NODE}: cfg = 0 cannot carry APG guidance; use cfg > 0 (APG targets high cfg)")
        model_options = args["model_options"]
        cond, uncond = out[0], out[1]
        r = effective_threshold(norm_threshold, elements_per_sample(cond), scale_by_size=scale_threshold_by_size)
        step = step_index(model_options, args["sigma"])
        state = run_state(model_options, STATE_KEY) if step is not None else None
        new_cond = apg_as_cond(cond, uncond, scale, eta=eta, norm_threshold=r, momentum=state,
                               step=step or 0)
        return [new_cond, *out[1:]]

    m.set_model_sampler_pre_cfg_function(pre_cfg)
    return m
