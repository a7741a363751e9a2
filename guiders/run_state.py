"""Per-sampling-run state: created fresh by an OUTER_SAMPLE wrapper, found by hooks through model_options.

The object lives under transformer_options["guidance_lab"][key] of the guider's per-run model_options copy, so
it never leaks into the patcher (whose model_options are deep-copied on clone) or into another run.
"""
from __future__ import annotations

from typing import Any, Callable

import comfy.model_patcher
import comfy.patcher_extension

NAMESPACE = "guidance_lab"


def install_run_state(patcher, key: str, factory: Callable[[Any], Any]) -> None:
    """Add an OUTER_SAMPLE wrapper on `patcher` that builds `factory(guider)` for every sampling run."""

    def outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj
        original = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original)
        topts = guider.model_options.setdefault("transformer_options", {})
        states = dict(topts.get(NAMESPACE, {}))
        states[key] = factory(guider)
        topts[NAMESPACE] = states
        try:
            return executor(*args, **kwargs)
        finally:
            guider.model_options = original

    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, f"{NAMESPACE}.{key}", outer_sample)


def run_state(model_options: dict | None, key: str):
    """The state object of the current run, or None when the model runs outside a sampler."""
    if not model_options:
        return None
    return model_options.get("transformer_options", {}).get(NAMESPACE, {}).get(key)


def step_index(model_options: dict | None, sigma) -> int | None:
    """Index i of the current step: the largest i with sample_sigmas[i] >= σ·(1 − 1e-5); None outside a run.

    Multi-evaluation samplers call the model at σ values between schedule entries; they map to the step
    they belong to, so per-step state advances once per step.
    """
    if not model_options:
        return None
    sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
    if sigmas is None or len(sigmas) == 0:
        return None
    s = float(sigma.max() if hasattr(sigma, "max") else sigma)
    hits = (sigmas.detach().float().cpu() >= s * (1 - 1e-5)).nonzero()
    return int(hits[-1]) if len(hits) else 0
