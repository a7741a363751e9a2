"""GL_ConceptEraseTrain: All-but-One style fine-tuning (kernels.erasure.surgical_losses; the loss is the
reconstruction of methods.md §12.2, a labelled DESIGN) of LoRA adapters on the projections that read the text
(UNets: cross-attention; SD3/Flux: the text input projections or the text stream's q/k/v).

1. Trajectories: the frozen model samples `trajectories` images per erased concept (Euler, CFG, its own σ
   schedule); every intermediate state (x_t, σ_t) goes into the training pool, so the layouts the model really
   produces for the concept are the ones it is tuned on.
2. Each step draws `batch` states; frozen predictions ε(x, c_a), ε(x, ∅), ε(x, c_p) with the adapters switched
   off (no grad), tuned predictions ε'(x, c_e), ε'(x, ∅), ε'(x, c_p) with them on; AdamW on the adapters only.
3. The adapters are LoRA weight wrappers (`add_weight_wrapper`) on a training clone, under
   `torch.inference_mode(False)`; the clone is unloaded afterwards. The result is returned as plain weight patches
   on a fresh clone of the input model (ΔW = α/r·up·down per projection) plus the GL_ERASURE edit for
   GL_SaveErasureLoRA.
"""
from __future__ import annotations

import logging
import math
import re
import time

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..kernels import erasure as ek
from ..kernels.adaptive import noise_from_denoised
from . import erasure as er
from . import training as tr
from .family import check_latent, coords_for

NODE = "GL_ConceptEraseTrain"
TRAINABLE = ("auto", "attn2 q/k/v/out", "attn2 k/v", "text input (SD3/Flux)", "text stream qkv (SD3/Flux)")
_UNET_TRAINABLE = {"attn2 q/k/v/out": ("to_q", "to_k", "to_v", "to_out.0"), "attn2 k/v": ("to_k", "to_v")}
_TEXT_STREAM = {"Flux": re.compile(r"^diffusion_model\.double_blocks\.\d+\.txt_attn\.qkv\.weight$"),
                "SD3": re.compile(r"^diffusion_model\.joint_blocks\.\d+\.context_block\.attn\.qkv\.weight$")}


class _Adapter(torch.nn.Module):
    """A LoRA weight wrapper W ↦ W + (α/r)·up·down that can be switched off (frozen predictions)."""

    def __init__(self, weight: torch.Tensor, rank: int, gen: torch.Generator):
        super().__init__()
        out_dim, in_dim = weight.shape[0], weight[0].numel()
        r = min(rank, out_dim, in_dim)
        self.down = torch.nn.Parameter(torch.randn(r, in_dim, generator=gen) / math.sqrt(in_dim))
        self.up = torch.nn.Parameter(torch.zeros(out_dim, r))
        self.scale = 1.0                  # α = r: α/r = 1, as the exported LoRA stores it
        self.enabled = True

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up @ self.down)

    def __call__(self, w):
        if not self.enabled:
            return w
        return (w + self.delta().to(w.device).reshape(w.shape)).to(w.dtype)


def _conds(model, clip, text: str, batch: int, device, x: torch.Tensor) -> dict:
    """The model's keyword conditioning for `text`, repeated to `batch`."""
    return tr.model_conds(model, clip, er.tokenize_one(clip, text, NODE), batch, device, x, NODE)




class _Model:
    """ε predictions of the loaded training clone on a batch with per-part conditionings.

    `copy_saved`: the transformer blocks of some families (Flux) add their residuals in place, which autograd
    refuses when the tensor was saved for the backward pass; the tensors saved during a tuned forward are then
    copied (saved-tensor hooks), so the backward sees the values the forward used, at the cost of that memory."""

    def __init__(self, patcher, adapters, flow: bool, copy_saved: bool = False):
        self.model, self.adapters, self.flow, self.copy_saved = patcher.model, adapters, flow, copy_saved

    def set_tuned(self, on: bool) -> None:
        for a in self.adapters:
            a.enabled = on

    def eps(self, x, sigma, parts: list[dict], *, tuned: bool) -> list[torch.Tensor]:
        self.set_tuned(tuned)
        n = len(parts)
        xs, ss = torch.cat([x] * n), torch.cat([sigma] * n)
        with tr.saved_copies(self.copy_saved and tuned):
            d = self.model.apply_model(xs, ss, **tr.cat_conds(parts)).float()
        alpha = 1.0 - ss.float() if self.flow else torch.ones_like(ss, dtype=torch.float32)  # x = α·x0 + σ·ε
        return list(noise_from_denoised(xs, d, ss, alpha).chunk(n))


