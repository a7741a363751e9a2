"""The personalization benchmark's subject evaluator: a small CNN that reads which surface pattern a demo-world
object carries (demo/subjects.py) — used ONLY to score generated images, never to train or guide anything.

Heads (on a 128-d embedding, the same trunk design as bench/evaluator.py):
    pattern  — 1 + len(PATTERNS) classes: 0 = flat (the world's own rendering), then stripes, checker, dots, rings;
    angle    — (cos 2θ, sin 2θ) of a stripes subject's angle (stripes repeat every 180°), trained on stripes only;
    shape, color — of the object, trained on patterned and flat objects alike: the benchmark's prompt adherence on
               patterned images (bench/evaluator.py, trained on flat objects only, reads the shape of only 62 % of
               ground-truth patterned objects: a pattern breaks the silhouette it learned).
`features` is the embedding: the benchmark's subject similarity is the cosine between a sample's features and the
mean features of its subject's reference images.

Training data: single-object scenes of the world, flat (1/5) or with a subject drawn from a third stream
("evaluator") that neither the hypernetwork's training subjects nor its held-out subjects come from; light
augmentation (bench/train_evaluator.augment) so that generated images' noise does not confuse it.

    python bench/subject_evaluator.py --steps 1500      # trains, reports held-out accuracy, writes the weights
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.evaluator import _block  # noqa: E402
from demo import subjects as sj  # noqa: E402
from demo import world  # noqa: E402

DEFAULT_WEIGHTS = REPO / "bench" / "weights" / "subject_evaluator.safetensors"
FORMAT = "guidance-lab-subject-evaluator-v2"
CLASSES = ("flat", *sj.PATTERNS)


class SubjectEvaluator(nn.Module):
    def __init__(self, widths=(32, 64, 96), feature_dim: int = 128):
        super().__init__()
        c1, c2, c3 = widths
        self.widths = tuple(widths)
        self.trunk = nn.Sequential(
            *_block(3, c1), *_block(c1, c1), nn.MaxPool2d(2),
            *_block(c1, c2), *_block(c2, c2), nn.MaxPool2d(2),
            *_block(c2, c3), *_block(c3, c3))
        self.embed = nn.Linear(2 * c3, feature_dim)
        self.pattern = nn.Linear(feature_dim, len(CLASSES))
        self.angle = nn.Linear(feature_dim, 2)
        self.shape = nn.Linear(feature_dim, len(world.SHAPES))
        self.color = nn.Linear(feature_dim, len(world.COLORS))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        z = F.relu(self.embed(torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)))
        return {"pattern": self.pattern(z), "angle": self.angle(z), "shape": self.shape(z), "color": self.color(z),
                "features": z}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """images [N, 3, H, W] in [0, 1] (resized to 32): pattern (argmax index into CLASSES), pattern_probs,
        angle (degrees in [0, 180)), shape and color (indices into world.SHAPES / world.COLORS), features."""
        self.eval()
        x = images.detach().float().clamp(0, 1)
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        outs = [self(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        out = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        probs = out["pattern"].softmax(1)
        angle = torch.rad2deg(torch.atan2(out["angle"][:, 1], out["angle"][:, 0])) / 2 % 180
        return {"pattern": probs.argmax(1), "pattern_probs": probs, "angle": angle, "shape": out["shape"].argmax(1),
                "color": out["color"].argmax(1), "features": out["features"]}

    def save(self, path: Path, metadata: dict) -> None:
        from safetensors.torch import save_file
        meta = {"format": FORMAT, "widths": json.dumps(list(self.widths)), "classes": json.dumps(list(CLASSES)),
                "subjects": json.dumps({"shade": sj.SHADE, "period": list(sj.PERIOD), "duty": list(sj.DUTY)})}
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path | None = None) -> "SubjectEvaluator":
        from safetensors import safe_open
        from safetensors.torch import load_file
        path = Path(path or DEFAULT_WEIGHTS)
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a subject evaluator (format {meta.get('format')!r})")
        want = {"shade": sj.SHADE, "period": list(sj.PERIOD), "duty": list(sj.DUTY)}
        if json.loads(meta["subjects"]) != want or json.loads(meta["classes"]) != list(CLASSES):
            raise ValueError(f"{path} was trained for other subjects ({meta['subjects']}); retrain it")
        model = cls(tuple(json.loads(meta["widths"])))
        model.load_state_dict(load_file(str(path)))
        model.metadata = meta
        return model.eval()


def batch(gen: torch.Generator, n: int, stream: str = "evaluator") -> tuple[torch.Tensor, ...]:
    """(images [n, 3, 32, 32], pattern class [n], stripes angle in degrees [n] (NaN elsewhere), shape [n],
    colour [n])."""
    imgs, cls, ang, shapes, colors = [], [], [], [], []
    for _ in range(n):
        start = int(torch.randint(0, 10**6, (1,), generator=gen))
        lab = world.scene(start, seed=1, kind="single", split="all")
        shapes.append(lab["objects"][0]["shape_idx"])
        colors.append(lab["objects"][0]["color_idx"])
        if torch.rand(1, generator=gen) < 0.2:
            imgs.append(sj.render(None, [lab])[0])
            cls.append(0)
            ang.append(math.nan)
        else:
            s = sj.from_stream(stream, int(torch.randint(0, 10**6, (1,), generator=gen)))
            imgs.append(sj.render(s, [lab])[0])
            cls.append(1 + s["pattern_idx"])
            ang.append(s["angle"] + lab["objects"][0]["rotation"] if s["pattern"] == "stripes" else math.nan)
    return torch.stack(imgs), torch.tensor(cls), torch.tensor(ang), torch.tensor(shapes), torch.tensor(colors)


def evaluate(model: SubjectEvaluator, n: int = 1024, seed: int = 99) -> dict:
    """Accuracy on held-out subjects' images (the benchmark's split) and stripe-angle error."""
    gen = torch.Generator().manual_seed(seed)
    imgs, cls, ang, shapes = [], [], [], []
    for i in range(n // 8):
        s = sj.subject(i, split="heldout")
        x, _caps, labels = sj.images(s, 0, 8)
        imgs.append(x)
        cls += [1 + s["pattern_idx"]] * 8
        shapes += [lab["objects"][0]["shape_idx"] for lab in labels]
        ang += [s["angle"] + lab["objects"][0]["rotation"] if s["pattern"] == "stripes" else math.nan
                for lab in labels]
    flat_x, _c, _l = world.batch(0, n // 4, kind="single", split="all")
    pred = model.predict(torch.cat(imgs))
    flat = model.predict(flat_x)
    ang_t = torch.tensor(ang)
    stripes = ~torch.isnan(ang_t)
    diff = (pred["angle"][stripes] - ang_t[stripes] % 180).abs()
    diff = torch.minimum(diff, 180 - diff)
    _ = gen
    return {"heldout_subject_pattern_accuracy": float((pred["pattern"] == torch.tensor(cls)).float().mean()),
            "heldout_subject_shape_accuracy": float((pred["shape"] == torch.tensor(shapes)).float().mean()),
            "flat_accuracy": float((flat["pattern"] == 0).float().mean()),
            "stripes_angle_error_deg_median": float(diff.median())}


def train(steps: int, batch_size: int, seed: int, lr: float = 2e-3) -> tuple[SubjectEvaluator, dict]:
    from bench.train_evaluator import augment
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SubjectEvaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for step in range(steps):
        x, cls, ang, shape, color = batch(gen, batch_size)
        out = model(augment(x, gen))
        loss = (F.cross_entropy(out["pattern"], cls) + F.cross_entropy(out["shape"], shape)
                + F.cross_entropy(out["color"], color))
        s = ~torch.isnan(ang)
        if s.any():
            target = torch.stack([torch.cos(torch.deg2rad(2 * ang[s])), torch.sin(torch.deg2rad(2 * ang[s]))], 1)
            loss = loss + F.mse_loss(out["angle"][s], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            print(f"step {step + 1}: loss {float(loss.detach()):.4f} ({time.time() - t0:.0f} s)", flush=True)
    return model.eval(), {"steps": steps, "batch": batch_size, "seed": seed, "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, info = train(a.steps, a.batch, a.seed)
    info.update(evaluate(model))
    print(json.dumps(info, indent=1))
    model.save(a.out, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
