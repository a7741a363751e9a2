"""Adapter guidance distillation in the host (kernels/agd.py): where the adapters sit, how they run, their files.

Sites and running:
* UNets (SD1.x, SD2.x, SDXL, the demo model): every cross-attention (attn2) of every transformer block —
  ("input", id, j), ("middle", 0, j), ("output", id, j) as ComfyUI names them in `transformer_options["block"]` /
  `["block_index"]`. An `attn2_patch` keeps the block's normalised input and its context (it changes nothing it is
  given, so other packs' attn2 patches compose) and an `attn2_output_patch` adds the attention adapter's output to
  the cross-attention's output: the adapter is a residual on the wrapped module, as in the authors' code.
  With `top_sites` (Guidance Lab design, off by default) adapters also sit on the hidden states entering each
  full-resolution output block (an `output_block_patch`; they read the prompt tokens the cross-attentions of the
  same call saw). `heads` > 1 splits each adapter's attention into heads (Guidance Lab design; the paper's has one).
* SD3 and Flux: no attention-level patch reaches these blocks, so the additive adapter (the authors' DiT type)
  offsets the image tokens of every joint/double block's output and every token of every single block's output
  (`patches_replace["dit"]`; a replacement already there is called, not dropped). Placement on the block output
  rather than inside the attention is Guidance Lab's design for these families.

Everything is a model patch on a clone; sample with cfg 1: one model call per step. The guidance scale ω is the
node's value, or per batch row `transformer_options["guidance_lab"]["agd_omega"]` (training passes one ω per
sample). The time token of UNet adapters projects sinusoidal features of the model timestep t(σ) (the authors
project the UNet's own time embedding of t: Guidance Lab design, same information).
"""
from __future__ import annotations

import json
import logging
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch


from ..kernels import agd as ak
from .family import network_family as family
from .weight_files import WeightFolder

NODE = "GL_AGDApply"
FORMAT = "guidance_lab.agd_adapter/1"
FOLDER_NAME = "gl_agd"
PACK_FILES = ("demo_agd.safetensors",)
TIME_FEATURES = 64
OMEGA_KEY = "agd_omega"
_SITE = re.compile(r"^diffusion_model\.(input_blocks|middle_block|output_blocks)\.?(\d*)\.1\.transformer_blocks\."
                   r"(\d+)\.attn2\.to_(q|k)\.weight$")
_DIT_SITE = re.compile(r"^diffusion_model\.(?:(double_blocks)\.(\d+)\.img_attn\.qkv|(single_blocks)\.(\d+)\.linear2|"
                       r"(joint_blocks)\.(\d+)\.x_block\.attn\.qkv)\.weight$")
_BLOCK = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


class AGDError(ValueError):
    """Models, adapters or files the AGD nodes cannot serve."""


@dataclass
class AGDAdapter:
    """The GL_AGD_ADAPTER value: adapter modules (CPU, float32) keyed by site, with what they were made for."""

    modules: torch.nn.ModuleDict
    family: str                         # "UNet", "SD3" or "Flux"
    config: dict                        # kind, hidden, features, use_prompt, time_token, seed
    sites: dict                         # site -> [dims]
    name: str = ""
    info: dict = field(default_factory=dict)

    def parameters(self) -> int:
        return sum(p.numel() for p in self.modules.parameters())


def top_blocks(model, sd: dict | None = None) -> dict[int, int]:
    """UNet output blocks that run at the latent's full resolution (the top level): {block index: width of the
    hidden states entering it}, from the model's config and its weights (`sd`: its state dict, if already read)."""
    cfg = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    nrb = cfg.get("num_res_blocks")
    if nrb is None or "context_dim" not in cfg:
        return {}
    per_level = [int(r) + 1 for r in (nrb if isinstance(nrb, (list, tuple)) else [nrb] * len(cfg["channel_mult"]))]
    total = sum(per_level)
    sd = model.model_state_dict() if sd is None else sd
    out: dict[int, int] = {}
    for i in range(total - per_level[0], total):
        w = sd.get(f"diffusion_model.output_blocks.{i - 1}.0.out_layers.3.weight")
        if w is None:
            return {}
        out[i] = int(w.shape[0])
    return out