def _trajectories(net: _Model, shape, conds_e, cond_u, *, count, steps, cfg, gen, device, model_sampling):
    """(x_t, σ_t) of `count` CFG Euler trajectories of the frozen model per erased concept, with the concept index."""
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "normal", steps).to(device)
    xs, ss, ks = [], [], []
    for k, cond_e in enumerate(conds_e):
        noise = torch.randn((count, *shape), generator=gen).to(device)
        x = model_sampling.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=True)
        for i in range(len(sigmas) - 1):
            s = sigmas[i].expand(count)
            xs.append(x)                         # the pool stays on the device: no copy per training step
            ss.append(s)
            ks.append(torch.full((count,), k))   # on the CPU: read as a list per step
            with torch.no_grad():
                c = net.model.apply_model(torch.cat([x, x]), torch.cat([s, s]),
                                          **tr.cat_conds([cond_e, cond_u])).float()
            d_c, d_u = c.chunk(2)
            denoised = d_u + cfg * (d_c - d_u)
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
            comfy.model_management.throw_exception_if_processing_interrupted()
    return torch.cat(xs), torch.cat(ss), torch.cat(ks)


def train_erasure(model, clip, latent: dict, *, erase: str, alternative: str = "", preserve: str = "",
                  steps: int = 500, learning_rate: float = 1e-4, rank: int = 8, batch: int = 2, eta: float = 1.0,
                  lambda_u: float = 1.0, lambda_p: float = 0.5, trajectories: int = 16, trajectory_steps: int = 30,
                  trajectory_cfg: float = 5.0, trainable: str = "auto", seed: int = 0):
    """(a clone of `model` with the trained erasure as weight patches, the GL_ERASURE edit)."""
    t0 = time.perf_counter()
    erased, alts, kept = _check(clip, erase, alternative, preserve, steps, batch, trainable, trajectories)
    keys, family = _keys(model, clip, trainable)
    shape = _latent_shape(model, latent)
    flow = coords_for(model.get_model_object("model_sampling"), node=NODE).kind == "flow"
    gen = torch.Generator().manual_seed(seed)
    t = model.clone()
    with torch.inference_mode(False):
        base = t.model_state_dict()
        adapters = {k: _Adapter(base[k], rank, gen) for k in keys}
        for k, a in adapters.items():
            t.add_weight_wrapper(k, a)
        t.model.requires_grad_(False)
        try:
            # text first: encoding loads the CLIP, which must not push the training clone out afterwards
            device = t.load_device
            x_probe = torch.zeros((1, *shape), device=device)
            conds = ([_conds(t.model, clip, c, 1, device, x_probe) for c in erased],
                     [_conds(t.model, clip, a, 1, device, x_probe) for a in alts],
                     _conds(t.model, clip, "", 1, device, x_probe),
                     [_conds(t.model, clip, p, 1, device, x_probe) for p in kept])
            comfy.model_management.load_models_gpu([t], memory_required=1e20, force_full_load=True)
            for a in adapters.values():
                a.to(device)
            net = _Model(t, list(adapters.values()), flow, copy_saved=family != "UNet")
            pbar = comfy.utils.ProgressBar(trajectories * trajectory_steps * len(erased) + steps)
            with torch.no_grad():
                net.set_tuned(False)
                pool = _trajectories(net, shape, [tr.repeat_conds(c, trajectories) for c in conds[0]],
                                     tr.repeat_conds(conds[2], trajectories), count=trajectories,
                                     steps=trajectory_steps, cfg=trajectory_cfg, gen=gen, device=device,
                                     model_sampling=t.get_model_object("model_sampling"))
            pbar.update(trajectories * trajectory_steps * len(erased))
            history = _optimise(net, pool, conds, adapters, pbar, steps=steps, lr=learning_rate, batch=batch,
                                gen=gen, eta=eta, lambda_u=lambda_u, lambda_p=lambda_p)
            deltas = {k: a.delta().detach().float().cpu() for k, a in adapters.items()}
        finally:
            for a in adapters.values():
                a.enabled = False
            tr.unload_wrappers(t, _Adapter)
    m = model.clone()
    applied = m.add_patches(er.diff_patches(deltas, base), 1.0)
    if len(applied) != len(deltas):
        raise RuntimeError(f"{NODE}: {len(applied)} of {len(deltas)} patches matched the model's weights")
    meta = {"erase": erased, "alternative": alts, "preserve": kept, "method": "all-but-one (design)",
            "steps": steps, "learning_rate": learning_rate, "rank": rank, "batch": batch, "eta": eta,
            "lambda_u": lambda_u, "lambda_p": lambda_p, "trajectories": trajectories,
            "trajectory_steps": trajectory_steps, "trajectory_cfg": trajectory_cfg, "trainable": trainable,
            "seed": seed, "loss_history": history, "family": type(model.model).__name__,
            "seconds": round(time.perf_counter() - t0, 2)}
    logging.info("%s: %d steps in %.1f s; losses (guidance, uncond, preserve) first %s last %s", NODE, steps,
                 meta["seconds"], history[0][1:], history[-1][1:])
    return m, er.ErasureEdit(deltas, 1.0, meta)


