"""Concept erasure as a reversible weight patch (kernels/erasure.py): the UCE closed form on every cross-attention
K/V projection of a UNet model, applied with `add_patches` on a clone (never an in-place edit), and its export as
a LoRA file the core LoraLoader reloads.

Stacking: each edit is solved against the model's *effective* weights (the original plus the patches already on
it, e.g. an earlier erasure or a LoRA), so two erasure nodes in a row compose like two sequential edits.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import comfy.lora
import comfy.model_patcher
import folder_paths

from ..kernels import erasure as ek

NODE = "GL_ConceptErase"
TOKEN_MODES = ek.TOKEN_MODES
TEMPLATES = {
    "none": ("{}",),
    "object": ("{}", "image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"),
    "art": ("{}", "painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"),
}
TARGETS = {"K+V": ("to_k", "to_v"), "K only": ("to_k",), "V only": ("to_v",)}
_KEY = re.compile(r"^diffusion_model\..*\.attn2\.(to_k|to_v)\.weight$")
LORA_FOLDER = "loras"


@dataclass
class ErasureEdit:
    """What GL_ConceptErase computed: ΔW per weight key (float32, CPU), the strength it was applied with, settings."""

    deltas: dict[str, torch.Tensor]
    strength: float
    metadata: dict = field(default_factory=dict)


def split_concepts(text: str | None) -> list[str]:
    """Concepts separated by ';' or new lines, trimmed, empty ones dropped."""
    return [p.strip() for p in re.split(r"[;\n]", text or "") if p.strip()]


def split_lines(text: str | None) -> list[str]:
    """One prompt per line, trimmed; a blank input means the empty prompt."""
    lines = [line.strip() for line in (text or "").splitlines()]
    lines = list(dict.fromkeys(line for line in lines if line))
    return lines or [""]


def target_keys(model: comfy.model_patcher.ModelPatcher, targets: str) -> list[str]:
    """Weight keys of the cross-attention projections `targets` names; a clear error for other families."""
    if targets not in TARGETS:
        raise ValueError(f"{NODE}: targets {targets!r}: choose one of {', '.join(TARGETS)}")
    kinds = TARGETS[targets]
    keys = [k for k in model.model_state_dict() if (m := _KEY.match(k)) and m.group(1) in kinds]
    if not keys:
        family = type(model.model).__name__
        raise ValueError(
            f"{NODE}: the model ({family}) has no UNet cross-attention K/V projections (attn2.to_k / attn2.to_v). "
            "This version edits UNet models (SD1.x, SD2.x, SDXL and the pack's demo model); SD3 and Flux "
            "(MMDiT text streams) are not supported yet — use a UNet checkpoint")
    return sorted(keys)


def tokenize_one(clip, text: str) -> tuple[list, int, int]:
    """(tokens, number of content tokens, sequence length) of `text`, which must fit one chunk."""
    tokens = clip.tokenize(text)
    key = next(iter(tokens))
    if any(len(chunks) != 1 for chunks in tokens.values()):
        raise ValueError(f"{NODE}: the prompt {text!r} is longer than one text-encoder chunk (75 tokens); shorten it")
    ids = [int(t[0]) for t in tokens[key][0]]
    sub = getattr(clip.tokenizer, f"clip_{key}", None)
    end = getattr(sub, "end_token", None)
    if end is None or end not in ids:
        raise ValueError(f"{NODE}: cannot find the end-of-text token of {text!r} (text encoder {key!r}); this "
                         "version reads CLIP-style tokenizers (SD1.x, SD2.x, SDXL)")
    return tokens, ids.index(end) - 1, len(ids)


def encode(clip, text: str) -> tuple[torch.Tensor, int]:
    """The hidden states the UNet receives for `text` ([T, d], float32; CLIP-skip respected) and its number of
    content tokens."""
    tokens, content, _length = tokenize_one(clip, text)
    cond = clip.encode_from_tokens(tokens, return_pooled=False, return_dict=True)["cond"]
    return cond[0].float().cpu(), content


def _pairs(clip, erase: list[str], alternative: list[str], templates: tuple[str, ...], mode: str):
    """Erase states C_e [d, n] and alternative states C_a [d, n] (paired columns) over templates and concepts."""
    ce, ca = [], []
    for concept, alt in zip(erase, alternative):
        for template in templates:
            e_states, e_content = encode(clip, template.format(concept))
            a_states, a_content = encode(clip, template.format(alt) if alt else "")
            for i, j in ek.pair_positions(mode, e_content, a_content, min(len(e_states), len(a_states))):
                ce.append(e_states[i])
                ca.append(a_states[j])
    return torch.stack(ce, 1), torch.stack(ca, 1)


def _preserve(clip, preserve: list[str], templates: tuple[str, ...], mode: str) -> torch.Tensor | None:
    cols = []
    for concept in preserve:
        for template in templates:
            states, content = encode(clip, template.format(concept))
            cols += [states[i] for i, _j in ek.pair_positions(mode, content, content, len(states))]
    return torch.stack(cols, 1) if cols else None


def effective_weight(model: comfy.model_patcher.ModelPatcher, key: str, state: dict) -> torch.Tensor:
    """The weight the sampler will use for `key`: the original plus the patches already on `model` (float32).

    `state` is `model.model_state_dict()`. While some clone of the model is loaded its patches are applied to the
    shared weights in place; the originals are then in the clones' shared `backup`, which is read first."""
    saved = model.backup.get(key)
    base = saved.weight if saved is not None else state[key]
    weight = base.detach().to("cpu", torch.float32, copy=True)
    patches = model.patches.get(key)
    if patches:
        weight = comfy.lora.calculate_weight(patches, weight, key)
    return weight


