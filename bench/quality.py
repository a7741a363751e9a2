"""Quality of guidance methods on the pack's demo model, measured through the real ComfyUI execution path.

    python bench/quality.py [--weights PATH] [--quick] [--images N] [--out BENCHMARKS.md] [--grid PATH]
    python bench/quality.py --classifier     # classifier-guidance rows (EluCD vs CFG), section "classifier_guidance"

Boots ComfyUI in-process on the CPU exactly as the tests do (tests/host.py: $GL_COMFYUI_ROOT, else $COMFYUI_PATH,
else the copy scripts/setup.sh installs) and executes, with `execution.PromptExecutor`, one API-format graph per
(configuration, prompt) built from the nodes users use:

    GL_DemoModelLoader ─ MODEL ─ GLBench_CountNFE ─ [GL_APG] ─ KSampler (euler, normal) ─ VAEDecode ─ GLBench_Capture
                       └ CLIP ─ CLIPTextEncode (prompt) / CLIPTextEncode ("")   EmptyLatentImage 256×256 (32×32 latents)
    CFG++: GL_SamplerCFGPP (euler) + BasicScheduler (normal) → SamplerCustom (cfg = λ) instead of KSampler
    FKC:   GL_SamplerFKC (K particles) + BasicScheduler (normal) → SamplerCustom (cfg = β) instead of KSampler

Two bench-only nodes are registered in-process for the run (and removed afterwards): `GLBench_CountNFE`
(MODEL → MODEL: a clone of the model with a DIFFUSION_MODEL wrapper that adds up the batch rows of every UNet
call; it changes no value) and `GLBench_Capture` (output node keeping the VAEDecode images as float tensors, so the
metrics see exactly what SaveImage would write, without a PNG round trip).

Prompts: the held-out single-object captions of the demo world (`demo.world.held_out_captions()`, one per held-out
(colour, shape, size, background) combination, none of them seen in training) and captions of held-out two-object
scenes (relations), each sampled `--per-prompt` times in one batch with a fixed seed per prompt (the same seed for
every configuration, so all methods start from the same noise). Metrics (bench/metrics.py, evaluator in
bench/weights/): attribute accuracy on the single-object captions, relation accuracy on the two-object captions,
Fréchet distance to as many real held-out images (the same captions' combinations), within-prompt diversity,
mean saturation, clipped fraction; NFEs per image (counted) and seconds per image (wall time of the graph).

Writes only the `quality` section of the Markdown file (`--out`, default BENCHMARKS.md), a comparison grid PNG
(`--grid`: configurations × prompts) and the raw numbers as JSON (`--json`, default bench/results/quality.json).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO / "tests") not in sys.path:             # tests/host.py boots the host as the tests do
    sys.path.insert(0, str(REPO / "tests"))
if str(REPO) not in sys.path:                       # appended: ComfyUI's top-level `nodes` must win over ours
    sys.path.append(str(REPO))

import host  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

SECTION = "quality"
TITLE = "Quality of guidance methods on the demo model (CPU)"
IMAGE_SIZE = 32                 # demo model: pixel space, 32×32
LATENT_WIDGET = 8 * IMAGE_SIZE  # EmptyLatentImage width/height (ComfyUI divides by 8)
PAIR_SEED = 7                   # world seed of the two-object prompts (held-out pair scenes)
REF_SEED = 11                   # world seed of the real reference images
DEFAULT_APG_THRESHOLD = 3.0     # see `--apg-threshold`
DEFAULT_AG_THRESHOLD = 0.985    # GL_AdaptiveGuidance's default γ̄
TUNED_AG_THRESHOLD = 0.999      # a stricter γ̄: later switch, fewer savings
MODERATE_SCALES = (3.0, 5.0, 7.5)
HIGH_SCALES = (10.0, 15.0)

# table columns (the smoke test checks every one is there)
COLUMNS = ("configuration", "NFE/image", "attribute acc. (single)", "shape / colour (single)",
           "relation acc. (pair)", "both objects found (pair)", "Fréchet dist. ↓", "diversity",
           "saturation", "clipped %", "s/image")


# ------------------------------------------------------------------------------------------------ configurations
@dataclass
class Config:
    key: str
    label: str
    method: str          # "cfg", "apg", "cfgpp", "ag" (Adaptive Guidance), "linear_ag", "fkc" (FKC particles) or
    #                      "elucd" (classifier guidance with the demo guidance classifier)
    scale: float         # KSampler cfg (CFG, APG) or λ (CFG++)
    short: str = ""      # ASCII label for the grid
    threshold: float | None = None   # Adaptive Guidance γ̄ (None: the run's --ag-threshold)
    particles: int = 0               # FKC: particles per image
    classifier_scale: float = 0.0    # EluCD: GL_ClassifierGuidance scale; GFCG: s_max
    scale_2: float = 0.0             # cfg+autoguidance: w_a; multi-condition: s_2 (regional prompts)
    refresh: int = 1                 # multi-condition: refresh_every (accelerated nested variant when > 1)
    calibrated: bool = False         # LinearAG: coefficients fitted by GL_LinearAGCalibrate's code (see calibrate)
    region: str = "mask"             # multi-condition: regional prompts by "mask" (whole image) or "area" (crop)
    diffier: tuple = (1, 0.5, 0.0, 0.5)  # DiffIER: iterations, step size, window start and end
    adapter: str = "demo_agd.safetensors"  # AGD: the adapter file GL_AGDLoader loads (--agd-adapter)
    images: list = field(default_factory=list)      # [B, 3, 32, 32] per prompt, in prompt order
    nfe: list = field(default_factory=list)         # UNet rows per image, per prompt
    seconds: list = field(default_factory=list)     # graph wall time per prompt
    batch: list = field(default_factory=list)


def all_configs(apg_threshold: float, ag_threshold: float = DEFAULT_AG_THRESHOLD) -> list[Config]:
    out = [Config(f"cfg-{s:g}", f"CFG {s:g}", "cfg", s, f"CFG {s:g}") for s in (1.0, 3.0, 5.0, 7.5, 10.0, 15.0)]
    out += [Config("ag-5", f"Adaptive Guidance, cfg 5 (γ̄ {ag_threshold:g})", "ag", 5.0, "AG cfg 5"),
            Config("ag_strict-5", f"Adaptive Guidance, cfg 5 (γ̄ {TUNED_AG_THRESHOLD:g})", "ag",
                   5.0, "AG .999 cfg5", threshold=TUNED_AG_THRESHOLD)]
    out += [Config("linear_ag-5", "LinearAG, cfg 5 (default coefficients, first half)", "linear_ag", 5.0,
                   "LinAG cfg 5")]
    out += [Config(f"apg-{s:g}", f"APG, cfg {s:g} (η 0, r {apg_threshold:g}, β −0.5)", "apg", s, f"APG cfg {s:g}")
            for s in (10.0, 15.0)]
    out += [Config(f"cfgpp-{s:g}", f"CFG++ λ {s:g}", "cfgpp", s, f"CFG++ {s:g}") for s in (0.6, 1.0)]
    out += [Config("fkc4-5", "FKC particles, CFG target β 5 (K 4, ddpm, clamp 2, best)", "fkc", 5.0, "FKC K4 cfg5",
                   particles=4)]
    return out


# EluCD at small classifier scales (cfg, s): the low-scale rows of the --classifier-small row set
ELUCD_SMALL_SCALES = ((1.0, 0.1), (1.0, 0.25), (1.0, 0.5), (3.0, 0.1), (3.0, 0.25), (3.0, 0.5))


# GFCG at the low cfg where CFG leaves errors to correct (cfg, s_max): the --classifier-gfcg row set
GFCG_LOW_CFG = ((1.0, 2.0), (3.0, 2.0))


def extra_configs() -> list[Config]:
    """Configurations run only when --configs names them (the standard run must fit 30 minutes on 2 cores)."""
    return [Config(f"elucd{s:g}-{c:g}", f"EluCD classifier guidance s {s:g}, cfg {c:g} (demo guidance classifier)",
                   "elucd", c, f"EluCD {s:g} cfg{c:g}", classifier_scale=s)
            for c, s in ((1.0, 1.0), (3.0, 1.0), (5.0, 0.5), (5.0, 1.0), (5.0, 2.0)) + ELUCD_SMALL_SCALES] + [
        Config(f"gfcg{s:g}-{c:g}", f"GFCG s_max {s:g}, cfg {c:g} (demo guidance classifier, 36 classes)", "gfcg", c,
               f"GFCG {s:g} cfg{c:g}", classifier_scale=s) for c, s in ((5.0, 2.0), (5.0, 5.0)) + GFCG_LOW_CFG] + [
        Config("dyncfg-5", "Dynamic CFG, cfg 5 × (0.5, 1, 2, 3), classifier + clipping", "dyncfg", 5.0,
               "DynCFG cfg5", classifier_scale=1.0),
        Config("dyncfg_clip-5", "Dynamic CFG, cfg 5 × (0.5, 1, 2, 3), clipping only", "dyncfg", 5.0,
               "DynCFG clip cfg5", classifier_scale=0.0)] + two_model_configs() + fkc_configs() + linear_ag_configs() \
        + agd_configs() + diffier_configs() + ag_sweep_configs()


AG_SWEEP_THRESHOLDS = (0.98, 0.985, 0.99, 0.995)


def ag_sweep_configs() -> list[Config]:
    """Adaptive Guidance at other thresholds γ̄ (ag-5 is the node default, 0.985; ag0.985-5 the same
    threshold by value, so commands recorded with it keep their meaning)."""
    return [Config(f"ag{t:g}-5", f"Adaptive Guidance, cfg 5 (γ̄ {t:g})", "ag", 5.0, f"AG {t:g} cfg5", threshold=t)
            for t in AG_SWEEP_THRESHOLDS]


AG_SWEEP_CONFIGS = "cfg-5,ag0.98-5,ag-5,ag0.99-5,ag0.995-5,ag_strict-5"


def agd_configs() -> list[Config]:
    """Adapter guidance distillation: the shipped demo_agd adapters at ω, sampled at cfg 1 (one call per step)."""
    return [Config(f"agd-{w:g}", f"AGD adapters at ω {w:g}, cfg 1 (demo_agd)", "agd", w, f"AGD w{w:g}")
            for w in (3.0, 5.0, 7.5)]


AGD_CONFIGS = "cfg-1,cfg-3,cfg-5,cfg-7.5,agd-3,agd-5,agd-7.5"
DIFFIER_SCALES = (3.0, 5.0, 7.5, 10.0, 15.0)


# GL_SamplerDiffIER settings by key infix: (iterations K, step size η, window start, window end); "late-" = the node's
# defaults, "" = its first defaults (the noisy half)
DIFFIER_VARIANTS = {"": (1, 0.5, 0.0, 0.5), "full-": (1, 0.5, 0.0, 1.0), "k3-": (3, 0.5, 0.0, 1.0),
                    "late-": (1, 0.5, 0.5, 1.0), "eta1-": (1, 1.0, 0.0, 0.5),
                    "latee1-": (1, 1.0, 0.5, 1.0), "latek3-": (3, 0.5, 0.5, 1.0)}


def diffier_configs() -> list[Config]:
    """Iterative error reduction (GL_SamplerDiffIER, euler base) across CFG scales: K 1, η 0.5, window 0–0.5 (the
    node's first default window) as `diffier-<w>`, and the variants of DIFFIER_VARIANTS as `diffier-<variant>-<w>`
    (`diffier-late-<w>` = the node's defaults now)."""
    out = []
    for infix, (k, eta, start, end) in DIFFIER_VARIANTS.items():
        out += [Config(f"diffier-{infix}{w:g}", f"DiffIER sampler, cfg {w:g} (euler, K {k}, η {eta:g}, window "
                       f"{start:g}–{end:g})", "diffier", w, f"DiffIER {infix}cfg {w:g}", diffier=(k, eta, start, end))
                for w in DIFFIER_SCALES]
    return out


DIFFIER_CONFIGS = ",".join([f"cfg-{w:g}" for w in DIFFIER_SCALES] + [f"diffier-{w:g}" for w in DIFFIER_SCALES])


def two_model_configs() -> list[Config]:
    """Autoguidance (weak model = demo_model_weak) and multi-condition CFG (global + regional prompts) rows."""
    out = [Config(f"autoguidance-{w:g}", f"Autoguidance w {w:g} (weak: demo_model_weak)", "autoguidance", w,
                  f"AutoG {w:g}") for w in (1.5, 2.0, 3.0, 5.0)]
    out += [Config("cfg_autoguidance-3", "CFG 3 + autoguidance w_a 2 (demo_model_weak)", "cfg_autoguidance", 3.0,
                   "CFG3+AutoG2", scale_2=2.0)]
    out += [Config(f"multicond-{s1:g}-{s2:g}",
                   f"Multi-condition nested: global s {s1:g} + regional s {s2:g} (single-object prompts: CFG "
                   f"{s1:g})", "multicond", s1, f"MC {s1:g}+{s2:g}", scale_2=s2)
            for s1, s2 in ((5.0, 1.0), (5.0, 2.0), (5.0, 5.0), (3.0, 5.0))]
    out += [Config(f"multicond_area-{s1:g}-{s2:g}",
                   f"Multi-condition nested, regions as areas: global s {s1:g} + regional s {s2:g} (single-object "
                   f"prompts: CFG {s1:g})", "multicond", s1, f"MC area {s1:g}+{s2:g}", scale_2=s2, region="area")
            for s1, s2 in ((5.0, 2.0), (5.0, 5.0), (3.0, 5.0))]
    out += [Config("multicond_m2-5-2", "Multi-condition nested, accelerated (refresh every 2 steps): global s 5 + "
                   "regional s 2 (single-object prompts: CFG 5)", "multicond", 5.0, "MC 5+2 m2", scale_2=2.0,
                   refresh=2)]
    return out


def linear_ag_configs() -> list[Config]:
    """LinearAG with coefficients calibrated on training prompts (the default-coefficient row is standard)."""
    return [Config("linear_ag_cal-5", f"LinearAG, cfg 5 (calibrated on {CALIBRATION_PROMPTS} training prompts, τ 0.05, "
                   "first half)", "linear_ag", 5.0, "LinAG cal cfg5", calibrated=True)]


CALIBRATION_PROMPTS = 16
LINEAR_AG_CONFIGS = "cfg-5,linear_ag-5,linear_ag_cal-5"


def fkc_configs() -> list[Config]:
    """FKC rows of the particle-sampler issue: CFG target and product of two experts against CFG and averaging."""
    return [Config("fkc8-5", "FKC particles, CFG target β 5 (K 8, ddpm, clamp 2, best)", "fkc", 5.0, "FKC K8 cfg5",
                   particles=8),
            Config("avg-5", "Multi-prompt averaging: ConditioningCombine(expert 1, expert 2), CFG 5", "avg", 5.0,
                   "Avg cfg5")] + [
        Config(f"fkcpoe{k}", f"FKC product of experts q1·q2 (K {k}, ddpm, clamp 2, best)"
               + (": K 1 = no weights, the plain product SDE" if k == 1 else ""), "fkcpoe", 1.0, f"PoE K{k}",
               particles=k) for k in (1, 4, 8)]


FKC_CONFIGS = "cfg-5,fkc4-5,fkc8-5,avg-5,fkcpoe1,fkcpoe4,fkcpoe8"

TWO_MODEL_CONFIGS = "cfg-1,cfg-3,cfg-5,autoguidance-2,autoguidance-3,autoguidance-5,cfg_autoguidance-3"
MULTI_CONDITION_CONFIGS = ("cfg-3,cfg-5,multicond-5-2,multicond-5-5,multicond_area-5-2,multicond_area-5-5,"
                           "multicond_area-3-5,multicond_m2-5-2")

CLASSIFIER_CONFIGS = ("cfg-1,cfg-3,cfg-5,cfg-10,cfg-15,elucd1-1,elucd1-3,elucd0.5-5,elucd1-5,elucd2-5,gfcg2-5,gfcg5-5,"
                      "dyncfg-5,dyncfg_clip-5")

CLASSIFIER_SMALL_CONFIGS = "cfg-1,cfg-3," + ",".join(f"elucd{sc:g}-{c:g}" for c, sc in ELUCD_SMALL_SCALES)
CLASSIFIER_GFCG_CONFIGS = "cfg-1,cfg-3," + ",".join(f"gfcg{sc:g}-{c:g}" for c, sc in GFCG_LOW_CFG)

# on-request row sets: command-line flag -> (configurations, section, title (None: --title), share of two-object
# prompts (None: --pair-share, default 0.3))
ROW_SETS = {
    "classifier": (CLASSIFIER_CONFIGS, "classifier_guidance", None, None),
    "classifier-small": (CLASSIFIER_SMALL_CONFIGS, "classifier_small_scales",
                         "EluCD classifier guidance at small scales on the demo model (CPU)", None),
    "classifier-gfcg": (CLASSIFIER_GFCG_CONFIGS, "classifier_gfcg_low_cfg",
                        "Gradient-free classifier guidance at low cfg on the demo model (CPU)", None),
    "two-model": (TWO_MODEL_CONFIGS, "two_model_guidance", "Two-model guidance (autoguidance) on the demo model (CPU)",
                  None),
    "multi-condition": (MULTI_CONDITION_CONFIGS, "multi_condition_guidance",
                        "Multi-condition CFG with regional prompts on the demo model (CPU)", 0.75),
    "linear-ag": (LINEAR_AG_CONFIGS, "linear_ag_calibrated",
                  "LinearAG with calibrated coefficients on the demo model (CPU)", None),
    "fkc": (FKC_CONFIGS, "fkc_demo", "FKC particles: CFG target and product of experts on the demo model (CPU)", 0.0),
    "agd": (AGD_CONFIGS, "agd", "Adapter guidance distillation on the demo model (CPU)", None),
    "ag-sweep": (AG_SWEEP_CONFIGS, "ag_sweep", "Adaptive Guidance threshold sweep on the demo model (CPU)", None),
    "diffier": (DIFFIER_CONFIGS, "diffier", "DiffIER sampler (iterative error reduction) across CFG scales on the demo "
                "model (CPU)", None),
}


def classifier_target(prompt) -> str:
    """The guidance classifier's class for a prompt: its (colour, shape); for a two-object prompt the first
    object named in the caption's scene (the classifier knows single objects only)."""
    from demo import world
    if prompt.kind == "single":
        return f"{world.COLORS[prompt.combo[0]]} {world.SHAPES[prompt.combo[1]]}"
    first = prompt.scene["objects"][0]
    return f"{first['color']} {first['shape']}"


# ------------------------------------------------------------------------------------------------ prompts, reference
@dataclass
class Prompt:
    caption: str
    kind: str            # "single" or "pair"
    seed: int
    combo: tuple | None = None   # (colour, shape, size, background) indices of a single-object prompt
    scene: dict | None = None    # the held-out pair scene a two-object caption describes (shown in the grid)


def make_prompts(n_images: int, per_prompt: int, seed: int, pair_share: float = 0.3) -> list[Prompt]:
    """ceil(n_images / per_prompt) prompts: about 1 − pair_share (70 %) held-out single-object captions (spread
    evenly over the held-out combinations, all of them once there are enough prompts), the rest two-object captions
    of held-out pair scenes; at least one of each kind when there are two prompts or more."""
    from demo import world
    singles = world.held_out_captions()
    combos = world.held_out_combos()
    n_prompts = max(1, math.ceil(n_images / per_prompt))
    n_single = min(len(singles), max(1, round((1.0 - pair_share) * n_prompts)))
    if n_prompts >= 2 and pair_share > 0:
        n_single = min(n_single, n_prompts - 1)
    n_pair = n_prompts - n_single
    picks = [int(i * len(singles) / n_single) for i in range(n_single)]
    prompts = []
    for i in picks:
        color, shape, size, bg = combos[i]
        combo = (world.COLORS.index(color), world.SHAPES.index(shape), world.SIZES.index(size),
                 world.BACKGROUNDS.index(bg))
        prompts.append(Prompt(singles[i], "single", 0, combo))
    if n_pair:
        _imgs, captions, labels = world.batch(0, n_pair, seed=PAIR_SEED, kind="pair", split="heldout")
        prompts += [Prompt(c, "pair", 0, scene=lab) for c, lab in zip(captions, labels)]
    for k, p in enumerate(prompts):
        p.seed = seed + k
    return prompts


def reference_images(prompts: list[Prompt], per_prompt: int, copies: int = 2):
    """`copies` disjoint sets of real held-out images, each as large as the generated set: for a single-object
    prompt `per_prompt` scenes of its (colour, shape, size, background) combination (any position), for the
    two-object prompts as many held-out pair scenes. Returns [(images [N, 3, 32, 32], prompts-or-labels)]."""
    from demo import world
    need = {}
    for p in prompts:
        if p.kind == "single":
            need[p.combo] = need.get(p.combo, 0) + per_prompt * copies
    buckets: dict = {c: [] for c in need}
    i = 0
    while any(len(buckets[c]) < n for c, n in need.items()):
        lab = world.scene(i, seed=REF_SEED, kind="single", split="heldout")
        o = lab["objects"][0]
        c = (o["color_idx"], o["shape_idx"], o["size_idx"], lab["background_idx"])
        if c in buckets and len(buckets[c]) < need[c]:
            buckets[c].append(lab)
        i += 1
        if i > 200_000:
            raise RuntimeError("could not find enough held-out reference scenes")
    n_pair = sum(per_prompt for p in prompts if p.kind == "pair")
    sets = []
    for k in range(copies):
        labels = []
        taken = {c: 0 for c in need}
        for p in prompts:
            if p.kind == "single":
                start = k * (need[p.combo] // copies) + taken[p.combo]
                labels += buckets[p.combo][start:start + per_prompt]
                taken[p.combo] += per_prompt
        if n_pair:
            labels += [world.scene(k * 100_000 + j, seed=REF_SEED, kind="pair", split="heldout")
                       for j in range(n_pair)]
        sets.append((world.render(labels, IMAGE_SIZE), labels))
    return sets


# ------------------------------------------------------------------------------------------------ in-process nodes
class _Probe:
    rows = 0


class CountNFE:
    """Bench-only MODEL → MODEL: counts UNet batch rows through a DIFFUSION_MODEL wrapper (values unchanged)."""
    KEY = "gl_bench.quality.nfe"
    CATEGORY = "Guidance Lab/bench"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def patch(self, model):
        import comfy.patcher_extension as pe

        def count(executor, *args, **kwargs):
            x = args[0] if args else kwargs["x"]
            _Probe.rows += int(x.shape[0])
            return executor(*args, **kwargs)
        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, self.KEY, count)
        return (m,)


class Capture:
    """Bench-only output node: keeps the decoded images (float, [B, H, W, 3]) for the runner."""
    CATEGORY = "Guidance Lab/bench"
    FUNCTION = "capture"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    captured: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")          # always run

    def capture(self, images):
        Capture.captured.append(images.detach().float().cpu().clone())
        return {"ui": {}}


class LinearAGCoefficients:
    """Bench-only source of the run's calibrated LinearAG coefficients (fitted once by `calibrate`)."""
    CATEGORY = "Guidance Lab/bench"
    FUNCTION = "get"
    RETURN_TYPES = ("GL_LINEAR_AG",)
    value = None

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def get(self):
        if LinearAGCoefficients.value is None:
            raise RuntimeError("no calibrated LinearAG coefficients (calibrate() did not run)")
        return (LinearAGCoefficients.value,)


def calibrate(host, weights: Path, steps: int, cfg: float = 5.0) -> dict:
    """Fit LinearAG coefficients with GL_LinearAGCalibrate's code on CALIBRATION_PROMPTS training captions (noise
    seeds 1000 + i, 8 samples each, euler/normal, the run's step count); returns timing and residual figures."""
    from demo import world
    cal = host.pack("guiders.linear_ag_calibration")
    model, clip, _vae = host.pack("guiders.demo_model").load_demo_model(weights)
    _imgs, captions, _labels = world.batch(0, CALIBRATION_PROMPTS, seed=3, kind="mixed", split="train")
    positives = [clip.encode_from_tokens_scheduled(clip.tokenize(c)) for c in captions]
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    t = time.perf_counter()
    coefficients, residuals, metadata = cal.calibrate_linear_ag(
        model, positives, negative, steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal", seed=1000,
        latent=torch.zeros(8, 3, IMAGE_SIZE, IMAGE_SIZE), progress=lambda done, total: None)
    LinearAGCoefficients.value = cal.LinearAGCoefficients(coefficients, residuals, metadata)
    return {"seconds": time.perf_counter() - t, "prompts": len(captions),
            "predicted_steps": LinearAGCoefficients.value.summary()}


BENCH_NODES = {"GLBench_CountNFE": CountNFE, "GLBench_Capture": Capture,
               "GLBench_LinearAGCoefficients": LinearAGCoefficients}




# ------------------------------------------------------------------------------------------------ graphs
def _ksampler(g: dict, model: list, prompt: Prompt, steps: int, cfg: float, positive: list) -> None:
    """KSampler (euler, normal) on `positive` against the empty negative, as node 6."""
    g["6"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": prompt.seed, "steps": steps, "cfg": cfg, "sampler_name": "euler",
        "scheduler": "normal", "positive": positive, "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}}


def _custom_advanced(g: dict, model: list, prompt: Prompt, steps: int, sampler: bool = True) -> None:
    """SamplerCustomAdvanced (node 6) driven by the guider at node 7: BasicScheduler (normal), RandomNoise (the
    prompt's seed) and, unless the caller set node 8, KSamplerSelect (euler)."""
    if sampler:
        g["8"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["9"] = {"class_type": "BasicScheduler",
              "inputs": {"model": model, "scheduler": "normal", "steps": steps, "denoise": 1.0}}
    g["13"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": prompt.seed}}
    g["6"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["13", 0], "guider": ["7", 0], "sampler": ["8", 0], "sigmas": ["9", 0], "latent_image": ["5", 0]}}


def build_graph(cfg: Config, prompt: Prompt, batch: int, steps: int, apg_threshold: float,
                ag_threshold: float = DEFAULT_AG_THRESHOLD) -> dict:
    """The API-format graph of one configuration and prompt."""
    g = {
        "1": {"class_type": "GL_DemoModelLoader", "inputs": {"checkpoint": "demo_model"}},
        "2": {"class_type": "GLBench_CountNFE", "inputs": {"model": ["1", 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt.caption, "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage",
              "inputs": {"width": LATENT_WIDGET, "height": LATENT_WIDGET, "batch_size": batch}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "11": {"class_type": "GLBench_Capture", "inputs": {"images": ["10", 0]}},
    }
    model = ["2", 0]
    if cfg.method == "apg":
        g["7"] = {"class_type": "GL_APG", "inputs": {
            "model": model, "eta": 0.0, "norm_threshold": apg_threshold, "momentum": -0.5, "start_percent": 0.0,
            "end_percent": 1.0, "scale_threshold_by_size": False}}
        model = ["7", 0]
    if cfg.method == "ag":
        g["7"] = {"class_type": "GL_AdaptiveGuidance", "inputs": {
            "model": model, "threshold": cfg.threshold if cfg.threshold is not None else ag_threshold,
            "start_percent": 0.0, "end_percent": 1.0, "batch_policy": "all", "space": "denoised"}}
        model = ["7", 0]
    if cfg.method == "linear_ag":
        g["7"] = {"class_type": "GL_LinearAG", "inputs": {"model": model, "first_fraction": 0.5, "tau": 0.05}}
        if cfg.calibrated:
            g["19"] = {"class_type": "GLBench_LinearAGCoefficients", "inputs": {}}
            g["7"]["inputs"]["coefficients"] = ["19", 0]
        model = ["7", 0]
    if cfg.method == "elucd":
        g["12"] = {"class_type": "GL_ClassifierLoader", "inputs": {"classifier": "demo_classifier.safetensors"}}
        g["7"] = {"class_type": "GL_ClassifierGuidance", "inputs": {
            "model": model, "classifier": ["12", 0], "target": classifier_target(prompt),
            "scale": cfg.classifier_scale, "joint_temperature": 1.0, "marginal_discount": 0.5, "softplus_beta": 3.0,
            "gamma": 0.3, "schedule": "sine", "decoder": "auto", "start_percent": 0.0, "end_percent": 1.0}}
        model = ["7", 0]
    if cfg.method == "dyncfg":
        inputs = {"model": model, "multipliers": "0.5, 1, 2, 3", "max_change": 5.0, "alignment_weight": 1.0,
                  "fidelity_weight": 1.0, "start_percent": 0.0, "end_percent": 0.7, "decoder": "auto"}
        if cfg.classifier_scale:
            g["12"] = {"class_type": "GL_ClassifierLoader", "inputs": {"classifier": "demo_classifier.safetensors"}}
            inputs.update(classifier=["12", 0], target=classifier_target(prompt))
        g["7"] = {"class_type": "GL_DynamicCFG", "inputs": inputs}
        model = ["7", 0]
    if cfg.method == "agd":
        g["12"] = {"class_type": "GL_AGDLoader", "inputs": {"adapter": cfg.adapter}}
        g["7"] = {"class_type": "GL_AGDApply", "inputs": {
            "model": model, "adapter": ["12", 0], "guidance_scale": cfg.scale, "strength": 1.0}}
        _ksampler(g, ["7", 0], prompt, steps, 1.0, ["3", 0])
    elif cfg.method in ("cfg", "apg", "ag", "linear_ag", "elucd", "dyncfg"):
        _ksampler(g, model, prompt, steps, cfg.scale, ["3", 0])
    elif cfg.method == "cfgpp":
        g["8"] = {"class_type": "GL_SamplerCFGPP", "inputs": {"sampler_name": "euler", "eta": 1.0, "s_noise": 1.0}}
        g["9"] = {"class_type": "BasicScheduler",
                  "inputs": {"model": model, "scheduler": "normal", "steps": steps, "denoise": 1.0}}
        g["6"] = {"class_type": "SamplerCustom", "inputs": {
            "model": model, "add_noise": True, "noise_seed": prompt.seed, "cfg": cfg.scale, "positive": ["3", 0],
            "negative": ["4", 0], "sampler": ["8", 0], "sigmas": ["9", 0], "latent_image": ["5", 0]}}
    elif cfg.method == "gfcg":
        g["12"] = {"class_type": "GL_ClassifierLoader", "inputs": {"classifier": "demo_classifier.safetensors"}}
        g["7"] = {"class_type": "GL_GradientFreeGuidance", "inputs": {
            "model": model, "positive": ["3", 0], "negative": ["4", 0], "clip": ["1", 1], "classifier": ["12", 0],
            "target": classifier_target(prompt), "classes": "", "prompt_template": "a {label}", "cfg": cfg.scale,
            "s_max": cfg.classifier_scale, "start_percent": 0.0, "end_percent": 1.0, "decoder": "auto"}}
        _custom_advanced(g, model, prompt, steps)
    elif cfg.method in ("autoguidance", "cfg_autoguidance") or (cfg.method == "multicond"
                                                                and prompt.kind == "pair"):
        if cfg.method == "multicond":
            g["7"] = {"class_type": "GL_MultiConditionGuider", "inputs": {
                "model": model, "negative": ["4", 0], "condition_1": ["3", 0],
                "condition_2": regional_prompts(g, prompt, cfg.region), "form": "nested (combine inputs)",
                "scale_1": cfg.scale, "scale_2": cfg.scale_2, "refresh_every": cfg.refresh}}
        else:
            g["14"] = {"class_type": "GL_DemoModelLoader", "inputs": {"checkpoint": weak_label()}}
            g["7"] = {"class_type": "GL_MultiModelGuider", "inputs": {
                "model": model, "positive": ["3", 0], "negative": ["4", 0], "model_2": ["14", 0],
                "mode": "autoguidance" if cfg.method == "autoguidance" else "cfg+autoguidance", "cfg": cfg.scale,
                "scale_2": cfg.scale_2 or 1.0, "start_percent": 0.0, "end_percent": 1.0, "max_ratio": 0.0}}
        _custom_advanced(g, model, prompt, steps)
    elif cfg.method == "multicond":          # single-object prompt: no layout to give, CFG at s_1
        _ksampler(g, model, prompt, steps, cfg.scale, ["3", 0])
    elif cfg.method in ("avg", "fkcpoe"):
        if prompt.kind != "single":
            raise ValueError(f"{cfg.key}: expert rows need single-object prompts (run with --pair-share 0)")
        e1, e2 = experts(prompt)
        g["15"] = {"class_type": "CLIPTextEncode", "inputs": {"text": e1, "clip": ["1", 1]}}
        g["16"] = {"class_type": "CLIPTextEncode", "inputs": {"text": e2, "clip": ["1", 1]}}
        if cfg.method == "avg":
            g["17"] = {"class_type": "ConditioningCombine", "inputs": {
                "conditioning_1": ["15", 0], "conditioning_2": ["16", 0]}}
            _ksampler(g, model, prompt, steps, cfg.scale, ["17", 0])
        else:
            g["7"] = {"class_type": "GL_FKCGuider", "inputs": {
                "model": model, "mode": "product", "positive": ["15", 0], "positive_2": ["16", 0], "beta": 1.0}}
            g["8"] = {"class_type": "GL_SamplerFKC", "inputs": {
                "particles": cfg.particles, "propagation": "ddpm", "resample": "every_step", "kappa": 0.5,
                "temperature": 1.0, "clamp": 2.0, "start_percent": 0.0, "end_percent": 1.0, "output": "best"}}
            _custom_advanced(g, model, prompt, steps, sampler=False)
    elif cfg.method == "diffier":
        g["7"] = {"class_type": "CFGGuider", "inputs": {
            "model": model, "positive": ["3", 0], "negative": ["4", 0], "cfg": cfg.scale}}
        g["8"] = {"class_type": "GL_SamplerDiffIER", "inputs": {
            "sampler_name": "euler", "iterations": cfg.diffier[0], "step_size": cfg.diffier[1], "tolerance": 1e-3,
            "start_percent": cfg.diffier[2], "end_percent": cfg.diffier[3],
            "objective": "noise energy gap (Guidance Lab design)"}}
        _custom_advanced(g, model, prompt, steps, sampler=False)
    elif cfg.method == "fkc":
        g["8"] = {"class_type": "GL_SamplerFKC", "inputs": {
            "particles": cfg.particles, "propagation": "ddpm", "resample": "every_step", "kappa": 0.5,
            "temperature": 1.0, "clamp": 2.0, "start_percent": 0.0, "end_percent": 1.0, "output": "best"}}
        g["9"] = {"class_type": "BasicScheduler",
                  "inputs": {"model": model, "scheduler": "normal", "steps": steps, "denoise": 1.0}}
        g["6"] = {"class_type": "SamplerCustom", "inputs": {
            "model": model, "add_noise": True, "noise_seed": prompt.seed, "cfg": cfg.scale, "positive": ["3", 0],
            "negative": ["4", 0], "sampler": ["8", 0], "sigmas": ["9", 0], "latent_image": ["5", 0]}}
    else:
        raise ValueError(cfg.method)
    return g


def experts(prompt: Prompt) -> tuple[str, str]:
    """The two experts of a single-object prompt: the object with its size ("a large red circle") and the object on
    its background ("a red circle on a white background"); the held-out caption names all four attributes."""
    from demo import world
    color, shape, size, bg = prompt.combo
    obj = f"{world.COLORS[color]} {world.SHAPES[shape]}"
    return f"a {world.SIZES[size]} {obj}", f"a {obj} on a {world.BACKGROUNDS[bg]} background"


# halves of the image for the first and second object of a relation (x, y, width, height in EmptyLatentImage pixels)
_HALF = LATENT_WIDGET // 2
_REGIONS = {"left": (0, 0, _HALF, LATENT_WIDGET), "right": (_HALF, 0, _HALF, LATENT_WIDGET),
            "top": (0, 0, LATENT_WIDGET, _HALF), "bottom": (0, _HALF, LATENT_WIDGET, _HALF)}
_LAYOUT = {"left of": ("left", "right"), "right of": ("right", "left"), "above": ("top", "bottom"),
           "below": ("bottom", "top")}


def weak_label() -> str:
    """GL_DemoModelLoader's option for the early checkpoint."""
    return host.boot().pack("nodes.demo_model").WEAK_LABEL


def regional_prompts(g: dict, prompt: Prompt, region: str = "mask") -> list:
    """SpaText-style spatial condition of a two-object prompt: each object's caption ("a red circle") on the half
    of the image its relation puts it in, combined; adds the nodes to `g`. region "mask": ConditioningSetMask (the
    model sees the whole image, its prediction counts inside the mask); "area": ConditioningSetAreaPercentage (the
    model sees only the half, as a picture of its own)."""
    objects, relation = prompt.scene["objects"], prompt.scene["relation"]
    if region == "mask":
        g["20"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": LATENT_WIDGET,
                                                          "height": LATENT_WIDGET}}
    regional = []
    for k, (obj, half) in enumerate(zip(objects, _LAYOUT[relation])):
        x, y, w, h = _REGIONS[half]
        n = 21 + 4 * k
        if region == "area":
            g[str(n + 2)] = {"class_type": "CLIPTextEncode", "inputs": {
                "text": f"a {obj['color']} {obj['shape']}", "clip": ["1", 1]}}
            g[str(n + 3)] = {"class_type": "ConditioningSetAreaPercentage", "inputs": {
                "conditioning": [str(n + 2), 0], "width": w / LATENT_WIDGET, "height": h / LATENT_WIDGET,
                "x": x / LATENT_WIDGET, "y": y / LATENT_WIDGET, "strength": 1.0}}
            regional.append(str(n + 3))
            continue
        g[str(n)] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": w, "height": h}}
        g[str(n + 1)] = {"class_type": "MaskComposite", "inputs": {
            "destination": ["20", 0], "source": [str(n), 0], "x": x, "y": y, "operation": "add"}}
        g[str(n + 2)] = {"class_type": "CLIPTextEncode", "inputs": {
            "text": f"a {obj['color']} {obj['shape']}", "clip": ["1", 1]}}
        g[str(n + 3)] = {"class_type": "ConditioningSetMask", "inputs": {
            "conditioning": [str(n + 2), 0], "mask": [str(n + 1), 0], "strength": 1.0, "set_cond_area": "default"}}
        regional.append(str(n + 3))
    g["30"] = {"class_type": "ConditioningCombine", "inputs": {
        "conditioning_1": [regional[0], 0], "conditioning_2": [regional[1], 0]}}
    return ["30", 0]


class Runner:
    """One PromptExecutor for the whole run (CLASSIC cache: the loader and the text encodings are reused)."""

    def __init__(self):
        import execution
        self.execution = execution
        self.ex = execution.PromptExecutor(host.ServerStub(), cache_type=execution.CacheType.CLASSIC,
                                           cache_args={"lru": 0, "ram": 0})
        self.done: dict = {}

    def run(self, graph: dict) -> tuple[torch.Tensor, int, float]:
        """(images [B, 3, H, W] in [0, 1], UNet rows, wall seconds of validation + execution).

        A graph identical to one already run (e.g. a multi-condition row's single-object prompts, which are plain
        CFG graphs) returns that run's figures: the executor's cache would skip the sampler and count 0 rows."""
        key = json.dumps(graph, sort_keys=True)
        if key in self.done:
            return self.done[key]
        result = self._run(graph)
        self.done[key] = result
        return result

    def _run(self, graph: dict) -> tuple[torch.Tensor, int, float]:
        prompt_id = uuid.uuid4().hex
        Capture.captured.clear()
        _Probe.rows = 0
        t0 = time.perf_counter()
        valid, error, outputs, node_errors = asyncio.run(self.execution.validate_prompt(prompt_id, graph, None))
        if not valid:
            raise RuntimeError(f"graph rejected: {error} {json.dumps(node_errors)[:2000]}")
        self.ex.execute(graph, prompt_id, {}, outputs)
        seconds = time.perf_counter() - t0
        errors = [data for event, data in self.ex.status_messages if event == "execution_error"]
        if not self.ex.success or errors:
            e = errors[0] if errors else {}
            raise RuntimeError(f"graph failed in {e.get('node_type')}: {e.get('exception_message')}\n"
                               + "".join(e.get("traceback", [])))
        if len(Capture.captured) != 1:
            raise RuntimeError(f"expected one captured image batch, got {len(Capture.captured)}")
        images = Capture.captured[0].movedim(-1, 1).contiguous()
        return images, _Probe.rows, seconds


# ------------------------------------------------------------------------------------------------ weights
@contextlib.contextmanager
def folder_first(folder_name: str, folder: str):
    """`folder` goes first in folder_paths' `folder_name` list while the block runs (as an extra_model_paths.yaml
    entry would); the list and its file-list cache are restored afterwards. The pack's own default entry must exist
    already (the caller registers it)."""
    import folder_paths
    paths = folder_paths.folder_names_and_paths[folder_name][0]
    saved = list(paths)
    paths.insert(0, folder)
    folder_paths.filename_list_cache.pop(folder_name, None)
    try:
        yield
    finally:
        paths[:] = saved
        folder_paths.filename_list_cache.pop(folder_name, None)


@contextlib.contextmanager
def weights_first(dm, path: Path):
    """Make GL_DemoModelLoader's "demo_model" resolve to `path`: a temporary folder whose demo_model.safetensors
    links to it goes first in the `gl_demo_model` list."""
    dm.weight_folders()
    tmp = Path(tempfile.mkdtemp(prefix="gl-quality-weights-"))
    (tmp / dm.CHECKPOINTS["demo_model"]).symlink_to(path.resolve())
    try:
        with folder_first(dm.FOLDER_NAME, str(tmp)):
            yield
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def candidate_adapter(host, path: Path):
    """GL_AGDLoader finds `path` by its name while the run lasts: its folder goes first in the gl_agd list (so a
    candidate named like the shipped file wins over it)."""
    host.pack("guiders.agd").folders()                  # the default entry exists before one is added in front
    return folder_first("gl_agd", str(path.resolve().parent))


def _file_identity(path: Path) -> tuple[dict, dict]:
    """(safetensors metadata, {"path": shown relative to the repository when inside it, "sha256": first 16 hex
    digits, "mb"}) of a weights file."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    try:
        shown = str(path.resolve().relative_to(REPO))
    except ValueError:                                  # a file outside the repository (--weights, --agd-adapter)
        shown = str(path.resolve())
    return meta, {"path": shown, "sha256": h.hexdigest()[:16], "mb": path.stat().st_size / 1e6}


def adapter_info(path: Path) -> dict:
    """What the AGD rows ran: the adapter file's hash, architecture and the command that trained it."""
    meta, ident = _file_identity(path)
    config, trained = json.loads(meta.get("config", "{}")), json.loads(meta.get("info", "{}"))
    return {**ident, "hidden": config.get("hidden"), "features": config.get("features"),
            "omega_gain": bool(config.get("omega_gain", False)), "heads": int(config.get("heads", 1)),
            "top_sites": bool(config.get("top_sites", False)), "parameters": trained.get("parameters"),
            "steps": trained.get("steps"), "objective": trained.get("objective"), "command": trained.get("command"),
            "rounds": len(trained.get("rounds", [])) + 1}


def adapter_design_text(a: dict) -> str:
    """The adapter line's architecture clause: the paper's adapter, or the Guidance Lab options the file uses."""
    parts = (["output × (ω − 1) (`omega_gain`)"] if a["omega_gain"] else []) + (
        [f"{a['heads']} attention heads"] if a.get("heads", 1) != 1 else []) + (
        ["adapters on the full-resolution output blocks too (`top_sites`)"] if a.get("top_sites") else [])
    if parts:
        return ", ".join(parts) + ", "
    return "the paper's adapter (one head, cross-attention sites, no `omega_gain`), "


def weights_info(path: Path) -> dict:
    meta, ident = _file_identity(path)
    training = {}
    try:
        training = json.loads(meta.get("training", "{}"))
    except json.JSONDecodeError:
        pass
    return {**ident, "checkpoint": meta.get("checkpoint", "?"), "train_steps": meta.get("train_steps", "?"),
            "train_seed": meta.get("train_seed", "?"), "git_commit": meta.get("git_commit", "?"),
            "batch": training.get("batch"), "precision": training.get("precision"), "device": training.get("device"),
            "train_seconds": training.get("train_seconds"), "stopped_early": training.get("stopped_early")}


# ------------------------------------------------------------------------------------------------ metrics
def _frac(x):
    return None if x is None else float(x)


def evaluate(configs: list[Config], prompts: list[Prompt], per_prompt: int, ref_sets, ev) -> list[dict]:
    """One row per configuration plus a first row for real held-out images (see the module docstring)."""
    from bench import metrics
    captions = [p.caption for p in prompts for _ in range(per_prompt)]
    single = torch.tensor([p.kind == "single" for p in prompts for _ in range(per_prompt)])
    keys = [i for i, _p in enumerate(prompts) for _ in range(per_prompt)]
    (real_a, _labels_a), (real_b, labels_b) = ref_sets
    stats_a = metrics.feature_stats(ev.features(real_a))

    def row(images, prompts_or_labels, key_list):
        acc = metrics.attribute_accuracy(images, prompts_or_labels, ev)
        feats = ev.features(images)
        div_keys = [k for k, s in zip(key_list, single.tolist()) if s]
        return {"attribute": _frac(acc["attribute"]), "shape": _frac(acc["shape"]), "color": _frac(acc["color"]),
                "relation": _frac(acc["relation"]), "pair_objects": _frac(acc["pair_objects"]),
                "n_single": acc["n_single"], "n_pair": acc["n_pair"],
                "fd": metrics.frechet_distance(feats, stats_a) if len(images) >= 2 else None,
                "diversity": metrics.mean_pairwise_distance(feats[single], div_keys),
                "saturation": metrics.mean_saturation(images), "clipped": metrics.clipped_fraction(images),
                "n": len(images),
                # per image, for the paired bootstrap of the checks (left out of the JSON: see `public`)
                "_feats": feats.detach().cpu().double().numpy(), "_correct": acc["correct"].numpy(),
                "_single": single.numpy(), "_prompt": np.asarray(keys), "_real": stats_a}

    # real set B is laid out like the generated set (matched single-object combinations first, then pair scenes)
    real_keys = [p.combo for p in prompts for _ in range(per_prompt)]
    rows = [{"key": "real", "label": "real held-out images (reference)", "nfe": None, "s_per_image": None,
             **row(real_b, labels_b, real_keys)}]
    for c in configs:
        images = torch.cat(c.images)
        nfe = sorted(set(c.nfe))
        rows.append({"key": c.key, "label": c.label, "method": c.method, "scale": c.scale,
                     "nfe": nfe[0] if len(nfe) == 1 else nfe, "nfe_mean": sum(c.nfe) / len(c.nfe),
                     "s_per_image": sum(c.seconds) / len(images),
                     **row(images, captions, keys)})
    return rows


# ------------------------------------------------------------------------------------------------ grid
GRID_SCALE = 3
GRID_PAD = 4
GRID_LABEL_W = 120
GRID_HEADER_H = 84


def grid_size(n_rows: int, n_cols: int) -> tuple[int, int]:
    """(width, height) of a comparison grid with n_rows image rows and n_cols prompt columns."""
    cell = IMAGE_SIZE * GRID_SCALE
    return (GRID_LABEL_W + n_cols * (cell + GRID_PAD) + GRID_PAD,
            GRID_HEADER_H + n_rows * (cell + GRID_PAD) + GRID_PAD)


def grid_columns(prompts: list[Prompt], n: int) -> list[int]:
    """Indices of up to n prompts for the grid: about 60 % single-object, the rest two-object, spread evenly."""
    singles = [i for i, p in enumerate(prompts) if p.kind == "single"]
    pairs = [i for i, p in enumerate(prompts) if p.kind == "pair"]
    n = min(n, len(prompts))
    n_pair = min(len(pairs), max(1 if pairs and n >= 2 else 0, n - math.ceil(0.6 * n)))
    n_single = min(len(singles), n - n_pair)
    n_pair = min(len(pairs), n - n_single)

    def spread(items, k):
        return [items[int(j * len(items) / k)] for j in range(k)] if k else []
    return spread(singles, n_single) + spread(pairs, n_pair)


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def write_grid(path: Path, configs: list[Config], prompts: list[Prompt], columns: list[int], real_row) -> Path:
    """PNG: one row per configuration (first row: a real image of each prompt), one column per prompt (its first
    image; all configurations start from the same noise), images upscaled ×3 (nearest)."""
    from PIL import Image, ImageDraw, ImageFont
    rows = [("real (held-out)", real_row)] + [(c.short, [c.images[i][0] for i in columns]) for c in configs]
    width, height = grid_size(len(rows), len(columns))
    cell = IMAGE_SIZE * GRID_SCALE
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for j, i in enumerate(columns):
        x = GRID_LABEL_W + GRID_PAD + j * (cell + GRID_PAD)
        lines = _wrap(draw, prompts[i].caption, font, cell)
        y = 2
        for line in lines[:7]:
            draw.text((x, y), line, fill=(0, 0, 0), font=font)
            y += 11
    for r, (label, images) in enumerate(rows):
        y = GRID_HEADER_H + GRID_PAD + r * (cell + GRID_PAD)
        for k, line in enumerate(_wrap(draw, label, font, GRID_LABEL_W - 8)[:6]):
            draw.text((4, y + 4 + 11 * k), line, fill=(0, 0, 0), font=font)
        for j, img in enumerate(images):
            x = GRID_LABEL_W + GRID_PAD + j * (cell + GRID_PAD)
            arr = (img.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(arr, "RGB").resize((cell, cell), Image.NEAREST), (x, y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ------------------------------------------------------------------------------------------------ report
from bench._machine import comfy_version as _comfy_version  # noqa: E402
from bench._machine import cpu_model as _cpu_model  # noqa: E402
from bench._machine import git_revision as _git_revision  # noqa: E402



def _command(argv) -> str:
    script = Path(__file__).resolve()
    try:
        script_arg = str(script.relative_to(REPO))
    except ValueError:
        script_arg = str(script)
    return shlex.join(["python", script_arg, *argv])


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}{'' if k == 1 else 's'}"


def _pct(x, digits=1):
    return "—" if x is None else f"{100 * x:.{digits}f} %"


def _num(x, digits=2):
    return "—" if x is None else f"{x:.{digits}f}"


def _nfe(v):
    if v is None:
        return "—"
    if isinstance(v, list):
        return "–".join(f"{x:g}" for x in (v[0], v[-1]))
    return f"{v:g}"


def table(rows: list[dict]) -> list[str]:
    out = ["| " + " | ".join(COLUMNS) + " |", "| --- |" + " ---: |" * (len(COLUMNS) - 1)]
    for r in rows:
        sc = "—" if r["shape"] is None else f"{100 * r['shape']:.0f} / {100 * r['color']:.0f} %"
        cells = [r["label"], _nfe(r["nfe"]), _pct(r["attribute"]), sc, _pct(r["relation"]), _pct(r["pair_objects"]),
                 _num(r["fd"]), _num(r["diversity"]), _num(r["saturation"], 3), _pct(r["clipped"], 2),
                 _num(r["s_per_image"], 3)]
        out.append("| " + " | ".join(cells) + " |")
    return out


def quality_bar(rows: list[dict]) -> list[str]:
    """Plain statements of what the numbers say about the demo model's quality bar (issue 3, item 4)."""
    by = {r["key"]: r for r in rows}
    real = by["real"]
    lines = []
    moderate = [by[f"cfg-{s:g}"] for s in MODERATE_SCALES if f"cfg-{s:g}" in by and by[f"cfg-{s:g}"]["attribute"]
                is not None]
    best = max(moderate, key=lambda r: r["attribute"]) if moderate else None
    if best is not None:
        listed = ", ".join(f"{r['label']} {_pct(r['attribute'])}" for r in moderate)
        ok = best["attribute"] >= 0.90
        lines.append(f"- Attribute accuracy ≥ 90 % at a moderate CFG scale: **{'met' if ok else 'not met'}** "
                     f"({listed}; evaluator on real held-out images: {_pct(real['attribute'])}).")
    if best is not None and "cfg-1" in by and by["cfg-1"]["attribute"] is not None:
        gap = best["attribute"] - by["cfg-1"]["attribute"]
        clear = gap >= 0.10
        c1 = by["cfg-1"]
        rel = (f"; relation accuracy {_pct(c1['relation'])} vs {_pct(best['relation'])}"
               if c1["relation"] is not None else "")
        lines.append("- CFG 1 clearly lower (≥ 10 points below the best moderate scale): "
                     f"**{'yes' if clear else 'no'}** (CFG 1 {_pct(c1['attribute'])}, {gap * 100:.1f} points below "
                     f"{best['label']}{rel}).")
    ref = by.get("cfg-5") or best
    highs = [by[f"cfg-{s:g}"] for s in HIGH_SCALES if f"cfg-{s:g}" in by]
    if ref is not None and highs and ref not in highs:
        top = highs[-1]
        sat_up = top["saturation"] >= 1.05 * max(ref["saturation"], real["saturation"])
        clip_up = top["clipped"] >= 1.5 * ref["clipped"] and top["clipped"] - ref["clipped"] >= 0.01
        visible = sat_up or clip_up
        detail = "; ".join(f"{r['label']}: saturation {r['saturation']:.3f}, clipped {_pct(r['clipped'], 2)}, "
                           f"FD {_num(r['fd'])}" for r in [ref, *highs])
        lines.append(f"- Oversaturation at high CFG visible (at {top['label']}: mean saturation ≥ 1.05× both "
                     f"{ref['label']} and real images, or clipped fraction ≥ 1.5× {ref['label']} and ≥ 1 point "
                     f"higher): **{'yes' if visible else 'no'}** ({detail}; real images: saturation "
                     f"{real['saturation']:.3f}, clipped {_pct(real['clipped'], 2)}).")
    return lines


def speedup_checks(rows: list[dict]) -> list[str]:
    """One line per NFE-saving row (ag-*, linear_ag-*): saving, accuracy and FD against CFG at its scale."""
    by_key = {r["key"]: r for r in rows}
    lines = []
    for r in rows:
        base = by_key.get(f"cfg-{r.get('scale', 0):g}")
        if r.get("method") not in ("ag", "linear_ag") or base is None or r.get("nfe_mean") is None:
            continue
        nfe, ref_nfe = r["nfe_mean"], base["nfe_mean"]
        saving = 1 - nfe / ref_nfe
        d_acc = None if r["attribute"] is None else 100 * (r["attribute"] - base["attribute"])
        fd_ratio = None if not base["fd"] else r["fd"] / base["fd"]
        ok = saving >= 0.25 and d_acc is not None and d_acc >= -1.0 and fd_ratio is not None and fd_ratio <= 1.05
        lines.append(f"- {r['label']} vs {base['label']}: NFEs {nfe:.2f} vs {ref_nfe:.2f} per image "
                     f"(**{100 * saving:.1f} % fewer**), attribute accuracy {_pct(r['attribute'])} vs "
                     f"{_pct(base['attribute'])} ({'—' if d_acc is None else f'{d_acc:+.1f}'} points), Fréchet "
                     f"distance {_num(r['fd'])} vs {_num(base['fd'])} (×{_num(fd_ratio, 3)}), s/image "
                     f"{_num(r['s_per_image'], 3)} vs {_num(base['s_per_image'], 3)}: all three targets met: "
                     f"**{'yes' if ok else 'no'}**.")
    return lines


_FIELD_NAMES = {"attribute": "attribute accuracy", "relation": "relation accuracy",
                "pair_objects": "both objects found", "fd": "Fréchet distance", "diversity": "diversity",
                "nfe": "NFE/image", "s_per_image": "s/image"}


def _vs(r: dict, base: dict, *specs: str) -> str:
    """"<metric> a vs b" for each spec "key[:points|:ratio|:ratio2]" (points: the accuracy difference; ratio: a/b with
    3 decimals, ratio2 with 2), joined with commas."""
    parts = []
    for spec in specs:
        key, _, extra = spec.partition(":")
        a, b = r[key], base[key]
        if key in ("attribute", "relation", "pair_objects"):
            text = f"{_pct(a)} vs {_pct(b)}"
        elif key == "nfe":
            text = f"{_nfe(a)} vs {_nfe(b)}"
        else:
            digits = 3 if key == "s_per_image" else 2
            text = f"{_num(a, digits)} vs {_num(b, digits)}"
        if extra == "points":
            text += f" ({100 * (a - b):+.1f} points)"
        elif extra.startswith("ratio"):
            text += f" (×{a / b:.{int(extra[5:] or 3)}f})"
        parts.append(f"{_FIELD_NAMES[key]} {text}")
    return ", ".join(parts)


def classifier_checks(rows: list[dict]) -> list[str]:
    by_key = {r["key"]: r for r in rows}
    lines = []
    for r in rows:
        if not r["key"].startswith(("elucd", "gfcg", "dyncfg")):
            continue
        base = by_key.get("cfg-" + r["key"].split("-", 1)[1])
        if base is None:
            continue
        lines.append(f"- {r['label']} vs CFG {base['label'].split()[-1]}: "
                     + _vs(r, base, "attribute:points", "relation", "fd:ratio", "s_per_image:ratio2") + ".")
    fixed = [r for r in rows if r["key"].startswith("cfg-")]
    if fixed:
        best = max(fixed, key=lambda r: r["attribute"])
        for r in rows:
            if r["key"].startswith("dyncfg"):
                lines.append(f"- {r['label']} vs the best fixed scale by accuracy ({best['label']}): "
                             + _vs(r, best, "attribute", "fd:ratio") + ".")
    return lines


def two_model_checks(rows: list[dict]) -> list[str]:
    """Autoguidance against CFG (quality without CFG's loss of variety) and multi-condition CFG against CFG on the
    same global prompt (two-object prompts)."""
    by_key = {r["key"]: r for r in rows}
    lines = []
    cfgs = [r for r in rows if r["key"].startswith("cfg-")]
    for r in rows:
        if r["key"].startswith(("autoguidance", "cfg_autoguidance")) and cfgs:
            near = min(cfgs, key=lambda c: abs(c["attribute"] - r["attribute"]))
            lines.append(f"- {r['label']} vs {near['label']} (the CFG row of nearest attribute accuracy): "
                         + _vs(r, near, "attribute", "fd:ratio", "diversity", "relation", "nfe") + ".")
        if r["key"].startswith("multicond"):
            base = by_key.get(f"cfg-{r['scale']:g}")
            what = "the global prompt alone"
            if r["key"].startswith("multicond_m2") and r["key"].replace("multicond_m2", "multicond") in by_key:
                base, what = by_key[r["key"].replace("multicond_m2", "multicond")], "the exact variant"
            if base is not None:
                lines.append(f"- {r['label']} vs {base['label']} ({what}): "
                             + _vs(r, base, "relation", "pair_objects", "nfe") + ".")
    return lines


def fkc_checks(rows: list[dict]) -> list[str]:
    """FKC against CFG (CFG target) and the product of experts against multi-prompt averaging."""
    by_key = {r["key"]: r for r in rows}
    lines = []
    pairs = [(k, "cfg-5") for k in ("fkc4-5", "fkc8-5")] + [(k, "avg-5") for k in ("fkcpoe1", "fkcpoe4", "fkcpoe8")]
    pairs += [(k, "fkcpoe1") for k in ("fkcpoe4", "fkcpoe8")]
    for key, base_key in pairs:
        r, base = by_key.get(key), by_key.get(base_key)
        if r is not None and base is not None:
            lines.append(f"- {r['label']} vs {base['label']}: "
                         + _vs(r, base, "attribute:points", "fd:ratio", "nfe", "s_per_image") + ".")
    return lines


def agd_checks(rows: list[dict]) -> list[str]:
    """Distilled adapters at ω (cfg 1) against CFG at ω: the issue's targets (Fréchet distance within 5 %, attribute
    accuracy within 2 points, half the NFEs, ≤ 0.55× the time per image)."""
    by_key = {r["key"]: r for r in rows}
    lines = []
    for r in rows:
        base = by_key.get("cfg-" + r["key"].split("-", 1)[1]) if r["key"].startswith("agd-") else None
        if base is not None:
            lines.append(f"- {r['label']} vs {base['label']}: "
                         + _vs(r, base, "attribute:points", "relation", "fd:ratio", "diversity", "nfe",
                               "s_per_image:ratio2") + ".")
            boot = bootstrap_rows([base, r])
            if boot is not None:
                acc = 100 * (boot["attribute"][:, 1] - boot["attribute"][:, 0])
                ratio = boot["fd"][:, 1] / boot["fd"][:, 0]
                (a_lo, a_hi), (f_lo, f_hi) = np.quantile(acc, [0.05, 0.95]), np.quantile(ratio, [0.05, 0.95])
                lines.append(f"  - Paired bootstrap over the prompts ({BOOTSTRAP_DRAWS} draws), 90 % intervals: "
                             f"attribute accuracy difference [{a_lo:+.1f}, {a_hi:+.1f}] points (within 2 points "
                             f"in {100 * float((acc >= -2).mean()):.0f} % of draws), Fréchet distance ratio "
                             f"[×{f_lo:.3f}, ×{f_hi:.3f}].")
    return lines


def public(row: dict) -> dict:
    """A result row without its per-image arrays (the keys starting with "_")."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


BOOTSTRAP_DRAWS = 400


def bootstrap_rows(rows: list[dict], *, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> dict[str, np.ndarray] | None:
    """Paired cluster bootstrap of the rows' Fréchet distances and attribute accuracies: {"fd", "attribute"}, each
    [draws, len(rows)]. Each draw resamples the prompts with replacement (a prompt's images stay together: they share
    its caption) and takes the same prompts in every row, as the rows themselves share prompts and seeds; Fréchet
    distances are recomputed on the drawn images against the same real statistics. None when a row lacks its
    per-image arrays or the rows were not made on the same prompts."""
    from bench import metrics
    if not rows or any("_feats" not in r for r in rows):
        return None
    prompt_of = rows[0]["_prompt"]
    if any(len(r["_prompt"]) != len(prompt_of) or (r["_prompt"] != prompt_of).any() for r in rows):
        return None
    members = [np.nonzero(prompt_of == k)[0] for k in np.unique(prompt_of)]
    rng = np.random.default_rng(seed)
    out = {"fd": np.empty((draws, len(rows))), "attribute": np.empty((draws, len(rows)))}
    for d in range(draws):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        for j, r in enumerate(rows):
            out["fd"][d, j] = metrics.frechet_distance(r["_feats"][idx], r["_real"])
            single = r["_single"][idx]
            out["attribute"][d, j] = r["_correct"][idx][single].mean() if single.any() else np.nan
    return out


def bootstrap_spreads(first: list[dict], second: list[dict], *, draws: int = BOOTSTRAP_DRAWS,
                      seed: int = 0) -> dict[str, np.ndarray] | None:
    """Per draw of `bootstrap_rows` over both groups: spread (max − min) of `second` minus spread of `first`, for
    Fréchet distance and attribute accuracy ({"fd", "attribute"}, each [draws])."""
    boot = bootstrap_rows(first + second, draws=draws, seed=seed)
    if boot is None:
        return None
    n = len(first)
    return {k: np.ptp(v[:, n:], axis=1) - np.ptp(v[:, :n], axis=1) for k, v in boot.items()}


def _bootstrap_line(name: str, diff: np.ndarray, unit: float, fmt: str) -> str:
    lo, mid, hi = np.quantile(diff * unit, [0.05, 0.5, 0.95])
    return (f"  - {name}: DiffIER's spread minus CFG's, median {mid:+{fmt}}, 90 % interval [{lo:+{fmt}}, "
            f"{hi:+{fmt}}]; DiffIER's spread smaller in {100 * float((diff < 0).mean()):.0f} % of draws.")


def diffier_checks(rows: list[dict]) -> list[str]:
    """The spread (max − min) of Fréchet distance and attribute accuracy over the CFG scales, CFG against DiffIER,
    and DiffIER at CFG's best scale (lowest Fréchet distance)."""
    cfg = [r for r in rows if r["key"] in {f"cfg-{w:g}" for w in DIFFIER_SCALES}]
    if len(cfg) < 2:
        return []
    lines = []
    best = min(cfg, key=lambda r: r["fd"])
    for infix, (k, eta, start, end) in DIFFIER_VARIANTS.items():
        keys = {f"diffier-{infix}{w:g}" for w in DIFFIER_SCALES}
        dif = [r for r in rows if r["key"] in keys]
        if len(dif) < 2:
            continue
        tag = f"DiffIER (K {k}, η {eta:g}, window {start:g}–{end:g})"
        scales = ", ".join(f"{r['scale']:g}" for r in cfg)
        if [r["scale"] for r in dif] != [r["scale"] for r in cfg]:
            scales += " (DiffIER: " + ", ".join(f"{r['scale']:g}" for r in dif) + ")"
        for name, key, fmt in (("Fréchet distance", "fd", lambda v: f"{v:.1f}"),
                               ("attribute accuracy", "attribute", lambda v: f"{100 * v:.1f} points")):
            spread = [max(r[key] for r in group) - min(r[key] for r in group) for group in (cfg, dif)]
            verdict = "smaller" if spread[1] < spread[0] else "not smaller"
            lines.append(f"- Spread of {name} over cfg {scales}: CFG {fmt(spread[0])}, {tag} {fmt(spread[1])} "
                         f"({verdict}).")
        boot = bootstrap_spreads(cfg, dif) if [r["scale"] for r in dif] == [r["scale"] for r in cfg] else None
        if boot is not None:
            lines.append(f"- How sure (paired bootstrap over the prompts, {BOOTSTRAP_DRAWS} draws, the same drawn "
                         "prompts in every row):")
            lines.append(_bootstrap_line("Fréchet distance", boot["fd"], 1.0, ".1f"))
            lines.append(_bootstrap_line("attribute accuracy (points)", boot["attribute"], 100.0, ".1f"))
        twin = next((r for r in dif if r["scale"] == best["scale"]), None)
        if twin is not None:
            lines.append(f"- At CFG's best scale by Fréchet distance ({best['label']}): {twin['label']} vs it: "
                         + _vs(twin, best, "attribute:points", "fd:ratio", "nfe", "s_per_image:ratio2") + ".")
    return lines


def diffier_graph_text(configs: list[Config]) -> str:
    """The Graphs line's DiffIER clause, naming every setting the run's DiffIER rows used ("" without such rows)."""
    settings = dict.fromkeys(c.diffier for c in configs if c.method == "diffier")
    if not settings:
        return ""
    used = "; ".join(f"{k} iteration{'s' if k != 1 else ''}, step size {eta:g}, window {a:g}–{b:g}"
                     for k, eta, a, b in settings)
    return ("; DiffIER: `CFGGuider` (cfg) + `GL_SamplerDiffIER` (euler base, tolerance 1e-3; " + used
            + ") + `BasicScheduler` + `RandomNoise` (the prompt's seed) → `SamplerCustomAdvanced`")


def render(rows: list[dict], *, args, info, prompts: list[Prompt], configs: list[Config]) -> str:
    w = info["weights"]
    n_single = sum(p.kind == "single" for p in prompts)
    n_pair = len(prompts) - n_single
    per_config = len(prompts) * args.per_prompt
    apg = [c for c in configs if c.method == "apg"]
    lines = [
        f"## {TITLE if args.section == SECTION else args.title}",
        "",
        "Command (from the repository root, `python` = the project venv's interpreter):",
        "",
        f"    {info['command']}",
        "",
        f"- Date: {info['date']}; wall time {info['wall'] / 60:.1f} min (boot, reference images, warm-up, all "
        f"graphs, metrics).",
        f"- Machine: {info['cpu']} (`/proc/cpuinfo` model name), {info['cores']} cores, {info['ram']} RAM; "
        f"`torch.set_num_threads({args.threads})`; attention `{info['attention']}`.",
        f"- Software: torch {torch.__version__}, ComfyUI {info['comfy']}, Python {platform.python_version()}, "
        f"Guidance Lab {info['rev']}.",
        f"- Weights: `{w['path']}` ({w['mb']:.1f} MB, sha256 {w['sha256']}…): checkpoint {w['checkpoint']}, "
        f"{w['train_steps']} training steps × batch {w['batch']}, seed {w['train_seed']}, {w['precision']} on "
        f"{w['device']}" + (f", {w['train_seconds'] / 60:.0f} min" if w.get("train_seconds") else "")
        + (" (stopped early by its time budget)" if w.get("stopped_early") else "")
        + f", trained at commit {w['git_commit']}.",
        *([f"- AGD adapter: `{a['path']}` ({a['mb']:.1f} MB, sha256 {a['sha256']}…): {a['parameters']:,} parameters, "
           f"d_h {a['hidden']}, {a['features']} Fourier features, "
           + adapter_design_text(a)
           + f"{a['steps']} steps on the {a['objective']} objective in {a['rounds']} round(s), the last by "
           f"`{a['command']}`."] if (a := info.get("agd_adapter")) else []),
        f"- Graphs (executed in-process with `execution.PromptExecutor`, as the server runs a queued prompt): "
        f"`GL_DemoModelLoader` → `CLIPTextEncode` (prompt; negative \"\") → `KSampler` (euler, normal, {args.steps} "
        f"steps) → `VAEDecode`; APG: `GL_APG` (eta 0, norm_threshold {args.apg_threshold:g}, momentum −0.5, window "
        f"0–1, no size scaling) before the KSampler; Adaptive Guidance: `GL_AdaptiveGuidance` (threshold "
        f"{args.ag_threshold:g}, denoised space, batch policy all) before the KSampler; LinearAG: `GL_LinearAG` "
        f"(default coefficients (1, 1, −1), first_fraction 0.5) before the KSampler; "
        f"CFG++: `GL_SamplerCFGPP` (euler) + `BasicScheduler` (normal, "
        f"{args.steps} steps) → `SamplerCustom` with cfg = λ; FKC: `GL_SamplerFKC` (ddpm, resampling every step, "
        f"clamp 2, output best) + `BasicScheduler` → `SamplerCustom` with cfg = β (K particles per image, one "
        f"batch)" + ("; EluCD: `GL_ClassifierLoader` (demo_classifier.safetensors, the demo world's guidance "
                      "classifier — not the evaluator) → `GL_ClassifierGuidance` (T1 1, discount 0.5, softplus 3, "
                      "γ 0.3, sine schedule, identity decoder; target = the prompt's colour and shape, for a "
                      "two-object prompt its first object) before the KSampler"
                      if any(c.method == "elucd" for c in configs) else "")
        + ("; GFCG: `GL_GradientFreeGuidance` (the same classifier and target, all 36 classes as candidates, "
           "prompt template \"a {label}\") + `KSamplerSelect` (euler) + `BasicScheduler` + `RandomNoise` (the "
           "prompt's seed) → `SamplerCustomAdvanced`" if any(c.method == "gfcg" for c in configs) else "")
        + ("; Dynamic CFG: `GL_DynamicCFG` (multipliers 0.5, 1, 2, 3 of cfg, max_change 5, window 0–0.7, "
           "alignment and fidelity weights 1; with the guidance classifier and target, or the clipping penalty "
           "alone) before the KSampler" if any(c.method == "dyncfg" for c in configs) else "")
        + ("; experts (single-object prompts): expert 1 = the object with its size (\"a large red circle\"), "
           "expert 2 = the object on its background (\"a red circle on a white background\"); averaging = "
           "`ConditioningCombine` of both → KSampler (the mean of the two predictions, CFG against \"\"); product of "
           "experts = `GL_FKCGuider` (mode product: q1·q2, no negative) + `GL_SamplerFKC` (as above) + "
           "`RandomNoise` → `SamplerCustomAdvanced`" if any(c.method in ("avg", "fkcpoe") for c in configs) else "")
        + (f"; LinearAG calibrated: coefficients fitted once per run by GL_LinearAGCalibrate's code on "
           f"{CALIBRATION_PROMPTS} training captions (`world.batch(0, {CALIBRATION_PROMPTS}, seed=3, kind=\"mixed\")`, "
           f"8 samples each from noise seeds 1000 + i, CFG 5, euler/normal, {args.steps} steps; "
           f"{info.get('calibration', {}).get('seconds', 0):.0f} s, not counted in the rows) and handed to "
           "`GL_LinearAG` (τ 0.05, first half) by a bench-only source node" if any(c.calibrated for c in configs)
           else "")
        + (f"; AGD: `GL_AGDLoader` ({agd[0].adapter}, trained on CFG trajectories of training captions: see the AGD "
           "adapter line) → `GL_AGDApply` (guidance_scale ω, strength 1) before a KSampler at cfg 1"
           if (agd := [c for c in configs if c.method == "agd"]) else "")
        + diffier_graph_text(configs)
        + ("; autoguidance: a second `GL_DemoModelLoader` (demo_model_weak, the early checkpoint of the same "
           "training run) as model_2 of `GL_MultiModelGuider` (mode autoguidance: D_weak + w·(D_main − D_weak) on "
           "the prompt; cfg+autoguidance: CFG at cfg plus w_a) + `KSamplerSelect` (euler) + `BasicScheduler` + "
           "`RandomNoise` → `SamplerCustomAdvanced`" if any(c.method.endswith("autoguidance") for c in configs)
           else "")
        + ("; multi-condition: `GL_MultiConditionGuider` (nested, combine inputs) with condition 1 = the "
           "two-object caption and condition 2 = each object's caption (\"a red circle\") masked to the half of "
           "the image its relation gives it (`SolidMask` + `MaskComposite` → `ConditioningSetMask`; rows \"regions "
           "as areas\": `ConditioningSetAreaPercentage`, the model then sees only that half), combined with "
           "`ConditioningCombine`, → `SamplerCustomAdvanced` (as for KSampler, ComfyUI also evaluates the negative and "
           "condition 1 on each area, so those rows' NFE/image counts half-image rows: 3 full and 6 half rows per "
           "step at unequal scales); single-object prompts have no layout and run "
           "CFG at s_1 in those rows" if any(c.method == "multicond" for c in configs) else "")
        + ". `EmptyLatentImage` 256×256 → "
        f"32×32 pixel-space "
        f"latents, one batch of {args.per_prompt} images per prompt, seed = {args.seed} + prompt index (the same for "
        f"every configuration, so each column of the grid starts from the same noise).",
        f"- Prompts: {_n(n_single, 'held-out single-object caption')} (`demo.world.held_out_captions()`: "
        f"(colour, shape, size, background) combinations never shown in training) and "
        f"{_n(n_pair, 'caption')} of held-out two-object scenes (`world.batch(0, {n_pair}, seed={PAIR_SEED}, "
        f"kind=\"pair\", split=\"heldout\")`), {_n(args.per_prompt, 'image')} each: {per_config} images per "
        f"configuration ({n_single * args.per_prompt} single-object, {n_pair * args.per_prompt} two-object).",
        "- Metrics (`bench/metrics.py`; the evaluator CNN of `bench/weights/` only scores, it never guides): "
        "*attribute acc.* = shape and colour both right on the single-object prompts; *relation acc.* = both "
        "named objects found and in the named relation on the two-object prompts; *both objects found* = the "
        "same without the geometry. *Fréchet dist.* = Fréchet distance of the evaluator's 128-d features of all "
        "images of the row to as many real held-out images (per single-object prompt, real scenes of its "
        "combination at random positions; held-out pair scenes for the pair prompts); the reference row compares "
        "a second, disjoint real set, i.e. the floor at this sample size. *diversity* = mean pairwise feature "
        "distance within a prompt (single-object prompts). *saturation* = mean HSV saturation; *clipped* = "
        "pixels with a channel at 0 or 1 after VAEDecode. *NFE/image* = UNet batch rows per image, counted by "
        "`GLBench_CountNFE`, a bench-only MODEL→MODEL node the runner registers in-process (a clone with a "
        "`DIFFUSION_MODEL` wrapper that adds up `x.shape[0]` of every UNet call; cond and uncond travel in one "
        "call with 2 rows per image). *s/image* = wall time of validating and executing the graph (text "
        "encoding, sampling, decoding; the loaded model is cached, as in a running server) ÷ images; "
        "configurations are interleaved per prompt in a rotating order.",
        "",
        *table(rows),
    ]
    if args.section == SECTION:
        lines += ["", "Quality bar of the demo model (issue 3, item 4):", "", *quality_bar(rows)]
    guided = classifier_checks(rows)
    if guided:
        lines += ["", "Classifier guidance against CFG at the same cfg (targets of the classifier-guidance issue: "
                      "higher attribute accuracy; better Fréchet distance at low scales):", "", *guided]
    particles = fkc_checks(rows)
    if particles:
        lines += ["", "FKC against CFG and the product of experts against multi-prompt averaging (rows of the particle-"
                      "sampler issue):", "", *particles]
    pairs = two_model_checks(rows)
    if pairs:
        lines += ["", "Against CFG (targets of the multi-condition and two-model issue: autoguidance gives better "
                      "quality without CFG's loss of variety; per-object scales beat single-prompt CFG on two-object "
                      "prompts):",
                  "", *pairs]
    distilled = agd_checks(rows)
    if distilled:
        lines += ["", "Distilled guidance against CFG at the same scale (targets of the guidance-distillation issue: "
                      "Fréchet distance within 5 %, attribute accuracy within 2 points, half the NFEs, ≤ 0.55× the "
                      "time per image):", "", *distilled]
    sensitivity = diffier_checks(rows)
    if sensitivity:
        lines += ["", "Sensitivity to the guidance scale (targets of the DiffIER issue: smaller spread of Fréchet "
                      "distance and attribute accuracy across scales than CFG; not worse at CFG's best scale):",
                  "", *sensitivity]
    savings = speedup_checks(rows)
    if savings:
        lines += ["", "Model-call savings against CFG at the same scale and steps (targets of the Adaptive Guidance "
                      "issue: ≥ 25 % fewer NFEs, attribute accuracy within 1 point, Fréchet distance within 5 %):",
                  "", *savings]
    if apg:
        lines += ["", f"APG's `norm_threshold` {args.apg_threshold:g} is for 3×32×32 pixel-space latents in [−1, 1] "
                      "(`--apg-threshold`): it bounds ‖D_c − D_u‖ per image; the paper's 15 at an SDXL 1024² latent "
                      "(4×128×128) scaled by √(3072/65536) would be 3.2."]
    if args.images < 256:
        lines += ["", f"Note: {per_config} images per configuration (fewer than the standard 256); Fréchet "
                      "distances at small N are biased upwards and the accuracies are coarse."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None,
                    help="demo-model weights file (default: what GL_DemoModelLoader finds, demo/weights/"
                         "demo_model.safetensors)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke mode: 32 images per configuration, 4 per prompt (defaults of --images/--per-prompt)")
    ap.add_argument("--images", type=int, default=None, help="images per configuration (default 256; --quick 32)")
    ap.add_argument("--per-prompt", type=int, default=None,
                    help="images per prompt, one batch (default 8; --quick 4)")
    ap.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    ap.add_argument("--section", default=SECTION, help=f"section of --out to write (default {SECTION!r}; "
                    "other sections get --title and no quality-bar lines)")
    ap.add_argument("--title", default="Classifier guidance on the demo model (CPU)",
                    help="heading of a section other than the default one")
    for flag, (keys, section, _title, share) in ROW_SETS.items():
        ap.add_argument(f"--{flag}", action="store_true", help=f"shorthand for --configs {keys} --section {section}"
                        + (f" --pair-share {share:g}" if share is not None else ""))
    ap.add_argument("--pair-share", type=float, default=None,
                    help="share of two-object prompts (default 0.3; 0.75 with --multi-condition)")
    ap.add_argument("--configs", default="all",
                    help="comma-separated configuration keys (default all: " + ", ".join(
                        c.key for c in all_configs(DEFAULT_APG_THRESHOLD)) + ")")
    ap.add_argument("--apg-threshold", type=float, default=DEFAULT_APG_THRESHOLD,
                    help="GL_APG norm_threshold for the 3×32×32 latents (default %(default)s)")
    ap.add_argument("--ag-threshold", type=float, default=DEFAULT_AG_THRESHOLD,
                    help="GL_AdaptiveGuidance threshold γ̄ of the ag-* rows (default %(default)s, the node default)")
    ap.add_argument("--seed", type=int, default=0, help="seed of prompt 0 (prompt k uses seed + k)")
    ap.add_argument("--agd-adapter", default=None,
                    help="AGD rows: this adapter file instead of the shipped demo_agd.safetensors (a candidate)")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"),
                    help="Markdown file whose `quality` section is (re)written (default: BENCHMARKS.md)")
    ap.add_argument("--grid", default=None, help="comparison grid PNG (configurations × prompts) (default: "
                    "bench/results/quality_grid.png, or <section>_grid.png for another --section)")
    ap.add_argument("--grid-prompts", type=int, default=8, help="prompt columns of the grid (default 8)")
    ap.add_argument("--json", default=None, help="raw results (default: bench/results/quality.json, or "
                    "<section>.json for another --section)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch.set_num_threads (default: all cores, %(default)s here)")
    ap.add_argument("--attention", choices=("pytorch", "comfy-default"), default="pytorch",
                    help="pytorch = --use-pytorch-cross-attention (default); comfy-default = ComfyUI's CPU default "
                         "(only when this process has not imported comfy yet)")
    args = ap.parse_args(argv)
    args.images = args.images if args.images is not None else (32 if args.quick else 256)
    args.per_prompt = args.per_prompt if args.per_prompt is not None else (4 if args.quick else 8)
    if args.images < 1 or args.per_prompt < 1 or args.steps < 1 or args.threads < 1:
        ap.error("need --images, --per-prompt, --steps, --threads >= 1")
    for flag, (keys, section, title, share) in ROW_SETS.items():
        if getattr(args, flag.replace("-", "_")):
            args.configs = keys
            if args.section == ap.get_default("section"):      # an explicit --section keeps its own name
                args.section = section
            if share is not None and args.pair_share is None:
                args.pair_share = share
            if title and args.title == ap.get_default("title"):
                args.title = title
    args.pair_share = 0.3 if args.pair_share is None else args.pair_share
    if not 0.0 <= args.pair_share < 1.0:
        ap.error("--pair-share must lie in [0, 1)")
    stem = "quality" if args.section == SECTION else args.section
    args.grid = args.grid or str(BENCH_DIR / "results" / f"{stem}_grid.png")
    args.json = args.json or str(BENCH_DIR / "results" / f"{stem}.json")
    if args.agd_adapter and not (Path(args.agd_adapter).is_file() and args.agd_adapter.endswith(".safetensors")):
        ap.error(f"--agd-adapter {args.agd_adapter!r} is not a .safetensors file")
    standard = [c.key for c in all_configs(args.apg_threshold)]
    known = standard + [c.key for c in extra_configs()]
    args.config_keys = standard if args.configs == "all" else [k.strip() for k in args.configs.split(",") if k.strip()]
    unknown = [k for k in args.config_keys if k not in known]
    if unknown or not args.config_keys:
        ap.error(f"unknown configuration(s) {unknown}; choose from {known}")
    return args


def boot_host(attention: str):
    """Boot ComfyUI (CPU) through tests/host.py; choose the attention backend if comfy is not imported yet."""
    root = str(host.comfy_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    if "comfy.model_management" not in sys.modules:
        import utils.extra_config  # noqa: F401  (before comfy.cli_args, as host.boot / main.py do)
        from comfy.cli_args import args
        args.use_pytorch_cross_attention = attention == "pytorch"
    return host.boot()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    wall0 = time.perf_counter()
    host = boot_host(args.attention)
    dm = host.pack("guiders.demo_model")
    if args.weights:
        weights = Path(args.weights)
        if not weights.is_file():
            print(f"error: no weights file at {weights}", file=sys.stderr)
            return 2
    else:
        weights = dm.find_checkpoint("demo_model")
        if weights is None:
            print("error: the demo model weights (demo_model.safetensors) are not there (looked in: "
                  + ", ".join(dm.weight_folders()) + "). " + dm.TRAIN_HINT, file=sys.stderr)
            return 2

    import logging

    import comfy.utils
    import nodes
    from comfy.ldm.modules import attention as comfy_attention

    from bench._markdown import write_section
    from bench.evaluator import load_evaluator
    previous = (torch.get_num_threads(), logging.getLogger().level, comfy.utils.PROGRESS_BAR_ENABLED)
    torch.set_num_threads(args.threads)          # after boot: tests/host.py pins the tests to GL_TEST_THREADS
    logging.getLogger().setLevel(logging.WARNING)
    comfy.utils.PROGRESS_BAR_ENABLED = False
    nodes.NODE_CLASS_MAPPINGS.update(BENCH_NODES)
    try:
        configs = [c for c in all_configs(args.apg_threshold, args.ag_threshold) + extra_configs()
                   if c.key in args.config_keys]
        prompts = make_prompts(args.images, args.per_prompt, args.seed, args.pair_share)
        ref_sets = reference_images(prompts, args.per_prompt)
        ev = load_evaluator()
        info = {"weights": weights_info(weights)}
        print(f"{len(configs)} configurations × {len(prompts)} prompts × {args.per_prompt} images, {args.steps} "
              f"steps; weights {info['weights']['path']}; {torch.get_num_threads()} threads", flush=True)
        with weights_first(dm, weights), contextlib.ExitStack() as stack:
            found = dm.find_checkpoint("demo_model")
            if found is None or found.resolve() != weights.resolve():
                raise RuntimeError(f"GL_DemoModelLoader would load {found}, not {weights}")
            runner = Runner()
            if any(c.calibrated for c in configs):
                info["calibration"] = calibrate(host, weights, args.steps)
                print(f"LinearAG calibration {info['calibration']['seconds']:.1f} s", flush=True)
            if any(c.method == "agd" for c in configs):
                # the file GL_AGDLoader will load: a models/gl_agd/demo_agd.safetensors wins over the pack's own
                adapter = Path(args.agd_adapter) if args.agd_adapter else host.pack("guiders.agd").resolve(
                    Config.adapter)
                info["agd_adapter"] = adapter_info(adapter)
                if args.agd_adapter:
                    stack.enter_context(candidate_adapter(host, adapter))
                    configs = [replace(c, adapter=adapter.name, label=c.label.replace("demo_agd", adapter.stem))
                               if c.method == "agd" else c for c in configs]
            t = time.perf_counter()
            runner.run(build_graph(configs[0], prompts[0], 1, 1, args.apg_threshold,    # warm-up: loads the model
                                   args.ag_threshold))
            print(f"warm-up (model load, 1 step) {time.perf_counter() - t:.1f} s", flush=True)
            t_run = time.perf_counter()
            for k, p in enumerate(prompts):
                order = configs[k % len(configs):] + configs[:k % len(configs)]
                for c in order:
                    images, rows, seconds = runner.run(build_graph(c, p, args.per_prompt, args.steps,
                                                                   args.apg_threshold, args.ag_threshold))
                    if images.shape != (args.per_prompt, 3, IMAGE_SIZE, IMAGE_SIZE):
                        raise RuntimeError(f"{c.key}: unexpected image batch {tuple(images.shape)}")
                    c.images.append(images)
                    c.nfe.append(rows / args.per_prompt)
                    c.seconds.append(seconds)
                done = time.perf_counter() - t_run
                print(f"prompt {k + 1}/{len(prompts)} ({p.kind}) {done / 60:.1f} min, eta "
                      f"{done / (k + 1) * (len(prompts) - k - 1) / 60:.1f} min", flush=True)
        rows = evaluate(configs, prompts, args.per_prompt, ref_sets, ev)
        columns = grid_columns(prompts, args.grid_prompts)
        real_a = ref_sets[0][0]
        from demo import world
        real_row = []
        for i in columns:
            p = prompts[i]
            real_row.append(world.render([p.scene], IMAGE_SIZE)[0] if p.kind == "pair" else real_a[i * args.per_prompt])
        grid = write_grid(Path(args.grid), configs, prompts, columns, real_row)
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
        info.update(command=_command(argv), cpu=_cpu_model(), cores=os.cpu_count(), ram=f"{ram:.0f} GiB",
                    comfy=_comfy_version(), rev=_git_revision(), attention=comfy_attention.optimized_attention.__name__,
                    date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    wall=time.perf_counter() - wall0)
        out = write_section(args.out, args.section,
                            render(rows, args=args, info=info, prompts=prompts, configs=configs))
        raw = Path(args.json)
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps({
            "args": {k: v for k, v in vars(args).items()}, "info": info, "rows": [public(r) for r in rows],
            "prompts": [{"caption": p.caption, "kind": p.kind, "seed": p.seed} for p in prompts],
            "grid": {"path": str(grid), "columns": columns, "rows": ["real"] + [c.key for c in configs]},
            "runs": {c.key: {"nfe_per_image": c.nfe, "seconds": c.seconds} for c in configs}},
            indent=1, default=str), encoding="utf-8")
    finally:
        for name in BENCH_NODES:
            nodes.NODE_CLASS_MAPPINGS.pop(name, None)
        LinearAGCoefficients.value = None
        torch.set_num_threads(previous[0])
        logging.getLogger().setLevel(previous[1])
        comfy.utils.PROGRESS_BAR_ENABLED = previous[2]

    print()
    print("\n".join(table(rows)))
    print()
    print("\n".join(quality_bar(rows)))
    print(f"\nwrote section '{args.section}' of {out}, grid {grid}, raw data {raw}; total {info['wall'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