def _optimise(net, pool, conds, adapters, pbar, *, steps, lr, batch, gen, eta, lambda_u, lambda_p) -> list:
    """AdamW on the adapters. Returns [step, L_g, L_u, L_p] measured on a fixed probe set of pool states (the
    same states, conditionings and weights every time, so the rows compare): before the first step (step 0),
    every 25 steps and after the last."""
    opt = torch.optim.AdamW([p for a in adapters.values() for p in a.parameters()], lr=lr, weight_decay=0.0)
    probe = _draw(pool, conds, min(len(pool[0]), max(2 * batch, 8)), torch.Generator().manual_seed(7))
    history = [_probe(net, pool, conds, probe, batch, eta, 0)]
    with torch.enable_grad():
        for step in range(steps):
            losses = _losses(net, pool, conds, _draw(pool, conds, batch, gen), eta)
            total = losses["guidance"] + lambda_u * losses["uncond"] + lambda_p * losses["preserve"]
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            if (step + 1) % 25 == 0 or step == steps - 1:
                history.append(_probe(net, pool, conds, probe, batch, eta, step + 1))
            pbar.update(1)
            comfy.model_management.throw_exception_if_processing_interrupted()
    return history


def _probe(net, pool, conds, probe, batch: int, eta: float, step: int) -> list:
    """[step, L_g, L_u, L_p] on the probe draw, evaluated `batch` states at a time (no gradients)."""
    idx, pick = probe
    sums, n = {"guidance": 0.0, "uncond": 0.0, "preserve": 0.0}, len(idx)
    with torch.no_grad():
        for i in range(0, n, batch):
            part = (idx[i:i + batch], None if pick is None else pick[i:i + batch])
            losses = _losses(net, pool, conds, part, eta)
            for name in sums:
                sums[name] += float(losses[name]) * len(part[0])
    return [step] + [round(sums[name] / n, 6) for name in ("guidance", "uncond", "preserve")]


