"""Wall time per image of Adaptive Guidance against plain CFG on a full-size random-weight SD1.5 UNet (CPU).

    python bench/adaptive_speed.py [--steps N] [--repeats R] [--switch-percent P] [--out BENCHMARKS.md]

Boots the real ComfyUI in-process as the tests do, builds the SD1.5 UNet of bench/step_overhead.py (the unet_config
ComfyUI derives from an SD1.5 checkpoint, seeded random weights), and samples one 64×64 latent (512×512 image) with
`CFGGuider(...).sample(...)` (core euler, normal schedule, cfg 7) for plain CFG and for `GL_AdaptiveGuidance`,
interleaved in one process. NFEs are counted by the pack's counter (guiders/nfe.py) and checked against an
independent count of UNet forwards (DIFFUSION_MODEL wrapper).

Random weights never make the conditional and unconditional predictions agree, so the switch cannot come from the
threshold here: the benchmark pins it with `start_percent` (threshold −1, `--switch-percent`, default 0.5 = the
middle of the schedule) and measures what a switch at that point saves in wall time. Where a trained model switches
is measured on the demo model (`bench/quality.py`, BENCHMARKS.md "quality"). Writes only the `adaptive_speed`
section of the Markdown file.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _p in (BENCH_DIR, REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

from _machine import comfy_version, cpu_model, git_revision  # noqa: E402
from _markdown import write_section  # noqa: E402
from step_overhead import CONTEXT_SHAPE, LATENT_SHAPE, boot_host, build_sd15  # noqa: E402

SECTION = "adaptive_speed"
TITLE = "Adaptive Guidance: wall time per image (random-weight SD1.5 UNet, CPU)"
CFG = 7.0
TARGET = 0.80


class ForwardCount:
    """Independent NFE count: batch rows of every UNet forward (DIFFUSION_MODEL wrapper)."""

    KEY = "gl_bench.adaptive_speed"

    def __init__(self):
        self.rows = 0

    def install(self, patcher):
        import comfy.patcher_extension as pe

        def wrapper(executor, *args, **kwargs):
            x = args[0] if args else kwargs["x"]
            self.rows += int(x.shape[0])
            return executor(*args, **kwargs)
        patcher.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, self.KEY, wrapper)


def run_once(patcher, inputs, steps, seed, counter: ForwardCount):
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", steps)
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(inputs["positive"], inputs["negative"])
    guider.set_cfg(CFG)
    gc.collect()
    counter.rows = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = guider.sample(inputs["noise"], inputs["latent"], comfy.samplers.sampler_object("euler"), sigmas,
                            disable_pbar=True, seed=seed)
    return time.perf_counter() - t0, counter.rows, bool(torch.isfinite(out).all())


def _command(argv) -> str:
    return shlex.join(["python", "bench/adaptive_speed.py", *argv])


def render(rows, *, args, info) -> str:
    cfg, ag = rows["cfg"], rows["ag"]
    ratio = ag["median"] / cfg["median"]
    paired = statistics.median(a / c for a, c in zip(ag["times"], cfg["times"]))
    nfe_ratio = ag["nfe"] / cfg["nfe"]
    lines = [
        f"## {TITLE}", "",
        "Command (from the repository root, `python` = the project venv's interpreter):", "",
        f"    {info['command']}", "",
        f"- Date: {info['date']}; machine: {info['cpu']}, {info['cores']} cores, `torch.set_num_threads("
        f"{args.threads})`; torch {torch.__version__}, ComfyUI {info['comfy']}, Guidance Lab {info['rev']}.",
        f"- Model: `comfy.supported_models.SD15` with the SD1.5 unet_config ({info['params'] / 1e6:.0f} M params, "
        f"seeded random weights, float32); one {LATENT_SHAPE[2]}×{LATENT_SHAPE[3]} latent (512×512 image) per run; "
        f"core `euler`, `normal` schedule, {args.steps} steps, cfg {CFG:g}; {args.repeats} timed rounds after one "
        "warm-up each, CFG and AG interleaved.",
        f"- Adaptive Guidance: `patch_adaptive_guidance(threshold=-1, start_percent={args.switch_percent:g})` — "
        "random weights never make the two predictions agree, so the switch is pinned at that point of the "
        f"schedule (after schedule step {ag['switch_step']}); the demo-model rows of the quality table show where "
        "the default threshold switches on a trained model.",
        "",
        "| configuration | NFE/image (pack counter) | UNet rows (independent) | median s/image | min–max s/image "
        "| ratio vs CFG |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in ("cfg", "ag"):
        r = rows[key]
        lines.append(f"| {r['label']} | {r['nfe']:g} | {r['rows']} | {r['median']:.2f} | {min(r['times']):.2f}–"
                     f"{max(r['times']):.2f} | {r['median'] / cfg['median']:.3f}× |")
    lines += [
        "",
        f"Wall time per image, AG ÷ CFG: **{ratio:.3f}×** (median of runs; paired per round: {paired:.3f}×), "
        f"NFE ratio {nfe_ratio:.3f}×. Target ≤ {TARGET:.2f}× at the same step count: "
        f"**{'met' if ratio <= TARGET else 'not met'}**.",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="sampler steps (default 10)")
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds (default 2)")
    ap.add_argument("--switch-percent", type=float, default=0.5,
                    help="start_percent at which the switch is pinned (default 0.5)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default all cores)")
    ap.add_argument("--attention", choices=("pytorch", "comfy-default"), default="pytorch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    args = ap.parse_args(argv)
    if args.steps < 2 or args.repeats < 1 or not 0 < args.switch_percent < 1:
        ap.error("need --steps >= 2, --repeats >= 1, 0 < --switch-percent < 1")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    wall0 = time.perf_counter()
    host = boot_host(args.attention)
    torch.set_num_threads(args.threads)
    import logging
    logging.getLogger().setLevel(logging.WARNING)
    ag_mod, nfe = host.pack("guiders.adaptive"), host.pack("guiders.nfe")
    patcher, _ = build_sd15(args.seed)
    params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
    counter = ForwardCount()
    base = patcher.clone()
    counter.install(base)
    plain = base.clone()
    nfe.install_nfe_counter(plain)
    ag = ag_mod.patch_adaptive_guidance(base, threshold=-1.0, start_percent=args.switch_percent)
    models = {"cfg": ("plain CFG (`GL_NFECounter` only)", plain), "ag": (
        f"Adaptive Guidance (switch pinned at start_percent {args.switch_percent:g})", ag)}
    gen = torch.Generator().manual_seed(args.seed)
    inputs = dict(positive=[[torch.randn(CONTEXT_SHAPE, generator=gen), {}]],
                  negative=[[torch.randn(CONTEXT_SHAPE, generator=gen), {}]],
                  noise=torch.randn(LATENT_SHAPE, generator=gen), latent=torch.zeros(LATENT_SHAPE))
    rows = {k: {"label": label, "times": [], "rows": None, "nfe": None, "finite": True}
            for k, (label, _m) in models.items()}
    for key, (_label, model) in models.items():           # warm-up
        t, _r, _f = run_once(model, inputs, 2, args.seed, counter)
        print(f"warm-up {key}: {t:.1f} s", flush=True)
    for rnd in range(args.repeats):
        order = list(models) if rnd % 2 == 0 else list(reversed(models))
        for key in order:
            t, r, finite = run_once(models[key][1], inputs, args.steps, args.seed, counter)
            report = nfe.last_report(models[key][1])
            if report.rows != r:
                raise RuntimeError(f"{key}: pack counter {report.rows} rows != independent count {r}")
            row = rows[key]
            row["times"].append(t)
            row["rows"], row["nfe"] = r, report.nfe_per_image
            row["finite"] &= finite
            if key == "ag":
                row["switch_step"] = report.notes["_adaptive_guidance"]["switch_step"]
            print(f"round {rnd + 1}/{args.repeats} {key}: {t:.2f} s, {report.line()}", flush=True)
    for row in rows.values():
        row["median"] = statistics.median(row["times"])
    info = dict(command=_command(argv), date=datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC"), cpu=cpu_model(), cores=os.cpu_count(), comfy=comfy_version(), rev=git_revision(),
        params=params, wall=time.perf_counter() - wall0)
    out = write_section(args.out, SECTION, render(rows, args=args, info=info))
    raw = BENCH_DIR / "results" / "adaptive_speed.json"
    raw.parent.mkdir(exist_ok=True)
    raw.write_text(json.dumps(dict(args=vars(args), info=info, rows=rows), indent=1, default=str), encoding="utf-8")
    print(render(rows, args=args, info=info))
    print(f"\nwrote section '{SECTION}' of {out}; total {info['wall'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