_SITES_SEEN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # network -> {top: sites}


def sites(model, *, top: bool = False, node: str = NODE) -> dict[str, tuple[int, ...]]:
    """UNet: {"input_4_0": (hidden width, context width), …}; SD3/Flux: {"double_0": (width,), "single_3": …}.
    top (UNets): also the inputs of the full-resolution output blocks, {"top_6": (width, context width), …}.
    Kept per network (reading its state dict costs ≈ 10 ms, and GL_AGDApply checks it on every run)."""
    seen = _SITES_SEEN.setdefault(model.model, {})
    if top not in seen:
        seen[top] = _find_sites(model, top, node)
    return dict(seen[top])


def _find_sites(model, top: bool, node: str) -> dict[str, tuple[int, ...]]:
    fam = family(model)
    if fam == "Flux" and getattr(getattr(model.model.diffusion_model, "params", None), "global_modulation", False):
        raise AGDError(f"{node}: this Flux variant shares one modulation across blocks (global_modulation); "
                       "adapters are placed on Flux.1, SD3 and UNet models in this version")
    found: dict[str, list[int]] = {}
    sd = model.model_state_dict()
    for key, w in sd.items():
        if fam == "UNet":
            m = _SITE.match(key)
            if m:
                kind, idx, j, proj = m.groups()
                entry = found.setdefault(f"{_BLOCK[kind]}_{idx or 0}_{j}", [0, 0])
                entry[0 if proj == "q" else 1] = int(w.shape[1])
            continue
        m = _DIT_SITE.match(key)
        if m:
            double, di, single, si, joint, ji = m.groups()
            name = f"double_{di}" if double else f"single_{si}" if single else f"double_{ji}"
            found[name] = [int(w.shape[0]) if single else int(w.shape[1])]
    if not found:
        raise AGDError(f"{node}: the model ({type(model.model).__name__}) has no UNet cross-attention and no SD3/Flux "
                       "blocks; adapters are placed on SD1.x, SD2.x, SDXL (and the demo model), SD3 and Flux")
    if top and fam == "UNet":
        blocks = top_blocks(model, sd)
        if not blocks:
            raise AGDError(f"{node}: the top-level sites need an SD-style UNet config (num_res_blocks, context_dim); "
                           f"this {type(model.model).__name__} has none; train without them")
        ctx = next(iter(found.values()))[1]
        found.update({f"top_{i}": [w, ctx] for i, w in blocks.items()})
    return {k: tuple(v) for k, v in sorted(found.items())}


def build_adapters(model, *, hidden: int = 320, features: int = 256, use_prompt: bool = True,
                   time_token: bool = True, omega_gain: bool = False, top_sites: bool = False, heads: int = 1,
                   seed: int = 0, node: str = NODE) -> AGDAdapter:
    """Fresh (zero-output) adapters for every site of `model`, seeded (the global RNG is left as it was).
    top_sites (UNets): adapters also on the full-resolution output blocks' inputs; heads (UNets): attention heads
    per adapter (the paper's adapter has one). Both are Guidance Lab design."""
    fam = family(model)
    top_sites = bool(top_sites and fam == "UNet")
    found = sites(model, top=top_sites, node=node)
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False):
        torch.manual_seed(seed)
        mods = {}
        for i, (name, dims) in enumerate(found.items()):
            if fam == "UNet":
                mods[name] = ak.AttentionAdapter(dims[0], hidden=hidden, d_time=TIME_FEATURES if time_token else 0,
                                                 d_context=dims[1] if use_prompt else 0, seed=seed + i,
                                                 features=features, omega_gain=omega_gain, heads=heads)
            else:
                mods[name] = ak.AdditiveAdapter(dims[0], hidden=hidden, d_vec=dims[0] if time_token else 0,
                                                seed=seed + i, features=features, omega_gain=omega_gain)
        modules = torch.nn.ModuleDict(mods)
    config = {"kind": "attention" if fam == "UNet" else "additive", "hidden": hidden, "features": features,
              "use_prompt": bool(use_prompt and fam == "UNet"), "time_token": bool(time_token), "seed": seed}
    if omega_gain:                      # files without the key are the paper's architecture
        config["omega_gain"] = True
    if top_sites:                       # files without the key have the paper's placement
        config["top_sites"] = True
    if heads != 1 and fam == "UNet":    # files without the key have one head
        config["heads"] = int(heads)
    return AGDAdapter(modules, fam, config, {k: list(v) for k, v in found.items()},
                      info={"model_class": type(model.model).__name__})


