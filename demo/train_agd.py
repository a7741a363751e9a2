"""Distil CFG into adapters for the demo model and write demo/weights/demo_agd.safetensors.

    python demo/train_agd.py                                   # the shipped file (see the defaults below)
    python demo/train_agd.py --prompts 16 --steps 50 --out /tmp/a.safetensors     # a quick run
    python demo/train_agd.py --resume demo/weights/demo_agd.safetensors ...         # continue a file

Runs the pack's own code in the real host (tests/host.py boots ComfyUI on the CPU): GL_AGDCollect's
`collect` samples `--prompts` training captions of the demo world (split train, mixed single/pair scenes; none is a
benchmark caption) with CFG at ω ~ U[omega_min, omega_max], `--images` images per trajectory, 20 euler/normal
steps, and GL_AGDTrain's `train_agd` trains the adapters on every recorded evaluation (every 20th trajectory held
out for the loss history) with the relative objective, as the shipped file was (`--objective paper` for the
paper's ε-MSE). The collection is kept under ComfyUI's output folder (a temporary one per run unless
`--output-dir` is given), so a rerun with `--output-dir` resumes it. The file's metadata holds the training
settings, the held-out loss history and the seconds taken.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from _script import REPO, log, recorded_args  # demo/ is first on sys.path when this runs as a script

DEFAULT_OUT = REPO / "demo" / "weights" / "demo_agd.safetensors"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="safetensors file to write")
    p.add_argument("--weights", default=str(REPO / "demo" / "weights" / "demo_model.safetensors"))
    p.add_argument("--prompts", type=int, default=1280, help="training captions (one trajectory each)")
    p.add_argument("--images", type=int, default=2, help="images per trajectory (same caption and ω)")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--omega-min", type=float, default=1.0)
    p.add_argument("--omega-max", type=float, default=12.0)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--objective", choices=("paper", "relative"), default="relative",
                   help="training loss: the paper's ε-MSE, or the error relative to the guidance to add")
    p.add_argument("--omega-gain", action="store_true",
                   help="adapters whose output is multiplied by ω − 1 (Guidance Lab design; off = the paper's)")
    p.add_argument("--top-sites", action="store_true",
                   help="adapters also on the full-resolution output blocks' inputs (Guidance Lab design; off = the "
                        "paper's cross-attention sites only)")
    p.add_argument("--heads", type=int, default=1,
                   help="attention heads per adapter (Guidance Lab design; the paper's adapter has 1)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="the student's forward in float32 or in bfloat16 autocast (faster on CPUs with AMX and GPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-seed", type=int, default=None,
                   help="seed of the adapters' initialisation and batch order (default: --seed, which also seeds the "
                        "collection)")
    p.add_argument("--resume", default=None, help="continue training this adapter file (its architecture is kept)")
    p.add_argument("--caption-seed", type=int, default=5, help="world seed of the training captions")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-dir", default=None, help="ComfyUI output folder (keeps the collection for a rerun)")
    args = p.parse_args(argv)

    import host
    hst = host.boot()
    import torch
    torch.set_num_threads(args.threads)
    if args.output_dir:
        import folder_paths
        folder_paths.set_output_directory(str(Path(args.output_dir).resolve()))
    from demo import world
    ag = hst.pack("guiders.agd")
    col = hst.pack("guiders.agd_collect")
    trn = hst.pack("guiders.agd_train")
    model, clip, _vae = hst.pack("guiders.demo_model").load_demo_model(Path(args.weights))
    _imgs, captions, _labels = world.batch(0, args.prompts, seed=args.caption_seed, kind="mixed", split="train")
    t0 = time.perf_counter()
    last = [0.0]

    def progress(done, total):
        now = time.perf_counter()
        if now - last[0] > 30 or done == total:
            last[0] = now
            log(f"collect {done}/{total} ({now - t0:.0f} s)")
    with torch.inference_mode():
        data = col.collect(model, clip, captions, {"samples": torch.zeros(args.images, 3, 32, 32)},
                           trajectories_per_prompt=1, omega_min=args.omega_min, omega_max=args.omega_max,
                           steps=args.sample_steps, sampler_name="euler", scheduler="normal", seed=args.seed,
                           precision="fp16", name=f"demo_agd_{args.prompts}x{args.images}", progress=progress)
        collect_s = time.perf_counter() - t0
        log(f"{data.summary()} {collect_s:.0f} s")
        t1 = time.perf_counter()
        previous = ag.load(args.resume) if args.resume else None
        rounds = []
        if previous is not None:        # what earlier rounds did stays in the metadata
            rounds = previous.info.pop("rounds", []) + [dict(previous.info)]
        adapter = trn.train_agd(model, data, hidden=args.hidden, features=args.features, omega_gain=args.omega_gain,
                                top_sites=args.top_sites, heads=args.heads,
                                steps=args.steps, batch_size=args.batch, learning_rate=args.lr,
                                seed=args.seed if args.train_seed is None else args.train_seed,
                                objective=args.objective, precision=args.precision, resume=previous,
                                log=lambda line: log(f"{line} ({time.perf_counter() - t1:.0f} s)"))
    if rounds:
        adapter.info["rounds"] = rounds
    adapter.info.update({"collect_seconds": round(collect_s, 1), "prompts": args.prompts,
                         "images_per_trajectory": args.images, "caption_seed": args.caption_seed,
                         "threads": args.threads, "machine": platform.processor() or platform.machine(),
                         "torch": torch.__version__,
                         "command": " ".join(["python demo/train_agd.py", *recorded_args(argv or sys.argv[1:])])})
    path = ag.save(adapter, args.out)
    base = sum(v.numel() for k, v in model.model_state_dict().items() if k.startswith("diffusion_model."))
    log(f"wrote {path}: {adapter.parameters()} parameters ({100 * adapter.parameters() / base:.2f} % of the "
          f"UNet's {base}), held-out loss {adapter.info['loss_history'][0][1]} -> "
          f"{adapter.info['loss_history'][-1][1]}")
    return adapter.info


if __name__ == "__main__":
    main()
