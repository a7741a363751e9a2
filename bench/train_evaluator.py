"""Train the demo world's evaluation classifier (bench/evaluator.py) and write bench/weights/evaluator.safetensors.

    python bench/train_evaluator.py                    # the shipped weights: seed 0, 1600 steps of 128 (~6-8 min)
    python bench/train_evaluator.py --eval-only        # re-measure the shipped weights, write nothing
    python bench/train_evaluator.py --steps 200 --out /tmp/e.safetensors   # a quick run

Training data: fresh clean images from the demo-world generator at every step (`world.batch`, kind="mixed" so
half single-object and half two-object scenes, split="all" so held-out combinations are seen too — the
evaluator has to score them), world seed `--seed + 1000`, scene indices step·batch …, 32×32. Three quarters of
each batch get light, label-preserving augmentation (brightness ±0.06, contrast ×0.8–1.2, saturation ×0.75–1.3,
Gaussian blur σ 0.3–0.9 on a third, Gaussian noise σ ≤ 0.05 on half), so the evaluator stays calibrated on the
slightly imperfect images a generator makes. Targets: shape / colour / size of the object for single scenes,
background and the shapes / colours present for every scene, and per 4×4-pixel cell the fraction covered by
each (colour, shape) object (from the world's anti-aliased coverage) for the grid head. Loss: the sum of the
cross-entropies (soft cross-entropy for the grid, binary for the presence heads). AdamW, lr 2e-3 with 50 warm-up
steps and cosine decay, weight decay 1e-4, one CPU thread, everything seeded: the same command gives the same
file on the same machine and torch version.

Evaluation (`--eval-seed`, default 2024, never used for training; the tests use yet another seed): single-object
scenes of split "all" and "heldout" (shape, colour, both, size, background), pair scenes of both splits
(relation caption judged correct; both named objects found; the inverted relation rejected; an absent (colour,
shape) reported absent), and the same on corrupted copies (noise σ 0.03 + blur σ 0.6). The accuracies go into
the weights' metadata and, as JSON, to stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.evaluator import (  # noqa: E402
    DEFAULT_WEIGHTS, GRID, IMAGE_SIZE, NUM_CELL_CLASSES, Evaluator, cell_class,
)
from demo import world  # noqa: E402

WORLD_SEED_OFFSET = 1000  # training scenes come from world seed = --seed + 1000


# -------------------------------------------------------------------------------------------------- targets

def targets(labels: list[dict]) -> dict[str, torch.Tensor]:
    """Training targets for a batch of world labels (see the module docstring)."""
    n = len(labels)
    single = torch.tensor([lab["kind"] == "single" for lab in labels])
    first = [lab["objects"][0] for lab in labels]
    out = {
        "single": single,
        "shape": torch.tensor([o["shape_idx"] for o in first]),
        "color": torch.tensor([o["color_idx"] for o in first]),
        "size": torch.tensor([o["size_idx"] for o in first]),
        "background": torch.tensor([lab["background_idx"] for lab in labels]),
        "shapes_present": torch.zeros(n, len(world.SHAPES)),
        "colors_present": torch.zeros(n, len(world.COLORS)),
    }
    grid = torch.zeros(n, NUM_CELL_CLASSES, GRID, GRID)
    rows, objects = [], []
    for i, lab in enumerate(labels):
        for o in lab["objects"]:
            rows.append(i)
            objects.append(o)
            out["shapes_present"][i, o["shape_idx"]] = 1.0
            out["colors_present"][i, o["color_idx"]] = 1.0
    # the world's own anti-aliased coverage (a private helper of demo/world.py, used here only, at train time)
    cover = world._coverage(objects, IMAGE_SIZE)  # [M, 32, 32]
    cells = F.avg_pool2d(cover[:, None], IMAGE_SIZE // GRID)[:, 0]  # [M, 8, 8]: covered fraction per cell
    cls = torch.tensor([cell_class(o["color_idx"], o["shape_idx"]) for o in objects])
    grid.index_put_((torch.tensor(rows), cls), cells, accumulate=True)
    grid[:, 0] = (1.0 - grid[:, 1:].sum(1)).clamp(min=0.0)
    out["grid"] = grid / grid.sum(1, keepdim=True)
    return out


# ------------------------------------------------------------------------------------------------ augmenting

def _luma(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur (5 taps, reflect padding); sigma [N] > 0."""
    taps = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # [N, 5]
    n, c, h, w = x.shape
    y = F.pad(x.reshape(1, n * c, h, w), (2, 2, 2, 2), mode="reflect")
    kk = k.repeat_interleave(c, 0)  # [N*C, 5]
    y = F.conv2d(y, kk[:, None, None, :], groups=n * c)  # horizontal
    y = F.conv2d(y, kk[:, None, :, None], groups=n * c)  # vertical
    return y.reshape(n, c, h, w)


