"""Adapter guidance distillation in the host (kernels/agd.py): where the adapters sit on a UNet and how they run.

Sites: every cross-attention (attn2) of every transformer block — ("input", id, j), ("middle", 0, j),
("output", id, j) as ComfyUI's UNet names them in `transformer_options["block"]` / `["block_index"]`.
Running: an `attn2_patch` keeps the block's normalised input and its context for the current block (it changes
nothing it is given, so other packs' attn2 patches compose), and an `attn2_output_patch` adds the block's adapter
output to the cross-attention's output — the adapter is a residual on the wrapped module, as in the authors' code.
Both are model patches on a clone (`set_model_attn2_patch` / `set_model_attn2_output_patch`); sample with cfg 1:
one model call per step.
"""
from __future__ import annotations

import re

import torch

from ..kernels import agd as ak

NODE = "GL_AGDApply"
_SITE = re.compile(r"^diffusion_model\.(input_blocks|middle_block|output_blocks)\.?(\d*)\.1\.transformer_blocks\."
                   r"(\d+)\.attn2\.to_(q|k)\.weight$")
_BLOCK = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


class AGDError(ValueError):
    """Models or adapters GL_AGDApply cannot serve."""


def sites(model, *, node: str = NODE) -> dict[str, tuple[int, int]]:
    """{"input.4.0": (hidden width, context width), …} for every cross-attention of a UNet."""
    found: dict[str, list[int]] = {}
    for key, w in model.model_state_dict().items():
        m = _SITE.match(key)
        if not m:
            continue
        kind, idx, j, proj = m.groups()
        name = f"{_BLOCK[kind]}.{idx or 0}.{j}"
        entry = found.setdefault(name, [0, 0])
        entry[0 if proj == "q" else 1] = int(w.shape[1])
    if not found:
        raise AGDError(f"{node}: the model ({type(model.model).__name__}) has no UNet cross-attention; this version "
                       "places adapters on UNet models (SD1.x, SD2.x, SDXL, the demo model)")
    return {k: (v[0], v[1]) for k, v in sorted(found.items())}


def build_adapters(model, *, hidden: int = 320, use_prompt: bool = True, seed: int = 0) -> torch.nn.ModuleDict:
    """Fresh (zero-output) adapters for every site of `model`, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.ModuleDict({
            name.replace(".", "_"): ak.AttentionAdapter(d_in, hidden=hidden, d_context=d_ctx if use_prompt else 0,
                                                        seed=seed + i)
            for i, (name, (d_in, d_ctx)) in enumerate(sites(model).items())})


def _site(extra_options: dict) -> str:
    kind, idx = extra_options["block"]
    return f"{kind}_{idx}_{extra_options.get('block_index', 0)}"


def apply_adapters(model, adapters: torch.nn.ModuleDict, omega: float, *, node: str = NODE):
    """A clone of `model` whose cross-attentions get the adapters' residual at guidance scale ω."""
    want = {n.replace(".", "_") for n in sites(model, node=node)}
    if set(adapters) != want:
        example = sorted(want ^ set(adapters))[:3]
        raise AGDError(f"{node}: the adapter was made for another model: its {len(adapters)} sites do not match "
                       f"this model's {len(want)} cross-attentions (e.g. {example}); use the base model the adapter "
                       "was trained on")
    stash: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(n, context, value, extra_options):
        stash[_site(extra_options)] = (n, context)
        return n, context, value

    def add(n, extra_options):
        name = _site(extra_options)
        h, context = stash.pop(name)
        adapter = adapters[name]
        dev = n.device
        if next(adapter.parameters()).device != dev:
            adapter.to(dev)
        w = torch.full((h.shape[0],), float(omega), device=dev)
        ctx = context if adapter.prompt is not None else None
        return n + adapter(h, w, None, ctx).to(n.dtype)

    m = model.clone()
    m.set_model_attn2_patch(keep)
    m.set_model_attn2_output_patch(add)
    return m
