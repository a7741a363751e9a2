"""Image-classifier architectures the pack loads from safetensors (pure torch / torchvision, no ComfyUI import).

* ``gl_small_cnn``: the demo world's guidance classifier — five 3×3 conv–BatchNorm–ReLU layers (two of them
  stride 2), global average pooling, one linear layer. ReLUs are modules, so EluCD's Softplus swap reaches them.
* ``resnet``: torchvision's ResNet family with torchvision's own key layout (``conv1``, ``bn1``, ``layer1.0.conv1``,
  …, ``fc``), so ImageNet ResNet-18/34/50/101/152 weights saved as safetensors load unchanged; the depth is read
  from the keys.
* ``ZeroShotClassifier``: a CLIP-style zero-shot head over any image encoder and fixed label text embeddings
  (built by GL_CLIPZeroShotClassifier from ComfyUI's CLIP vision and CLIP text models, not loaded from a file).
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

ARCHITECTURES = ("gl_small_cnn", "resnet")          # loadable from files; ZeroShotClassifier is built by a node

# torchvision ResNet: (block kind, blocks per stage) -> depth
_RESNET_DEPTHS = {("basic", (2, 2, 2, 2)): 18, ("basic", (3, 4, 6, 3)): 34, ("bottleneck", (3, 4, 6, 3)): 50,
                  ("bottleneck", (3, 4, 23, 3)): 101, ("bottleneck", (3, 8, 36, 3)): 152}


class SmallCNN(nn.Module):
    """32×32 RGB → logits. Widths (w, w, 2w, 2w, 4w); stride 2 at the 2nd and 4th conv (32 → 16 → 8)."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        chans = [3, width, width, 2 * width, 2 * width, 4 * width]
        strides = [1, 2, 1, 2, 1]
        layers: list[nn.Module] = []
        for cin, cout, stride in zip(chans[:-1], chans[1:], strides):
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def small_cnn_shape(state_dict: dict) -> tuple[int, int]:
    """(num_classes, width) of a SmallCNN state dict."""
    return int(state_dict["fc.weight"].shape[0]), int(state_dict["features.0.weight"].shape[0])


def resnet_spec(state_dict: dict) -> tuple[int, int]:
    """(depth, num_classes) of a torchvision-layout ResNet state dict; ValueError when the keys are not one."""
    if "conv1.weight" not in state_dict or "fc.weight" not in state_dict:
        raise ValueError("not a torchvision ResNet state dict (no conv1.weight / fc.weight)")
    blocks = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in state_dict if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(len(ids))
    kind = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
    depth = _RESNET_DEPTHS.get((kind, tuple(blocks)))
    if depth is None:
        raise ValueError(f"unknown ResNet layout: {kind} blocks {blocks} (supported: ResNet-18/34/50/101/152)")
    return depth, int(state_dict["fc.weight"].shape[0])


def build_resnet(depth: int, num_classes: int) -> nn.Module:
    import torchvision.models as tvm
    builders = {18: tvm.resnet18, 34: tvm.resnet34, 50: tvm.resnet50, 101: tvm.resnet101, 152: tvm.resnet152}
    if depth not in builders:
        raise ValueError(f"ResNet depth {depth} is not one of {sorted(builders)}")
    return builders[depth](weights=None, num_classes=num_classes)


def build_classifier(architecture: str, state_dict: dict) -> nn.Module:
    """The module of `architecture` shaped for `state_dict` (weights not loaded)."""
    if architecture == "gl_small_cnn":
        num_classes, width = small_cnn_shape(state_dict)
        return SmallCNN(num_classes, width)
    if architecture == "resnet":
        return build_resnet(*resnet_spec(state_dict))
    raise ValueError(f"unknown classifier architecture {architecture!r}; supported: {ARCHITECTURES}")


def detect_architecture(state_dict: dict) -> str:
    """Architecture of a state dict without metadata."""
    if "features.0.weight" in state_dict and "fc.weight" in state_dict:
        return "gl_small_cnn"
    resnet_spec(state_dict)
    return "resnet"


class ZeroShotClassifier(nn.Module):
    """CLIP-style zero-shot classifier: logits = scale · cos(image embedding, text embedding of each label).

    ``encoder`` maps normalised images [B, 3, H, W] to image embeddings [B, D] in the joint space;
    ``text_embeds`` [K, D] are the labels' text embeddings (normalised here). Differentiable in the images."""

    def __init__(self, encoder: nn.Module, text_embeds: torch.Tensor, logit_scale: float = 100.0):
        super().__init__()
        if text_embeds.ndim != 2:
            raise ValueError(f"text embeddings must be [labels, dim], got {list(text_embeds.shape)}")
        self.encoder = encoder
        self.register_buffer("text_embeds", torch.nn.functional.normalize(text_embeds.float(), dim=-1))
        self.logit_scale = float(logit_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.encoder(x)
        image = torch.nn.functional.normalize(emb.to(torch.promote_types(emb.dtype, torch.float32)), dim=-1)
        return self.logit_scale * image @ self.text_embeds.to(image.device, image.dtype).t()
