"""LinearAG as a MODEL patch: a PREDICT_NOISE wrapper that skips the unconditional model call on selected steps.

Castillo et al., AAAI 2025, arXiv:2312.12487. The predictor is Guidance Lab's DESIGN (kernels/linear_ag.py): on a
predicted step k the unconditional prediction is D̂_u,k = a_k·D_c,k + b_k·D_u,k−1 + c_k·D_c,k−1, by default
(1, 1, −1) — the previous step's guidance vector reused — or per-step coefficients from GL_LinearAGCalibrate.

* Which steps: `predicted_steps` — odd k in the first `first_fraction` of the run (with calibration residuals only
  where the fit's relative residual is below τ); even steps run true CFG and refresh the history.
* Predicted step (1 NFE): the wrapper runs the host's normal path with a `sampler_calc_cond_batch_function` on a
  model_options copy that evaluates the conditional branch only and puts D̂_u into the unconditional slot. The
  pre-CFG list, `sampler_cfg_function` and post-CFG list of other nodes then run as usual, at the real cfg scale.
  A calc function set by another node is called (with the uncond left out), never replaced.
* Other steps (2 NFE): the normal path with a capture hook put first in the pre-CFG list, recording the raw D_c, D_u.
* Only the first evaluation at σ = sample_sigmas[k] is predicted, and only when the history is that of the latest
  evaluation at step k−1; the other evaluations of multi-stage samplers (Heun, DPM-2, 2S…) run normal CFG.
* History and counters live in a per-run state object (OUTER_SAMPLE wrapper, run_state.py).

Nothing to save — cfg 1, no negative, a guider that replaces `predict_noise`, another node that needs the true
unconditional prediction (`disable_cfg1_optimization`) — gives the plain path and one log warning per run.
Calibration and coefficient files: guiders/linear_ag_calibration.py (calibrate_linear_ag is re-exported here).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

import comfy.patcher_extension
import comfy.samplers

from ..kernels.linear_ag import DEFAULT_COEFFICIENTS, predict_uncond, predicted_steps
from .adaptive import _fallback_reason
from .capture import run_capturing_predictions
from .linear_ag_calibration import calibrate_linear_ag, model_fingerprint  # noqa: F401  (public here too)
from .nfe import current_run, install_nfe_counter
from .run_state import NAMESPACE, install_run_state, run_state, step_index

NODE = "GL_LinearAG"
STATE_KEY = "linear_ag"
WRAPPER_KEY = f"{NAMESPACE}.{STATE_KEY}"
LOG = logging.getLogger("guidance_lab")

Predictor = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Settings:
    """What the node fixed: the coefficient table (None = default), residuals, schedule options, predictor."""

    coefficients: torch.Tensor | None
    residuals: torch.Tensor | None
    meta: dict
    first_fraction: float
    tau: float
    predictor: Predictor
    other_model: bool


@dataclass
class _History:
    step: int
    d_cond: torch.Tensor
    d_uncond: torch.Tensor


@dataclass
class LinearAGRun:
    """Per-sampling-run state: the schedule, the latest true (D_c, D_u) and what happened."""

    started: bool = False
    schedule: list = field(default_factory=list)
    history: _History | None = None
    last_step: int | None = None
    predicted: list = field(default_factory=list)
    cfg_calls: int = 0
    predicted_calls: int = 0
    fallback: str | None = None


def check_settings(*, first_fraction, tau, coefficients=None, residuals=None) -> None:
    """Raise ValueError naming the node, the value and the fix."""
    if not (math.isfinite(first_fraction) and 0.0 <= first_fraction <= 1.0):
        raise ValueError(f"{NODE}: first_fraction ({first_fraction}) must lie in [0, 1]: the share of the run in "
                         "which odd steps may skip the unconditional call (0.5 = first half, 0 = plain CFG)")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"{NODE}: tau ({tau}) must be a finite number > 0: the largest relative residual a "
                         "calibrated step may have to be predicted (0.05 is the usual value)")
    if residuals is not None and coefficients is None:
        raise ValueError(f"{NODE}: residuals were given without coefficients; pass both from one calibration "
                         "(GL_LinearAGCalibrate / GL_LinearAGLoad) or neither")
    if coefficients is not None:
        c = torch.as_tensor(coefficients)
        if c.ndim != 2 or c.shape[1] != 3 or c.shape[0] < 1 or not torch.isfinite(c).all():
            raise ValueError(f"{NODE}: coefficients must be a finite [n_steps, 3] table (a, b, c per step), got "
                             f"shape {tuple(c.shape)}; use the output of GL_LinearAGCalibrate or GL_LinearAGLoad")
        if residuals is not None and tuple(torch.as_tensor(residuals).shape) != (c.shape[0],):
            raise ValueError(f"{NODE}: residuals must hold one value per step ({c.shape[0]}), got shape "
                             f"{tuple(torch.as_tensor(residuals).shape)}; pass both tables of one calibration")


def patch_linear_ag(model, *, coefficients=None, residuals=None, calibration_meta=None, first_fraction: float = 0.5,
                    tau: float = 0.05, _predictor: Predictor | None = None):
    """A clone of `model` whose sampling predicts the unconditional branch on LinearAG's steps.

    `coefficients` [n_steps, 3] and `residuals` [n_steps] come from one calibration (None: DEFAULT_COEFFICIENTS
    at every step, no residual filter); `calibration_meta` is that calibration's metadata (reported, and compared
    with the model's fingerprint). `_predictor(step, d_cond, d_uncond_prev, d_cond_prev)` replaces the affine
    predictor — for tests only.
    """
    first_fraction, tau = float(first_fraction), float(tau)
    check_settings(first_fraction=first_fraction, tau=tau, coefficients=coefficients, residuals=residuals)
    table = None if coefficients is None else torch.as_tensor(coefficients).detach().to("cpu", torch.float64)
    res = None if residuals is None else torch.as_tensor(residuals).detach().to("cpu", torch.float64)
    meta = dict(calibration_meta or {})
    if _predictor is None:
        def _predictor(step, d_cond, d_uncond_prev, d_cond_prev):
            row = DEFAULT_COEFFICIENTS if table is None else table[step]
            return predict_uncond(row, d_cond, d_uncond_prev, d_cond_prev)
    other = _other_model(model, meta)
    settings = _Settings(table, res, meta, first_fraction, tau, _predictor, other)
    m = model.clone()
    for kind in (comfy.patcher_extension.WrappersMP.PREDICT_NOISE, comfy.patcher_extension.WrappersMP.OUTER_SAMPLE):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)     # a second GL_LinearAG replaces the first (one state key)
    install_nfe_counter(m)
    install_run_state(m, STATE_KEY, lambda guider: LinearAGRun())

    def predict_noise(executor, x, timestep, model_options={}, seed=None):
        run = run_state(model_options, STATE_KEY)
        if run is None:
            return executor(x, timestep, model_options, seed)
        if not run.started:
            _start(run, settings, executor.class_obj, model_options)
        if run.fallback is not None:
            return executor(x, timestep, model_options, seed)
        step = _schedule_point(model_options, timestep)
        hist = run.history
        if (step is not None and run.schedule[step] and run.last_step == step - 1 and hist is not None
                and hist.step == step - 1 and hist.d_cond.shape == x.shape):
            run.last_step = step
            result = _predicted_call(executor, x, timestep, model_options, seed, run, settings, step, hist)
        else:
            if step is not None:
                run.last_step = step
            result = _cfg_call(executor, x, timestep, model_options, seed, run, step)
        _note(model_options, run, settings)
        return result

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY, predict_noise)
    return m


def _start(run: LinearAGRun, settings: _Settings, guider, model_options) -> None:
    """First evaluation of a run: fallback check, step-count check, schedule."""
    run.started = True
    reason = _fallback_reason(guider, model_options)
    sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
    if reason is None and sigmas is None:
        reason = "the sampler passed no schedule (sample_sigmas), so steps cannot be identified"
    if reason is not None:
        run.fallback = reason
        LOG.warning("%s: no model calls saved in this run: %s.", NODE, reason)
        _note(model_options, run, settings)
        return
    n = len(sigmas) - 1
    if settings.coefficients is not None and settings.coefficients.shape[0] != n:
        raise ValueError(
            f"{NODE}: the LinearAG coefficients were calibrated for {settings.coefficients.shape[0]} steps, but "
            f"this run samples {n} steps. Calibrate with the same steps (GL_LinearAGCalibrate steps = {n}, same "
            "sampler and scheduler), or disconnect the coefficients input to use the default predictor (note: "
            "denoise < 1, KSamplerAdvanced start/end steps and split sigmas shorten the run)")
    run.schedule = predicted_steps(n, residuals=settings.residuals, tau=settings.tau,
                                   first_fraction=settings.first_fraction)


def _schedule_point(model_options, timestep) -> int | None:
    """Step k when σ equals sample_sigmas[k] (an evaluation on the schedule), else None."""
    step = step_index(model_options, timestep)
    if step is None:
        return None
    sigmas = model_options["transformer_options"]["sample_sigmas"]
    if step >= len(sigmas) - 1:
        return None
    s, target = float(timestep.max()), float(sigmas[step])
    return step if math.isclose(s, target, rel_tol=1e-5, abs_tol=1e-8) else None


def _cfg_call(executor, x, timestep, model_options, seed, run: LinearAGRun, step):
    """Normal path; a capture hook first in the pre-CFG list records the raw predictions of schedule points."""
    result, captured = run_capturing_predictions(executor, x, timestep, model_options, seed)
    run.cfg_calls += 1
    if step is not None and "cond" in captured:      # cloned: a later hook may edit its tensors in place
        run.history = _History(step, captured["cond"].detach().clone(), captured["uncond"].detach().clone())
    return result


def _predicted_call(executor, x, timestep, model_options, seed, run: LinearAGRun, settings: _Settings, step,
                    hist: _History):
    """Normal path with the conditional branch evaluated alone and D̂_u in the unconditional slot (1 NFE)."""
    previous = model_options.get("sampler_calc_cond_batch_function")
    made = []

    def calc(args):
        conds = args["conds"]
        if conds[1] is None:             # the uncond was already left out (cfg-1 path above us): nothing to predict
            return _calc(previous, args)
        out = list(_calc(previous, {**args, "conds": [conds[0], None, *conds[2:]]}))
        out[1] = settings.predictor(step, out[0], hist.d_uncond, hist.d_cond)
        made.append(step)
        return out

    opts = dict(model_options)
    opts["sampler_calc_cond_batch_function"] = calc
    result = executor(x, timestep, opts, seed)
    if made:
        run.predicted_calls += 1
        run.predicted.append(step)
    else:
        run.cfg_calls += 1
    return result


def _calc(previous, args):
    """The calc function set by another node, or the host's calc_cond_batch."""
    if previous is not None:
        return previous(args)
    return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                          args["model_options"])


