"""Image classifiers for guidance (the GL_CLASSIFIER type) and what they look at.

A `Classifier` holds a torch module built from a safetensors file (kernels/classifiers.py architectures), its
input size and normalisation, and its label names. Files are found in the folder list `gl_classifiers` of
ComfyUI's folder_paths (`models/classifiers/`, extra_model_paths.yaml can add more) plus the pack's
`demo/weights/` (the demo world's guidance classifier, `demo_classifier.safetensors`).

File metadata (all optional except for non-ResNet files): `architecture` (gl_small_cnn | resnet), `input_size`
([H, W]), `mean`, `std` (per channel, applied to RGB in [0, 1]), `labels` (JSON list). A plain torchvision ResNet
state dict without metadata is read as an ImageNet classifier: 224×224, ImageNet mean/std, labels "class 0" ….

The module is built and filled outside inference mode (its tensors can take part in autograd), in float32, with
requires_grad off; guidance gets a private deep copy with ReLU → Softplus(β) (never the shared module).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..kernels.classifier_guidance import replace_relu_with_softplus
from ..kernels.classifiers import build_classifier, detect_architecture
from .weight_files import WeightFolder

FOLDER_NAME = "gl_classifiers"
PACK_FILES = ("demo_classifier.safetensors",)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ClassifierError(ValueError):
    """A classifier file or a target that cannot be used; the message names the node and the fix."""


@dataclass
class Classifier:
    module: torch.nn.Module
    architecture: str
    labels: list[str]
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = "classifier"
    crop: bool = False           # True: resize the shorter side and centre-crop (CLIP), else resize (same aspect)
    kind: str = "classifier"     # "clip_zero_shot": logits are scaled cosine similarities to label texts
    _softplus: dict = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def smoothed(self, beta: float) -> torch.nn.Module:
        """A private copy whose ReLUs are Softplus(β) (β = 0: the module itself, unchanged), cached per β."""
        if beta <= 0 or not any(isinstance(m, torch.nn.ReLU) for m in self.module.modules()):
            return self.module                      # nothing to smooth (e.g. CLIP's GELUs): no copy
        if beta not in self._softplus:
            with torch.inference_mode(False):
                module = copy.deepcopy(self.module)
            replace_relu_with_softplus(module, beta)
            self._softplus[beta] = module.eval()
        return self._softplus[beta]

    def prepare(self, images: torch.Tensor, *, node: str) -> torch.Tensor:
        """RGB images [B, 3, H, W] in [0, 1] → the classifier's input (resized with antialiasing when the size
        differs but the aspect ratio matches; a clear error when it does not; `crop`: centre-cropped like CLIP)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ClassifierError(f"{node}: the classifier needs RGB images [B, 3, H, W], got {list(images.shape)}")
        h, w = images.shape[-2:]
        th, tw = self.input_size
        if self.crop and (h, w) != (th, tw):
            scale = max(th / h, tw / w)               # shorter side to size, then the centre crop
            rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
            images = F.interpolate(images, size=(rh, rw), mode="bicubic", antialias=True, align_corners=False)
            top, left = (rh - th) // 2, (rw - tw) // 2
            images = images[:, :, top:top + th, left:left + tw]
        elif (h, w) != (th, tw):
            if abs(h * tw - w * th) > 0.01 * h * tw:
                raise ClassifierError(
                    f"{node}: the image is {w}×{h} but classifier '{self.name}' reads {tw}×{th} images and the "
                    f"aspect ratios differ; sample at a {tw}:{th} aspect ratio (e.g. {tw * 8}×{th * 8} for an "
                    "SD latent) or use a classifier made for this shape")
            images = F.interpolate(images, size=(th, tw), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        return (images - mean) / std

    def logits(self, images: torch.Tensor, *, node: str, module: torch.nn.Module | None = None) -> torch.Tensor:
        """float32 logits of RGB images in [0, 1] (`module`: e.g. the `smoothed` copy; default the classifier's own),
        on the images' device; differentiable when the caller records gradients."""
        net = (module if module is not None else self.module).to(images.device)
        return net(self.prepare(images, node=node)).float()

    def target_indices(self, spec: str, batch: int, *, node: str) -> torch.Tensor:
        """Class indices [batch] from a comma-separated list of label names or indices (cycled over the batch)."""
        items = [s.strip() for s in str(spec).split(",") if s.strip()]
        if not items:
            raise ClassifierError(f"{node}: target is empty; name a class, e.g. '{self.labels[0]}', or several "
                                  "separated by commas (one per image of the batch)")
        lookup = {label.lower(): i for i, label in enumerate(self.labels)}
        out = []
        for item in items:
            if item.lower() in lookup:
                out.append(lookup[item.lower()])
            elif item.isdigit() and int(item) < self.num_classes:
                out.append(int(item))
            else:
                sample = ", ".join(self.labels[:8]) + (", …" if self.num_classes > 8 else "")
                raise ClassifierError(f"{node}: target '{item}' is not a class of classifier '{self.name}' "
                                      f"({self.num_classes} classes: {sample}); use a label name or an index "
                                      f"0–{self.num_classes - 1}")
        return torch.tensor([out[i % len(out)] for i in range(batch)], dtype=torch.long)


def _meta_json(meta: dict, key: str, default):
    if key not in meta:
        return default
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise ClassifierError(f"classifier metadata '{key}' is not JSON: {meta[key][:80]!r}") from e


def load_classifier(path, *, node: str = "GL_ClassifierLoader") -> Classifier:
    """Read a classifier file (safetensors only)."""
    from safetensors import safe_open
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ClassifierError(f"{node}: {path.name} is not a .safetensors file; classifiers load from safetensors "
                              "only (convert a .pth with safetensors.torch.save_file(model.state_dict(), ...))")
    with torch.inference_mode(False):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k).clone() for k in f.keys()}
        try:
            arch = meta.get("architecture") or detect_architecture(state)
            module = build_classifier(arch, state)
        except (ValueError, KeyError) as e:
            raise ClassifierError(f"{node}: {path.name} is not a supported classifier ({e}); supported: "
                                  "torchvision ResNet-18/34/50/101/152 state dicts and the pack's gl_small_cnn") from e
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ClassifierError(f"{node}: {path.name} does not match architecture {arch}: missing "
                                  f"{missing[:4]}, unexpected {unexpected[:4]}")
        module = module.float().eval().requires_grad_(False)
    imagenet = arch == "resnet" and "input_size" not in meta
    size = _meta_json(meta, "input_size", [224, 224] if imagenet else None)
    if size is None:
        raise ClassifierError(f"{node}: {path.name} has no 'input_size' metadata; add it ([H, W]) when saving")
    num = int(module.fc.out_features)
    labels = _meta_json(meta, "labels", [f"class {i}" for i in range(num)])
    if len(labels) != num:
        raise ClassifierError(f"{node}: {path.name} lists {len(labels)} labels for {num} outputs")
    mean = tuple(_meta_json(meta, "mean", IMAGENET_MEAN if imagenet else [0.0, 0.0, 0.0]))
    std = tuple(_meta_json(meta, "std", IMAGENET_STD if imagenet else [1.0, 1.0, 1.0]))
    return Classifier(module=module, architecture=arch, labels=[str(x) for x in labels],
                      input_size=(int(size[0]), int(size[1])), mean=mean, std=std, name=path.stem)


_FILES = WeightFolder(FOLDER_NAME, "classifiers", PACK_FILES, ClassifierError, "classifier", "GL_ClassifierLoader")
classifier_folders, classifier_files, resolve_classifier = _FILES.folders, _FILES.files, _FILES.resolve
