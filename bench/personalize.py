"""Hypernetwork personalization (GL_Personalize) and hybrid-model CFG on the demo model, through the real ComfyUI
execution path.

    python bench/personalize.py [--hypernet demo/weights/demo_hypernet.safetensors] [--subjects 8] [--prompts 12]
                                [--images-per-prompt 2] [--w-p 0,1,2,3,4] [--hybrid-start 0] [--hybrid-only]
                                [--section personalization] [--out BENCHMARKS.md]

Held-out subjects (demo/subjects.py split "heldout": patterns the hypernetwork never saw) × prompts "a <colour>
<shape>"; per subject, 3 of its images (GL_DemoSubjectImages) go to GL_Personalize. Rows (same seeds everywhere;
euler, normal, 20 steps, empty negative):
    base               KSampler, cfg 5, the demo model
    personalized       KSampler, cfg 5, the personalized model
    hybrid w_p         GL_MultiModelGuider mode hybrid on the base model: D_u + 5·(D_b − D_u) + w_p·(D_p − D_b),
                       the personalized term through the LoRA hook on positive_2 (ConditioningSetProperties);
                       --hybrid-start S: that term only from start_percent S on (plain CFG on the base model over
                       the noisiest S of the schedule, where the composition forms)
    direct LoRA fit    with --direct-fit STEPS: KSampler, cfg 5, the demo model with a LoRA (the hypernetwork's layers
                       and rank) optimised on N images of the subject for STEPS steps (guiders/hypernet_train.fit_lora,
                       the per-subject optimisation a hypernetwork replaces), loaded by the core LoraLoaderModelOnly;
                       one row per N of --direct-images (3 = the same references GL_Personalize gets)
    ground truth       the prompts' objects rendered with the subject's pattern (what a perfect model draws)
Columns: prompt adherence (colour and shape of the prompt, read by bench/subject_evaluator.py, an evaluation-only
CNN trained on patterned and flat objects), the world evaluator's attribute accuracy (bench/evaluator.py, trained
on flat objects only: it misreads the shape of patterned objects, see the ground-truth row), subject pattern
accuracy (the sample's pattern class equals the subject's) and subject similarity (cosine between the sample's
subject-evaluator features and the mean features of 16 ground-truth images of the subject), the same similarity to
the other held-out subjects and the share of samples nearest their own subject (whether samples show *their*
subject or one look for all), the share read as flat
(no pattern), model rows per step (UNet batch rows per image and step, counted by GLBench_CountNFE),
seconds per image (wall time of the graph runs, sampling included). Writes section --section (default
`personalization`) of --out and bench/results/<section>.json (--json). --hybrid-only leaves out the base and
personalized rows (hybrid w_p 0 is the base model).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for p in (str(BENCH_DIR), str(REPO)):
    if p not in sys.path:
        sys.path.append(p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import quality as q  # noqa: E402

SECTION = "personalization"
CFG = 5.0
STEPS = 20
DEFAULT_HYPERNET = REPO / "demo" / "weights" / "demo_hypernet.safetensors"


def json_path(section: str) -> Path:
    """The default JSON file of a section's run: one per section, so runs written to different sections never
    overwrite each other's rows."""
    return BENCH_DIR / "results" / f"{section}.json"


