"""A zero-shot GL_CLASSIFIER from ComfyUI's CLIP vision model and a CLIP text encoder (GL_CLIPZeroShotClassifier).

logits_k = logit_scale · cos(E_img(x), E_txt(template(label_k))) (Radford et al., 2021). E_img: the CLIP vision
model's projected image embedding (`visual_projection` of the pooled token). E_txt: the projected pooled text
embedding (`text_projection` of the end-of-text token) of one CLIP text tower of the CLIP object — computed here with
the projection on, whatever the family's conditioning uses (SD1.x, SD3 and Flux condition on the unprojected pooled
output).

The two towers must come from the same CLIP model; only the embedding widths can be checked:
* SDXL checkpoint CLIP (its OpenCLIP ViT-bigG tower, `clip_g`) + CLIP vision ViT-bigG (clip_vision_g.safetensors);
* SD2.x checkpoint CLIP (OpenCLIP ViT-H, `clip_h`) + CLIP vision ViT-H/14 laion2B (the IP-Adapter image encoder);
* a standalone CLIP-L text encoder file that carries `text_projection.weight` (CLIPLoader) + CLIP vision ViT-L/14.
SD1.x checkpoints and SDXL's CLIP-L do not store CLIP-L's text projection, so their `clip_l` cannot serve.

The vision model is a private copy made outside inference mode (autograd can save its tensors, for EluCD), kept
in the stored dtype, its encoder layers computed without the host's in-place residual adds; ComfyUI's
cast-on-the-fly operations compute in the images' float32. Images are resized (shorter side) and centre-cropped
to the model's size differentiably; ComfyUI's 8-bit rounding of CLIP inputs is skipped.
"""
from __future__ import annotations

import copy

import torch

from ..kernels.classifiers import ZeroShotClassifier
from .classifier import Classifier, ClassifierError

NODE = "GL_CLIPZeroShotClassifier"
TEXT_ENCODERS = ("auto", "clip_g", "clip_h", "clip_l")


class _ImageEmbeds(torch.nn.Module):
    """ComfyUI's CLIPVisionModelProjection → its projected image embedding [B, D]."""

    def __init__(self, vision: torch.nn.Module):
        super().__init__()
        self.vision = vision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values=x)[2]


