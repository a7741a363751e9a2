"""Hypernetwork personalization in the host: which weights a hypernetwork adapts on each family, its file format,
and turning subject images into a personalized model (weight patches on a clone) plus the same LoRA as a hook
group (for hybrid-model CFG on one model: GL_MultiModelGuider mode hybrid with the hook on positive_2).

A hypernetwork with the clip_vision encoder reads a ComfyUI CLIP_VISION model's penultimate hidden states
(`encode_image(image, crop=True).penultimate_hidden_states`: [N, T, d], the class token and the patch tokens, as
IP-Adapter Plus reads them), computed here with the frozen CLIP vision model under no_grad; the file stores d and T,
and a CLIP vision model giving other sizes (another ViT, another input size) is refused.

The math (encoder, decoder, factors, penalty) is kernels/hypernet.py; training is guiders/hypernet_train.py.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

import comfy.hooks
import comfy.lora
import comfy.model_patcher

from ..kernels import hypernet as hk
from .family import network_family as family
from .weight_files import WeightFolder

NODE = "GL_Personalize"
FOLDER_NAME = "gl_hypernetworks"
PACK_FILES = ("demo_hypernet.safetensors",)
FORMAT = "guidance_lab.hypernetwork/1"
MAX_IMAGES = 64
CLIP_VISION_WIDTHS = ("ViT-L/14 gives 1024-wide, ViT-H/14 1280-wide, ViT-bigG/14 1664-wide features; 257 tokens "
                      "at 224 px")

# which weights a hypernetwork adapts, per family (linear weights; convolutions as [out, in·k·k], as LoRA files
# store them)
LAYERS = {
    "attention": {
        "UNet": r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$",
        "Flux": r"\.(double_blocks\.\d+\.(img_attn|txt_attn)\.(qkv|proj)|single_blocks\.\d+\.linear[12])\.weight$",
        "SD3": r"\.joint_blocks\.\d+\.(x_block|context_block)\.attn\.(qkv|proj)\.weight$",
    },
    "attention + feed-forward": {
        "UNet": r"\.transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))\.weight$",
        "Flux": r"\.(double_blocks\.\d+\.(img_attn|txt_attn)\.(qkv|proj)|double_blocks\.\d+\.(img_mlp|txt_mlp)\.[02]"
                r"|single_blocks\.\d+\.linear[12])\.weight$",
        "SD3": r"\.joint_blocks\.\d+\.(x_block|context_block)\.(attn\.(qkv|proj)|mlp\.fc[12])\.weight$",
    },
    "attention + feed-forward + convolutions (UNet)": {
        "UNet": r"(\.transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
                r"|\.(in_layers\.2|out_layers\.3))\.weight$",
    },
    "cross-attention k/v (UNet)": {"UNet": r"\.attn2\.(to_k|to_v)\.weight$"},
}


class HypernetError(ValueError):
    """Bad hypernetwork files, images or model combinations."""


@dataclass
class Hypernet:
    """A loaded hypernetwork (custom type GL_HYPERNET): the module (CPU, float32, eval) and its file metadata."""

    module: hk.HyperNetwork
    family: str
    layers: str
    name: str = ""
    info: dict = field(default_factory=dict)

    @property
    def targets(self) -> list[hk.Target]:
        return self.module.targets


def targets_for(model, layers: str = "attention", *, node: str = NODE) -> list[hk.Target]:
    """The weights `layers` selects on this model, with their shapes (sorted by key)."""
    if layers not in LAYERS:
        raise HypernetError(f"{node}: layers {layers!r}: choose one of {', '.join(LAYERS)}")
    fam = family(model)
    pattern = LAYERS[layers].get(fam)
    if pattern is None:
        raise HypernetError(f"{node}: layers {layers!r} does not exist on {fam} models; choose 'attention'")
    rx = re.compile(pattern)
    out = [hk.Target(k, int(w.shape[0]), int(w[0].numel())) for k, w in sorted(model.model_state_dict().items())
           if k.startswith("diffusion_model.") and w.ndim >= 2 and rx.search(k)]
    if not out:
        raise HypernetError(f"{node}: the model ({type(model.model).__name__}) has no {layers} weights this pack "
                            "can adapt; supported: SD1.x/SD2.x/SDXL UNets, SD3 and Flux")
    return out


# ------------------------------------------------------------------------------------------------------ files

_FILES = WeightFolder(FOLDER_NAME, FOLDER_NAME, PACK_FILES, HypernetError, "hypernetwork", "GL_HypernetworkLoader")
folders, files, resolve = _FILES.folders, _FILES.files, _FILES.resolve


def save(hn: Hypernet, path: str | Path, extra: dict | None = None, *, half: bool = False) -> Path:
    """Write a hypernetwork as safetensors (metadata: format, family, layers, config, targets). Weights are float32,
    or with `half` float16 (half the file; `load` widens them to float32 again, so only the stored values are
    rounded: a relative error of about 5e-4 per weight)."""
    import comfy.utils
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "family": hn.family, "layers": hn.layers, "config": json.dumps(hn.module.config),
            "targets": json.dumps([[t.key, t.out_dim, t.in_dim] for t in hn.targets]),
            "info": json.dumps({**hn.info, **(extra or {})}, sort_keys=True)}
    dtype = torch.float16 if half else torch.float32
    sd = {k: v.detach().to(dtype if v.is_floating_point() else v.dtype).cpu().contiguous()
          for k, v in hn.module.state_dict().items()}
    comfy.utils.save_torch_file(sd, str(path), metadata=meta)
    return path


def load(path: str | Path, *, node: str = "GL_HypernetworkLoader") -> Hypernet:
    """Read a file written by `save` (safetensors only; the architecture is rebuilt from the metadata)."""
    import comfy.utils
    path = Path(path)
    if path.suffix != ".safetensors":
        raise HypernetError(f"{node}: '{path.name}' is not a .safetensors file; hypernetworks are stored as "
                            "safetensors only")
    sd, meta = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    if not meta or meta.get("format") != FORMAT:
        raise HypernetError(f"{node}: '{path.name}' is not a Guidance Lab hypernetwork (format "
                            f"{(meta or {}).get('format')!r}); pick a file written by GL_HypernetworkTrain (core's "
                            "HypernetworkLoader reads old-style hypernetworks)")
    targets = [hk.Target(str(k), int(o), int(i)) for k, o, i in json.loads(meta["targets"])]
    with torch.inference_mode(False):
        module = hk.HyperNetwork(targets, json.loads(meta["config"]))
        missing, unexpected = module.load_state_dict(sd, strict=False)
    if not module.config["subject_query"] and module.config["decoder"] != "basis":
        # the pretraining head: only the subject-query path and the basis decoder read it
        missing = [k for k in missing if not k.startswith("project.")]
    if missing or unexpected:
        raise HypernetError(f"{node}: '{path.name}' does not match its own metadata (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    module.eval().requires_grad_(False)
    return Hypernet(module, meta["family"], meta["layers"], path.stem, json.loads(meta.get("info", "{}")))


# ------------------------------------------------------------------------------------------------ personalize

def _check_images(images: torch.Tensor, reads: str, *, node: str) -> None:
    """A clear error for what cannot be a batch of subject images."""
    if not torch.is_tensor(images) or images.ndim != 4:
        raise HypernetError(f"{node}: images must be an IMAGE batch [N, H, W, C] (e.g. from LoadImage); got "
                            f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
    n, h, w, c = images.shape
    if c not in (3, 4):
        raise HypernetError(f"{node}: subject images need 3 (RGB) or 4 (RGBA) channels; got {c}")
    if n < 1 or n > MAX_IMAGES:
        raise HypernetError(f"{node}: give 1 to {MAX_IMAGES} subject images; got {n}")
    if min(h, w) < 8:
        raise HypernetError(f"{node}: subject images of {w}×{h} pixels are too small (at least 8×8; {reads})")


def subject_images(images: torch.Tensor, size: int, *, node: str = NODE) -> torch.Tensor:
    """A ComfyUI IMAGE batch [N, H, W, C] → [N, 3, size, size] in [0, 1] (alpha dropped, centre-cropped to a
    square, resized); a clear error for what cannot be a subject image."""
    _check_images(images, f"the hypernetwork reads {size}×{size}", node=node)
    _n, h, w, _c = images.shape
    x = images[..., :3].permute(0, 3, 1, 2).float()
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[:, :, top:top + side, left:left + side]
    return hk.resize_images(x, size)


def clip_vision_features(clip_vision, images: torch.Tensor, *, node: str = NODE, chunk: int = 16) -> torch.Tensor:
    """IMAGE batch [N, H, W, C] → the frozen CLIP vision model's penultimate hidden states [N, T, d] (float32, CPU,
    an ordinary tensor without grad). encode_image's own preprocessing: the shorter side resized to the model's
    input size, centre crop, mean/std."""
    if clip_vision is None or not callable(getattr(clip_vision, "encode_image", None)):
        raise HypernetError(f"{node}: clip_vision must be a CLIP_VISION model (CLIPVisionLoader); got "
                            f"{type(clip_vision).__name__}")
    _check_images(images, f"the CLIP vision model reads {getattr(clip_vision, 'image_size', 224)} px", node=node)
    out = []
    with torch.no_grad():
        for part in images[..., :3].split(chunk):
            states = getattr(clip_vision.encode_image(part, crop=True), "penultimate_hidden_states", None)
            if not torch.is_tensor(states) or states.ndim != 3 or states.shape[0] != len(part):
                raise HypernetError(f"{node}: this CLIP vision model gives no penultimate hidden states [N, tokens, "
                                    "width]; load a CLIP ViT (ViT-L/14, ViT-H/14, ViT-bigG/14) with CLIPVisionLoader")
            out.append(states)
    with torch.inference_mode(False):           # an ordinary tensor: usable by autograd when training reads it
        return torch.cat(out).detach().float().cpu()


def check_features(hn: Hypernet, features: torch.Tensor, *, node: str = NODE) -> None:
    """A clear error unless `features` [N, T, d] have the token count and width the hypernetwork was trained on."""
    want = (hn.module.config["feature_tokens"], hn.module.config["feature_dim"])
    got = tuple(features.shape[1:])
    if got != want:
        raise HypernetError(
            f"{node}: the hypernetwork '{hn.name}' was trained on CLIP vision features of {want[0]} tokens × "
            f"{want[1]} wide, but the connected CLIP vision model gives {got[0]} tokens × {got[1]} wide: connect the "
            f"CLIP vision model it was trained with ({CLIP_VISION_WIDTHS})")


def missing_clip_vision(hn: Hypernet, label: str, *, node: str = NODE) -> HypernetError:
    """The error for a clip_vision hypernetwork used without a CLIP vision model; `label` names it ("the
    hypernetwork 'x'", "resume 'x'")."""
    cfg = hn.module.config
    return HypernetError(f"{node}: {label} reads CLIP vision features ({cfg['feature_tokens']} tokens × "
                         f"{cfg['feature_dim']} wide): connect the CLIP vision model it was trained with "
                         "(CLIPVisionLoader) to the clip_vision input")


def reference_inputs(hn: Hypernet, images: torch.Tensor, clip_vision=None, *, node: str = NODE) -> torch.Tensor:
    """What the hypernetwork reads from one subject's IMAGE batch: images [N, 3, s, s] (encoder conv) or CLIP vision
    features [N, T, d] (encoder clip_vision)."""
    cfg = hn.module.config
    if hn.module.reads_features:
        if clip_vision is None:
            raise missing_clip_vision(hn, f"the hypernetwork '{hn.name}'", node=node)
        features = clip_vision_features(clip_vision, images, node=node)
        check_features(hn, features, node=node)
        return features
    if clip_vision is not None:
        logging.warning("%s: the hypernetwork '%s' has its own image encoder (conv); the connected clip_vision is "
                        "not used", node, hn.name)
    return subject_images(images, cfg["image_size"], node=node)


def check_model(model, hn: Hypernet, *, node: str = NODE) -> None:
    """A clear error unless every target weight exists on `model` with the hypernetwork's shape."""
    fam = family(model)
    state = model.model_state_dict()
    bad = [t for t in hn.targets
           if t.key not in state or (state[t.key].shape[0], state[t.key][0].numel()) != (t.out_dim, t.in_dim)]
    if fam != hn.family or bad:
        what = ("is another family" if fam != hn.family
                else f"lacks or reshapes {len(bad)} of them (e.g. {bad[0].key})")
        raise HypernetError(
            f"{node}: the hypernetwork '{hn.name}' was trained for a {hn.family} model with {len(hn.targets)} "
            f"{hn.layers} weights; this {fam} model ({type(model.model).__name__}) {what}: use the base model the "
            "hypernetwork was trained on")


def predict(hn: Hypernet, inputs: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRA factors {key: (B [out, r], A [r, in])} for one subject from its images [N, 3, size, size] or features
    [N, T, d] (`reference_inputs`)."""
    with torch.inference_mode(False), torch.no_grad():
        factors = hn.module(inputs[None].float())
    return {k: (b[0].detach(), a[0].detach()) for k, (b, a) in factors.items()}


def lora_state_dict(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A standard LoRA dict (`<module>.lora_up.weight` = B, `.lora_down.weight` = A, `.alpha` = r: scale 1)."""
    sd = {}
    for key, (b, a) in factors.items():
        module = key[: -len(".weight")]
        sd[f"{module}.lora_up.weight"] = b.float().contiguous()
        sd[f"{module}.lora_down.weight"] = a.float().contiguous()
        sd[f"{module}.alpha"] = torch.tensor(float(a.shape[0]))
    return sd


def personalize(model, images: torch.Tensor, hn: Hypernet, *, strength: float = 1.0, clip_vision=None,
                node: str = NODE):
    """(a clone of `model` with the predicted LoRA as weight patches, the same LoRA as a HOOKS group, the LoRA
    state dict). The input model is untouched; strength 0 gives the base model's weights. `clip_vision`: required
    by hypernetworks with the clip_vision encoder, unused (a warning) by conv ones."""
    if hn is None or not isinstance(hn, Hypernet):
        raise HypernetError(f"{node}: connect a GL_HYPERNET (GL_HypernetworkLoader or GL_HypernetworkTrain)")
    check_model(model, hn, node=node)
    pics = reference_inputs(hn, images, clip_vision, node=node)
    lora = lora_state_dict(predict(hn, pics))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
    m = model.clone()
    applied = m.add_patches(patches, strength)
    if len(applied) != len(hn.targets):
        raise HypernetError(f"{node}: {len(applied)} of {len(hn.targets)} predicted LoRA modules matched the model")
    hooks = comfy.hooks.create_hook_lora(lora, strength_model=strength, strength_clip=0.0)
    logging.info("%s: %d subject image(s) -> rank-%d LoRA on %d weights (strength %.2f, encoder %s)", node,
                 len(pics), hn.module.config["rank"], len(applied), strength, hn.module.config["encoder"])
    return m, hooks, lora
