"""Concept erasure (GL_ConceptErase) on the demo model, through the real ComfyUI execution path.

    python bench/erasure.py [--images-per-prompt 8] [--erased-prompts 12] [--other-prompts 24] [--out BENCHMARKS.md]

Erases the shape "circle" with "square" as the alternative. Graph per (configuration, prompt):
GL_DemoModelLoader → GL_ConceptErase or GL_ConceptEraseTrain (the row's settings; absent for the unerased
reference) → KSampler (euler, normal, 20 steps, cfg 5, empty negative) → VAEDecode → GLBench_Capture, the same seed
per prompt in every row. On the hooks rows the erasure node's `hooks` output goes through core Cond Set Props onto
the prompt and the KSampler gets the original model.
Prompts are demo-world captions (every template, colour, size and background) naming a circle ("erased
prompts") or another shape ("other prompts"). Columns: share of erased-prompt images the evaluator reads as the
alternative (a square of the caption's colour) and as the original; attribute accuracy on the other prompts and
its change against the unerased model; mean absolute pixel difference and mean evaluator-feature distance of
the other prompts' images to the unerased model's (same seeds); the largest pixel difference of unconditional
images (empty prompt, cfg 1) to the unerased model's; the first step's unconditional prediction, evaluated alone
inside a few of the cfg-5 runs (bench node GLBench_UncondProbe), against the unerased model's on the same noise;
the time the erasure node took.

Also times the closed form on an SD1.5-size model (the SD1.5 UNet config and a CLIP-L text encoder, random
weights; the cost does not depend on the values). Writes section `erasure` of --out and bench/results/erasure.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for p in (str(BENCH_DIR), str(REPO)):
    if p not in sys.path:
        sys.path.append(p)

import torch  # noqa: E402

from bench import quality as q  # noqa: E402

SECTION = "erasure"
ERASE, ALTERNATIVE = "circle", "square"
WORLD_SEED = 23
PROBE_PROMPTS = 4          # prompts (half erased, half other) whose first step's unconditional prediction is probed
COLOUR_TEMPLATES = "a {}\n" + "\n".join(f"a {c} {{}}" for c in ("red", "green", "blue", "yellow", "purple", "orange"))
OTHER_SHAPES = "square; triangle; diamond; cross; star"
ROWS = [  # (key, label, GL_ConceptErase settings or None for the unerased model)
    ("original", "unerased model", None),
    ("uce_default", "UCE defaults (last token, no templates, protect_uncond)", {}),
    ("tuned", "all tokens, colour templates, preserve other shapes, erase_scale 2, preserve_scale 4",
     {"token_mode": "all", "templates": "custom", "custom_templates": COLOUR_TEMPLATES, "preserve": OTHER_SHAPES,
      "erase_scale": 2.0, "preserve_scale": 4.0, "protect_uncond": False}),
    ("tuned_protect", "the same + protect_uncond (λ 0.1)",
     {"token_mode": "all", "templates": "custom", "custom_templates": COLOUR_TEMPLATES, "preserve": OTHER_SHAPES,
      "erase_scale": 2.0, "preserve_scale": 4.0, "lam": 0.1, "protect_uncond": True}),
    ("tuned_hooks", "the tuned edit (no protect_uncond) through the hooks output: Cond Set Props on the prompt, "
     "KSampler on the original model",
     {"token_mode": "all", "templates": "custom", "custom_templates": COLOUR_TEMPLATES, "preserve": OTHER_SHAPES,
      "erase_scale": 2.0, "preserve_scale": 4.0, "protect_uncond": False, "route": "hooks"}),
    ("trained", "GL_ConceptEraseTrain (All-but-One design): TRAIN_LABEL", {"node": "GL_ConceptEraseTrain"}),
    ("trained_hooks", "the same trained edit through the hooks output",
     {"node": "GL_ConceptEraseTrain", "route": "hooks"}),
]
TRAIN = {"erase": ERASE, "alternative": ALTERNATIVE, "preserve": OTHER_SHAPES, "steps": 300, "learning_rate": 1e-3,
         "rank": 8, "batch": 4, "eta": 1.0, "lambda_u": 1.0, "lambda_p": 0.5, "trajectories": 8,
         "trajectory_steps": 20, "trajectory_cfg": 5.0, "trainable": "attn2 q/k/v/out", "seed": 0}
TRAIN_LABEL = (f"{TRAIN['steps']} steps, batch {TRAIN['batch']}, lr {TRAIN['learning_rate']:g}, rank {TRAIN['rank']}, "
               f"{TRAIN['trajectories']} trajectories × {TRAIN['trajectory_steps']} steps, preserve other shapes")
ROWS = [(k, label.replace("TRAIN_LABEL", TRAIN_LABEL), settings) for k, label, settings in ROWS]
DEFAULTS = {"erase": ERASE, "alternative": ALTERNATIVE, "preserve": "", "erase_scale": 1.0, "preserve_scale": 1.0,
            "lam": 0.5, "token_mode": "last_content", "templates": "none", "custom_templates": "",
            "targets": "K+V", "protect_uncond": True, "uncond_prompts": "", "strength": 1.0}


def prompts(n_erased: int, n_other: int) -> tuple[list[str], list[str]]:
    """Distinct demo-world single-object captions naming the erased shape, and naming another shape."""
    from demo import world
    erased, other, start = [], [], 0
    while len(erased) < n_erased or len(other) < n_other:
        _imgs, captions, labels = world.batch(start, 256, seed=WORLD_SEED, kind="single", split="all")
        for c, lab in zip(captions, labels):
            bucket = erased if lab["objects"][0]["shape"] == ERASE else other
            if c not in erased and c not in other and len(bucket) < (n_erased if bucket is erased else n_other):
                bucket.append(c)
        start += 256
    return erased, other


class UncondProbe:
    """Bench-only MODEL → MODEL node: a clone whose pre-CFG hook, at the first step of every sampling run, evaluates
    the unconditional conditioning alone (one model call of its own, through the host's calc_cond_batch, which
    applies whatever weights or hooks the host gives that conditioning) and records it with the sampler's own
    unconditional prediction. It returns the predictions unchanged. The first step's state is the seed's noise,
    the same in every row, so rows compare call for call in the same layout."""
    CATEGORY = "Guidance Lab/bench"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    records: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def patch(self, model):
        import comfy.samplers
        m = model.clone()

        def probe(args):
            out, conds, t = args["conds_out"], args["conds"], args["timestep"]
            sigmas = args["model_options"].get("transformer_options", {}).get("sample_sigmas")
            if conds[1] is not None and sigmas is not None and float(t.flatten()[0]) == float(sigmas[0]):
                alone = comfy.samplers.calc_cond_batch(args["model"], [conds[1]], args["input"], t,
                                                       args["model_options"])[0]
                UncondProbe.records.append({"alone": alone.detach().float().cpu().clone(),
                                            "sampler": out[1].detach().float().cpu().clone()})
            return out

        m.set_model_sampler_pre_cfg_function(probe)
        return (m,)


def graph(settings: dict | None, caption: str, seed: int, batch: int, cfg: float, probe: bool = False) -> dict:
    g = {"1": {"class_type": "GL_DemoModelLoader", "inputs": {"checkpoint": "demo_model"}},
         "3": {"class_type": "CLIPTextEncode", "inputs": {"text": caption, "clip": ["1", 1]}},
         "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
         "5": {"class_type": "EmptyLatentImage", "inputs": {"width": q.LATENT_WIDGET, "height": q.LATENT_WIDGET,
                                                            "batch_size": batch}},
         "10": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
         "11": {"class_type": "GLBench_Capture", "inputs": {"images": ["10", 0]}}}
    model, positive = ["1", 0], ["3", 0]
    erase = settings is not None
    settings = dict(settings or {})
    hooks = settings.pop("route", None) == "hooks"
    if erase and settings.get("node") == "GL_ConceptEraseTrain":
        g["21"] = {"class_type": "EmptyLatentImage", "inputs": {"width": q.LATENT_WIDGET, "height": q.LATENT_WIDGET,
                                                                "batch_size": 1}}
        g["20"] = {"class_type": "GL_ConceptEraseTrain",
                   "inputs": {"model": ["1", 0], "clip": ["1", 1], "latent": ["21", 0], **TRAIN}}
    elif erase:
        g["20"] = {"class_type": "GL_ConceptErase",
                   "inputs": {"model": ["1", 0], "clip": ["1", 1], **{**DEFAULTS, **settings}}}
    if "20" in g and hooks:
        # the edit rides on the prompt only (an empty prompt is the unconditional branch: it stays unhooked)
        if caption:
            g["22"] = {"class_type": "ConditioningSetProperties", "inputs": {
                "cond_NEW": ["3", 0], "strength": 1.0, "set_cond_area": "default", "hooks": ["20", 2]}}
            positive = ["22", 0]
    elif "20" in g:
        model = ["20", 0]
    if probe:
        g["30"] = {"class_type": "GLBench_UncondProbe", "inputs": {"model": model}}
        model = ["30", 0]
    g["6"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": 20, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
        "positive": positive, "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    return g


def sd15_size_timing() -> dict:
    """Seconds of the closed form (defaults, one concept) on an SD1.5-size UNet + CLIP-L, random weights (the UNet
    of bench/step_overhead.py)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    from step_overhead import build_sd15, init_weights
    erasure = q.host.boot().pack("guiders.erasure")
    patcher, _config = build_sd15(0)
    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer,
                                                                         comfy.sd1_clip.SD1ClipModel))
    with torch.inference_mode(False):
        init_weights(clip.cond_stage_model, 1)
    unet_params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
    text_params = sum(p.numel() for p in clip.cond_stage_model.parameters())
    times = []
    for concept in ("Van Gogh", "Monet", "Picasso"):
        t = time.perf_counter()
        _m, edit = erasure.concept_erase(patcher, clip, erase=concept, alternative="art")
        times.append(time.perf_counter() - t)
    return {"seconds": times, "projections": len(edit.deltas), "unet_params": unet_params,
            "text_params": text_params}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images-per-prompt", type=int, default=8)
    ap.add_argument("--erased-prompts", type=int, default=12)
    ap.add_argument("--other-prompts", type=int, default=24)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    ap.add_argument("--json", default=str(BENCH_DIR / "results" / "erasure.json"))
    ap.add_argument("--skip-sd15-timing", action="store_true")
    args = ap.parse_args(argv)
    wall0 = time.perf_counter()
    host = q.boot_host("pytorch")
    import logging

    import comfy.utils
    import nodes

    from bench import metrics
    from bench._markdown import write_section
    from bench.evaluator import load_evaluator
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.WARNING)
    comfy.utils.PROGRESS_BAR_ENABLED = False
    bench_nodes = {**q.BENCH_NODES, "GLBench_UncondProbe": UncondProbe}
    nodes.NODE_CLASS_MAPPINGS.update(bench_nodes)
    dm = host.pack("guiders.demo_model")
    weights = dm.find_checkpoint("demo_model")
    ev = load_evaluator()
    erased, other = prompts(args.erased_prompts, args.other_prompts)
    n = args.images_per_prompt
    runner = q.Runner()
    results = {}
    try:
        runner.run(graph(None, "", 0, 1, 5.0))
        for key, label, settings in ROWS:
            t = time.perf_counter()
            first = runner.run(graph(settings, erased[0], args.seed, n, 5.0))     # the erasure node runs here
            seconds_first = time.perf_counter() - t
            imgs = {c: runner.run(graph(settings, c, args.seed + i, n, 5.0))[0]
                    for i, c in enumerate(erased + other)}
            assert torch.equal(first[0], imgs[erased[0]])
            uncond = runner.run(graph(settings, "", args.seed, n, 1.0))[0]
            seconds = time.perf_counter() - t
            UncondProbe.records.clear()       # first-step unconditional predictions (a few prompts; not timed)
            for i, c in enumerate(erased[:PROBE_PROMPTS // 2] + other[:PROBE_PROMPTS // 2]):
                runner.run(graph(settings, c, args.seed + i, n, 5.0, probe=True))
            assert len(UncondProbe.records) == 2 * (PROBE_PROMPTS // 2), len(UncondProbe.records)
            results[key] = {"label": label, "images": imgs, "uncond": uncond, "seconds": seconds,
                            "seconds_first": seconds_first, "probe": list(UncondProbe.records)}
            print(f"{key}: {results[key]['seconds']:.0f} s", flush=True)
        # the node's own time, from its log-free path: run it directly on the loaded demo model
        erasure = host.pack("guiders.erasure")
        patcher, clip, _vae = dm.load_demo_model(weights)
        for key, _label, settings in ROWS[1:]:
            if settings.get("route") == "hooks":
                results[key]["node_seconds"] = None           # the same edit as the row above it
                continue
            if settings.get("node") == "GL_ConceptEraseTrain":
                results[key]["node_seconds"] = results[key]["seconds_first"] - results["original"]["seconds_first"]
                continue
            t = time.perf_counter()
            erasure.concept_erase(patcher, clip, **{k: v for k, v in {**DEFAULTS, **settings}.items()})
            results[key]["node_seconds"] = time.perf_counter() - t
        rows = summarise(results, erased, other, n, ev, metrics)
        timing = None if args.skip_sd15_timing else sd15_size_timing()
    finally:
        for name in bench_nodes:
            nodes.NODE_CLASS_MAPPINGS.pop(name, None)
    info = {"cpu": q._cpu_model(), "cores": os.cpu_count(), "comfy": q._comfy_version(), "rev": q._git_revision(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall": time.perf_counter() - wall0,
            "command": " ".join(["python bench/erasure.py", *(argv or sys.argv[1:])]),
            "weights": q.weights_info(weights)}
    write_section(args.out, SECTION, render(rows, timing, info, erased, other, n))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "timing": timing, "info": info, "erased": erased,
                                           "other": other}, indent=1, default=str))
    print(f"wrote section {SECTION!r} of {args.out}", flush=True)
    return 0


def summarise(results, erased, other, n, ev, metrics) -> list[dict]:
    base = results["original"]
    rows = []
    for key, r in results.items():
        er_imgs = torch.cat([r["images"][c] for c in erased])
        er_caps = [c for c in erased for _ in range(n)]
        alt_caps = [c.replace(ERASE, ALTERNATIVE) for c in er_caps]
        ot_imgs = torch.cat([r["images"][c] for c in other])
        ot_base = torch.cat([base["images"][c] for c in other])
        ot_caps = [c for c in other for _ in range(n)]
        feats, feats_base = ev.features(ot_imgs), ev.features(ot_base)
        rows.append({
            "key": key, "label": r["label"],
            "as_alternative": float(metrics.attribute_accuracy(er_imgs, alt_caps, ev)["attribute"]),
            "as_original": float(metrics.attribute_accuracy(er_imgs, er_caps, ev)["attribute"]),
            "other_accuracy": float(metrics.attribute_accuracy(ot_imgs, ot_caps, ev)["attribute"]),
            "other_pixel": float((ot_imgs - ot_base).abs().mean()),
            "other_feature": float(torch.linalg.vector_norm(feats - feats_base, dim=1).mean()),
            "feature_scale": float(torch.linalg.vector_norm(feats_base - feats_base.mean(0), dim=1).mean()),
            "uncond_max": float((r["uncond"] - base["uncond"]).abs().max()),
            # first step, unconditional conditioning alone, same noise: against the unerased model (bit for bit
            # = 0.0), and against the row's own sampler call (which shares a batch with the prompt on one route)
            "uncond_pred_max": max(float((p["alone"] - p0["alone"]).abs().max())
                                   for p, p0 in zip(r["probe"], base["probe"])),
            "uncond_pred_equal": sum(torch.equal(p["alone"], p0["alone"]) for p, p0 in zip(r["probe"], base["probe"])),
            "uncond_pred_calls": len(r["probe"]),
            "sampler_vs_alone_max": max(float((p["sampler"] - p["alone"]).abs().max()) for p in r["probe"]),
            "node_seconds": r.get("node_seconds")})
    return rows


def render(rows, timing, info, erased, other, n) -> str:
    base = rows[0]
    w = info["weights"]
    lines = [
        f"## Concept erasure on the demo model (CPU): erase \"{ERASE}\", alternative \"{ALTERNATIVE}\"", "",
        f"- Command: `{info['command']}`",
        f"- Machine: {info['cpu']}, {info['cores']} cores; ComfyUI {info['comfy']}; revision {info['rev']}; "
        f"{info['date']}; {info['wall'] / 60:.1f} min in all.",
        f"- Weights: `{w['path']}` (sha256 {w['sha256']}, step {w['train_steps']}).",
        f"- {len(erased)} erased prompts (captions naming a {ERASE}) and {len(other)} other prompts (other shapes), "
        f"{n} images each, the same seeds in every row; KSampler euler/normal, 20 steps, cfg 5, empty negative; "
        "\"unconditional images\" = empty prompt at cfg 1 (only the unconditional branch runs; on the hooks "
        "rows the empty prompt carries no hooks, as a negative does not).",
        f"- \"Unconditional prediction\": at the first step of {PROBE_PROMPTS} of the cfg-5 runs ({PROBE_PROMPTS // 2} "
        f"erased, {PROBE_PROMPTS // 2} other prompts; × {n} images), the empty negative evaluated alone in one model "
        "call inside the run (bench node `GLBench_UncondProbe`, a pre-CFG hook calling the host's `calc_cond_batch`, "
        "so the host applies the weights or hooks it gives that conditioning), against the same call of the unerased "
        "model on the same noise: the largest absolute difference and how many calls are bit-identical.", "",
        "| configuration | erased prompts → alternative | erased prompts → original | other prompts: accuracy "
        "(Δ points) | other prompts: pixel Δ | other prompts: feature Δ | unconditional images: max pixel Δ | "
        "unconditional prediction: max Δ (bit-identical calls) | erasure node time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        delta = 100 * (r["other_accuracy"] - base["other_accuracy"])
        secs = "—" if r["node_seconds"] is None else f"{r['node_seconds']:.2f} s"
        probe = ("reference" if r is base else
                 f"{r['uncond_pred_max']:.2e} ({r['uncond_pred_equal']}/{r['uncond_pred_calls']})")
        if r["key"].endswith("_hooks"):
            secs = "the row above's edit"
        if r["key"] == "trained" and r["node_seconds"] is not None:
            secs = f"≈ {r['node_seconds']:.0f} s (training)"
        lines.append(f"| {r['label']} | {100 * r['as_alternative']:.1f} % | {100 * r['as_original']:.1f} % | "
                     f"{100 * r['other_accuracy']:.1f} % ({delta:+.1f}) | {r['other_pixel']:.4f} | "
                     f"{r['other_feature']:.3f} | {r['uncond_max']:.2e} | {probe} | {secs} |")
    lines += ["", f"Feature Δ is the mean distance in the evaluator's feature space between an image and the "
              f"unerased model's image of the same seed (for scale: the unerased images lie on average "
              f"{base['feature_scale']:.3f} from their mean); pixel Δ is in [0, 1] units. Node time: the closed "
              "form's solve (run on its own), or the fine-tuning's training (the first graph's time minus the "
              "unerased model's)."]
    if timing:
        s = timing["seconds"]
        lines += ["", f"Closed form on an SD1.5-size model (UNet {timing['unet_params'] / 1e6:.0f} M parameters, "
                  f"CLIP-L text encoder {timing['text_params'] / 1e6:.0f} M, random weights; defaults; one concept "
                  f"and its alternative, {timing['projections']} projections): {', '.join(f'{x:.2f}' for x in s)} s "
                  "(three concepts in a row; target < 5 s)."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
