"""CFG++ as a custom SAMPLER (KSAMPLER): works with SamplerCustom / SamplerCustomAdvanced and any CFGGuider.

The guider's cfg value is λ. A post-CFG hook appended to this run's model_options copy (with the cfg = 1
optimisation disabled there only) captures the unconditional prediction D_u next to the guided D_λ; the
kernels then take α-form steps that are correct on EPS, V-prediction and flow models. Cost: 2 NFE per step
(dpmpp_2s_ancestral: 4), the same as CFG with the same sampler.
"""
from __future__ import annotations

import logging
import statistics

import comfy.k_diffusion.sampling
import comfy.model_patcher
import comfy.samplers

from ..kernels import cfgpp as kernel
from .family import coords_for

NODE = "GL_SamplerCFGPP (CFG++ sampler)"
MAX_LAMBDA = 2.0


def _check_lambda(lam) -> float:
    if lam is None:
        raise ValueError(f"{NODE}: the guider has no cfg value; use it with KSampler/SamplerCustom or a CFGGuider")
    lam = float(lam)
    if not 0.0 <= lam <= MAX_LAMBDA:
        raise ValueError(f"{NODE}: cfg = {lam} is read as CFG++'s λ, which lives in [0, 1] (paper default 0.6; "
                         f"values up to {MAX_LAMBDA} are allowed as extrapolation). Set cfg to about 0.6 — "
                         "λ = 0.6 already guides like CFG ≈ 5–8 at 20–50 steps.")
    return lam


def make_sampler_function(sampler_name: str, *, eta: float = 1.0, s_noise: float = 1.0):
    if sampler_name not in kernel.SAMPLERS:
        raise ValueError(f"{NODE}: unknown sampler_name {sampler_name!r}; choose one of {', '.join(kernel.SAMPLERS)}")
    if eta < 0 or s_noise < 0:
        raise ValueError(f"{NODE}: eta ({eta}) and s_noise ({s_noise}) must be >= 0")

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = dict(extra_args or {})
        guider = model.inner_model
        lam = _check_lambda(getattr(guider, "cfg", None))
        coords = coords_for(guider.model_patcher.get_model_object("model_sampling"), node=NODE)
        captured = {}

        def grab(args):                       # last post-CFG hook: sees the final D̂ and the branch outputs
            if args.get("uncond") is None:
                raise ValueError(f"{NODE}: no negative (unconditional) conditioning reached the sampler. CFG++ "
                                 "re-noises with the unconditional prediction: connect a negative prompt "
                                 "(CFGGuider / KSampler), not BasicGuider.")
            captured["uncond"] = args["uncond_denoised"]
            return args["denoised"]

        options = dict(extra_args.get("model_options", {}))
        extra_args["model_options"] = comfy.model_patcher.set_model_options_post_cfg_function(
            options, grab, disable_cfg1_optimization=True)   # this run only: the uncond is needed at λ = 1
        s_in = x.new_ones([x.shape[0]])

        def denoise(xx, sigma):
            guided = model(xx, sigma * s_in, **extra_args)
            return guided, captured.pop("uncond")

        omegas = kernel.equivalent_cfg(sigmas, lam, coords, eta=eta if sampler_name in kernel.ANCESTRAL else 0.0)
        if len(omegas) > 1:
            logging.info("%s: λ = %.3g on this %d-step schedule acts like CFG ω median %.2f (range %.2f–%.2f)",
                         NODE, lam, len(omegas), statistics.median(omegas[:-1]), min(omegas), max(omegas))
        noise_sampler = comfy.k_diffusion.sampling.default_noise_sampler(x, seed=extra_args.get("seed"))
        common = dict(coords=coords, callback=callback)
        if sampler_name == "euler":
            return kernel.sample_ancestral(denoise, x, sigmas, eta=0.0, s_noise=0.0, **common)
        if sampler_name == "euler_ancestral":
            return kernel.sample_ancestral(denoise, x, sigmas, eta=eta, s_noise=s_noise,
                                           noise_sampler=noise_sampler, **common)
        if sampler_name == "dpmpp_2m":
            return kernel.sample_dpmpp_2m(denoise, x, sigmas, **common)
        return kernel.sample_dpmpp_2s_ancestral(denoise, x, sigmas, eta=eta, s_noise=s_noise,
                                                noise_sampler=noise_sampler, **common)

    return sample


def make_cfgpp_sampler(sampler_name: str, *, eta: float = 1.0, s_noise: float = 1.0):
    """A SAMPLER object running CFG++ with the given solver."""
    return comfy.samplers.KSAMPLER(make_sampler_function(sampler_name, eta=eta, s_noise=s_noise))
