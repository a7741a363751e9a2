"""Adaptive Guidance as a MODEL patch: a PREDICT_NOISE wrapper that really skips the unconditional model call.

Works wherever a CFGGuider samples: core KSampler, KSamplerAdvanced, SamplerCustomAdvanced with CFGGuider, and
custom guiders that subclass CFGGuider without replacing `predict_noise`.

* Before the switch the wrapper runs the host's normal path (so every pre-/post-CFG node takes effect) with a
  capture hook put first in the pre-CFG list; it reads the raw conditional and unconditional predictions and takes
  their cosine per sample, over all non-batch dims: in denoised space (D_c vs D_u, the default) or in noise space
  (ε = (x − α·D)/σ).
* When the batch's similarity exceeds the threshold (policy "all": every sample), the latch closes; from the next
  schedule entry on the wrapper calls the rest of the wrapper chain with the negative left out and scale 1 —
  exactly the host's own cfg = 1 path, so pre- and post-CFG lists and later PREDICT_NOISE wrappers still run — and
  the model is evaluated on the conditional branch only.
* The latch lives in a per-run state object (OUTER_SAMPLE wrapper), keyed by the sampler's schedule index.

When it cannot save anything it falls back to the normal path and says so once per run: cfg = 1 (no
unconditional branch to drop), no negative conditioning, a guider that replaces `predict_noise` (DualCFGGuider,
PerpNeg, ...), or another node that needs the unconditional prediction at every step (it set
`disable_cfg1_optimization`, e.g. a CFG++ sampler).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

import comfy.patcher_extension
import comfy.samplers

from ..kernels.adaptive import (BATCH_POLICIES, SPACES, AGState, batch_similarity, cosine_per_sample,
                                noise_from_denoised)
from .capture import run_capturing_predictions
from .family import coords_for
from .nfe import current_run, install_nfe_counter
from .run_state import NAMESPACE, install_run_state, run_state, step_index

__all__ = ["BATCH_POLICIES", "DEFAULT_THRESHOLD", "SPACES", "check_settings", "patch_adaptive_guidance"]

NODE = "GL_AdaptiveGuidance"
STATE_KEY = "adaptive_guidance"
WRAPPER_KEY = f"{NAMESPACE}.{STATE_KEY}"
LOG = logging.getLogger("guidance_lab")
DEFAULT_THRESHOLD = 0.985   # γ̄ default; measured on the demo model (README, BENCHMARKS section ag_sweep_large)


def check_settings(*, threshold, start_percent, end_percent, batch_policy, space="denoised") -> None:
    """Raise ValueError naming the node, the input and the fix."""
    if not math.isfinite(threshold):
        raise ValueError(f"{NODE}: threshold ({threshold}) must be a finite number; {DEFAULT_THRESHOLD:g} is the "
                         "default, values above 1 never switch (plain CFG)")
    if not 0.0 <= start_percent <= 1.0 or not 0.0 <= end_percent <= 1.0:
        raise ValueError(f"{NODE}: start_percent ({start_percent}) and end_percent ({end_percent}) must lie in "
                         "[0, 1] (fractions of the noise schedule, 0 = noisiest)")
    if end_percent < start_percent:
        raise ValueError(f"{NODE}: end_percent ({end_percent}) is the latest switch and must not come before "
                         f"start_percent ({start_percent}), the earliest; use end_percent = 1 for no forced switch")
    if batch_policy not in BATCH_POLICIES:
        raise ValueError(f"{NODE}: batch_policy {batch_policy!r} is not one of {list(BATCH_POLICIES)}")
    if space not in SPACES:
        raise ValueError(f"{NODE}: space {space!r} is not one of {list(SPACES)}")


@dataclass
class AGRun:
    """Per-sampling-run state: the latch, the model family and what was already logged."""

    state: AGState
    flow: bool
    cfg_calls: int = 0
    cond_only_calls: int = 0
    fallback: str | None = None
    measured: list = field(default_factory=list)   # per-sample γ of each measured step (for reports and tests)


def _fallback_reason(guider, model_options) -> str | None:
    if guider is None or not isinstance(guider, comfy.samplers.CFGGuider):
        return "the sampler does not run a CFGGuider"
    if type(guider).predict_noise is not comfy.samplers.CFGGuider.predict_noise:
        return (f"guider {type(guider).__name__} computes its own guidance (it replaces predict_noise), so the "
                "unconditional call cannot be dropped safely")
    if math.isclose(float(getattr(guider, "cfg", 1.0)), 1.0):
        return "cfg is 1: the host evaluates no unconditional branch, so there is nothing to skip"
    if guider.conds.get("negative") is None:
        return "no negative conditioning: there is no unconditional branch to skip"
    if model_options.get("disable_cfg1_optimization", False):
        return ("another node needs the unconditional prediction at every step (it set disable_cfg1_optimization, "
                "e.g. a CFG++ sampler), so it is kept")
    return None


def patch_adaptive_guidance(model, *, threshold: float = DEFAULT_THRESHOLD, start_percent: float = 0.0,
                            end_percent: float = 1.0, batch_policy: str = "all", space: str = "denoised"):
    """A clone of `model` whose sampling drops the unconditional branch once cond and uncond agree."""
    check_settings(threshold=threshold, start_percent=start_percent, end_percent=end_percent,
                   batch_policy=batch_policy, space=space)
    coords_for(model.get_model_object("model_sampling"), node=NODE)   # clear error for unsupported families
    m = model.clone()
    install_nfe_counter(m)

    def factory(guider):
        ms = guider.model_patcher.get_model_object("model_sampling")
        sigma_start = math.inf if start_percent <= 0 else float(ms.percent_to_sigma(start_percent))
        sigma_force = -1.0 if end_percent >= 1 else float(ms.percent_to_sigma(end_percent))
        state = AGState(threshold=float(threshold), sigma_start=sigma_start, sigma_force=sigma_force)
        return AGRun(state=state, flow=coords_for(ms, node=NODE).kind == "flow")

    install_run_state(m, STATE_KEY, factory)

    def predict_noise(executor, x, timestep, model_options={}, seed=None):
        guider = executor.class_obj
        run = run_state(model_options, STATE_KEY)
        if run is None:
            return executor(x, timestep, model_options, seed)
        if run.fallback is None:
            reason = _fallback_reason(guider, model_options)
            if reason is not None:
                run.fallback = reason
                LOG.warning("%s: no model calls saved in this run: %s.", NODE, reason)
                _note(model_options, run)
        if run.fallback is not None:
            return executor(x, timestep, model_options, seed)
        step = step_index(model_options, timestep)
        if step is not None and run.state.conditional_only(step):
            run.cond_only_calls += 1
            _note(model_options, run)
            # the host's own cfg = 1 path: negative left out, scale 1, pre/post-CFG lists still run. Through the
            # rest of the wrapper chain (not sampling_function directly), so PREDICT_NOISE wrappers of other nodes
            # registered after this one (caches, …) still run on these steps; the chain ends in
            # CFGGuider.predict_noise (guiders that replace it fell back above)
            conds, cfg = guider.conds, guider.cfg
            guider.conds, guider.cfg = {k: v for k, v in conds.items() if k != "negative"}, 1.0
            try:
                return executor(x, timestep, model_options, seed)
            finally:
                guider.conds, guider.cfg = conds, cfg
        result, captured = run_capturing_predictions(executor, x, timestep, model_options, seed)
        run.cfg_calls += 1
        if step is not None and "cond" in captured:
            sigma = timestep.float().reshape(-1)
            if space == "noise":
                alpha = 1.0 - sigma if run.flow else torch.ones_like(sigma)
                gammas = cosine_per_sample(noise_from_denoised(x, captured["cond"], sigma, alpha),
                                           noise_from_denoised(x, captured["uncond"], sigma, alpha))
            else:
                gammas = cosine_per_sample(captured["cond"], captured["uncond"])
            run.measured.append((step, gammas.tolist()))
            run.state.observe(step, batch_similarity(gammas, batch_policy), float(sigma.max()))
        _note(model_options, run)
        return result

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY, predict_noise)
    return m


def _note(model_options, run: AGRun) -> None:
    """Put the switch figures into the run's NFE report (logged and shown by GL_NFEReport)."""
    report = current_run(model_options)
    if report is None:
        return
    st = run.state
    report.notes["_adaptive_guidance"] = {"switch_step": st.switch_step, "forced": st.forced,
                                          "fallback": run.fallback, "cfg_calls": run.cfg_calls,
                                          "cond_only_calls": run.cond_only_calls, "measured": list(run.measured)}
    if run.fallback is not None:
        report.notes["adaptive guidance"] = f"not applied ({run.fallback})"
    elif st.switch_step is None:
        report.notes["adaptive guidance"] = "no switch (CFG at every step)"
    else:
        how = "forced at end_percent" if st.forced else f"γ {st.history[-1][1]:.4f} > {st.threshold:g}"
        report.notes["adaptive guidance"] = (f"conditional only after schedule step {st.switch_step} ({how}); "
                                             f"{run.cond_only_calls} evaluation(s) without the uncond")
