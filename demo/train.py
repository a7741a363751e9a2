"""Train the pack's demo text-to-image model on the demo world and write its weights (safetensors + metadata).

    python demo/train.py --device cuda --precision bf16 --threads 8   # the shipped files: 2000 steps x 256
    python demo/train.py --precision bf16                               # same recipe on the CPU (hours)
    python demo/train.py --precision bf16 --steps 6000 --batch 32 --weak-at 2400   # ~1 h CPU variant, not evaluated

Writes demo/weights/demo_model.safetensors and demo/weights/demo_model_weak.safetensors (--out, --weak-out).
The shipped files were trained on one NVIDIA H200 (torch 2.11, bf16): 0.173 s/step at batch 256, 5.8 minutes.
That rate is set by the CPU side (scene drawing, tokenizing, ComfyUI's per-token Python loop of SDClipModel), not
the GPU: batch 1024 took 0.50 s/step. On 2 cores of an AMD EPYC (idle machine, --threads 2, bf16) the same UNet
takes 0.58 s/step at batch 32, so the full recipe would take about 2.6 hours there.

Reproducible: the weights depend only on the arguments (seed, steps, batch, lr, precision, ...), the model config
(demo/model_config.py) and the demo world (demo/world.py) — bit for bit on the same CPU and --threads; other
machines give numerically close weights. --time-budget-min only stops early (the LR schedule follows --steps).

What it does: the model of guiders/demo_model.py (ComfyUI's SD1 UNetModel + SDClipModel, pixel space, EPS) from a
seeded initialisation; data from demo/world.py (mixed single/pair scenes, split "train", 32×32, images mapped to
[-1, 1]); ~10% of the captions replaced by "" (what CLIPTextEncode of an empty negative prompt gives, so
classifier-free guidance works); EPS objective (plus a low-frequency image-space term, --lowpass-weight, see
Trainer.loss) with the model's own discrete schedule (σ drawn from its 1000
training sigmas, x = x0 + σ·n, network input and timestep exactly as BaseModel._apply_model computes them); the text
encoder trained jointly through the CLIP object's SDClipModel; AdamW, warm-up then cosine decay, gradient clipping,
an EMA of the weights (the EMA is what is saved). An early EMA checkpoint of the same run (--weak-at) is saved as
the "weak" model for autoguidance; from that step on the text encoder is frozen (--freeze-text-at), so both files
hold the same text encoder and one CLIPTextEncode conditions both UNets. A fixed probe batch (held-aside scenes,
fixed noise, σ spread over the schedule) is evaluated at the start, every --probe-every steps and at the end, so
runs can be compared.

ComfyUI is imported from $GL_COMFYUI_ROOT, $COMFYUI_PATH, --comfyui, or the copy scripts/setup.sh installs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_COMFYUI = Path(os.environ.get("GL_HOME", Path.home() / ".cache" / "guidance-lab")) / "comfyui-0.3.75"
PROBE_START = 1_000_000_000  # probe scenes: indices far beyond any training index


def log(message: str) -> None:
    """One progress line on stdout (plain text, no ComfyUI logging)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def parse_args(argv=None) -> argparse.Namespace:
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))  # appended: ComfyUI's top-level `nodes` must win over the pack's nodes/
    from demo.model_config import TRAIN, WORLD
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(REPO / "demo" / "weights" / "demo_model.safetensors"),
                   help="weights file to write (the EMA weights at the last step)")
    p.add_argument("--weak-out", default=None,
                   help="file of the early 'weak' checkpoint (default: <out stem>_weak.safetensors next to --out)")
    p.add_argument("--weak-at", type=int, default=TRAIN["weak_at"],
                   help="step at which the weak checkpoint (EMA) is saved; 0 = none")
    p.add_argument("--freeze-text-at", type=int, default=None,
                   help="from this step on the text encoder is frozen at its EMA weights (default: --weak-at), so "
                        "the weak and the final checkpoint share one text encoder and one CLIPTextEncode output can "
                        "condition both (autoguidance); 0 = train it to the end")
    p.add_argument("--steps", type=int, default=TRAIN["steps"], help="optimizer steps (also sets the LR schedule)")
    p.add_argument("--batch", type=int, default=TRAIN["batch"], help="images per step")
    p.add_argument("--lr", type=float, default=TRAIN["lr"], help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=TRAIN["warmup"], help="linear warm-up steps")
    p.add_argument("--min-lr-ratio", type=float, default=TRAIN["min_lr_ratio"],
                   help="cosine decay ends at this fraction of --lr at --steps")
    p.add_argument("--weight-decay", type=float, default=TRAIN["weight_decay"],
                   help="AdamW weight decay of weight matrices and kernels (not embeddings, norms, biases)")
    p.add_argument("--grad-clip", type=float, default=TRAIN["grad_clip"], help="global gradient-norm clip (0 = off)")
    p.add_argument("--ema-decay", type=float, default=TRAIN["ema_decay"], help="EMA decay (with 1+t/10+t warm-up)")
    p.add_argument("--caption-dropout", type=float, default=TRAIN["caption_dropout"],
                   help="fraction of captions replaced by the empty prompt")
    p.add_argument("--lowpass-weight", type=float, default=TRAIN["lowpass_weight"],
                   help="weight of the extra low-frequency loss: the image-space (x0) error of the prediction "
                        "averaged over --lowpass-pool blocks, i.e. σ²·|pool(ε̂) − pool(ε)|² (0 = plain EPS loss)")
    p.add_argument("--lowpass-pool", type=int, default=TRAIN["lowpass_pool"],
                   help="block size (pixels) of the low-frequency loss; the image side must be a multiple of it")
    p.add_argument("--seed", type=int, default=TRAIN["seed"], help="seed of initialisation, noise, σ and dropout")
    p.add_argument("--world-seed", type=int, default=WORLD["seed"], help="seed of the demo world (data)")
    p.add_argument("--size", type=int, default=WORLD["size"], help="image size (square)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="training device")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast the training forward/backward to bfloat16 (weights, optimizer, EMA and the "
                        "probe stay float32); ~1.6x faster on CPUs with AVX512-BF16/AMX and on GPUs")
    p.add_argument("--time-budget-min", type=float, default=0.0,
                   help="stop (and save) once training has run this many minutes; 0 = no limit")
    p.add_argument("--log-every", type=int, default=TRAIN["log_every"], help="progress line every N steps")
    p.add_argument("--probe-every", type=int, default=TRAIN["probe_every"],
                   help="probe-batch loss every N steps (0 = only at start and end)")
    p.add_argument("--probe-batch", type=int, default=TRAIN["probe_batch"], help="size of the fixed probe batch")
    p.add_argument("--comfyui", default=None, help="ComfyUI root (default: $GL_COMFYUI_ROOT, $COMFYUI_PATH, "
                   f"{DEFAULT_COMFYUI})")
    args = p.parse_args(argv)
    if args.weak_out is None:
        out = Path(args.out)
        args.weak_out = str(out.with_name(out.stem + "_weak" + out.suffix))
    if args.lowpass_weight < 0 or args.lowpass_pool < 1 or args.size % args.lowpass_pool:
        p.error("--lowpass-weight must be >= 0 and --lowpass-pool a positive divisor of --size")
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be positive")
    if args.weak_at >= args.steps:
        p.error(f"--weak-at ({args.weak_at}) must be below --steps ({args.steps}), or 0 for none")
    if args.freeze_text_at is None:
        args.freeze_text_at = args.weak_at
    if args.weak_at and args.freeze_text_at and args.freeze_text_at > args.weak_at:
        p.error("--freeze-text-at after --weak-at would give the weak checkpoint a different text encoder")
    return args