def _other_model(model, meta: dict) -> bool:
    """True (and one log warning) when the calibration metadata names another model's fingerprint."""
    stored = meta.get("model_fingerprint")
    if not stored:
        return False
    own = model_fingerprint(model)
    if own == stored:
        return False
    LOG.warning("%s: these coefficients were calibrated on another model (fingerprint %s, this model %s); "
                "recalibrate on this model for reliable predictions.", NODE, stored[:12], own[:12])
    return True


def _note(model_options, run: LinearAGRun, settings: _Settings) -> None:
    """Put the figures into the run's NFE report (logged and shown by GL_NFEReport)."""
    report = current_run(model_options)
    if report is None:
        return
    calibrated = settings.coefficients is not None
    report.notes["_linear_ag"] = {
        "predicted_steps": list(run.predicted), "schedule": [k for k, on in enumerate(run.schedule) if on],
        "cfg_calls": run.cfg_calls, "predicted_calls": run.predicted_calls, "fallback": run.fallback,
        "coefficients": "calibrated" if calibrated else "default", "calibration": dict(settings.meta),
        "other_model": settings.other_model}
    if run.fallback is not None:
        report.notes["linear ag"] = f"not applied ({run.fallback})"
        return
    which = ("calibrated coefficients" + (" (from another model!)" if settings.other_model else "")
             if calibrated else "default coefficients (previous guidance vector reused)")
    steps = ", ".join(str(k) for k in run.predicted) or "none"
    report.notes["linear ag"] = (f"uncond predicted at {len(run.predicted)} of {len(run.schedule)} steps "
                                 f"(steps {steps}), {which}")