def _keys(model, clip, trainable: str) -> tuple[list[str], str]:
    """The weights the adapters train: UNet cross-attention projections, or on SD3/Flux the text input
    projections or the text stream's fused q/k/v in every joint block."""
    family = er.family_of(model, "K+V", clip, NODE)
    state = model.model_state_dict()
    er.check_text(model, clip, family, state, NODE)
    if trainable == "auto":
        trainable = "attn2 q/k/v/out" if family.name == "UNet" else "text stream qkv (SD3/Flux)"
    if family.name == "UNet":
        if trainable not in _UNET_TRAINABLE:
            raise ValueError(f"{NODE}: trainable {trainable!r} is for SD3/Flux; on this UNet model choose "
                             f"{' or '.join(_UNET_TRAINABLE)}")
        suffixes = tuple(f".{n}.weight" for n in _UNET_TRAINABLE[trainable])
        keys = [k for k in state if k.startswith("diffusion_model.") and ".attn2." in k and k.endswith(suffixes)]
        return keys, family.name
    if trainable == "text input (SD3/Flux)":
        return list(family.keys), family.name
    if trainable == "text stream qkv (SD3/Flux)":
        return sorted(k for k in state if _TEXT_STREAM[family.name].match(k)), family.name
    raise ValueError(f"{NODE}: trainable {trainable!r} names UNet cross-attention, which {family.name} does not have; "
                     "choose 'text input (SD3/Flux)' or 'text stream qkv (SD3/Flux)'")


def _latent_shape(model, latent) -> tuple:
    import comfy.sample
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not torch.is_tensor(samples) or samples.ndim < 4:
        raise ValueError(f"{NODE}: latent must be a LATENT (e.g. EmptyLatentImage at the size you sample); it sets "
                         "the size of the training trajectories")
    check_latent(model, samples, node=NODE)
    return tuple(comfy.sample.fix_empty_latent_channels(model, samples[:1]).shape[1:])


def _draw(pool, conds, n: int, gen: torch.Generator) -> tuple:
    """`n` pool indices and, when there are preserved concepts, which one each state is paired with."""
    idx = torch.randint(0, len(pool[0]), (n,), generator=gen)
    pick = torch.randint(0, len(conds[3]), (n,), generator=gen) if conds[3] else None
    return idx, pick


def _losses(net: _Model, pool, conds, draw: tuple, eta: float) -> dict:
    xs, ss, ks = pool
    c_e, c_a, c_u, c_p = conds
    idx, pick = draw
    x, s, k = xs[idx.to(xs.device)], ss[idx.to(ss.device)], ks[idx].tolist()
    n = len(k)
    erase_part = tr.cat_conds([c_e[i] for i in k])
    alt_part = tr.cat_conds([c_a[i] for i in k])
    uncond_part = tr.repeat_conds(c_u, n)
    parts_ref, parts_tuned = [alt_part, uncond_part], [erase_part, uncond_part]
    if pick is not None:
        pres = tr.cat_conds([c_p[i] for i in pick.tolist()])
        parts_ref.append(pres)
        parts_tuned.append(pres)
    with torch.no_grad():
        ref = net.eps(x, s, parts_ref, tuned=False)
    tuned = net.eps(x, s, parts_tuned, tuned=True)
    return ek.surgical_losses(tuned[0], tuned[1], ref[0], ref[1], eta=eta,
                              eps_preserve=tuned[2] if c_p else None, ref_preserve=ref[2] if c_p else None)


def _check(clip, erase, alternative, preserve, steps, batch, trainable, trajectories):
    if clip is None:
        raise ValueError(f"{NODE}: connect the CLIP that belongs to the model")
    erased, alts, kept = er.split_concepts(erase), er.split_concepts(alternative), er.split_concepts(preserve)
    if not erased:
        raise ValueError(f"{NODE}: erase is empty; name the concept(s) to erase (';'-separated)")
    if len(alts) not in (0, 1, len(erased)):
        raise ValueError(f"{NODE}: alternative has {len(alts)} entries for {len(erased)} erased concept(s); give "
                         "one for all, one per erased concept, or none (the empty prompt)")
    alts = alts * len(erased) if len(alts) == 1 else (alts or [""] * len(erased))
    if trainable not in TRAINABLE:
        raise ValueError(f"{NODE}: trainable {trainable!r}: choose one of {', '.join(TRAINABLE)}")
    for name, value in (("steps", steps), ("batch", batch), ("trajectories", trajectories)):
        if value < 1:
            raise ValueError(f"{NODE}: {name} must be at least 1, got {value}")
    return erased, alts, kept