def boot_comfy(device: str, root: str | None = None) -> str:
    """Import ComfyUI's `comfy` package (CPU-only unless `device` is cuda); returns its version."""
    if "comfy" not in sys.modules:
        root = Path(root or os.environ.get("GL_COMFYUI_ROOT") or os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI)
        if not (root / "comfy").is_dir():
            raise SystemExit(f"no ComfyUI at {root}: run scripts/setup.sh, or pass --comfyui / set COMFYUI_PATH")
        sys.path.insert(0, str(root.resolve()))
        from comfy.cli_args import args
        args.cpu = device == "cpu"
    try:
        import comfyui_version
        return comfyui_version.__version__
    except ImportError:
        return "unknown"


def git_commit() -> str:
    """HEAD of the pack's repository, '+dirty' when tracked files differ from it; 'unknown' without git."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def lr_at(step: int, args) -> float:
    """Linear warm-up to --lr, then cosine decay to --lr·--min-lr-ratio at --steps (step counts from 0)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    """The demo model, its optimizer and EMA, and one EPS training step."""

    def __init__(self, args, comfy_version: str):
        import torch

        from demo import model_config, world
        from guiders import demo_model as dm
        self.torch, self.dm, self.world, self.args = torch, dm, world, args
        self.device = torch.device(args.device)
        self.config = model_config.model_config()
        self.config["unet"]["image_size"] = args.size
        self.patcher, self.clip, _vae = dm.build_demo_model(self.config, args.seed)
        self.model = self.patcher.model
        self.net = self.model.diffusion_model.to(self.device)
        self.text_ctx = dm.trainable_text_encoder(self.clip)
        self.text = self.text_ctx.__enter__().to(self.device)
        self.net.train().requires_grad_(True)
        self.text.train()
        self.model.model_sampling.to(self.device)
        self.sigmas = self.model.model_sampling.sigmas
        self.named = [(dm.UNET_PREFIX + n, p) for n, p in self.net.named_parameters()]
        self.named += [(dm.TEXT_PREFIX + n, p) for n, p in self.text.named_parameters()]
        decay = [p for n, p in self.named if p.ndim >= 2 and "embedding" not in n]
        no_decay = [p for n, p in self.named if not (p.ndim >= 2 and "embedding" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999))
        self.ema = [p.detach().clone() for _n, p in self.named]
        self.gen = torch.Generator().manual_seed(args.seed + 1)
        # on a GPU the next step's scenes are drawn on a CPU thread while this step runs (same data, same order)
        self.pool = None
        if self.device.type == "cuda":
            from concurrent.futures import ThreadPoolExecutor
            self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = None
        self.token_cache: dict[str, list[int]] = {}
        self.empty = self.tokens([""])[0]
        self.fed = set(self.empty)
        self.comfy_version = comfy_version
        self.text_frozen = False
        self.unet_params = sum(p.numel() for p in self.net.parameters())
        self.text_params = sum(p.numel() for p in self.text.parameters())
        self._make_probe()

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        self.text_ctx.__exit__(None, None, None)

    # data -------------------------------------------------------------------------------------------------

    def tokens(self, captions: list[str]) -> list[list[int]]:
        missing = [c for c in dict.fromkeys(captions) if c not in self.token_cache]
        if missing:
            self.token_cache.update(zip(missing, self.dm.tokenize(self.clip, missing)))
        return [self.token_cache[c] for c in captions]

    def data(self, start: int, count: int):
        """Scenes start..start+count-1 of the world: (x0 in [-1, 1] [count, 3, size, size], captions)."""
        from demo.model_config import WORLD
        images, captions, _labels = self.world.batch(start, count, seed=self.args.world_seed, size=self.args.size,
                                                     kind=WORLD["kind"], split=WORLD["split"])
        return images * 2 - 1, captions

    def _tokenized(self, start: int, count: int):
        x0, captions = self.data(start, count)
        return x0, self.tokens(captions)

    def train_data(self, step: int):
        """Scenes and caption tokens of training step `step` (scenes step·batch onwards); on the GPU path they are
        prepared on a CPU thread while the previous step runs (same data, same order)."""
        a = self.args
        if self.pending is not None and self.pending[0] == step:
            x0, tokens = self.pending[1].result()
        else:
            x0, tokens = self._tokenized(step * a.batch, a.batch)
        self.pending = None
        if self.pool is not None and step + 1 < a.steps:
            self.pending = (step + 1, self.pool.submit(self._tokenized, (step + 1) * a.batch, a.batch))
        return x0, tokens

    def _make_probe(self):
        torch, a = self.torch, self.args
        x0, captions = self.data(PROBE_START, a.probe_batch)
        gen = torch.Generator().manual_seed(a.seed + 2)
        probe_tokens = self.tokens(captions)
        for t in probe_tokens:
            self.fed.update(t)
        self.probe = {"x0": x0, "tokens": probe_tokens,
                      "noise": torch.randn(x0.shape, generator=gen),
                      "idx": torch.linspace(0, len(self.sigmas) - 1, a.probe_batch).round().long()}

    # model ------------------------------------------------------------------------------------------------

    def loss(self, x0, tokens, noise, idx):
        """EPS loss: x = x0 + σ·n; the network sees calculate_input(σ, x) and timestep(σ), as in _apply_model
        (demo_model.predict_noise).

        Plus, with --lowpass-weight w > 0, w·σ²·mean|pool(ε̂ − ε)|² over --lowpass-pool blocks: the denoised image's
        error (x0 = x − σ·ε) on its low frequencies. Why: a sampler turns an error δ of ε̂ into an image error σ·δ,
        and at high σ the plain loss gives the few low-frequency components of ε (per-channel means: the background
        colour) almost no weight, so the model's images inherit the initial noise's colour cast. Both terms are
        squared errors of linear functions of ε̂, so their joint minimiser is still E[ε | x] (no bias)."""
        torch = self.torch
        x0, noise, idx = x0.to(self.device), noise.to(self.device), idx.to(self.device)
        with torch.no_grad() if self.text_frozen else contextlib.nullcontext():
            context, _pooled = self.text(tokens)
        sigma = self.sigmas[idx]
        x = x0 + noise * sigma[:, None, None, None]
        eps = self.dm.predict_noise(self.model, x, sigma, context)
        loss = torch.nn.functional.mse_loss(eps, noise)
        w, k = self.args.lowpass_weight, self.args.lowpass_pool
        if w > 0:
            low = torch.nn.functional.avg_pool2d((eps - noise).float(), k) * sigma.float()[:, None, None, None]
            loss = loss + w * low.square().mean()
        return loss

    def step(self, step: int):
        """One optimizer step; returns the loss as a detached 0-d tensor on the training device (reading it would
        make the CPU wait for the GPU every step; the loop reads a window of them at each log line)."""
        torch, a = self.torch, self.args
        x0, caption_tokens = self.train_data(step)
        drop = torch.rand(a.batch, generator=self.gen) < a.caption_dropout
        noise = torch.randn(x0.shape, generator=self.gen)
        idx = torch.randint(0, len(self.sigmas), (a.batch,), generator=self.gen)
        for t in caption_tokens:
            self.fed.update(t)
        tokens = [self.empty if d else t for d, t in zip(drop.tolist(), caption_tokens)]
        lr = lr_at(step, a)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            loss = self.loss(x0, tokens, noise, idx)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for _n, p in self.named]
        if a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        self.opt.step()
        decay = min(a.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in params], 1 - decay)
        return loss.detach()

    def freeze_text(self) -> None:
        """Text encoder := its EMA weights, no further updates (its EMA then stays equal to it, bit for bit)."""
        with self.torch.no_grad():
            for (name, p), e in zip(self.named, self.ema):
                if name.startswith(self.dm.TEXT_PREFIX):
                    p.copy_(e)
                    p.requires_grad_(False)
                    p.grad = None
        self.text_frozen = True

    def probe_loss(self, use_ema: bool) -> float:
        torch, pr = self.torch, self.probe
        params = [p for _n, p in self.named]
        with torch.no_grad():
            backup = [p.detach().clone() for p in params] if use_ema else None
            if use_ema:
                torch._foreach_copy_(params, self.ema)
            try:
                return float(self.loss(pr["x0"], pr["tokens"], pr["noise"], pr["idx"]))
            finally:
                if use_ema:
                    torch._foreach_copy_(params, backup)

    def save(self, path: str, steps: int, kind: str, extra: dict) -> None:
        tensors = self.dm.state_dict(self.model, self.clip)
        tensors.update({n: e for (n, _p), e in zip(self.named, self.ema)})
        a = self.args
        from demo.model_config import WORLD
        world = {**WORLD, "seed": a.world_seed, "size": a.size, "caption_dropout": a.caption_dropout}
        training = {k: v for k, v in vars(a).items() if k not in ("comfyui",)}
        training.update(checkpoint=kind, weights="ema", device=str(self.device), torch=self.torch.__version__,
                        comfyui=self.comfy_version, python=platform.python_version(),
                        unet_params=self.unet_params, text_params=self.text_params)
        training.update(extra)
        training["steps_done"] = steps
        meta = {"checkpoint": kind, "train_seed": str(a.seed), "train_steps": str(steps), "git_commit": git_commit(),
                "world_seed": str(a.world_seed), "world_size": str(a.size), "world": json.dumps(world, sort_keys=True),
                "training": json.dumps(training, sort_keys=True)}
        token_ids = self.fed  # every token the model was fed (not those of a prefetched batch)
        self.dm.save_demo_file(path, tensors, self.config, self.clip, meta, token_ids=token_ids)
        log(f"saved {kind} checkpoint (EMA, step {steps}) to {path}")


