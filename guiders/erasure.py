"""Concept erasure as a reversible weight patch (kernels/erasure.py): the UCE closed form on every weight that
reads the text (UNets: every cross-attention K/V projection; SD3 and Flux: the token and pooled input
projections), applied with `add_patches` on a clone (never an in-place edit), and its export as a LoRA file the
core LoraLoader reloads.

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

import comfy.hooks
import comfy.lora
import comfy.model_base
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


@dataclass(frozen=True)
class Family:
    """Where text enters a model family: the weights that read the token states, the one that reads the pooled
    vector (None: not edited), and the parts of the token sequence the model receives, in order ("clip": a
    CLIP-style chunk with a start token, "t5": T5 tokens without one)."""

    name: str
    token_keys: tuple[str, ...]
    pooled_key: str | None
    layout: tuple[str, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return self.token_keys + ((self.pooled_key,) if self.pooled_key else ())


@dataclass
class Text:
    """One prompt as the model receives it: token states [T, d], pooled vector [p] (or None) and, per layout
    part, (offset in the sequence, first content position, content tokens, length)."""

    states: torch.Tensor
    pooled: torch.Tensor | None
    segments: list[tuple[int, int, int, int]]


def split_concepts(text: str | None) -> list[str]:
    """Concepts separated by ';' or new lines, trimmed, empty ones dropped."""
    return [p.strip() for p in re.split(r"[;\n]", text or "") if p.strip()]


def split_lines(text: str | None) -> list[str]:
    """One prompt per line, trimmed; a blank input means the empty prompt."""
    lines = [line.strip() for line in (text or "").splitlines()]
    lines = list(dict.fromkeys(line for line in lines if line))
    return lines or [""]


def family_of(model: comfy.model_patcher.ModelPatcher, targets: str = "K+V", clip=None,
              node: str = NODE) -> Family:
    """The model's family as far as erasure is concerned; a clear error for families this node cannot edit.

    UNets (SD1.x, SD2.x, SDXL, the demo model): every cross-attention K/V projection reads the CLIP states.
    SD3 and Flux (MMDiT): K and V are computed in every block from a text stream that has already mixed with the
    image, so the closed form edits where the text enters instead (as the UCE authors' Flux script does): the
    token input projection (SD3 `context_embedder`, Flux `txt_in`) and the pooled-vector projection (SD3
    `y_embedder`, Flux `vector_in`)."""
    if targets not in TARGETS:
        raise ValueError(f"{node}: targets {targets!r}: choose one of {', '.join(TARGETS)}")
    state = model.model_state_dict()
    inner, kind = model.model, type(model.model).__name__
    mmdit = None
    if isinstance(inner, comfy.model_base.Flux) and "diffusion_model.txt_in.weight" in state:
        pooled = "diffusion_model.vector_in.in_layer.weight"
        mmdit = Family("Flux", ("diffusion_model.txt_in.weight",), pooled if pooled in state else None, ("t5",))
    elif isinstance(inner, comfy.model_base.SD3) and "diffusion_model.context_embedder.weight" in state:
        pooled = "diffusion_model.y_embedder.mlp.0.weight"
        encoder = getattr(clip, "cond_stage_model", None)
        layout = tuple(part for part, present in (
            ("clip", getattr(encoder, "clip_l", None) is not None or getattr(encoder, "clip_g", None) is not None),
            ("t5", getattr(encoder, "t5xxl", None) is not None)) if present)
        mmdit = Family("SD3", ("diffusion_model.context_embedder.weight",), pooled if pooled in state else None,
                       layout or ("clip", "t5"))
    if mmdit is not None:
        if targets != "K+V":
            raise ValueError(f"{node}: targets {targets!r} splits cross-attention K and V, which {mmdit.name} does "
                             "not have (its K/V are computed from a text stream that mixes with the image); choose "
                             "K+V, which on this family edits the text input projections")
        return mmdit
    kinds = TARGETS[targets]
    keys = tuple(sorted(k for k in state if (m := _KEY.match(k)) and m.group(1) in kinds))
    if not keys:
        raise ValueError(
            f"{node}: the model ({kind}) has no UNet cross-attention K/V projections (attn2.to_k / attn2.to_v) and "
            "is not SD3 or Flux. Concept erasure supports SD1.x, SD2.x, SDXL (and the pack's demo model), SD3 and "
            "Flux checkpoints")
    return Family("UNet", keys, None, ("clip",))


def tokenize_one(clip, text: str, node: str = NODE) -> dict:
    """The tokens of `text`; every CLIP-style part must fit one chunk (T5 parts are never split)."""
    tokens = clip.tokenize(text)
    if any(len(chunks) != 1 for chunks in tokens.values()):
        raise ValueError(f"{node}: the prompt {text!r} is longer than one text-encoder chunk (75 tokens); shorten it")
    return tokens


def _segment(clip, tokens: dict, part: str, text: str, node: str) -> tuple[str, int, int, int]:
    """(token key, first content position, content tokens, length) of one layout part of `tokens`."""
    if part == "t5":
        key = "t5xxl" if "t5xxl" in tokens else None
    else:
        key = "l" if "l" in tokens else next((k for k in tokens if k != "t5xxl"), None)
    if key is None:
        raise ValueError(f"{node}: the CLIP gives no {'T5' if part == 't5' else 'CLIP'} tokens, which this model "
                         "reads: connect the text encoder(s) of this checkpoint")
    ids = [int(t[0]) for t in tokens[key][0]]
    sub = getattr(clip.tokenizer, f"clip_{key}", None) or getattr(clip.tokenizer, key, None)
    end, first = getattr(sub, "end_token", None), getattr(sub, "tokens_start", 1)
    if end is None or end not in ids:
        raise ValueError(f"{node}: cannot find the end-of-text token of {text!r} (text encoder {key!r}); this "
                         "version reads CLIP and T5 tokenizers (SD1.x, SD2.x, SDXL, SD3, Flux)")
    return key, first, ids.index(end) - first, len(ids)


def encode_text(clip, text: str, family: Family, node: str = NODE) -> Text:
    """The token states and pooled vector the model receives for `text` (float32, CPU; CLIP-skip respected)."""
    tokens = tokenize_one(clip, text, node)
    parts = [_segment(clip, tokens, part, text, node) for part in family.layout]
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    states = out["cond"][0].float().cpu()
    segments, offset = [], 0
    for _key, first, content, length in parts:
        segments.append((offset, first, content, length))
        offset += length
    if offset != states.shape[0]:
        raise ValueError(f"{node}: the CLIP gives {states.shape[0]} token states for {text!r} where a {family.name} "
                         f"text encoder gives {offset} ({' + '.join(family.layout)}): connect the text encoder(s) of "
                         "this checkpoint")
    pooled = out.get("pooled_output")
    return Text(states, None if pooled is None else pooled[0].float().cpu(), segments)


def encode(clip, text: str) -> tuple[torch.Tensor, int]:
    """UNet families: the CLIP states the UNet receives for `text` ([T, d]) and its number of content tokens."""
    t = encode_text(clip, text, Family("UNet", (), None, ("clip",)))
    return t.states, t.segments[0][2]


def check_text(model, clip, family: Family, state: dict, node: str = NODE) -> None:
    """A clear error when `clip` is not the text encoder `model` reads (sequence layout, widths)."""
    probe = encode_text(clip, "", family, node)
    widths = {k: probe.states.shape[-1] for k in family.token_keys}
    if family.pooled_key and probe.pooled is not None:
        widths[family.pooled_key] = probe.pooled.shape[-1]
    for key, width in widths.items():
        if state[key].shape[1] != width:
            raise ValueError(f"{node}: {key} reads {state[key].shape[1]}-wide inputs but the CLIP gives {width}: "
                             "connect the text encoder(s) of this checkpoint")


def positions(mode: str, e: Text, a: Text) -> list[tuple[int, int]]:
    """Paired token positions of two prompts, part by part (kernels.erasure.pair_positions)."""
    out = []
    for (eo, ef, ec, el), (ao, _af, ac, al) in zip(e.segments, a.segments):
        out += [(eo + i, ao + j) for i, j in ek.pair_positions(mode, ec, ac, min(el, al), ef)]
    return out


def _pairs(clip, family: Family, erase: list[str], alternative: list[str], templates: tuple[str, ...], mode: str):
    """Paired columns (erase, alternative) over templates and concepts: token states [d, n] each, and pooled
    vectors [p, m] each (None when the model's pooled input is not edited)."""
    ce, ca, pe, pa = [], [], [], []
    for concept, alt in zip(erase, alternative):
        for template in templates:
            e = encode_text(clip, template.format(concept), family)
            a = encode_text(clip, template.format(alt) if alt else "", family)
            for i, j in positions(mode, e, a):
                ce.append(e.states[i])
                ca.append(a.states[j])
            if family.pooled_key and e.pooled is not None and a.pooled is not None:
                pe.append(e.pooled)
                pa.append(a.pooled)
    # an encoder without the pooled part (e.g. SD3 with T5 only) gives zeros: nothing to edit there
    pooled = (torch.stack(pe, 1), torch.stack(pa, 1)) if pe and any(bool(v.any()) for v in pe) else None
    return (torch.stack(ce, 1), torch.stack(ca, 1)), pooled


def _preserve(clip, family: Family, preserve: list[str], templates: tuple[str, ...], mode: str):
    """Preserved columns: token states [d, n] and pooled vectors [p, m] (None where there are none)."""
    cols, pooled = [], []
    for concept in preserve:
        for template in templates:
            t = encode_text(clip, template.format(concept), family)
            cols += [t.states[i] for i, _j in positions(mode, t, t)]
            if t.pooled is not None:
                pooled.append(t.pooled)
    return (torch.stack(cols, 1) if cols else None), (torch.stack(pooled, 1) if pooled else None)


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


def diff_patches(deltas: dict[str, torch.Tensor], state: dict) -> dict:
    """ΔW per weight key as the host's plain-difference patches, in each weight's dtype (for `add_patches` and for
    a weight hook)."""
    return {k: (d.to(state[k].dtype),) for k, d in deltas.items()}


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
    family = family_of(model, targets, clip)
    state = model.model_state_dict()
    check_text(model, clip, family, state)
    m = model.clone()
    edit = ErasureEdit({}, strength, {
        "erase": erased, "alternative": alts, "preserve": kept, "erase_scale": erase_scale,
        "preserve_scale": preserve_scale, "lambda": lam, "token_mode": token_mode, "templates": list(template_list),
        "targets": targets, "protect_uncond": protect_uncond, "uncond_prompts": split_lines(uncond_prompts),
        "family": type(model.model).__name__, "edited": list(family.keys)})
    if not erased:
        logging.info("%s: nothing to erase (empty erase list): the model is returned unchanged", NODE)
        return m, edit
    (ce, ca), pooled_pairs = _pairs(clip, family, erased, alts, template_list, token_mode)
    cp, pp = _preserve(clip, family, kept, template_list, token_mode)
    basis = pooled_basis = None
    if protect_uncond:
        unconds = [encode_text(clip, p, family) for p in split_lines(uncond_prompts)]
        basis = ek.span_basis(torch.cat([u.states for u in unconds], 0).T)          # [d, k]
        if pooled_pairs is not None:
            pooled_basis = ek.span_basis(torch.stack([u.pooled for u in unconds], 1))
        kept_share = ek.surviving_fraction(ce, basis)
        edit.metadata["erase_norm_kept"] = round(float(kept_share.mean()), 4)
        edit.metadata["protected_dims"] = int(basis.shape[1])
        logging.info("%s: protect_uncond removes a %d-dim span of the %d-dim token states; erase directions keep "
                     "%.0f %% of their norm (mean; min %.0f %%)", NODE, basis.shape[1], ce.shape[0],
                     100 * float(kept_share.mean()), 100 * float(kept_share.min()))
    jobs = [(key, ce, ca, cp, basis) for key in family.token_keys]
    if pooled_pairs is not None:
        jobs.append((family.pooled_key, *pooled_pairs, pp, pooled_basis))
    for key, c_erase, c_alt, c_keep, protect in jobs:
        w = effective_weight(model, key, state)
        edit.deltas[key] = ek.closed_form_delta(w, c_erase, w @ c_alt, c_keep, lam=lam, erase_scale=erase_scale,
                                                preserve_scale=preserve_scale, protect=protect)
    applied = m.add_patches(diff_patches(edit.deltas, state), strength)
    if len(applied) != len(jobs):
        raise RuntimeError(f"{NODE}: {len(applied)} of {len(jobs)} patches matched the model's weights")
    edit.metadata["seconds"] = round(time.perf_counter() - t0, 3)
    logging.info("%s: erased %s -> %s on %d %s projections (%d state pairs, %d preserved) in %.2f s", NODE, erased,
                 alts, len(jobs), family.name, ce.shape[1], 0 if cp is None else cp.shape[1],
                 edit.metadata["seconds"])
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


def erasure_hooks(edit: ErasureEdit, model: comfy.model_patcher.ModelPatcher) -> comfy.hooks.HookGroup | None:
    """The edit as a HOOKS group (one ComfyUI weight hook holding the same ΔW at the same strength). Attached to a
    conditioning (core Cond Set Props), only that conditioning's model calls run with the edited weights: every
    other one — CFG's negative/unconditional branch included — runs the original weights bit for bit, because the
    host restores them from its own copy between groups. None for an empty edit (nothing to attach)."""
    if not edit.deltas:
        return None
    hook = comfy.hooks.WeightHook(strength_model=edit.strength, strength_clip=0.0)
    hook.weights = diff_patches(edit.deltas, model.model_state_dict())
    hook.need_weight_init = False                 # already keyed by the model's weight names: no LoRA key map
    group = comfy.hooks.HookGroup()
    group.add(hook)
    return group


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
        raise ValueError("GL_SaveErasureLoRA: the erasure is empty (nothing was erased), so there is no LoRA to save; "
                         "name at least one concept in GL_ConceptErase's erase input")
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