def prompt_list(n: int) -> list[tuple[str, str]]:
    """(colour, shape) pairs: every colour and every shape equally often."""
    from demo import world
    nc, ns = len(world.COLORS), len(world.SHAPES)
    return [(world.COLORS[i % nc], world.SHAPES[(i + i // nc) % ns]) for i in range(n)]


def graph(row: str, w_p: float, subject: int, caption: str, seed: int, batch: int, hypernet: str,
          lora: str = "", start_percent: float = 0.0) -> dict:
    g = {"1": {"class_type": "GL_DemoModelLoader", "inputs": {"checkpoint": "demo_model"}},
         "2": {"class_type": "GL_HypernetworkLoader", "inputs": {"hypernetwork": hypernet}},
         "3": {"class_type": "CLIPTextEncode", "inputs": {"text": caption, "clip": ["1", 1]}},
         "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
         "5": {"class_type": "EmptyLatentImage", "inputs": {"width": q.LATENT_WIDGET, "height": q.LATENT_WIDGET,
                                                            "batch_size": batch}},
         "7": {"class_type": "GL_DemoSubjectImages", "inputs": {"subject": subject, "split": "heldout", "count": 3,
                                                                "start": 0, "size": 32}},
         "9": {"class_type": "GLBench_CountNFE", "inputs": {"model": ["1", 0]}},
         "8": {"class_type": "GL_Personalize", "inputs": {"model": ["9", 0], "images": ["7", 0],
                                                          "hypernetwork": ["2", 0], "strength": 1.0}},
         "10": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
         "11": {"class_type": "GLBench_Capture", "inputs": {"images": ["10", 0]}}}
    if row in ("base", "personalized", "direct"):
        model = {"base": ["9", 0], "personalized": ["8", 0], "direct": ["17", 0]}[row]
        g["6"] = {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed, "steps": STEPS, "cfg": CFG,
            "sampler_name": "euler", "scheduler": "normal", "positive": ["3", 0], "negative": ["4", 0],
            "latent_image": ["5", 0], "denoise": 1.0}}
        if row != "personalized":
            for k in ("2", "7", "8"):
                del g[k]
        if row == "direct":
            g["17"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["9", 0], "lora_name": lora,
                                                                       "strength_model": 1.0}}
        return g
    g["12"] = {"class_type": "ConditioningSetProperties", "inputs": {
        "cond_NEW": ["3", 0], "strength": 1.0, "set_cond_area": "default", "hooks": ["8", 1]}}
    g["13"] = {"class_type": "GL_MultiModelGuider", "inputs": {
        "model": ["9", 0], "positive": ["3", 0], "mode": "hybrid", "cfg": CFG, "scale_2": w_p,
        "start_percent": start_percent, "end_percent": 1.0, "max_ratio": 0.0, "negative": ["4", 0],
        "positive_2": ["12", 0]}}
    g["14"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}}
    g["15"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["16"] = {"class_type": "BasicScheduler", "inputs": {"model": ["9", 0], "scheduler": "normal", "steps": STEPS,
                                                          "denoise": 1.0}}
    g["6"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["14", 0], "guider": ["13", 0], "sampler": ["15", 0], "sigmas": ["16", 0], "latent_image": ["5", 0]}}
    return g


def ground_truth(subject: int, pairs: list[tuple[str, str]], n: int, seed: int) -> torch.Tensor:
    """The prompts' objects (random size, place, background) painted with the subject's pattern, n per prompt."""
    from demo import subjects as sj
    from demo import world
    subj = sj.subject(subject, split="heldout")
    out = []
    for k, (colour, shape) in enumerate(pairs):
        labels, i = [], 0
        while len(labels) < n:
            lab = world.scene(seed * 1000 + k * 97 + i, seed=5, kind="single", split="all")
            i += 1
            o = lab["objects"][0]
            if o["color"] == colour and o["shape"] == shape:
                labels.append(lab)
        out.append(sj.render(subj, labels))
    return torch.cat(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hypernet", default=str(DEFAULT_HYPERNET))
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--w-p", default="0,1,2,3,4")
    ap.add_argument("--hybrid-start", type=float, default=0.0,
                    help="start_percent of the personalized term in the hybrid rows (0 = every step; 0.3 = the "
                         "personal model only after the noisiest 30 %%: base-early / personal-late)")
    ap.add_argument("--hybrid-only", action="store_true", help="leave out the base and personalized rows")
    ap.add_argument("--section", default=SECTION, help="the BENCHMARKS.md section (its markers) to write")
    ap.add_argument("--direct-fit", type=int, default=0,
                    help="steps of a LoRA optimised directly per subject (0: no direct-fit rows)")
    ap.add_argument("--direct-images", default="3", help="images of the subject per direct fit, one row per value")
    ap.add_argument("--direct-lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    ap.add_argument("--json", default=None, help="where the rows go as JSON (default: bench/results/<section>.json)")
    args = ap.parse_args(argv)
    args.json = args.json or str(json_path(args.section))
    wall0 = time.perf_counter()
    host = q.boot_host("pytorch")
    import logging

    import comfy.utils
    import folder_paths
    import nodes

    from bench import metrics
    from bench._markdown import write_section
    from bench.evaluator import load_evaluator
    from bench.subject_evaluator import SubjectEvaluator
    from demo import subjects as sj
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.WARNING)
    comfy.utils.PROGRESS_BAR_ENABLED = False
    nodes.NODE_CLASS_MAPPINGS.update(q.BENCH_NODES)
    hpath = Path(args.hypernet).resolve()
    host.pack("guiders.hypernet").folders()
    folder_paths.add_model_folder_path("gl_hypernetworks", str(hpath.parent))
    ev, sev = load_evaluator(), SubjectEvaluator.load()
    pairs = prompt_list(args.prompts)
    captions = [f"a {c} {s}" for c, s in pairs]
    n = args.images_per_prompt
    w_ps = [float(v) for v in args.w_p.split(",") if v.strip()]
    direct_n = [int(v) for v in args.direct_images.split(",") if v.strip()] if args.direct_fit > 0 else []
    rows = ([] if args.hybrid_only else [("base", 0.0), ("personalized", 0.0)]) + [("hybrid", w) for w in w_ps]
    rows += [("direct", float(k)) for k in direct_n]

    def row_name(r: str, w: float) -> str:
        return {"hybrid": f"hybrid w_p {w:g}", "direct": f"direct LoRA fit, {w:g} images"}.get(r, r)
    runner = q.Runner()
    per_row = {row_name(r, w): {"images": [], "subject": [], "seconds": 0.0, "unet_rows": 0, "fit_seconds": 0.0}
               for r, w in rows}
    if direct_n:
        import tempfile

        import comfy.utils as cu
        hn = host.pack("guiders.hypernet")
        net = hn.load(hpath)
        dm = host.pack("guiders.demo_model")
        ht = host.pack("guiders.hypernet_train")
        fit_model = dm.load_demo_model(dm.DEFAULT_PATH)
        lora_dir = Path(tempfile.mkdtemp(prefix="gl-direct-fit-"))
        folder_paths.add_model_folder_path("loras", str(lora_dir))
    truth = {"images": [], "subject": []}
    try:
        runner.run(graph("base", 0.0, 0, "", 0, 1, hpath.name))
        for s in range(args.subjects):
            loras = {}
            for count in direct_n:        # the same first images GL_DemoSubjectImages gives (start 0)
                pics, caps, _labels = sj.images(sj.subject(s, split="heldout"), 0, count, size=32)
                with torch.inference_mode():
                    factors, fit = ht.fit_lora(*fit_model, pics, caps, layers=net.layers,
                                               rank=net.module.config["rank"], steps=args.direct_fit,
                                               learning_rate=args.direct_lr, seed=s)
                loras[count] = f"subject{s}_n{count}.safetensors"
                cu.save_torch_file(hn.lora_state_dict(factors), str(lora_dir / loras[count]))
                per_row[row_name("direct", float(count))]["fit_seconds"] += fit["seconds"]
            for r, w in rows:
                key = row_name(r, w)
                for k, cap in enumerate(captions):
                    imgs, unet_rows, secs = runner.run(graph(r, w, s, cap, args.seed + 100 * s + k, n,
                                                             hpath.name, loras.get(int(w), ""), args.hybrid_start))
                    per_row[key]["images"].append(imgs)
                    per_row[key]["unet_rows"] += unet_rows
                    per_row[key]["subject"] += [s] * len(imgs)
                    per_row[key]["seconds"] += secs
            truth["images"].append(ground_truth(s, pairs, n, s))
            truth["subject"] += [s] * (n * len(pairs))
            print(f"subject {s}: done ({time.perf_counter() - wall0:.0f} s)", flush=True)
    finally:
        for name in q.BENCH_NODES:
            nodes.NODE_CLASS_MAPPINGS.pop(name, None)
        if direct_n:
            shutil.rmtree(lora_dir, ignore_errors=True)
    # subject references: 16 ground-truth images per subject (other scenes than the samples' prompts)
    ref_feats, patterns = {}, {}
    for s in range(args.subjects):
        subj = sj.subject(s, split="heldout")
        imgs, _c, _l = sj.images(subj, 100, 16)
        ref_feats[s] = F.normalize(sev.predict(imgs)["features"].mean(0), dim=0)
        patterns[s] = 1 + subj["pattern_idx"]
    prompts_all = [c for _s in range(args.subjects) for c in captions for _ in range(n)]
    from demo import world
    want_shape = torch.tensor([world.SHAPES.index(s) for _s in range(args.subjects) for _c, s in pairs
                               for _ in range(n)])
    want_color = torch.tensor([world.COLORS.index(c) for _s in range(args.subjects) for c, _sh in pairs
                               for _ in range(n)])
    table, per_image = [], {}
    for key, r in [*per_row.items(), ("ground truth", truth)]:
        images = torch.cat(r["images"])
        subj_idx = torch.tensor(r["subject"])
        pred = sev.predict(images)
        feats = F.normalize(pred["features"], dim=1)
        sim = (feats * torch.stack([ref_feats[int(s)] for s in subj_idx])).sum(1)
        all_refs = torch.stack([ref_feats[s] for s in range(args.subjects)])          # [S, d]
        to_all = feats @ all_refs.T                                                    # [N, S]
        own = F.one_hot(subj_idx, args.subjects).bool()
        other = (to_all.masked_fill(own, 0.0).sum(1) / max(args.subjects - 1, 1)) if args.subjects > 1 else sim
        want = torch.tensor([patterns[int(s)] for s in subj_idx])
        adherent = ((pred["shape"] == want_shape) & (pred["color"] == want_color)).float()
        per_image[key] = {"similarity": sim, "adherence": adherent}
        row = {"row": key, "images": len(images),
               "prompt_adherence": float(adherent.mean()),
               "attribute_accuracy": float(metrics.attribute_accuracy(images, prompts_all, ev)["attribute"]),
               "pattern_accuracy": float((pred["pattern"] == want).float().mean()),
               "flat_share": float((pred["pattern"] == 0).float().mean()),
               "subject_similarity": float(sim.mean()),
               "other_similarity": float(other.mean()),
               "own_subject_nearest": float((to_all.argmax(1) == subj_idx).float().mean())}
        if "seconds" in r:
            row["seconds_per_image"] = r["seconds"] / len(images)
            row["rows_per_step"] = r["unet_rows"] / (len(images) * STEPS)
        if r.get("fit_seconds"):
            row["fit_seconds_per_subject"] = r["fit_seconds"] / args.subjects
        table.append(row)
        print(json.dumps(row), flush=True)
    groups = torch.arange(args.subjects * len(captions) * n) // n      # one group per subject and prompt
    steps = hybrid_steps(per_image, w_ps, groups)
    for step in steps:
        print(json.dumps(step), flush=True)
    import comfy.utils as cu
    meta = cu.load_torch_file(str(hpath), return_metadata=True)[1]
    info = {"cpu": q._cpu_model(), "cores": os.cpu_count(), "comfy": q._comfy_version(), "rev": q._git_revision(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall": time.perf_counter() - wall0, "hypernet": hpath.name,
            "hypernet_info": json.loads(meta.get("info", "{}")),
            "command": " ".join(["python bench/personalize.py", *(argv or sys.argv[1:])])}
    info["hypernet_info"].pop("loss_history", None)
    if direct_n:
        info["direct"] = {"layers": net.layers, "rank": net.module.config["rank"], "steps": args.direct_fit,
                          "images": direct_n, "learning_rate": args.direct_lr}
    write_section(args.out, args.section, render(table, info, args, captions, steps))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    samples = {k: {m: [round(float(x), 5) for x in v[m]] for m in ("similarity", "adherence")}
               for k, v in per_image.items() if k.startswith("hybrid")}
    Path(args.json).write_text(json.dumps({"rows": table, "hybrid_steps": steps, "info": info, "prompts": captions,
                                           "hybrid_samples": samples}, indent=1, default=str))
    print(f"wrote section {args.section!r} of {args.out}", flush=True)
    return 0


def paired_change(a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor | None = None, *, draws: int = 2000,
                  seed: int = 0) -> dict:
    """Mean of b − a over paired samples (the same seed and prompt in both rows) with a 95 % percentile bootstrap
    interval. `groups` (an integer id per sample) makes it a cluster bootstrap: whole groups are resampled, as
    samples of one group (one subject and prompt: same caption, same references) are not independent; without it,
    every sample is its own group."""
    d = (b - a).double()
    ids = torch.arange(len(d)) if groups is None else torch.unique(groups, return_inverse=True)[1]
    n = int(ids.max()) + 1
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, ids, d)
    counts = torch.zeros(n, dtype=torch.float64).index_add_(0, ids, torch.ones_like(d))
    idx = torch.randint(0, n, (draws, n), generator=torch.Generator().manual_seed(seed))
    means = sums[idx].sum(1) / counts[idx].sum(1)
    return {"mean": float(d.mean()), "low": float(means.quantile(0.025)), "high": float(means.quantile(0.975))}


def hybrid_steps(per_image: dict, w_ps: list[float], groups: torch.Tensor | None = None) -> list[dict]:
    """For consecutive w_p values of the hybrid rows: the paired change of subject similarity and prompt adherence
    (`paired_change`, clustered by `groups`)."""
    ws = sorted(w_ps)
    out = []
    for lo, hi in zip(ws, ws[1:]):
        a, b = per_image[f"hybrid w_p {lo:g}"], per_image[f"hybrid w_p {hi:g}"]
        out.append({"from": lo, "to": hi, "similarity": paired_change(a["similarity"], b["similarity"], groups),
                    "adherence": paired_change(a["adherence"], b["adherence"], groups)})
    return out


def render(table: list[dict], info: dict, args, captions: list[str], steps: list[dict] | None = None) -> str:
    title = ("## Hypernetwork personalization and hybrid-model CFG on the demo model (CPU)" if args.hybrid_start <= 0
             else f"## Hybrid-model CFG, base model early and personal term from start_percent {args.hybrid_start:g} "
                  "on (demo model, CPU)")
    lines = [
        title,
        "",
        f"Command: `{info['command']}` · {info['cpu']} ({info['cores']} cores) · ComfyUI {info['comfy']} · rev "
        f"{info['rev']} · {info['date']} · {info['wall']:.0f} s in all.",
        "",
        f"Hypernetwork `{info['hypernet']}`: {json.dumps(info['hypernet_info'], sort_keys=True)}.",
        "",
        f"{args.subjects} held-out subjects × {len(captions)} prompts ('a <colour> <shape>') × "
        f"{args.images_per_prompt} images; cfg {CFG:g}, euler, 20 steps, empty negative; same seeds in every row"
        + (f"; hybrid rows: the personalized term from start_percent {args.hybrid_start:g} on (base model only "
           "before)." if args.hybrid_start > 0 else "."),
        "",
        "| row | prompt adherence | attribute accuracy (world evaluator) | subject pattern accuracy | flat (no "
        "pattern) | subject similarity | similarity to the other subjects | own subject nearest | model rows / step "
        "| s / image |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in table:
        rows = f"{r['rows_per_step']:.2f}" if "rows_per_step" in r else "–"
        secs = f"{r['seconds_per_image']:.3f}" if "seconds_per_image" in r else "–"
        lines.append(f"| {r['row']} | {100 * r['prompt_adherence']:.1f} % | {100 * r['attribute_accuracy']:.1f} % | "
                     f"{100 * r['pattern_accuracy']:.1f} % | "
                     f"{100 * r['flat_share']:.1f} % | {r['subject_similarity']:.3f} | {r['other_similarity']:.3f} | "
                     f"{100 * r['own_subject_nearest']:.1f} % | {rows} | {secs} |")
    lines += ["", "Prompt adherence, subject pattern accuracy and similarity come from bench/subject_evaluator.py "
              "(evaluation only); *similarity to the other subjects* is the same cosine to the mean features of each "
              "other held-out subject, averaged (a row that draws every subject the same way scores as high there as "
              "in the own-subject column); *own subject nearest* = the share of samples whose features are closest to "
              f"their own subject's among the {args.subjects} (chance {100 / max(args.subjects, 1):.1f} %). "
              "Attribute accuracy from bench/evaluator.py (trained on flat objects, it misreads "
              "patterned shapes: see its ground-truth figure). The ground-truth row is the evaluators' ceiling. "
              "Model rows per step: UNet batch rows per image and step, counted by the bench node "
              "GLBench_CountNFE (a DIFFUSION_MODEL wrapper on the loaded model, which the personalized clone and the "
              "guider inherit): 2 for CFG, 3 for hybrid-model CFG with w_p > 0 inside the personal term's window and 2 "
              "outside it (the guider evaluates a term only when its coefficient is non-zero and it is in its "
              "window)."]
    if steps:
        parts = [f"{st['from']:g} → {st['to']:g}: similarity {st['similarity']['mean']:+.3f} "
                 f"[{st['similarity']['low']:+.3f}, {st['similarity']['high']:+.3f}], adherence "
                 f"{100 * st['adherence']['mean']:+.1f} [{100 * st['adherence']['low']:+.1f}, "
                 f"{100 * st['adherence']['high']:+.1f}] points" for st in steps]
        lines += ["", "Hybrid-model CFG, change between consecutive w_p, paired image by image (same seeds and "
                  "prompts), mean with its 95 % bootstrap interval (resampling whole subject × prompt groups, whose "
                  "images share caption and references): " + "; ".join(parts) + "."]
    fits = [r for r in table if "fit_seconds_per_subject" in r]
    if fits:
        lines += ["", f"Direct LoRA fit rows: per subject, a rank-{info['direct']['rank']} LoRA on the hypernetwork's "
                  f"layers ({info['direct']['layers']}) optimised for {args.direct_fit} steps (batch 4, AdamW, lr "
                  f"{args.direct_lr:g}, the hypernetwork's training loss) on the subject's first N images and their "
                  "captions (N = 3: the references GL_Personalize gets), then loaded by LoraLoaderModelOnly: the "
                  "per-subject optimisation a hypernetwork replaces. Fitting time per subject: "
                  + ", ".join(f"{r['fit_seconds_per_subject']:.0f} s ({r['row'].split(', ')[-1]})" for r in fits)
                  + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