def train(args, comfy_version: str = "unknown") -> dict:
    """Run the training described by `args` (see parse_args); returns a summary dict."""
    import torch
    with torch.inference_mode(False), torch.enable_grad():
        t0 = time.perf_counter()
        trainer = Trainer(args, comfy_version)
        try:
            return _loop(trainer, args, t0)
        finally:
            trainer.close()


def _loop(trainer: Trainer, args, t0: float) -> dict:
    if args.freeze_text_at and args.freeze_text_at < 0.3 * args.steps:
        log(f"warning: the text encoder stops learning at step {args.freeze_text_at} of {args.steps} "
            "(--freeze-text-at, default --weak-at); a run frozen at 1500 of 6000 steps ignored its prompts. "
            "Freeze later (and take the weak checkpoint there), or pass --freeze-text-at 0")
    log(f"demo model: UNet {trainer.unet_params / 1e6:.2f} M params, text encoder {trainer.text_params / 1e6:.2f} M; "
        f"{args.steps} steps x batch {args.batch} on {args.device} ({args.threads} threads, {args.precision}), "
        f"seed {args.seed}")
    probes = [[0, trainer.probe_loss(False), trainer.probe_loss(True)]]
    log(f"probe step 0 loss {probes[0][1]:.4f}")
    start = time.perf_counter()
    budget = args.time_budget_min * 60
    window, done, stopped_early = [], 0, False
    log_sum, log_n = 0.0, 0
    for step in range(args.steps):
        window.append(trainer.step(step))
        done = step + 1
        elapsed = time.perf_counter() - start
        if done % args.log_every == 0 or done == args.steps or len(window) >= 50:
            # losses stay on the device between reads (no per-step host sync); checked every ≤ 50 steps
            losses = trainer.torch.stack(window).float().cpu()
            bad = (~trainer.torch.isfinite(losses)).nonzero()
            if len(bad):
                first = int(bad[0, 0])
                raise FloatingPointError(f"loss is {float(losses[first])} at step {done - len(window) + 1 + first}")
            log_sum, log_n = log_sum + float(losses.sum()), log_n + len(window)
            window = []
        if done % args.log_every == 0 or done == args.steps:
            rate = elapsed / done
            log(f"step {done}/{args.steps} loss {log_sum / log_n:.4f} lr {lr_at(step, args):.2e} "
                f"{rate:.3f} s/step elapsed {elapsed / 60:.1f} min eta {(args.steps - done) * rate / 60:.1f} min")
            log_sum, log_n = 0.0, 0
        if args.probe_every and done % args.probe_every == 0 and done != args.steps:
            probes.append([done, trainer.probe_loss(False), trainer.probe_loss(True)])
            log(f"probe step {done} loss {probes[-1][1]:.4f} ema {probes[-1][2]:.4f}")
        if done == args.freeze_text_at:
            trainer.freeze_text()
            log(f"text encoder frozen at its EMA weights after step {done}")
        if done == args.weak_at:
            trainer.save(args.weak_out, done, "weak", {"probe": probes})
        if budget and elapsed >= budget and done < args.steps:
            stopped_early = True
            log(f"time budget of {args.time_budget_min} min reached after {done} steps; stopping")
            break
    train_s = time.perf_counter() - start
    probes.append([done, trainer.probe_loss(False), trainer.probe_loss(True)])
    log(f"probe step {done} loss {probes[-1][1]:.4f} ema {probes[-1][2]:.4f}")
    summary = {"steps_done": done, "stopped_early": stopped_early, "train_seconds": round(train_s, 1),
               "seconds_per_step": round(train_s / done, 4), "probe": probes}
    if args.weak_at and done < args.weak_at:
        log(f"warning: stopped before --weak-at {args.weak_at}: no weak checkpoint written")
    trainer.save(args.out, done, "final", summary)
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    log("summary " + json.dumps(summary))
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    version = boot_comfy(args.device, args.comfyui)
    import torch
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes every step: let cuDNN pick its fastest convolutions
    return train(args, version)


if __name__ == "__main__":
    main()