def check_model(model, adapter: AGDAdapter, *, node: str = NODE) -> None:
    if not isinstance(adapter, AGDAdapter):
        raise AGDError(f"{node}: connect a GL_AGD_ADAPTER (from GL_AGDLoader or GL_AGDTrain); got "
                       f"{type(adapter).__name__}")
    fam = family(model)
    found = {k: list(v) for k, v in sites(model, top=bool(adapter.config.get("top_sites")), node=node).items()}
    if fam != adapter.family or found != adapter.sites:
        diff = sorted(set(found) ^ set(adapter.sites)) or [k for k in found if found[k] != adapter.sites.get(k)]
        label = f"the adapter '{adapter.name}'" if adapter.name else "the adapter"
        raise AGDError(f"{node}: {label} was made for a {adapter.family} model "
                       f"({adapter.info.get('model_class', '?')}) with {len(adapter.sites)} sites; this {fam} model "
                       f"({type(model.model).__name__}) has {len(found)} and they differ (e.g. {diff[:3]}); use the "
                       "base model the adapter was trained on")


def _row_omega(extra_options: dict, rows: int, device) -> torch.Tensor | None:
    """The per-row ω a caller put in `transformer_options` (training), or None."""
    w = extra_options.get("guidance_lab", {}).get(OMEGA_KEY)
    if torch.is_tensor(w) and w.numel() == rows:
        return w.reshape(rows).to(device, torch.float32)
    return None


def _omega(extra_options: dict, omega: float, rows: int, device) -> torch.Tensor:
    w = _row_omega(extra_options, rows, device)
    return w if w is not None else torch.full((rows,), float(omega), device=device)


def _warn_uncond(extra_options: dict, warned: list) -> None:
    """Log once per patched model when unconditional rows reach the adapters (the sampler's cfg is not 1)."""
    if not warned and 1 in (extra_options.get("cond_or_uncond") or ()):
        warned.append(True)
        logging.warning("%s: the model with distilled guidance is being sampled with cfg != 1 (unconditional rows "
                        "are evaluated); the adapters already imitate CFG, so use cfg 1 (one model call per step)",
                        NODE)


def _on(module: torch.nn.Module, device) -> torch.nn.Module:
    if next(module.parameters()).device != device:
        module.to(device)
    return module


def apply_adapters(model, adapter: AGDAdapter, omega: float, *, strength: float = 1.0, node: str = NODE):
    """A clone of `model` whose sites get the adapters' residual at guidance scale ω (times `strength`)."""
    check_model(model, adapter, node=node)
    m = model.clone()
    if adapter.family == "UNet":
        _patch_unet(m, adapter, omega, strength)
    else:
        _patch_dit(m, adapter, omega, strength)
    return m