def augment(x: torch.Tensor, gen: torch.Generator, p: float = 0.75) -> torch.Tensor:
    """Light label-preserving jitter of images [N, 3, H, W] in [0, 1] on a random fraction p of them."""
    n = x.shape[0]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)
    on = (torch.rand(n, generator=gen) < p).float()[:, None, None, None]
    y = x + u(-0.06, 0.06, 1, 1, 1)
    mean = y.mean((1, 2, 3), keepdim=True)
    y = mean + (y - mean) * u(0.8, 1.2, 1, 1, 1)
    gray = _luma(y)
    y = gray + (y - gray) * u(0.75, 1.3, 1, 1, 1)
    blur = torch.rand(n, generator=gen) < 1 / 3
    if blur.any():
        y[blur] = gaussian_blur(y[blur], u(0.3, 0.9)[blur])
    noisy = (torch.rand(n, generator=gen) < 0.5).float()[:, None, None, None]
    y = y + noisy * u(0.0, 0.05, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    return (on * y + (1 - on) * x).clamp(0.0, 1.0)


def corrupt(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Fixed corruption for the robustness figures: Gaussian noise σ 0.03 after a blur σ 0.6."""
    gen = torch.Generator().manual_seed(seed)
    y = gaussian_blur(x, torch.full((x.shape[0],), 0.6))
    return (y + 0.03 * torch.randn(x.shape, generator=gen)).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------------- losses

def loss_fn(out: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    single = t["single"]
    parts = {}
    if single.any():
        for name in ("shape", "color", "size"):
            parts[name] = F.cross_entropy(out[name][single], t[name][single])
    parts["background"] = F.cross_entropy(out["background"], t["background"])
    for name in ("shapes_present", "colors_present"):
        parts[name] = F.binary_cross_entropy_with_logits(out[name], t[name])
    parts["grid"] = -(t["grid"] * out["grid"].log_softmax(1)).sum(1).mean()
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}


# ------------------------------------------------------------------------------------------------ evaluation

def _absent_pair(lab: dict, k: int) -> tuple[int, int]:
    """A (colour, shape) that is not in the scene, chosen deterministically from k."""
    present = {(o["color_idx"], o["shape_idx"]) for o in lab["objects"]}
    combos = [(c, s) for c in range(len(world.COLORS)) for s in range(len(world.SHAPES)) if (c, s) not in present]
    return combos[(k * 7919 + lab["index"]) % len(combos)]


def evaluate_single(model: Evaluator, images: torch.Tensor, labels: list[dict]) -> dict[str, float]:
    pred = model.predict(images)
    obj = [lab["objects"][0] for lab in labels]
    shape_ok = pred["shape"] == torch.tensor([o["shape_idx"] for o in obj])
    color_ok = pred["color"] == torch.tensor([o["color_idx"] for o in obj])
    size_ok = pred["size"] == torch.tensor([o["size_idx"] for o in obj])
    bg_ok = pred["background"] == torch.tensor([lab["background_idx"] for lab in labels])
    # the grid head must find the single object too (consistency of the two ways of reading an image)
    found = Evaluator.locate_in_grid(pred["grid"], torch.tensor([o["color_idx"] for o in obj]),
                                     torch.tensor([o["shape_idx"] for o in obj]))["present"]
    return {"n": len(labels), "shape_and_color": _mean(shape_ok & color_ok), "shape": _mean(shape_ok),
            "color": _mean(color_ok), "size": _mean(size_ok), "background": _mean(bg_ok),
            "grid_found": _mean(found)}


def evaluate_pair(model: Evaluator, images: torch.Tensor, labels: list[dict]) -> dict[str, float]:
    grid = model.predict(images)["grid"]
    a = (torch.tensor([lab["objects"][0]["color_idx"] for lab in labels]),
         torch.tensor([lab["objects"][0]["shape_idx"] for lab in labels]))
    b = (torch.tensor([lab["objects"][1]["color_idx"] for lab in labels]),
         torch.tensor([lab["objects"][1]["shape_idx"] for lab in labels]))
    rel = [lab["relation"] for lab in labels]
    inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    true = Evaluator.relation_from_grid(grid, a, rel, b)
    flipped = Evaluator.relation_from_grid(grid, a, [inverse[r] for r in rel], b)
    absent = torch.tensor([_absent_pair(lab, 1) for lab in labels])
    wrong = Evaluator.relation_from_grid(grid, (absent[:, 0], absent[:, 1]), rel, b)
    return {"n": len(labels), "relation": _mean(true["correct"]),
            "both_present": _mean(true["present_a"] & true["present_b"]),
            "inverted_rejected": _mean(~flipped["correct"]), "absent_rejected": _mean(~wrong["present_a"]),
            "min_mass_present": float(torch.minimum(true["mass_a"], true["mass_b"]).min()),
            "max_mass_absent": float(wrong["mass_a"].max())}


def _mean(b: torch.Tensor) -> float:
    return round(float(b.float().mean()), 5)


def evaluate(model: Evaluator, seed: int, n_single: int = 2048, n_pair: int = 1024, n_heldout: int = 1024,
             size: int = 32) -> dict[str, dict]:
    """Accuracies on fresh scenes of world seed `seed` (see the module docstring)."""
    res = {}
    for split, n1, n2 in (("all", n_single, n_pair), ("heldout", n_heldout, n_heldout)):
        img, _, lab = world.batch(0, n1, seed=seed, kind="single", split=split, size=size)
        res[f"single_{split}"] = evaluate_single(model, img, lab)
        res[f"single_{split}_corrupted"] = evaluate_single(model, corrupt(img, seed), lab)
        img, _, lab = world.batch(0, n2, seed=seed, kind="pair", split=split, size=size)
        res[f"pair_{split}"] = evaluate_pair(model, img, lab)
        res[f"pair_{split}_corrupted"] = evaluate_pair(model, corrupt(img, seed + 1), lab)
    return res


# ----------------------------------------------------------------------------------------------------- train

def train(steps: int, batch_size: int, seed: int, lr: float = 2e-3, warmup: int = 50, log_every: int = 100,
          max_minutes: float | None = None) -> tuple[Evaluator, dict]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Evaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    world_seed = seed + WORLD_SEED_OFFSET
    start = time.perf_counter()
    model.train()
    done = 0
    for step in range(steps):
        images, _, labels = world.batch(step * batch_size, batch_size, seed=world_seed, kind="mixed", split="all")
        t = targets(labels)
        out = model(augment(images, gen))
        loss, parts = loss_fn(out, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        done = step + 1
        if step % log_every == 0 or done == steps:
            elapsed = time.perf_counter() - start
            print(f"step {step:5d}  loss {float(loss):.4f}  " + "  ".join(f"{k} {v:.3f}" for k, v in parts.items())
                  + f"  {elapsed:.0f}s", flush=True)
        if max_minutes is not None and time.perf_counter() - start > 60 * max_minutes:
            print(f"stopping at step {done}: time budget of {max_minutes} min spent", flush=True)
            break
    model.eval()
    info = {"seed": seed, "world_seed": world_seed, "steps": done, "batch_size": batch_size, "lr": lr,
            "train_seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "threads": 1}
    return model, info


def _report(results: dict) -> str:
    lines = []
    for name, r in results.items():
        lines.append(f"{name:26s} " + "  ".join(f"{k} {v}" for k, v in r.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seed", type=int, default=2024)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop early after this much training time")
    ap.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--eval-only", action="store_true", help="measure the weights at --out, write nothing")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.eval_only:
        model = Evaluator.load(args.out)
        info = {k: model.metadata.get(k) for k in ("seed", "steps", "batch_size", "train_seconds")}
    else:
        model, info = train(args.steps, args.batch_size, args.seed, max_minutes=args.max_minutes)
    t0 = time.perf_counter()
    results = evaluate(model, args.eval_seed)
    print(_report(results), flush=True)
    print(f"evaluation took {time.perf_counter() - t0:.1f}s", flush=True)
    if not args.eval_only:
        model.save(args.out, {**{k: str(v) for k, v in info.items()}, "eval_seed": str(args.eval_seed),
                              "accuracy": json.dumps(results),
                              "command": " ".join(["python bench/train_evaluator.py", *(argv or sys.argv[1:])])})
        print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)", flush=True)
    print(json.dumps({"train": info, "eval_seed": args.eval_seed, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
