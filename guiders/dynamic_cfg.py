"""Dynamic CFG by online feedback as a MODEL patch: one pre-CFG hook, 0 extra NFE.

Each step inside the window, every candidate scale w of the grid cfg·{multipliers} gives D_w = D_u + w·(D_c − D_u)
(no model call); evaluators score each candidate's decoded image per sample — the classifier's log-probability
of the target, or with a CLIP zero-shot classifier the CLIP similarity to the target's text (alignment, optional),
and a clipping penalty (fidelity) — the scores are z-normalised over the
candidates, weighted by run progress (alignment 1 → 0.3, fidelity 0.3 → 1) and the best candidate within
`max_change` of the previous step's choice wins. The hook hands the host c' = D_u + (w*/cfg)·(D_c − D_u), so the
standard combine (or whatever CFG function and post-CFG nodes follow) sees D_u + w*·(D_c − D_u). Outside the
window the last choice is kept. The chosen scales are logged at the end of each run (INFO).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

import comfy.patcher_extension

from ..kernels.dynamic_cfg import as_cond, candidate_scales, choose, clipping_penalty, progress_weights, zscore
from .classifier_guidance import decode, pick_decoder
from .family import in_window
from .nfe import install_nfe_counter
from .run_state import install_run_state, run_state, step_index

NODE = "GL_DynamicCFG"
STATE_KEY = "dynamic_cfg"
log = logging.getLogger("guidance_lab")


def parse_multipliers(text: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).replace(";", ",").split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"{NODE}: multipliers {text!r} must be numbers separated by commas, e.g. "
                         "'0.5, 0.75, 1, 1.25, 1.5'") from e
    if len(values) < 2 or any(v < 0 for v in values):
        raise ValueError(f"{NODE}: multipliers {text!r} need at least two non-negative values, e.g. "
                         "'0.5, 0.75, 1, 1.25, 1.5'")
    return values


def check_settings(*, multipliers, max_change, alignment_weight, fidelity_weight, start_percent, end_percent):
    if isinstance(multipliers, str):
        parse_multipliers(multipliers)
    if max_change < 0:
        raise ValueError(f"{NODE}: max_change ({max_change}) must be >= 0 (0 = no limit)")
    if alignment_weight < 0 or fidelity_weight < 0 or alignment_weight + fidelity_weight == 0:
        raise ValueError(f"{NODE}: alignment_weight ({alignment_weight}) and fidelity_weight ({fidelity_weight}) "
                         "must be >= 0 and not both 0")
    if not 0.0 <= start_percent < end_percent <= 1.0:
        raise ValueError(f"{NODE}: start_percent ({start_percent}) must be smaller than end_percent "
                         f"({end_percent}), both in [0, 1]")


def patch_dynamic_cfg(model, *, classifier=None, target: str = "", multipliers="0.5, 0.75, 1, 1.25, 1.5",
                      max_change: float = 1.0, alignment_weight: float = 1.0, fidelity_weight: float = 1.0,
                      start_percent: float = 0.0, end_percent: float = 0.7, decoder: str = "auto",
                      evaluators: list[Callable] | None = None, trace: dict | None = None, vae=None):
    """A clone of `model` whose CFG scale is chosen per step and per sample. `evaluators`: extra callables
    (images [B, 3, H, W] in about [0, 1], candidate scale) -> score [B], higher is better, weighted like the
    alignment score (for custom scorers and tests). `trace`: a dict whose "last" is set to each run's
    {"previous", "trace": [(step, [chosen scale per image])]}."""
    check_settings(multipliers=multipliers, max_change=max_change, alignment_weight=alignment_weight,
                   fidelity_weight=fidelity_weight, start_percent=start_percent, end_percent=end_percent)
    mults = parse_multipliers(multipliers) if isinstance(multipliers, str) else [float(v) for v in multipliers]
    if classifier is not None:
        classifier.target_indices(target, 1, node=NODE)
    latent_format = model.get_model_object("latent_format")
    chosen_decoder = pick_decoder(latent_format, decoder, node=NODE, vae=vae)
    extra = list(evaluators or [])
    holder: dict = trace if trace is not None else {}
    holder["last"] = None
    m = model.clone()
    m.model_options["disable_cfg1_optimization"] = True      # candidates need the uncond even at cfg 1
    install_nfe_counter(m)

    install_run_state(m, STATE_KEY, lambda _guider: {"previous": None, "trace": []})

    def report(executor, *args, **kwargs):
        try:
            return executor(*args, **kwargs)
        finally:
            state = holder["last"]
            if state and state["trace"]:
                first = ", ".join(f"{w[0]:g}" for _i, w in state["trace"])
                log.info("%s: chosen cfg per evaluated step (image 0): %s", NODE, first)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, f"guidance_lab.{STATE_KEY}.report",
                           report)

    def scores_of(candidate, scale, targets):
        image = decode(candidate.float(), latent_format, chosen_decoder, vae, node=NODE)
        fid = -clipping_penalty(image)
        align = []
        if classifier is not None:
            logits = classifier.logits(image, node=NODE)
            if getattr(classifier, "kind", "classifier") != "clip_zero_shot":
                logits = torch.log_softmax(logits, dim=1)        # a classifier: log-probability of the target
            # CLIP zero-shot: the target's scaled cosine similarity (a CLIP score), meaningful even for one label
            align.append(logits.gather(1, targets.view(-1, 1).to(logits.device)).squeeze(1))
        align += [torch.as_tensor(fn(image, float(scale)), dtype=torch.float32, device=image.device) for fn in extra]
        return align, fid

    def pre_cfg(args):
        out, cfg = args["conds_out"], float(args["cond_scale"])
        if args["conds"][1] is None or len(out) < 2:
            return out
        if cfg == 0:
            raise ValueError(f"{NODE}: cfg = 0 leaves no guidance to rescale; use cfg > 0")
        model_options = args["model_options"]
        state = run_state(model_options, STATE_KEY)
        if state is None:
            return out
        holder["last"] = state
        ms = args["model"].model_sampling
        sigma = float(args["sigma"].max())
        d_c, d_u = out[0], out[1]
        if not in_window(ms, sigma, start_percent, end_percent):
            prev = state["previous"]
            if prev is None or len(prev) != d_c.shape[0]:
                return out
            return [as_cond(d_c, d_u, prev.to(d_c.device), cfg), *out[1:]]
        step = step_index(model_options, args["sigma"]) or 0
        sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        n = max(len(sigmas) - 1, 1) if sigmas is not None else 1
        lam_align, lam_fid = progress_weights(step / max(n - 1, 1))
        scales = candidate_scales(cfg, mults)
        targets = classifier.target_indices(target, d_c.shape[0], node=NODE) if classifier is not None else None
        aligns, fids = [], []
        with torch.no_grad():
            for w in scales.tolist():
                align, fid = scores_of(d_u + w * (d_c - d_u), w, targets)
                aligns.append(align)
                fids.append(fid)
        total = fidelity_weight * lam_fid * zscore(torch.stack(fids, dim=1))
        for j in range(len(aligns[0])):
            total = total + alignment_weight * lam_align * zscore(torch.stack([a[j] for a in aligns], dim=1))
        total = total - 1e-6 * (scales.to(total.device) - cfg).abs().view(1, -1)   # ties: stay near cfg
        prev = state["previous"]
        prev = prev.to(total.device) if prev is not None and len(prev) == d_c.shape[0] else None
        chosen = choose(total, scales, prev, max_change)
        state["previous"] = chosen.detach().cpu()
        state["trace"].append((step, [round(float(v), 4) for v in chosen]))
        return [as_cond(d_c, d_u, chosen.to(d_c.device), cfg), *out[1:]]

    m.set_model_sampler_pre_cfg_function(pre_cfg)
    return m
