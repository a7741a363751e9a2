"""Soak: 100 sequential prompts through one headless server, mixing every example workflow that samples (every
pack node but the training jobs, whose workflows run in tests/workflows), on every tiny architecture and the
demo model (batch 1, at most 8 steps), at two seeds. Every prompt succeeds; the server's resident memory grows
≤ 5 % after warm-up; the same (workflow, architecture, seed) gives the same pixels every time it comes back, after
other prompts ran in between (A, B, …, A: no state leaks between prompts; a sampler of the prompt really re-ran, not
served from the cache).

The memory series and timings go to $GL_ARTIFACTS/soak/report.json (default test-artifacts/soak/)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflows"))
import serverutil  # noqa: E402
from test_workflows import REPO, WORKFLOWS, wa  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.slow]
ARTIFACTS = Path(os.environ.get("GL_ARTIFACTS", REPO / "test-artifacts")) / "soak"
PROMPTS = int(os.environ.get("GL_SOAK_PROMPTS", "100"))
WARMUP = 30                 # prompts before the memory baseline: every variant has run at least once by then
WINDOW = 10                 # prompts per median of the memory comparison
GROWTH_LIMIT = 0.05
MAX_STEPS = 8
# long training jobs that write weight files: run by tests/workflows (in-process and over HTTP), not repeated here
LONG_JOBS = {"GL_AGDCollect", "GL_AGDTrain", "GL_ConceptEraseTrain", "GL_HypernetworkTrain",
             "GL_HypernetworkBasis"}
SEED_INPUTS = {"KSampler": "seed", "KSamplerAdvanced": "noise_seed", "SamplerCustom": "noise_seed",
               "RandomNoise": "noise_seed"}
ARCHS = ("sd15_eps", "sd15_v", "sd3", "flux")


def _variants(info: dict) -> list[tuple[str, dict]]:
    """(label, API prompt) per workflow and architecture: the tiny-model workflows on one architecture each,
    rotating, so all four families are in the mix; the demo-model workflows as they are."""
    out = []
    tiny_index = 0
    for path in WORKFLOWS:
        ui = json.loads(path.read_text(encoding="utf-8"))
        types = {n["type"] for n in ui["nodes"]}
        if types & LONG_JOBS or "GL_LinearAGLoad" in types:     # the load workflow reads the calibrate one's file
            continue
        prompt = _shrunk(wa.ui_to_api(ui, info))
        label = path.stem
        for node in prompt.values():
            if node["class_type"] == "GL_TinyTestModel":
                node["inputs"]["architecture"] = ARCHS[tiny_index % len(ARCHS)]
                label = f"{path.stem}[{node['inputs']['architecture']}]"
        tiny_index += "GL_TinyTestModel" in types
        out.append((label, prompt))
    return out


def _shrunk(prompt: dict) -> dict:
    """The same graph at batch 1 and at most MAX_STEPS steps (every step count of a prompt is capped alike, so a
    calibration and the sampler that uses it still agree): a soak repeats prompts, it does not judge images."""
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            inputs["batch_size"] = 1
        if isinstance(inputs.get("steps"), int):
            inputs["steps"] = min(inputs["steps"], MAX_STEPS)
    return prompt


def _with_seed(prompt: dict, seed: int) -> dict:
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        name = SEED_INPUTS.get(node["class_type"])
        if name is not None and not isinstance(node["inputs"].get(name), list):
            node["inputs"][name] = seed
    return prompt


def _pixels(server, entry: dict) -> list[str]:
    digests = []
    for img in wa.output_images(entry):
        if img["type"] != "output":
            continue
        path = server.base / "output" / img["subfolder"] / img["filename"]
        digests.append(hashlib.sha256(np.asarray(Image.open(path).convert("RGB")).tobytes()).hexdigest())
    return digests


def _cached_nodes(entry: dict) -> set[str]:
    cached = set()
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_cached":
            cached |= set(data.get("nodes", []))
    return cached


server = serverutil.module_server("comfy-soak", wa=wa)


def test_soak(server):
    variants = _variants(server.info)
    labels = [label for label, _ in variants]
    covered = {n["class_type"] for _, p in variants for n in p.values() if n["class_type"].startswith("GL_")}
    rng = random.Random(0)
    # every variant once (warm-up), then random (variant, seed) picks, never the same variant twice in a row
    schedule = [(i, 0) for i in range(len(variants))]
    while len(schedule) < PROMPTS:
        i = rng.randrange(len(variants))
        if i != schedule[-1][0]:
            schedule.append((i, rng.randrange(2)))
    proc = psutil.Process(server.proc.pid)
    seen: dict[tuple[int, int], list[str]] = {}
    rows = []
    start = time.monotonic()
    for n, (i, seed) in enumerate(schedule[:PROMPTS]):
        label, prompt = variants[i]
        t0 = time.monotonic()
        entry = wa.queue_and_wait(server.url, _with_seed(prompt, seed), timeout=300)
        assert entry["status"]["status_str"] == "success", f"prompt {n} ({label}, seed {seed}) failed"
        samplers = {k for k, v in prompt.items() if v["class_type"] in SEED_INPUTS or "Sampler" in v["class_type"]}
        # ComfyUI's cache keeps the outputs of nodes identical to ones of the previous prompt (same inputs, same
        # ancestors): those are the same computation. At least one sampler must really run.
        assert samplers - _cached_nodes(entry), f"prompt {n} ({label}): served from the cache, not re-run"
        pixels = _pixels(server, entry)
        assert pixels, f"prompt {n} ({label}) saved no image"
        if (i, seed) in seen:
            assert pixels == seen[(i, seed)], (
                f"prompt {n}: {label} at seed {seed} differs from its first run (state leaked between prompts)")
        seen.setdefault((i, seed), pixels)
        rows.append({"n": n, "label": label, "seed": seed, "s": round(time.monotonic() - t0, 3),
                     "rss_mb": round(proc.memory_info().rss / 2**20, 1)})
    # resident memory after each prompt; a prompt that loads a second model (autoguidance) lifts it until the host
    # unloads that model, so growth compares the median of the first WINDOW prompts after warm-up with the median of
    # the last WINDOW: a leak is a trend, not one prompt's peak
    rss = [r["rss_mb"] for r in rows]
    base = float(np.median(rss[WARMUP:WARMUP + WINDOW]))
    end = float(np.median(rss[-WINDOW:]))
    growth = (end - base) / base
    report = {"prompts": len(rows), "variants": labels, "pack_nodes": sorted(covered),
              "repeats_checked": len(rows) - len(seen), "rss_median_after_warmup_mb": base,
              "rss_median_last_mb": end, "rss_max_after_warmup_mb": max(rss[WARMUP:]), "rss_end_mb": rss[-1],
              "growth": round(growth, 4), "wall_s": round(time.monotonic() - start, 1), "rows": rows}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    assert len(rows) == PROMPTS
    assert len(rows) - len(seen) >= 20, "too few repeats to check determinism and leaks"
    assert growth <= GROWTH_LIMIT, (f"resident memory grew {growth:.1%} after warm-up (median {base:.0f} MB over "
                                    f"prompts {WARMUP}–{WARMUP + WINDOW - 1} → {end:.0f} MB over the last "
                                    f"{WINDOW}); see {ARTIFACTS / 'report.json'}")
