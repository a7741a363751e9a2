"""The host's CFG steps, for guiders that evaluate more than a cond/uncond pair (as core's PerpNeg guider does).

A custom guider that calls `calc_cond_batch` itself bypasses `sampling_function`, so it must run other nodes'
hooks by hand: the pre-CFG list on the evaluated predictions, the single `sampler_cfg_function` slot on the
cond/uncond pair, then the post-CFG list on the final result. These helpers do exactly what the host does, plus an
`extra` term (the guider's additional branches) added to the CFG result before the post-CFG list sees it.
"""
from __future__ import annotations

import torch

import comfy.samplers


def evaluate(model, conds: list, x, timestep, model_options: dict) -> list:
    """One batched evaluation of `conds` (None entries give zeros), through the host's replaceable
    `sampler_calc_cond_batch_function` slot when another node set it, as `sampling_function` does."""
    fn = model_options.get("sampler_calc_cond_batch_function")
    if fn is not None:
        return fn({"conds": conds, "input": x, "sigma": timestep, "model": model, "model_options": model_options})
    return comfy.samplers.calc_cond_batch(model, conds, x, timestep, model_options)


def pre_cfg(model, conds: list, out: list, scale: float, x, timestep, model_options: dict) -> list:
    """Run other nodes' pre-CFG functions on the predictions (cond at 0, uncond at 1, extras after)."""
    for fn in model_options.get("sampler_pre_cfg_function", []):
        args = {"conds": conds, "conds_out": out, "cond_scale": scale, "timestep": timestep, "input": x,
                "sigma": timestep, "model": model, "model_options": model_options}
        out = fn(args)
    return out


def cfg_and_post(model, cond_pred, uncond_pred, scale: float, x, timestep, model_options: dict, *, cond=None,
                 uncond=None, extra: torch.Tensor | None = None, post_args: dict | None = None) -> torch.Tensor:
    """The host's `cfg_function` (the `sampler_cfg_function` slot or uncond + scale·(cond − uncond)), plus `extra`,
    then the post-CFG list."""
    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": scale, "timestep": timestep,
                "input": x, "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                "model": model, "model_options": model_options, "input_cond": cond, "input_uncond": uncond}
        result = x - model_options["sampler_cfg_function"](args)
    else:
        result = uncond_pred + (cond_pred - uncond_pred) * scale
    if extra is not None:
        result = (result.float() + extra).to(result.dtype)
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": result, "cond": cond, "uncond": uncond, "cond_scale": scale, "model": model,
                "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                "model_options": model_options, "input": x, **(post_args or {})}
        result = fn(args)
    return result