def _patch_unet(m, adapter: AGDAdapter, omega: float, strength: float) -> None:
    ms = m.get_model_object("model_sampling")
    stash: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    folded: dict[str, ak.FoldedAttention] = {}          # inference snapshots, refolded when parameters change
    shared: dict = {}                                   # the time features of the model call being run
    prompt = {"generation": 0, "seen": None, "copy": None}   # the prompt tokens last seen, and a counter of changes
    prompt_kv: dict[str, tuple] = {}                    # site -> (generation, folded form, prompt tokens' K,V)
    warned: list = []

    def site(extra_options: dict) -> str:
        kind, idx = extra_options["block"]
        return f"{kind}_{idx}_{extra_options.get('block_index', 0)}"

    def keep(n, context, value, extra_options):
        stash[site(extra_options)] = (n, context)
        shared["context"] = context                     # what the top-level sites read (no context reaches them)
        return n, context, value

    def time_features(extra_options: dict, rows: int, device) -> torch.Tensor:
        """t(σ) features, computed once per model call (every site of a call gets the same `sigmas` tensor)."""
        sigma = extra_options["sigmas"]
        key = (rows, device)
        if shared.get("sigmas") is not sigma or shared.get("key") != key:
            t = ms.timestep(sigma.to(device).float()).reshape(-1)
            shared.update(sigmas=sigma, key=key, features=ak.timestep_features(
                t.repeat_interleave(rows // t.shape[0]), TIME_FEATURES))
        return shared["features"]

    def prompt_generation(context: torch.Tensor) -> int:
        """A number that changes whenever the prompt tokens do. The tensor is rebuilt for every model call, so on CPU
        its values are compared with the last ones once per call (≈ 10 µs); on other devices that comparison would
        stall the queue, so every call counts as new there and the prompt's keys/values are recomputed."""
        if context is prompt["seen"]:
            return prompt["generation"]
        last = prompt["copy"]
        same = (context.device.type == "cpu" and last is not None and last.shape == context.shape
                and last.dtype == context.dtype and torch.equal(last, context))
        if not same:
            prompt["generation"] += 1
            prompt["copy"] = context.clone() if context.device.type == "cpu" else None
        prompt["seen"] = context
        return prompt["generation"]

    def residual(name: str, h: torch.Tensor, context, extra_options: dict, device) -> torch.Tensor:
        """The adapter of site `name` on hidden states h [B, N, C] (times `strength`)."""
        _warn_uncond(extra_options, warned)
        rows = h.shape[0]
        if torch.is_grad_enabled():                     # training: the module itself, so gradients reach it
            mod = _on(adapter.modules[name], device)
            t_emb = time_features(extra_options, rows, device) if mod.time is not None else None
            out = mod(h, _omega(extra_options, omega, rows, device), t_emb,
                      context if mod.prompt is not None else None)
        else:
            f = folded.get(name)
            if f is None or f.device != device or f.stale():
                f = folded[name] = ak.FoldedAttention(_on(adapter.modules[name], device))
            t_emb = time_features(extra_options, rows, device) if f.time is not None else None
            per_row = _row_omega(extra_options, rows, device)
            okv = f.omega_kv(per_row) if per_row is not None else f.constant_omega_kv(omega, rows)
            gain = None
            if f.omega_gain:
                gain = ak.omega_gain(per_row) if per_row is not None else float(omega) - 1.0
            pkv = None
            if f.prompt is not None:
                gen, cached = prompt_generation(context), prompt_kv.get(name)
                if cached is None or cached[0] != gen or cached[1] is not f:
                    cached = prompt_kv[name] = (gen, f, f.prompt_kv(context))
                pkv = cached[2]
            out = f(h, f.kv(okv, t_emb, prompt_kv=pkv) if pkv is not None else f.kv(okv, t_emb), gain=gain)
        return out if strength == 1.0 else strength * out

    def add(n, extra_options):
        name = site(extra_options)
        h, context = stash.pop(name)
        return n + residual(name, h, context, extra_options, n.device).to(n.dtype)

    def add_top(h, hsp, extra_options):
        kind, idx = extra_options.get("block", ("", -1))
        name = f"top_{idx}"
        if kind != "output" or name not in adapter.modules:
            return h, hsp
        context = shared.get("context")
        if context is None and adapter.config.get("use_prompt"):
            raise AGDError(f"{NODE}: no prompt tokens reached the top-level adapters (no cross-attention ran before "
                           "them in this model call)")
        b, c = h.shape[:2]
        tokens = h.reshape(b, c, -1).transpose(1, 2)
        out = residual(name, tokens, context, extra_options, h.device)
        return h + out.transpose(1, 2).reshape(h.shape).to(h.dtype), hsp

    m.set_model_attn2_patch(keep)
    m.set_model_attn2_output_patch(add)
    if any(name.startswith("top_") for name in adapter.sites):
        m.set_model_output_block_patch(add_top)


def _patch_dit(m, adapter: AGDAdapter, omega: float, strength: float) -> None:
    existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    warned: list = []
    for name in adapter.sites:
        kind, idx = name.split("_")
        block_name = f"{kind}_block"
        previous = existing.get((block_name, int(idx)))
        m.set_model_patch_replace(_dit_block(adapter.modules[name], omega, strength, previous, warned), "dit",
                                  block_name, int(idx))


def _dit_block(mod, omega: float, strength: float, previous, warned: list):
    def block(args, extra):
        out = previous(args, extra) if previous is not None else extra["original_block"](args)
        img = out["img"]
        topts = args.get("transformer_options", {})
        _warn_uncond(topts, warned)
        _on(mod, img.device)
        w = _omega(topts, omega, img.shape[0], img.device)
        vec = args.get("vec") if mod.vec is not None else None
        offset = mod(w, vec)
        return {**out, "img": img + (strength * offset[:, None]).to(img.dtype)}
    return block


# ------------------------------------------------------------------------------------------------------ files

_FILES = WeightFolder(FOLDER_NAME, FOLDER_NAME, PACK_FILES, AGDError, "adapter", "GL_AGDLoader")
folders, files, resolve = _FILES.folders, _FILES.files, _FILES.resolve


def save(adapter: AGDAdapter, path: str | Path) -> Path:
    """Write adapters as safetensors (float32; metadata: format, family, config, sites, training info)."""
    import comfy.utils
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "family": adapter.family, "config": json.dumps(adapter.config, sort_keys=True),
            "sites": json.dumps(adapter.sites, sort_keys=True), "info": json.dumps(adapter.info, sort_keys=True)}
    sd = {k: v.detach().float().cpu().contiguous() for k, v in adapter.modules.state_dict().items()}
    comfy.utils.save_torch_file(sd, str(path), metadata=meta)
    return path


def load(path: str | Path, *, node: str = "GL_AGDLoader") -> AGDAdapter:
    """Read a file written by `save` (safetensors only; modules rebuilt from the metadata, Fourier buffers
    included)."""
    import comfy.utils
    path = Path(path)
    if path.suffix != ".safetensors":
        raise AGDError(f"{node}: '{path.name}' is not a .safetensors file; adapters are stored as safetensors only")
    sd, meta = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    if not meta or meta.get("format") != FORMAT:
        raise AGDError(f"{node}: '{path.name}' is not a Guidance Lab AGD adapter (format "
                       f"{(meta or {}).get('format')!r}); pick a file written by GL_AGDTrain")
    config, site_dims = json.loads(meta["config"]), json.loads(meta["sites"])
    fam = meta["family"]
    gain = bool(config.get("omega_gain", False))
    with torch.inference_mode(False):
        mods = {}
        for name, dims in site_dims.items():
            if config["kind"] == "attention":
                mods[name] = ak.AttentionAdapter(dims[0], hidden=config["hidden"], features=config["features"],
                                                 d_time=TIME_FEATURES if config["time_token"] else 0,
                                                 d_context=dims[1] if config["use_prompt"] else 0,
                                                 omega_gain=gain, heads=int(config.get("heads", 1)))
            else:
                mods[name] = ak.AdditiveAdapter(dims[0], hidden=config["hidden"], features=config["features"],
                                                d_vec=dims[0] if config["time_token"] else 0, omega_gain=gain)
        modules = torch.nn.ModuleDict(mods)
        missing, unexpected = modules.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise AGDError(f"{node}: '{path.name}' does not match its own metadata (missing {missing[:3]}, unexpected "
                       f"{unexpected[:3]})")
    modules.eval().requires_grad_(False)
    info = json.loads(meta.get("info", "{}"))
    logging.info("%s: loaded %s (%s, %d sites)", node, path.name, fam, len(site_dims))
    return AGDAdapter(modules, fam, config, site_dims, path.stem, info)
