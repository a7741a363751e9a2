"""Per-step wall time of Guidance Lab methods against plain CFG on a full-size random-weight SD1.5 UNet (CPU).

    python bench/step_overhead.py [--steps N] [--repeats R] [--out BENCHMARKS.md]

Boots the real ComfyUI in-process exactly as the tests do (tests/host.py: $GL_COMFYUI_ROOT, else $COMFYUI_PATH,
else the copy scripts/setup.sh installs), builds `comfy.supported_models.SD15` with the unet_config ComfyUI's
model detection derives for an SD1.5 checkpoint, fills it with seeded random weights and samples a 64×64 latent
with `CFGGuider(patcher).sample(...)` under `torch.inference_mode()` for every configuration, interleaved in one
process. Writes (only) the `step_overhead` section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _p in (BENCH_DIR, REPO / "tests"):          # bench/_markdown.py and tests/host.py
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

from _markdown import write_section  # noqa: E402

SECTION = "step_overhead"
TITLE = "Per-step overhead (random-weight SD1.5 UNet, CPU)"

# What comfy/model_detection.py:detect_unet_config derives from a real SD1.5 checkpoint (identical to its
# diffusers-conversion table entry `SD15`); SD15.unet_extra_config then adds num_heads=8, num_head_channels=-1.
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
LATENT_SHAPE = (1, 4, 64, 64)
CONTEXT_SHAPE = (1, 77, 768)
CFG = 7.0
CFGPP_LAMBDA = 0.6
BASELINE = "cfg"


# --------------------------------------------------------------------------------------------------- host, model
def boot_host(attention: str):
    """Boot ComfyUI (CPU) through tests/host.py, choosing the attention backend before comfy reads its args."""
    import host
    root = str(host.comfy_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    import utils.extra_config  # noqa: F401  (before comfy.cli_args, as host.boot / main.py do)
    from comfy.cli_args import args
    if "comfy.model_management" in sys.modules and args.use_pytorch_cross_attention != (attention == "pytorch"):
        raise RuntimeError("comfy.model_management was imported before the attention backend could be chosen")
    args.use_pytorch_cross_attention = attention == "pytorch"
    return host.boot()


def init_weights(module: torch.nn.Module, seed: int) -> None:
    """comfy ops skip init: normal(0, 0.02) for ndim >= 2, ones for GroupNorm/LayerNorm weights, zeros otherwise.

    Norm layers are found by type, not by name: the UNet's ResBlock GroupNorms are named `in_layers.0`,
    `out_layers.0` and `out.0`, with no "norm" in the parameter name.
    """
    gen = torch.Generator().manual_seed(seed)
    norm_weights = {id(m.weight) for m in module.modules()
                    if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None}
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            elif id(p) in norm_weights:
                p.fill_(1.0)
            else:
                p.zero_()


def build_sd15(seed: int):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    with torch.inference_mode(False):
        config = comfy.supported_models.SD15(dict(SD15_UNET_CONFIG))
        model = config.get_model({})
        init_weights(model.diffusion_model, seed)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher, config


# --------------------------------------------------------------------------------------------------- instrumentation
class Probe:
    """Counts network batch rows (NFE) and forward calls; timestamps sampler entry/exit and every step callback."""

    KEY = "gl_bench.step_overhead"

    def __init__(self):
        self.reset()

    def reset(self):
        self.rows = 0
        self.calls = 0
        self.net_time = 0.0                     # wall time spent inside the UNet forward (DIFFUSION_MODEL)
        self.marks: list[float] = []
        self.t_enter = self.t_exit = None

    def install(self, patcher) -> None:
        import comfy.patcher_extension as pe
        patcher.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, self.KEY, self._diffusion_model)
        patcher.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, self.KEY, self._sampler_sample)

    def _diffusion_model(self, executor, *args, **kwargs):
        x = args[0] if args else kwargs["x"]
        self.rows += int(x.shape[0])
        self.calls += 1
        t = time.perf_counter()
        try:
            return executor(*args, **kwargs)
        finally:
            self.net_time += time.perf_counter() - t

    def _sampler_sample(self, executor, *args, **kwargs):
        self.t_enter = time.perf_counter()
        try:
            return executor(*args, **kwargs)
        finally:
            self.t_exit = time.perf_counter()

    def callback(self, step, x0, x, total_steps):
        self.marks.append(time.perf_counter())

    def step_times(self, steps: int) -> list[float]:
        """Step k = the interval holding the k-th network evaluation: sampler entry → callback 0, callback k-1 →
        callback k, …, callback N-2 → sampler exit. They add up to the sampler's whole wall time."""
        if len(self.marks) != steps or self.t_enter is None or self.t_exit is None:
            raise RuntimeError(f"expected {steps} step callbacks inside one sampler call, got {len(self.marks)}")
        points = [self.t_enter, *self.marks[:-1], self.t_exit]
        return [b - a for a, b in zip(points, points[1:])]