def concept_erase(model, clip, *, erase: str, alternative: str = "", preserve: str = "", erase_scale: float = 1.0,
                  preserve_scale: float = 1.0, lam: float = 0.5, token_mode: str = "last_content",
                  templates: str = "none", custom_templates: str = "", targets: str = "K+V",
                  protect_uncond: bool = True, uncond_prompts: str = "",
                  strength: float = 1.0) -> tuple[comfy.model_patcher.ModelPatcher, ErasureEdit]:
    """A clone of `model` with the closed-form erasure as patches, and the edit itself (for LoRA export)."""
    t0 = time.perf_counter()
    if clip is None:
        raise ValueError(f"{NODE}: connect the CLIP that belongs to the model (the edit is solved on its text states)")
    erased, alts, kept = split_concepts(erase), split_concepts(alternative), split_concepts(preserve)
    if len(alts) not in (0, 1, len(erased)) or (len(alts) > 1 and not erased):
        raise ValueError(f"{NODE}: alternative has {len(alts)} entries for {len(erased)} erased concept(s); give "
                         "one alternative for all, one per erased concept (same order, ';'-separated), or none")
    alts = alts * len(erased) if len(alts) <= 1 else alts
    alts = alts or [""] * len(erased)
    template_list = _templates(templates, custom_templates)
    keys = target_keys(model, targets)
    m = model.clone()
    edit = ErasureEdit({}, strength, {
        "erase": erased, "alternative": alts, "preserve": kept, "erase_scale": erase_scale,
        "preserve_scale": preserve_scale, "lambda": lam, "token_mode": token_mode, "templates": list(template_list),
        "targets": targets, "protect_uncond": protect_uncond, "uncond_prompts": split_lines(uncond_prompts),
        "family": type(model.model).__name__})
    if not erased:
        logging.info("%s: nothing to erase (empty erase list): the model is returned unchanged", NODE)
        return m, edit
    ce, ca = _pairs(clip, erased, alts, template_list, token_mode)
    cp = _preserve(clip, kept, template_list, token_mode)
    basis = None
    if protect_uncond:
        u = torch.cat([encode(clip, p)[0] for p in split_lines(uncond_prompts)], 0).T          # [d, 77·n]
        basis = ek.span_basis(u)
        kept_share = ek.surviving_fraction(ce, basis)
        edit.metadata["erase_norm_kept"] = round(float(kept_share.mean()), 4)
        edit.metadata["protected_dims"] = int(basis.shape[1])
        logging.info("%s: protect_uncond removes a %d-dim span; erase directions keep %.0f %% of their norm "
                     "(mean; min %.0f %%)", NODE, basis.shape[1], 100 * float(kept_share.mean()),
                     100 * float(kept_share.min()))
    state = model.model_state_dict()
    width = ce.shape[0]
    for key in keys:
        w = effective_weight(model, key, state)
        if w.shape[1] != width:
            raise ValueError(f"{NODE}: {key} reads {w.shape[1]}-wide text states but the CLIP gives {width}: "
                             "connect the CLIP of this checkpoint")
        edit.deltas[key] = ek.closed_form_delta(w, ce, w @ ca, cp, lam=lam, erase_scale=erase_scale,
                                                preserve_scale=preserve_scale, protect=basis)
    applied = m.add_patches({k: (d.to(state[k].dtype),) for k, d in edit.deltas.items()}, strength)
    if len(applied) != len(keys):
        raise RuntimeError(f"{NODE}: {len(applied)} of {len(keys)} patches matched the model's weights")
    edit.metadata["seconds"] = round(time.perf_counter() - t0, 3)
    logging.info("%s: erased %s -> %s on %d projections (%d state pairs, %d preserved) in %.2f s", NODE, erased,
                 alts, len(keys), ce.shape[1], 0 if cp is None else cp.shape[1], edit.metadata["seconds"])
    return m, edit


