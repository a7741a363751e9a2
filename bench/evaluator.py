"""The demo world's evaluation classifier: a small CNN that reads 32×32 RGB images of the demo world.

Used ONLY to evaluate generated images (attribute accuracy, relation accuracy, Fréchet distance in its feature
space). It never guides sampling: guidance classifiers are separate models, so a method cannot win the benchmark
by fooling the very network that scores it.

Design
    Input: images [N, 3, H, W], RGB in [0, 1] (values outside are clamped; other sizes are resized to 32×32
    with antialiasing). Trunk: six 3×3 conv–BatchNorm–ReLU layers, two 2×2 max-pools (32 → 16 → 8), width
    32/64/96; receptive field 32 px, so every cell of the final 8×8 map sees a whole object.

    Global heads (on a 128-d embedding = ReLU(Linear([avg-pool, max-pool] of the 8×8 map))):
        shape (len(SHAPES)), color (len(COLORS)), size (len(SIZES)) — of the single object; trained on
        single-object scenes only (in a pair scene "the main object" is not visible in the pixels);
        background (len(BACKGROUNDS)) — every scene;
        shapes_present, colors_present (multi-label, sigmoid) — which shapes / colours occur anywhere, every
        scene; they make the embedding describe both objects of a pair, so `features` (this 128-d embedding,
        the penultimate layer) suits a Fréchet distance over single and pair scenes alike.

    Grid head (for two-object scenes): a 1×1 conv on the 8×8 map gives, per 4×4-pixel cell, a softmax over
    1 + len(COLORS)·len(SHAPES) classes: "no object" (0) or the (colour, shape) pair 1 + colour·len(SHAPES) +
    shape. It is trained with soft targets, the fraction of the cell that each object covers (from the world's
    anti-aliased coverage), so P(class) per cell estimates covered area. For a named object (colour c, shape s):
        mass     = Σ_cells P(c, s)                (in cells; one cell = 16 px² at 32×32)
        centroid = Σ_cells P(c, s)·cell_centre / mass   (x right, y down, fractions of the image side)
    An object is *present* when mass ≥ PRESENCE_MASS (0.5 cell ≈ 8 px²; the smallest object in the world covers
    about 1.2 cells). A relation caption "A <rel> B" is *correct* when both A and B are present and the centroid
    offset points the right way along the relation's axis and is at least as long as the offset across it
    ("left of": x_B − x_A > 0 and ≥ |y_B − y_A|). The world's own pairs satisfy this with a factor of 2 (their
    along-axis offset is at least twice the across one), so clean images pass with margin.

Weights: `bench/weights/evaluator.safetensors` (float32 state dict incl. BatchNorm statistics, < 1 MB), with
metadata: the world's constants it was trained for, training seed, steps, batch size, wall time and the
accuracies measured by bench/train_evaluator.py. `load()` refuses weights trained for other world constants.
Pure torch + safetensors; no ComfyUI import.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from demo.world import BACKGROUNDS, COLORS, RELATIONS, SHAPES, SIZES

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "evaluator.safetensors"
IMAGE_SIZE = 32
GRID = 8  # grid-head resolution: GRID × GRID cells of IMAGE_SIZE / GRID pixels
NUM_CELL_CLASSES = 1 + len(COLORS) * len(SHAPES)
PRESENCE_MASS = 0.5  # cells of predicted area a named object needs to count as present
FEATURE_DIM = 128
WORLD = {"shapes": list(SHAPES), "colors": list(COLORS), "sizes": list(SIZES), "backgrounds": list(BACKGROUNDS)}


def cell_class(color_idx: int, shape_idx: int) -> int:
    """Grid-head class of a (colour, shape) pair (0 is "no object")."""
    return 1 + int(color_idx) * len(SHAPES) + int(shape_idx)


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Evaluator(nn.Module):
    """See the module docstring. `forward` gives logits; `predict`, `features`, `locate` and `check_relation`
    are the evaluation entry points (eval mode, no grad, batched)."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 96), feature_dim: int = FEATURE_DIM):
        super().__init__()
        c1, c2, c3 = widths
        self.widths = tuple(widths)
        self.trunk = nn.Sequential(
            *_block(3, c1), *_block(c1, c1), nn.MaxPool2d(2),
            *_block(c1, c2), *_block(c2, c2), nn.MaxPool2d(2),
            *_block(c2, c3), *_block(c3, c3))
        self.embed = nn.Linear(2 * c3, feature_dim)
        self.heads = nn.ModuleDict({
            "shape": nn.Linear(feature_dim, len(SHAPES)),
            "color": nn.Linear(feature_dim, len(COLORS)),
            "size": nn.Linear(feature_dim, len(SIZES)),
            "background": nn.Linear(feature_dim, len(BACKGROUNDS)),
            "shapes_present": nn.Linear(feature_dim, len(SHAPES)),
            "colors_present": nn.Linear(feature_dim, len(COLORS)),
        })
        self.grid = nn.Conv2d(c3, NUM_CELL_CLASSES, 1)
        self.metadata: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------------ network

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """Float32 [N, 3, 32, 32] in [0, 1] from images [N, 3, H, W] (clamped; resized if H, W ≠ 32)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
        x = images.detach().float().clamp(0.0, 1.0)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True,
                              align_corners=False).clamp(0.0, 1.0)
        return x

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits for prepared images x [N, 3, 32, 32]: one entry per global head ([N, k]), "grid"
        ([N, NUM_CELL_CLASSES, 8, 8]) and "features" (the 128-d embedding)."""
        h = self.trunk(x)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)
        z = F.relu(self.embed(pooled))
        out = {name: head(z) for name, head in self.heads.items()}
        out["grid"] = self.grid(h)
        out["features"] = z
        return out

    @torch.no_grad()
    def _run(self, images: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
        was_training = self.training
        self.eval()
        try:
            outs = [self(self.prepare(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
            if not outs:
                outs = [self(torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE))]
        finally:
            self.train(was_training)
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Predictions for images [N, 3, H, W] in [0, 1]: argmax indices "shape", "color", "size", "background"
        ([N] long); their softmax probabilities "<name>_probs"; "shapes_present", "colors_present" (sigmoid
        probabilities [N, 6]); "grid" (cell-class probabilities [N, NUM_CELL_CLASSES, 8, 8]) and "features"."""
        out = self._run(images, batch_size)
        res: dict[str, torch.Tensor] = {}
        for name in ("shape", "color", "size", "background"):
            res[name + "_probs"] = out[name].softmax(-1)
            res[name] = out[name].argmax(-1)
        for name in ("shapes_present", "colors_present"):
            res[name] = out[name].sigmoid()
        res["grid"] = out["grid"].softmax(1)
        res["features"] = out["features"]
        return res

    def features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Penultimate-layer embedding [N, 128] (float32) of images [N, 3, H, W] in [0, 1]; for Fréchet distance
        and diversity."""
        return self._run(images, batch_size)["features"]

    # ----------------------------------------------------------------------------------------- object finding

    @staticmethod
    def locate_in_grid(grid_probs: torch.Tensor, color_idx, shape_idx) -> dict[str, torch.Tensor]:
        """Mass (cells) and centroid (x, y in [0, 1]) of the (colour, shape) pair per image, from grid
        probabilities [N, C, G, G]; colour/shape are ints or [N] index tensors."""
        n, _, g, _ = grid_probs.shape
        cls = torch.as_tensor(1 + torch.as_tensor(color_idx) * len(SHAPES) + torch.as_tensor(shape_idx))
        cls = cls.expand(n) if cls.dim() == 0 else cls
        p = grid_probs[torch.arange(n), cls.long()]  # [N, G, G]
        mass = p.sum((1, 2))
        centres = (torch.arange(g, dtype=p.dtype) + 0.5) / g
        denom = mass.clamp(min=1e-8)
        cx = (p.sum(1) * centres).sum(1) / denom
        cy = (p.sum(2) * centres).sum(1) / denom
        return {"mass": mass, "cx": cx, "cy": cy, "present": mass >= PRESENCE_MASS}

    def locate(self, images: torch.Tensor, color_idx, shape_idx, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """`locate_in_grid` on the evaluator's grid prediction for images [N, 3, H, W]."""
        return self.locate_in_grid(self.predict(images, batch_size)["grid"], color_idx, shape_idx)

    @staticmethod
    def relation_from_grid(grid_probs: torch.Tensor, a, relation, b) -> dict[str, torch.Tensor]:
        """Judge "A <relation> B" per image from grid probabilities [N, C, G, G]. a, b: (colour_idx, shape_idx)
        pairs of ints or [N] tensors; relation: a name from RELATIONS, an index, or a list of either per image.
        Returns bool tensors "correct" (both present and the relation holds), "present_a", "present_b",
        "holds" (geometry only) and float "along", "across" (centroid offset of B from A along / across the
        relation's axis, positive along = the relation's direction)."""
        n = grid_probs.shape[0]
        la = Evaluator.locate_in_grid(grid_probs, *a)
        lb = Evaluator.locate_in_grid(grid_probs, *b)
        rel = relation if isinstance(relation, (list, tuple)) else [relation] * n
        rel = torch.tensor([RELATIONS.index(r) if isinstance(r, str) else int(r) for r in rel], dtype=torch.long)
        dx, dy = lb["cx"] - la["cx"], lb["cy"] - la["cy"]
        # RELATIONS = ("left of", "right of", "above", "below"); A left of B: B is further right (dx > 0)
        sign = torch.tensor([1.0, -1.0, 1.0, -1.0])[rel]
        horizontal = rel < 2
        along = torch.where(horizontal, dx, dy) * sign
        across = torch.where(horizontal, dy, dx).abs()
        holds = (along > 0) & (along >= across)
        return {"correct": la["present"] & lb["present"] & holds, "present_a": la["present"],
                "present_b": lb["present"], "holds": holds, "along": along, "across": across,
                "mass_a": la["mass"], "mass_b": lb["mass"]}

    def check_relation(self, images: torch.Tensor, a, relation, b, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """`relation_from_grid` on the evaluator's grid prediction for images [N, 3, H, W]."""
        return self.relation_from_grid(self.predict(images, batch_size)["grid"], a, relation, b)

    # ------------------------------------------------------------------------------------------------ storage

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """Write the state dict (float32, contiguous) and metadata (values JSON-encoded unless str)."""
        from safetensors.torch import save_file
        meta = {"format": "guidance-lab-evaluator-v1", "widths": json.dumps(list(self.widths)),
                "feature_dim": str(self.embed.out_features), "grid": str(GRID), "image_size": str(IMAGE_SIZE),
                "world": json.dumps(WORLD)}
        for k, v in (metadata or {}).items():
            meta[k] = v if isinstance(v, str) else json.dumps(v)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path), metadata=meta)
        self.metadata = meta

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Evaluator":
        """The evaluator stored at `path` (default: the shipped bench/weights/evaluator.safetensors), in eval
        mode, with its metadata in `.metadata` (str → str)."""
        from safetensors import safe_open
        from safetensors.torch import load_file
        path = Path(path) if path is not None else DEFAULT_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"no evaluator weights at {path}; train them with bench/train_evaluator.py")
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        if meta.get("format") != "guidance-lab-evaluator-v1":
            raise ValueError(f"{path} is not a Guidance Lab evaluator (format {meta.get('format')!r})")
        if json.loads(meta["world"]) != WORLD:
            raise ValueError(f"{path} was trained for another demo world ({meta['world']}); retrain it")
        model = cls(tuple(json.loads(meta["widths"])), int(meta["feature_dim"]))
        model.load_state_dict(load_file(str(path)))
        model.metadata = meta
        return model.eval()


_CACHE: dict[str, Evaluator] = {}


def load_evaluator(path: str | Path | None = None) -> Evaluator:
    """`Evaluator.load(path)`, cached per path (the shipped weights by default)."""
    key = str(Path(path).resolve() if path is not None else DEFAULT_WEIGHTS)
    if key not in _CACHE:
        _CACHE[key] = Evaluator.load(key)
    return _CACHE[key]
