"""Helpers of the host tier: run a guider directly, count network rows."""
from __future__ import annotations

import torch


def run(patcher, positive, negative, cfg, *, sampler="euler", steps=4, batch=2, size=16, seed=0, sigmas=None,
        guider=None, channels=3):
    """Sample through comfy.samplers.CFGGuider (or `guider`) exactly as SamplerCustomAdvanced does."""
    import comfy.samplers
    g = guider if guider is not None else comfy.samplers.CFGGuider(patcher)
    if guider is None:
        g.set_conds(positive, negative)
        g.set_cfg(cfg)
    if sigmas is None:
        sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", steps)
    if isinstance(sampler, str):
        sampler = comfy.samplers.sampler_object(sampler)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, channels, size, size, generator=gen)
    latent = torch.zeros_like(noise)
    with torch.inference_mode():
        return g.sample(noise, latent, sampler, sigmas, seed=seed, disable_pbar=True)


def count_rows(patcher):
    """Clone `patcher` with a unet wrapper counting network evaluations (batch rows)."""
    m = patcher.clone()
    counter = {"rows": 0, "calls": 0}

    def wrapper(apply_model, args):
        counter["rows"] += args["input"].shape[0]
        counter["calls"] += 1
        return apply_model(args["input"], args["timestep"], **args["c"])
    m.set_model_unet_function_wrapper(wrapper)
    return m, counter


def encode(clip, text: str) -> list:
    """CLIPTextEncode's conditioning of `text`."""
    import nodes
    return nodes.CLIPTextEncode().encode(clip, text)[0]


def original_weights(patcher) -> dict:
    """The model's own weights, whichever clone is loaded (a loaded clone's patches sit in the shared weights and
    the originals in the shared backup)."""
    return {k: (patcher.backup[k].weight if k in patcher.backup else v).clone()
            for k, v in patcher.model_state_dict().items()}
