"""Train the demo world's guidance classifier and write demo/weights/demo_classifier.safetensors.

    python demo/train_classifier.py                      # the shipped file: seed 0, 1500 steps of 128
    python demo/train_classifier.py --steps 100 --out /tmp/c.safetensors   # a quick run

A classifier that guidance nodes (GL_ClassifierGuidance) may steer with. It is NOT the benchmark's evaluator
(bench/evaluator.py): other architecture (kernels/classifiers.py SmallCNN: strided convs, average pooling, one
head), other seed, other world seed, so a guided method cannot win the benchmark by fooling the network that
scores it. Like an off-the-shelf classifier it is trained on clean images only (EluCD's setting).

Classes: the 36 (colour, shape) pairs of single-object scenes, named "red circle", "green square", …; data: fresh
single-object scenes of split "all" every step (world seed `--world-seed`, 32×32, RGB in [0, 1]), with random
horizontal flips and Gaussian noise σ ≤ 0.03 on half the batch. AdamW, lr 2e-3, 50 warm-up steps then cosine
decay, weight decay 1e-4, seeded: the same command gives the same file on the same machine and torch version.
The file's metadata holds the architecture, input size and normalisation, label names, the training arguments
and the accuracy on fresh scenes (another world seed), clean and with noise σ 0.05.
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

from demo import world  # noqa: E402
from kernels.classifiers import SmallCNN  # noqa: E402

DEFAULT_OUT = REPO / "demo" / "weights" / "demo_classifier.safetensors"
FORMAT = "guidance-lab-classifier/1"
LABELS = [f"{c} {s}" for c in world.COLORS for s in world.SHAPES]


def log(message: str) -> None:
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def label_index(labels: dict) -> int:
    return labels["color_idx"] * len(world.SHAPES) + labels["shape_idx"]


def data(start: int, count: int, world_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, _captions, labels = world.batch(start, count, seed=world_seed, size=32, kind="single", split="all")
    return images, torch.tensor([label_index(lab) for lab in labels])


def accuracy(net: torch.nn.Module, world_seed: int, count: int = 1024, noise: float = 0.0) -> float:
    x, y = data(0, count, world_seed)
    gen = torch.Generator().manual_seed(7)
    if noise:
        x = (x + noise * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    with torch.no_grad():
        return float((net.eval()(x).argmax(1) == y).float().mean())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="safetensors file to write")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=32, help="SmallCNN base width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-seed", type=int, default=7000, help="world seed of the training scenes")
    p.add_argument("--eval-world-seed", type=int, default=7001, help="world seed of the accuracy check")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    net = SmallCNN(len(LABELS), args.width)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    t0 = time.perf_counter()
    window = []
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = data(step * args.batch, args.batch, args.world_seed)
        flip = torch.rand(args.batch, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        noisy = (torch.rand(args.batch, generator=gen) < 0.5).float().view(-1, 1, 1, 1)
        level = 0.03 * torch.rand(args.batch, 1, 1, 1, generator=gen)
        x = (x + noisy * level * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        loss = F.cross_entropy(net.train()(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(float(loss.detach()))
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            log(f"step {step + 1}/{args.steps} loss {sum(window) / len(window):.4f} "
                f"{(time.perf_counter() - t0) / (step + 1):.3f} s/step")
            window = []
    seconds = time.perf_counter() - t0
    acc = {"clean": accuracy(net, args.eval_world_seed), "noise_0.05": accuracy(net, args.eval_world_seed,
                                                                                 noise=0.05)}
    log("accuracy " + json.dumps(acc))
    import safetensors.torch
    meta = {"format": FORMAT, "architecture": "gl_small_cnn", "input_size": json.dumps([32, 32]),
            "input_range": "0_1", "mean": json.dumps([0.0, 0.0, 0.0]), "std": json.dumps([1.0, 1.0, 1.0]),
            "labels": json.dumps(LABELS), "purpose": "guidance (never used to evaluate)",
            "training": json.dumps({**vars(args), "seconds": round(seconds, 1), "torch": torch.__version__,
                                    "python": platform.python_version()}),
            "accuracy": json.dumps(acc)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in net.state_dict().items()
             if v.is_floating_point()}
    safetensors.torch.save_file(state, str(out), metadata=meta)
    out.chmod(0o644)
    log(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB) in {seconds / 60:.1f} min")
    return {"accuracy": acc, "seconds": seconds}


if __name__ == "__main__":
    main()