class _OutOfPlaceLayer(torch.nn.Module):
    """The host's CLIPLayer math, x + attn(ln1(x)) then x + mlp(ln2(x)), without its in-place `+=` (which autograd
    cannot differentiate through the layer norms). Wraps the private copy's layers only. A module rather than an
    instance `forward` (as guiders/demo_model.trainable_text_encoder patches, temporarily): a deep copy of the
    classifier then computes with its own copied submodules."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer_norm1, self.self_attn = layer.layer_norm1, layer.self_attn
        self.layer_norm2, self.mlp = layer.layer_norm2, layer.mlp

    def forward(self, x, mask=None, optimized_attention=None):
        x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
        return x + self.mlp(self.layer_norm2(x))


def _out_of_place(vision: torch.nn.Module) -> torch.nn.Module:
    layers = getattr(getattr(getattr(vision, "vision_model", None), "encoder", None), "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        for i, layer in enumerate(layers):
            if all(hasattr(layer, a) for a in ("layer_norm1", "self_attn", "layer_norm2", "mlp")):
                layers[i] = _OutOfPlaceLayer(layer)
    return vision


def parse_labels(text: str, *, node: str = NODE) -> list[str]:
    labels = [s.strip() for s in str(text).replace("\n", ",").split(",") if s.strip()]
    if not labels:
        raise ClassifierError(f"{node}: labels is empty; name the classes, separated by commas (e.g. 'cat, dog, "
                              "car'; one label gives a CLIP score)")
    if len({label.lower() for label in labels}) != len(labels):
        raise ClassifierError(f"{node}: labels {text!r} repeat a class; name each class once")
    return labels


def vision_projection_dim(clip_vision, *, node: str = NODE) -> int:
    model = getattr(clip_vision, "model", None)
    projection = getattr(model, "visual_projection", None)
    if model is None or getattr(model, "vision_model", None) is None or not isinstance(projection, torch.nn.Linear):
        raise ClassifierError(f"{node}: this image encoder has no CLIP image projection (SigLIP and DINOv2 "
                              "encoders have no matching text tower); load a CLIP vision model (ViT-L/14, ViT-H/14 "
                              "or ViT-bigG/14) with CLIPVisionLoader")
    return int(projection.out_features)


def _text_towers(clip) -> dict:
    csm = getattr(clip, "cond_stage_model", None)
    towers = {}
    for name in TEXT_ENCODERS[1:]:
        enc = getattr(csm, name, None)
        projection = getattr(getattr(enc, "transformer", None), "text_projection", None)
        if enc is not None and isinstance(projection, torch.nn.Linear):
            towers[name] = enc
    return towers


def pick_text_encoder(clip, choice: str, dim: int, *, node: str = NODE) -> str:
    towers = _text_towers(clip)
    if choice not in TEXT_ENCODERS:
        raise ClassifierError(f"{node}: text_encoder {choice!r} is not one of {TEXT_ENCODERS}")
    if not towers:
        raise ClassifierError(f"{node}: the connected CLIP has no CLIP text tower (clip_l, clip_g or clip_h); "
                              "connect a CLIP from a checkpoint or CLIPLoader")
    widths = {name: int(enc.transformer.text_projection.out_features) for name, enc in towers.items()}
    if choice == "auto":
        matching = [name for name in TEXT_ENCODERS[1:] if widths.get(name) == dim]
        if not matching:
            raise ClassifierError(f"{node}: no text tower of the CLIP has the image embedding's width {dim} "
                                  f"(towers: {widths}); pair CLIP vision ViT-bigG with SDXL's CLIP, ViT-H with "
                                  "SD2.x's, ViT-L with a CLIP-L text encoder that has its projection")
        return matching[0]
    if choice not in towers:
        raise ClassifierError(f"{node}: text_encoder '{choice}' is not in the connected CLIP (it has "
                              f"{', '.join(towers)}); use 'auto'")
    if widths[choice] != dim:
        raise ClassifierError(f"{node}: text_encoder '{choice}' embeds to width {widths[choice]} but the CLIP "
                              f"vision model to {dim}; they are not one CLIP model: use 'auto' or a matching pair")
    return choice


def text_embeddings(clip, texts: list[str], encoder: str, *, node: str = NODE) -> torch.Tensor:
    """Projected pooled text embeddings [len(texts), D] (float32, CPU) from tower `encoder` of `clip`."""
    enc = _text_towers(clip)[encoder]
    weight = enc.transformer.text_projection.weight
    if not torch.isfinite(weight).all() or float(weight.abs().max()) == 0.0:
        raise ClassifierError(f"{node}: the '{encoder}' text projection of this CLIP holds no weights (SD1.x "
                              "checkpoints and SDXL's CLIP-L do not store it); load a text encoder that has it")
    key = encoder.split("_", 1)[1]
    clip.load_model()
    out = []
    for text in texts:
        tokens = clip.tokenize(text)
        if key not in tokens:
            raise ClassifierError(f"{node}: the CLIP tokenizer gives no '{key}' tokens for tower {encoder}")
        enc.reset_clip_options()
        enc.set_clip_options({"projected_pooled": True})
        try:
            pooled = enc.encode_token_weights(tokens[key])[1]
        finally:
            enc.reset_clip_options()
        if pooled is None:
            raise ClassifierError(f"{node}: tower {encoder} returned no pooled output")
        out.append(pooled[0].detach().float().cpu())
    return torch.stack(out)


def build_zero_shot_classifier(clip_vision, clip, labels: str, *, prompt_template: str = "a photo of a {label}",
                               text_encoder: str = "auto", logit_scale: float = 100.0,
                               node: str = NODE) -> Classifier:
    if "{label}" not in prompt_template:
        raise ClassifierError(f"{node}: prompt_template {prompt_template!r} has no {{label}}; write e.g. "
                              "'a photo of a {label}'")
    if not logit_scale > 0:
        raise ClassifierError(f"{node}: logit_scale ({logit_scale}) must be > 0 (CLIP: 100)")
    names = parse_labels(labels, node=node)
    dim = vision_projection_dim(clip_vision, node=node)
    encoder = pick_text_encoder(clip, text_encoder, dim, node=node)
    embeds = text_embeddings(clip, [prompt_template.replace("{label}", n) for n in names], encoder, node=node)
    with torch.inference_mode(False):
        vision = _out_of_place(copy.deepcopy(clip_vision.model).eval().requires_grad_(False))  # normal tensors
        module = ZeroShotClassifier(_ImageEmbeds(vision), embeds.clone(), logit_scale).eval()
    size = int(clip_vision.image_size)
    return Classifier(module=module, architecture=f"clip_zero_shot/{encoder}", labels=names, input_size=(size, size),
                      mean=tuple(float(v) for v in clip_vision.image_mean),
                      std=tuple(float(v) for v in clip_vision.image_std), name=f"CLIP zero-shot ({encoder})",
                      crop=True, kind="clip_zero_shot")