class Config:
    def __init__(self, key, label, patcher, sampler, cfg):
        self.key, self.label, self.patcher, self.sampler, self.cfg = key, label, patcher, sampler, cfg
        self.step_times: list[float] = []          # all steps of all timed rounds
        self.round_means: list[float] = []         # mean step time per timed round
        self.run_times: list[float] = []           # whole CFGGuider.sample() call per timed round
        self.outside: list[float] = []             # per timed round: (sampler time − UNet time) / steps
        self.rounds: list[list[float]] = []        # raw step times per timed round
        self.nfe_rows: set[int] = set()
        self.calls: set[int] = set()
        self.finite = True


def resnet_classifier(host, depth: int, seed: int):
    """A torchvision ResNet with seeded random weights, saved without metadata and loaded by the pack's loader (so
    it is read as an ImageNet classifier: 224×224, ImageNet mean/std, 1000 classes)."""
    import tempfile

    import safetensors.torch
    import torchvision.models as tvm
    torch.manual_seed(seed)
    net = {18: tvm.resnet18, 50: tvm.resnet50}[depth](weights=None)
    folder = tempfile.mkdtemp(prefix="gl-overhead-")
    path = Path(folder) / f"resnet{depth}.safetensors"
    try:
        safetensors.torch.save_file({k: v.float().contiguous() for k, v in net.state_dict().items()
                                     if v.is_floating_point()}, str(path))
        return host.pack("guiders.classifier").load_classifier(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sd_vae(host, seed: int):
    """SD1.5's VAE (the host's AutoencoderKL with the config VAE() picks for an SD checkpoint's VAE keys), seeded
    random weights (normal(0, 1/sqrt(fan_in)) kernels, unit norms, zero biases), built by comfy.sd.VAE."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.inference_mode(False):
        net = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
        host.pack("guiders.tiny_models")._init_weights(net, seed)
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return comfy.sd.VAE(sd=state)


def make_configs(host, base):
    import comfy.samplers
    patch_apg = host.pack("guiders.apg").patch_apg
    make_cfgpp_sampler = host.pack("guiders.cfgpp").make_cfgpp_sampler
    patch_elucd = host.pack("guiders.classifier_guidance").patch_classifier_guidance
    agd = host.pack("guiders.agd")
    adapter = agd.build_adapters(base, hidden=320, features=256, seed=0)      # the authors' size for SD
    share = adapter.parameters() / sum(p.numel() for p in base.model.diffusion_model.parameters())
    distilled = Config("agd", f"AGD adapters (`GL_AGDApply`; d_h 320, 256 Fourier features, time and prompt tokens: "
                       f"{adapter.parameters() / 1e6:.2f} M parameters, {100 * share:.1f} % of the UNet), ω {CFG:g}, "
                       "core `euler` at cfg 1", agd.apply_adapters(base, adapter, CFG),
                       comfy.samplers.sampler_object("euler"), 1.0)
    elucd = [Config(f"elucd_r{d}", f"EluCD (linear decoder, random ResNet-{d} at 224², core `euler`, cfg {CFG:g})",
                    patch_elucd(base, resnet_classifier(host, d, 0), "class 0", decoder="linear"),
                    comfy.samplers.sampler_object("euler"), CFG) for d in (18, 50)]
    tm = host.pack("guiders.tiny_models")
    r18 = resnet_classifier(host, 18, 0)
    with torch.inference_mode():                  # as VAELoader builds them inside the executor
        taesd = tm.build_taesd_vae(4, seed=0)     # TAESD's real architecture, random weights
        kl = sd_vae(host, seed=0)                 # SD1.5's AutoencoderKL, random weights
    decoded = [Config("elucd_taesd",
                      f"EluCD (TAESD decoder `vae`, random ResNet-18 at 224², core `euler`, cfg {CFG:g})",
                      patch_elucd(base, r18, "class 0", decoder="vae", vae=taesd),
                      comfy.samplers.sampler_object("euler"), CFG),
               Config("elucd_klvae", f"EluCD (full SD1.5 VAE decoder `vae`, random ResNet-18 at 224², core `euler`, "
                      f"cfg {CFG:g})", patch_elucd(base, r18, "class 0", decoder="vae", vae=kl),
                      comfy.samplers.sampler_object("euler"), CFG)]
    return elucd + decoded + [distilled] + [
        Config("cfg", f"plain CFG (core `euler`, cfg {CFG:g})", base, comfy.samplers.sampler_object("euler"), CFG),
        Config("apg", f"APG (`patch_apg` defaults, core `euler`, cfg {CFG:g})", patch_apg(base),
               comfy.samplers.sampler_object("euler"), CFG),
        Config("cfgpp", f"CFG++ (`make_cfgpp_sampler(\"euler\")`, λ = cfg {CFGPP_LAMBDA:g})", base,
               make_cfgpp_sampler("euler"), CFGPP_LAMBDA),
        Config("core_cfgpp", f"core `euler_cfg_pp` (reference, cfg {CFGPP_LAMBDA:g})", base,
               comfy.samplers.sampler_object("euler_cfg_pp"), CFGPP_LAMBDA),
    ]


def run_once(cfg: Config, probe: Probe, inputs: dict, steps: int, seed: int):
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(cfg.patcher.get_model_object("model_sampling"), "normal", steps)
    guider = comfy.samplers.CFGGuider(cfg.patcher)
    guider.set_conds(inputs["positive"], inputs["negative"])
    guider.set_cfg(cfg.cfg)
    gc.collect()
    probe.reset()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = guider.sample(inputs["noise"], inputs["latent"], cfg.sampler, sigmas, callback=probe.callback,
                            disable_pbar=True, seed=seed)
    run_time = time.perf_counter() - t0
    step_times = probe.step_times(steps)
    outside = (sum(step_times) - probe.net_time) / steps
    return step_times, run_time, outside, bool(torch.isfinite(out).all())


# --------------------------------------------------------------------------------------------------- report
from _machine import comfy_version as _comfy_version  # noqa: E402
from _machine import cpu_model as _cpu_model  # noqa: E402
from _machine import git_revision as _git_revision  # noqa: E402



def _command() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script_arg = str(script.relative_to(REPO))
    except ValueError:
        script_arg = str(script)
    return shlex.join(["python", script_arg, *sys.argv[1:]])


def summarize(configs: list[Config], steps: int) -> list[dict]:
    base = next(c for c in configs if c.key == BASELINE)
    base_median = statistics.median(base.step_times)
    rows = []
    for c in configs:
        med = statistics.median(c.step_times)
        paired = [m / b for m, b in zip(c.round_means, base.round_means)]
        rows.append(dict(
            key=c.key, label=c.label,
            nfe=("/".join(f"{r / steps:g}" for r in sorted(c.nfe_rows))),
            calls=("/".join(f"{n / steps:g}" for n in sorted(c.calls))),
            median=med, lo=min(c.step_times), hi=max(c.step_times), n=len(c.step_times),
            ratio=med / base_median, paired=statistics.median(paired),
            outside=statistics.median(c.outside), run=statistics.median(c.run_times), finite=c.finite,
            round_spread=(max(c.round_means) - min(c.round_means)) / statistics.median(c.round_means) * 100))
    base_outside = rows[configs.index(base)]["outside"]
    for r in rows:                     # the UNet call is the same batched forward everywhere: overhead = the rest
        r["extra"] = r["outside"] - base_outside
        r["est_ratio"] = 1.0 + r["extra"] / base_median
    return rows


def render(rows, *, args, info) -> str:
    table = ["| configuration | NFE/step | forward calls/step | median s/step | min–max s/step | ratio vs CFG "
             "| paired ratio | outside UNet ms/step | median s/run (`sample()`) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        table.append(f"| {r['label']} | {r['nfe']} | {r['calls']} | {r['median']:.3f} | {r['lo']:.3f}–{r['hi']:.3f} "
                     f"| {r['ratio']:.3f}× | {r['paired']:.3f}× | {r['outside'] * 1e3:.1f} | {r['run']:.2f} |")
    by_key = {r["key"]: r for r in rows}
    base = by_key[BASELINE]
    noise = (base["hi"] - base["lo"]) / base["median"] * 100
    noisiest = max(rows, key=lambda r: r["round_spread"])
    # Resolving a 2 % margin needs every configuration's round-to-round spread within 2 % and uncontended cores.
    trustworthy = args.repeats >= 2 and noisiest["round_spread"] <= 2.0 and info["util"] >= 0.85
    wall, outside = [], []
    for key, name in (("apg", "APG"), ("cfgpp", "CFG++")):
        r = by_key[key]
        ok = r["ratio"] <= 1.02 and r["paired"] <= 1.02
        wall.append(f"{name} {r['ratio']:.3f}× (paired {r['paired']:.3f}×): "
                    + ("≤ 1.02×" if ok else "**above 1.02×**"))
        outside.append(f"{name} {r['extra'] * 1e3:+.1f} ms/step → {r['est_ratio']:.4f}× "
                       + ("(met)" if r["est_ratio"] <= 1.02 else "(**not met**)"))
    reasons = []
    if args.repeats < 2:
        reasons.append("only one round was timed")
    if noisiest["round_spread"] > 2.0:
        reasons.append(f"the round-to-round spread reaches {noisiest['round_spread']:.1f} % ({noisiest['key']}), "
                       "more than the 2 % margin")
    if info["util"] < 0.85:
        reasons.append(f"the cores were shared ({info['util'] * 100:.0f} % utilisation)")
    wall_note = "" if trustworthy else f" — but {'; '.join(reasons)}, so the wall-clock ratios alone cannot settle it"
    non_finite = [r["label"] for r in rows if not r["finite"]]
    cfg_rounds = ", ".join(f"{m:.3f}" for m in info["cfg_rounds"])
    spreads = ", ".join(f"{r['key']} {r['round_spread']:.1f} %" for r in rows)
    elucd = [f"{r['label'].split(' (')[0]} with ResNet-{r['key'][7:]}: {r['ratio']:.3f}× (paired {r['paired']:.3f}×, "
             f"{r['extra'] * 1e3:+.0f} ms/step outside the UNet → {r['est_ratio']:.3f}×): "
             + ("≤ 1.3×" if r["est_ratio"] <= 1.3 else "**above 1.3×**")
             for r in rows if r["key"].startswith("elucd_r")]
    decoders = [f"{'TAESD' if r['key'] == 'elucd_taesd' else 'the full SD1.5 VAE'}: {r['ratio']:.3f}× (paired "
                f"{r['paired']:.3f}×, {r['extra'] * 1e3:+.0f} ms/step outside the UNet → {r['est_ratio']:.3f}×)"
                for r in rows if r["key"] in ("elucd_taesd", "elucd_klvae")]
    lines = [
        f"## {TITLE}",
        "",
        "Command (from the repository root, `python` = the project venv's interpreter):",
        "",
        f"    {info['command']}",
        "",
        f"- Date: {info['date']}",
        f"- Machine: {info['cpu']} (`/proc/cpuinfo` model name), {info['cores']} cores, "
        f"{info['ram']} RAM; `torch.set_num_threads({args.threads})`, so the network uses all cores.",
        f"- Software: torch {torch.__version__}, ComfyUI {info['comfy']}, Python {platform.python_version()}, "
        f"Guidance Lab {info['rev']}.",
        f"- Model: `comfy.supported_models.SD15` with the unet_config ComfyUI's model detection derives for an "
        f"SD1.5 checkpoint (model_channels 320, channel_mult [1, 2, 4, 4], num_res_blocks 2, transformer_depth 1, "
        f"context_dim 768, num_heads 8, attention at the 1×/2×/4× levels), {info['params'] / 1e6:.1f} M parameters, "
        f"{info['dtype']}, EPS. Random weights, seed {args.seed}: normal(0, 0.02) for ndim ≥ 2, ones for "
        f"GroupNorm/LayerNorm weights, zeros for biases.",
        f"- Input: {LATENT_SHAPE[2]}×{LATENT_SHAPE[3]} latent, {LATENT_SHAPE[1]} channels, batch {LATENT_SHAPE[0]}; "
        f"positive and negative conditioning `[[randn(1, 77, 768), {{}}]]`; \"normal\" schedule, {args.steps} steps, "
        f"seed {args.seed}.",
        f"- Attention: `{info['attention']}`" + (
            " (`--use-pytorch-cross-attention`; ComfyUI's `--cpu` default, sub-quadratic attention, is about 3× "
            "slower for this batch-2 UNet on this machine — run with `--attention comfy-default` to use it)."
            if args.attention == "pytorch" else " (ComfyUI's default on CPU)."),
        f"- Protocol: one process; warm-up: every configuration once ({args.warmup_steps} step); then "
        f"{args.repeats} timed round{'s' if args.repeats != 1 else ''}, round-robin over the configurations with "
        "the order rotated each round. Each "
        "run is `comfy.samplers.CFGGuider(patcher).sample(...)` under `torch.inference_mode()`. A step's time is "
        "the wall time between consecutive sampler callbacks (the first from sampler entry, the last to sampler "
        "exit, taken in a `SAMPLER_SAMPLE` wrapper), so it contains one step's network call, guidance and update, "
        "and excludes per-run set-up (model load, cond preparation), which is in the last column. Median over "
        f"{args.steps} steps × {args.repeats} rounds. \"outside UNet\" = (sampler wall time − wall time inside the "
        "UNet forward) ÷ steps, median over rounds. NFE/step = batch rows through the UNet (counted by a "
        "`DIFFUSION_MODEL` wrapper) per step; cond and uncond travel in one batched forward call.",
        "",
        *table,
        "",
        "\"ratio vs CFG\" = median s/step ÷ plain CFG's median s/step; \"paired ratio\" = median over rounds of "
        "(the configuration's mean step time ÷ plain CFG's mean step time in the same round).",
        "",
        "Target APG and CFG++ ≤ 1.02× plain CFG per step:",
        "",
        f"- wall clock: {'; '.join(wall)}{wall_note}.",
        "- time outside the UNet (guidance hooks, sampler update, model wrapper; every configuration runs the "
        "same single batched cond+uncond forward, timed separately by the `DIFFUSION_MODEL` wrapper), relative to "
        f"plain CFG's {base['outside'] * 1e3:.1f} ms/step and expressed against its median step: "
        f"{'; '.join(outside)}.",
        "",
        *([f"Target AGD ≤ 0.55× plain CFG per step (one 1-row forward with the adapters against CFG's 2-row "
           f"forward): {by_key['agd']['ratio']:.3f}× (paired {by_key['agd']['paired']:.3f}×): "
           + ("met" if max(by_key['agd']['ratio'], by_key['agd']['paired']) <= 0.55 else "**not met**") + ".", ""]
          if "agd" in by_key else []),
        *([f"Target EluCD ≤ 1.3× plain CFG per step (classifier forward + backward on the linear-decoded "
           f"prediction, resized to 224²): {'; '.join(elucd)}.", ""] if elucd else []),
        *([f"EluCD with the `vae` decoder (ResNet-18; decode to 512² and its backward every step; no target, for "
           f"choosing a decoder): {'; '.join(decoders)}.", ""] if decoders else []),
        f"Noise: plain CFG's step times spread over {noise:.1f} % of its median; its mean s/step per round "
        f"({cfg_rounds}) over {base['round_spread']:.1f} %; round-to-round spread of the mean s/step for every "
        f"configuration: {spreads}. During the {info['timed_wall'] / 60:.1f} min of timed rounds "
        f"this process used "
        f"{info['util'] * 100:.0f} % of {args.threads} threads' CPU time and was preempted {info['nivcsw']} times "
        f"(involuntary context switches); 1-min load average {info['load_before']:.2f} before, "
        f"{info['load_after']:.2f} after. Utilisation well below ~90 % or a load average above {args.threads} means "
        "other processes shared the cores, which inflates and scatters the step times; the interleaved rounds and "
        "the paired ratio limit, but do not remove, that bias. The time outside the UNet is barely affected by the "
        "noise, which sits almost entirely in the UNet's own time.",
    ]
    if non_finite:
        lines += ["", f"Warning: non-finite output from {', '.join(non_finite)}."]
    lines += ["", f"Benchmark wall time: {info['wall'] / 60:.1f} min (boot, model build, warm-up and all rounds)."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="sampler steps per run (default 4)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds over all configurations (default 3)")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"),
                    help="Markdown file whose step_overhead section is (re)written (default: BENCHMARKS.md)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch.set_num_threads (default: all cores, %(default)s here)")
    ap.add_argument("--warmup-steps", type=int, default=1, help="steps of the warm-up run per configuration")
    ap.add_argument("--attention", choices=("pytorch", "comfy-default"), default="pytorch",
                    help="pytorch = --use-pytorch-cross-attention (default); comfy-default = sub-quadratic on CPU")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps < 2 or args.repeats < 1 or args.threads < 1 or args.warmup_steps < 1:
        ap.error("need --steps >= 2, --repeats >= 1, --threads >= 1, --warmup-steps >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    host = boot_host(args.attention)
    torch.set_num_threads(args.threads)          # after boot: tests/host.py pins the tests to GL_TEST_THREADS
    import logging
    logging.getLogger().setLevel(logging.WARNING)
    from comfy.ldm.modules import attention as comfy_attention

    t = time.perf_counter()
    patcher, _ = build_sd15(args.seed)
    params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
    print(f"built SD1.5 UNet: {params / 1e6:.1f} M params in {time.perf_counter() - t:.1f} s; "
          f"attention {comfy_attention.optimized_attention.__name__}; {torch.get_num_threads()} threads", flush=True)
    probe = Probe()
    base = patcher.clone()
    probe.install(base)                          # before patch_apg clones it, so every configuration is probed
    configs = make_configs(host, base)

    gen = torch.Generator().manual_seed(args.seed)
    inputs = dict(positive=[[torch.randn(CONTEXT_SHAPE, generator=gen), {}]],
                  negative=[[torch.randn(CONTEXT_SHAPE, generator=gen), {}]],
                  noise=torch.randn(LATENT_SHAPE, generator=gen), latent=torch.zeros(LATENT_SHAPE))

    for c in configs:
        t = time.perf_counter()
        run_once(c, probe, inputs, args.warmup_steps, args.seed)
        print(f"warm-up  {c.key:<10} {time.perf_counter() - t:7.2f} s", flush=True)

    k = len(configs)
    load_before = os.getloadavg()[0]
    usage0, timed0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for rnd in range(args.repeats):
        order = configs[rnd % k:] + configs[:rnd % k]
        for c in order:
            steps, run_time, outside, finite = run_once(c, probe, inputs, args.steps, args.seed)
            c.step_times += steps
            c.rounds.append(steps)
            c.outside.append(outside)
            c.round_means.append(statistics.fmean(steps))
            c.run_times.append(run_time)
            c.nfe_rows.add(probe.rows)
            c.calls.add(probe.calls)
            c.finite &= finite
            print(f"round {rnd + 1}/{args.repeats}  {c.key:<10} {statistics.fmean(steps):7.3f} s/step  "
                  f"outside UNet {outside * 1e3:7.2f} ms/step  NFE {probe.rows}  calls {probe.calls}  "
                  f"run {run_time:.2f} s", flush=True)

    usage1, timed_wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - timed0
    cpu_s = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    contention = dict(util=cpu_s / (timed_wall * args.threads), nivcsw=usage1.ru_nivcsw - usage0.ru_nivcsw,
                      load_before=load_before, load_after=os.getloadavg()[0], timed_wall=timed_wall,
                      cfg_rounds=next(c for c in configs if c.key == BASELINE).round_means)
    rows = summarize(configs, args.steps)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    info = dict(command=_command(), date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                cpu=_cpu_model(), cores=os.cpu_count(), ram=f"{ram:.0f} GiB", comfy=_comfy_version(),
                rev=_git_revision(), params=params, dtype=str(patcher.model.get_dtype()).replace("torch.", ""),
                attention=comfy_attention.optimized_attention.__name__, wall=time.perf_counter() - wall0,
                **contention)
    out = write_section(args.out, SECTION, render(rows, args=args, info=info))
    raw = BENCH_DIR / "results" / "step_overhead.json"          # git-ignored: raw per-step data of the last run
    raw.parent.mkdir(exist_ok=True)
    raw.write_text(json.dumps(dict(args=vars(args), info=info, summary=rows,
                                   runs={c.key: dict(step_times=c.rounds, outside=c.outside, run_times=c.run_times)
                                         for c in configs}), indent=1, default=str), encoding="utf-8")

    print()
    print(f"{'configuration':<58} {'NFE/step':>8} {'median s/step':>14} {'ratio':>7} {'paired':>7} "
          f"{'outside UNet':>13}")
    for r in rows:
        print(f"{r['label']:<58} {r['nfe']:>8} {r['median']:>14.3f} {r['ratio']:>6.3f}× {r['paired']:>6.3f}× "
              f"{r['outside'] * 1e3:>10.1f} ms")
    print(f"\nwrote section '{SECTION}' of {out} (raw data: {raw}); total {info['wall'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
