"""Iterative error reduction (inspired by DiffIER, arXiv 2508.13628; objective: Guidance Lab design, kernels/diffier.py)
as a custom SAMPLER (KSAMPLER): works with SamplerCustom / SamplerCustomAdvanced and any guider that runs the
post-CFG list (CFGGuider, the pack's guiders).

Each step of the schedule inside the σ-window: the guided prediction D̂ and the conditional one D_c (read by a
post-CFG hook appended to this run's model_options copy) give the gap e; up to `iterations` corrections move the
state (each is one more guided evaluation, 2 NFEs at cfg > 1; kept per sample only if |e| drops), then the base
sampler takes its step from the corrected state — the core k-diffusion sampler itself, run on that single step,
reusing the last evaluation (a cache), with one noise sampler for the whole run so ancestral noise is drawn as in a
normal run. Outside the window the steps are the base sampler's, unchanged; iterations 0 or step size 0 run the base
sampler exactly. Multistep samplers (dpmpp_2m, lms, …) keep a history across steps and are not offered.
"""
from __future__ import annotations

import logging

import comfy.k_diffusion.sampling as ks
import comfy.model_patcher
import comfy.samplers

from ..kernels import diffier as dk
from . import nfe
from .family import coords_for, window_bounds

NODE = "GL_SamplerDiffIER"
BASE = {"euler": ks.sample_euler, "euler_ancestral": ks.sample_euler_ancestral, "heun": ks.sample_heun,
        "dpm_2": ks.sample_dpm_2, "dpmpp_2s_ancestral": ks.sample_dpmpp_2s_ancestral}
NOISY = ("euler_ancestral", "dpmpp_2s_ancestral")
OBJECTIVES = ("noise energy gap (Guidance Lab design)",)
LOG = logging.getLogger("guidance_lab")


def check(sampler_name, iterations, eta, tol, start_percent, end_percent, objective=OBJECTIVES[0]) -> None:
    """ValueError naming the node, the value and the fix."""
    if sampler_name not in BASE:
        raise ValueError(f"{NODE}: sampler_name {sampler_name!r} is not offered; choose one of {', '.join(BASE)} "
                         "(multistep samplers keep a history across steps that a corrected state would break)")
    if objective not in OBJECTIVES:
        raise ValueError(f"{NODE}: objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if iterations < 0 or not 0.0 <= eta <= 1.0 or tol < 0:
        raise ValueError(f"{NODE}: iterations ({iterations}) must be >= 0, step_size ({eta}) in [0, 1] and "
                         f"tolerance ({tol}) >= 0")
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"{NODE}: the window start_percent {start_percent} … end_percent {end_percent} must satisfy "
                         "0 <= start <= end <= 1 (fractions of the schedule, 0 = noisiest); swap them if reversed")


class _Cached:
    """The sampler's model with the latest evaluation kept: a call at the same state and σ returns it (no NFE)."""

    def __init__(self, model):
        self.model, self.inner_model, self.entry = model, model.inner_model, None

    def __call__(self, x, sigma, **kwargs):
        e, self.entry = self.entry, None
        if e is not None and x is e[0] and float(sigma.max()) == e[1]:
            return e[2]
        return self.model(x, sigma, **kwargs)


def make_sampler_function(sampler_name: str = "euler", *, iterations: int = 1, eta: float = 0.5, tol: float = 1e-3,
                          start_percent: float = 0.5, end_percent: float = 1.0, objective: str = OBJECTIVES[0]):
    check(sampler_name, iterations, eta, tol, start_percent, end_percent, objective)
    base = BASE[sampler_name]

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = dict(extra_args or {})
        if iterations == 0 or eta == 0:
            return base(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable)
        ms = model.inner_model.model_patcher.get_model_object("model_sampling")
        coords = coords_for(ms, node=NODE)
        lo, hi = window_bounds(ms, start_percent, end_percent)
        captured = {}

        def grab(args):                        # last post-CFG hook: the conditional prediction next to D̂
            captured["cond"] = args["cond_denoised"]
            return args["denoised"]

        extra_args["model_options"] = comfy.model_patcher.set_model_options_post_cfg_function(
            dict(extra_args.get("model_options", {})), grab)
        s_in = x.new_ones([x.shape[0]])
        cached = _Cached(model)
        kw = {"noise_sampler": ks.default_noise_sampler(x, seed=extra_args.get("seed"))} \
            if sampler_name in NOISY else {}
        stats = {"steps": 0, "calls": 0, "before": [], "after": [], "no_cond": False}
        for i in range(len(sigmas) - 1):
            sigma = float(sigmas[i])
            if lo <= sigma <= hi:
                def denoise(xx, i=i):
                    guided = model(xx, sigmas[i] * s_in, **extra_args)
                    cond = captured.pop("cond", None)
                    stats["no_cond"] |= cond is None
                    return guided, guided if cond is None else cond
                x, (guided, _c), gaps, used = dk.reduce_error(denoise, x, sigma, coords.alpha(sigma),
                                                              iterations=iterations, eta=eta, tol=tol)
                cached.entry = (x, sigma, guided)
                stats["steps"] += 1
                stats["calls"] += used
                stats["before"].append(float(gaps[0].abs().mean()))
                stats["after"].append(float(gaps[-1].abs().mean()))

            def step_callback(d, i=i):
                if callback is not None:
                    callback({**d, "i": i})
            x = base(cached, x, sigmas[i:i + 2], extra_args=extra_args, callback=step_callback, disable=True, **kw)
        _report(stats, extra_args.get("model_options"))
        return x

    return sample


def _report(stats: dict, model_options) -> None:
    if stats["no_cond"]:
        LOG.warning("%s: no conditional prediction reached the sampler (a guider without the post-CFG list, or "
                    "cfg 1 with no negative); nothing was corrected", NODE)
    mean = (lambda v: sum(v) / len(v)) if stats["steps"] else (lambda v: float("nan"))
    line = (f"{stats['calls']} extra guided evaluations on {stats['steps']} step(s) in the window; mean |gap| "
            f"{mean(stats['before']):.4g} before, {mean(stats['after']):.4g} after the corrections")
    LOG.info("%s: %s", NODE, line)
    run = nfe.current_run(model_options)
    if run is not None:
        run.notes["DiffIER"] = line


def make_sampler(sampler_name: str = "euler", **options) -> comfy.samplers.KSAMPLER:
    return comfy.samplers.KSAMPLER(make_sampler_function(sampler_name, **options))