def _templates(choice: str, custom: str) -> tuple[str, ...]:
    if choice == "custom":
        lines = tuple(line.strip() for line in (custom or "").splitlines() if line.strip())
        bad = [line for line in lines if line.count("{}") != 1]
        if not lines or bad:
            raise ValueError(f"{NODE}: custom_templates needs one template per line, each with exactly one '{{}}' "
                             f"where the concept goes (e.g. 'a photo of {{}}'); got {bad or 'nothing'}")
        return lines
    if choice not in TEMPLATES:
        raise ValueError(f"{NODE}: templates {choice!r}: choose one of {', '.join([*TEMPLATES, 'custom'])}")
    return TEMPLATES[choice]


# --------------------------------------------------------------------------------------------------- LoRA export

def lora_state_dict(edit: ErasureEdit, *, rank: int = 0, energy: float = 0.999) -> tuple[dict, float]:
    """A standard LoRA dict (`<module>.lora_up.weight`, `.lora_down.weight`, `.alpha`) whose effect at strength 1
    equals the edit at the strength it was applied with; returns it and the worst relative truncation error."""
    sd, worst = {}, 0.0
    for key, delta in edit.deltas.items():
        up, down, err = ek.low_rank(delta.float() * edit.strength, rank=rank, energy=energy)
        module = key[: -len(".weight")]
        sd[f"{module}.lora_up.weight"] = up.contiguous()
        sd[f"{module}.lora_down.weight"] = down.contiguous()
        sd[f"{module}.alpha"] = torch.tensor(float(up.shape[1]))
        worst = max(worst, err)
    return sd, worst


def save_lora(edit: ErasureEdit, filename_prefix: str, *, rank: int = 0, energy: float = 0.999,
              folder: str | None = None) -> tuple[Path, float]:
    """Write the edit as a LoRA safetensors file (metadata: family, concepts, settings, truncation error)."""
    import json

    import comfy.utils
    if not edit.deltas:
        raise ValueError("GL_SaveErasureLoRA: the erasure is empty (nothing was erased), so there is no LoRA to save")
    sd, err = lora_state_dict(edit, rank=rank, energy=energy)
    root = folder or folder_paths.get_folder_paths(LORA_FOLDER)[0]
    full, name, counter, _sub, prefix = folder_paths.get_save_image_path(filename_prefix, root)
    Path(full).mkdir(parents=True, exist_ok=True)
    path = Path(full) / f"{name}_{counter:05}_.safetensors"
    meta = {"guidance_lab": "concept_erase", "family": str(edit.metadata.get("family", "")),
            "relative_truncation_error": f"{err:.3g}", "rank": str(rank), "energy": str(energy),
            "settings": json.dumps({k: v for k, v in edit.metadata.items() if k != "family"}, sort_keys=True)}
    comfy.utils.save_torch_file(sd, str(path), metadata=meta)
    logging.info("GL_SaveErasureLoRA: wrote %s (%d modules, worst relative truncation error %.2e)", path,
                 len(edit.deltas), err)
    return path, err
