"""Shared pieces of the pack's training nodes (GL_ConceptEraseTrain, GL_HypernetworkTrain): the model's keyword
conditioning for a prompt, batching of conditionings, saved-tensor copies for models that add residuals in place,
and taking trained weight wrappers off the shared modules afterwards."""
from __future__ import annotations

import contextlib

import torch

import comfy.model_management


def model_conds(model, clip, tokens: dict, batch: int, device, x: torch.Tensor, node: str) -> dict:
    """The model's keyword conditioning (c_crossattn and, e.g. for SDXL/SD3/Flux, y and guidance) for `tokens`,
    repeated to `batch`; `x` is a latent of the training size (some families read its shape)."""
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    kw = {"cross_attn": out["cond"].clone(), "device": device, "noise": x}
    if out.get("pooled_output") is not None:
        kw["pooled_output"] = out["pooled_output"].clone()
    extra = model.extra_conds(**kw)
    conds = {}
    for k, v in extra.items():
        c = v.process_cond(batch_size=batch).cond
        if not torch.is_tensor(c):
            raise ValueError(f"{node}: the model needs a non-tensor conditioning {k!r}; this version trains models "
                             "whose conditioning is tensors (SD1.x, SD2.x, SDXL, SD3, Flux)")
        conds[k] = c.to(device).clone()
    return conds


def cat_conds(parts: list[dict]) -> dict:
    """Conditionings of several batches side by side (same keys)."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def repeat_conds(cond: dict, n: int) -> dict:
    return {k: torch.cat([v] * n) for k, v in cond.items()}


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def saved_copies(enabled: bool):
    """Inside: tensors saved for the backward pass are copies. Some families' blocks (Flux) add residuals in place,
    which autograd refuses when the tensor was saved; with copies the backward sees the values the forward used
    (same gradients, more memory)."""
    if enabled and torch.is_grad_enabled():
        return torch.autograd.graph.saved_tensors_hooks(_copy, _same)
    return contextlib.nullcontext()


def unload_wrappers(patcher, kind: type) -> None:
    """Unload a training clone and take its weight wrappers of class `kind` off the shared modules (ComfyUI's
    unload leaves weight functions in place until the next load; the modules are shared with every clone)."""
    loaded = comfy.model_management.current_loaded_models
    for i in reversed(range(len(loaded))):
        if loaded[i].model is patcher:
            loaded.pop(i).model_unload()
    for m in patcher.model.modules():
        functions = getattr(m, "weight_function", None)
        if functions and any(isinstance(f, kind) for f in functions):
            m.weight_function = [f for f in functions if not isinstance(f, kind)]
            if not m.weight_function and hasattr(m, "prev_comfy_cast_weights"):
                m.comfy_cast_weights = m.prev_comfy_cast_weights
                del m.prev_comfy_cast_weights
