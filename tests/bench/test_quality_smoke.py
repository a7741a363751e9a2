"""bench/quality.py end to end on the real host, tiny: a few images of four configurations (CFG 1, CFG 5, CFG++, AG)
through GL_DemoModelLoader → CLIPTextEncode → KSampler / SamplerCustom → VAEDecode, on the shipped demo-model
weights if present, else on a throwaway checkpoint trained here (demo/train.py, 5 steps). Checks the Markdown
section (every column, every row, text outside the section kept), exact NFE counts, the grid PNG's size and that
the runner leaves the host as it found it. Measures mechanics, not quality."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import host as host_module

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
PER_PROMPT = 2
CONFIGS = ("cfg-1", "cfg-5", "ag-5", "cfgpp-0.6")   # in all_configs order
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def booted():
    """tests/bench has no conftest that boots the host (the evaluator tests need none): boot it here."""
    return host_module.boot()


@pytest.fixture(scope="module")
def quality(booted):
    from bench import quality as module
    return module


@pytest.fixture(scope="module")
def weights(booted, tmp_path_factory) -> Path:
    shipped = REPO / "demo" / "weights" / "demo_model.safetensors"
    if shipped.is_file():
        return shipped
    out = tmp_path_factory.mktemp("quality_weights") / "throwaway.safetensors"
    env = {**os.environ, "GL_COMFYUI_ROOT": str(host_module.comfy_root())}
    cmd = [sys.executable, str(REPO / "demo" / "train.py"), "--out", str(out), "--steps", "5", "--batch", "4",
           "--threads", "1", "--weak-at", "0", "--probe-every", "0", "--probe-batch", "4", "--log-every", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def result(quality, weights, tmp_path_factory):
    import torch
    folder = tmp_path_factory.mktemp("quality_out")
    md, grid, raw = folder / "BENCH.md", folder / "grid.png", folder / "quality.json"
    md.write_text("# Guidance Lab benchmarks\n\nhand-written text outside every section\n", encoding="utf-8")
    threads = torch.get_num_threads()
    rc = quality.main(["--weights", str(weights), "--quick", "--images", "4", "--per-prompt", str(PER_PROMPT),
                       "--steps", str(STEPS), "--configs", ",".join(CONFIGS), "--threads", "1", "--grid-prompts", "2",
                       "--out", str(md), "--grid", str(grid), "--json", str(raw)])
    assert rc == 0
    assert torch.get_num_threads() == threads
    return md.read_text(encoding="utf-8"), grid, json.loads(raw.read_text(encoding="utf-8"))


def test_table_has_every_column_and_row(quality, result):
    text, _grid, data = result
    assert "hand-written text outside every section" in text
    assert text.count("<!-- quality:start -->") == 1 and text.count("<!-- quality:end -->") == 1
    section = text.split("<!-- quality:start -->")[1].split("<!-- quality:end -->")[0]
    header = "| " + " | ".join(quality.COLUMNS) + " |"
    assert header in section
    for column in ("attribute acc.", "relation acc.", "Fréchet", "diversity", "saturation", "clipped",
                   "NFE/image", "s/image"):
        assert column in header
    lines = section.splitlines()
    start = lines.index(header)
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append(line)
    labels = [row["label"] for row in data["rows"]]
    assert len(body) == 1 + len(CONFIGS) == len(labels)       # the real-image reference row, then each config
    for line, label in zip(body, labels):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(quality.COLUMNS) and cells[0] == label
    for row in data["rows"][1:]:                               # generated rows: every metric is a number
        for key in ("attribute", "relation", "fd", "diversity", "saturation", "clipped", "s_per_image"):
            assert isinstance(row[key], float), (row["key"], key, row[key])
    assert "Command" in section and "--quick" in section and "Machine" in section
    assert "training steps" in section and "Quality bar" in section
    assert "Model-call savings against CFG" in section and "Adaptive Guidance, cfg 5" in section


def test_nfe_counts_are_exact(result):
    _text, _grid, data = result
    runs = data["runs"]
    assert set(runs) == set(CONFIGS)
    expected = {"cfg-1": STEPS, "cfg-5": 2 * STEPS, "cfgpp-0.6": 2 * STEPS}   # cfg 1 skips the uncond
    for key, nfe in expected.items():
        assert runs[key]["nfe_per_image"] and all(v == nfe for v in runs[key]["nfe_per_image"]), (key, runs[key])
        assert next(r for r in data["rows"] if r["key"] == key)["nfe"] == nfe
        assert all(s > 0 for s in runs[key]["seconds"])
    # Adaptive Guidance: CFG until the switch (at least the first step), then 1 NFE per step
    assert all(STEPS + 1 <= v <= 2 * STEPS and v == int(v) for v in runs["ag-5"]["nfe_per_image"])


def test_grid_png_has_the_right_size(quality, result):
    from PIL import Image
    _text, grid, data = result
    assert grid.is_file()
    n_rows, n_cols = 1 + len(CONFIGS), len(data["grid"]["columns"])
    assert n_cols == 2 and data["grid"]["rows"] == ["real", *CONFIGS]
    cell = 32 * quality.GRID_SCALE + quality.GRID_PAD
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == quality.grid_size(n_rows, n_cols) == (
            quality.GRID_LABEL_W + n_cols * cell + quality.GRID_PAD,
            quality.GRID_HEADER_H + n_rows * cell + quality.GRID_PAD)


def test_runner_leaves_the_host_clean(quality, result):
    import nodes
    assert not set(quality.BENCH_NODES) & set(nodes.NODE_CLASS_MAPPINGS)


def test_missing_weights_are_reported(quality, tmp_path, capsys):
    rc = quality.main(["--weights", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "x.md")])
    assert rc == 2 and "no weights file" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()


def test_every_extra_configuration_builds_a_valid_graph(quality):
    """The graphs of the rows run only on request (classifier, two-model, multi-condition, FKC experts) pass the host's
    own validation for a single-object and, where they take one, a two-object prompt: every node and input exists."""
    import asyncio

    import execution
    import nodes
    if quality.host.boot().pack("guiders.demo_model").find_checkpoint("demo_model_weak") is None:
        pytest.skip("the shipped demo-model weights are not there")
    nodes.NODE_CLASS_MAPPINGS.update(quality.BENCH_NODES)
    try:
        prompts = quality.make_prompts(4, 2, 0)
        single = next(p for p in prompts if p.kind == "single")
        pair = next(p for p in prompts if p.kind == "pair")
        checked = 0
        for cfg in quality.extra_configs():
            for p in (single, pair):
                if cfg.method in ("avg", "fkcpoe") and p.kind == "pair":
                    with pytest.raises(ValueError, match="single-object prompts"):
                        quality.build_graph(cfg, p, 2, 2, 3.0)
                    continue
                graph = quality.build_graph(cfg, p, 2, 2, 3.0)
                valid, error, _outputs, node_errors = asyncio.run(execution.validate_prompt("x", graph, None))
                assert valid, (cfg.key, p.kind, error, node_errors)
                checked += 1
        assert checked >= 2 * len(quality.extra_configs()) - 4
    finally:
        for key in quality.BENCH_NODES:
            nodes.NODE_CLASS_MAPPINGS.pop(key, None)


def test_bench_ag_default_is_the_nodes(quality):
    """The ag-5 rows claim the node default: the bench's copy of γ̄ must be the guider's."""
    adaptive = quality.host.boot().pack("guiders.adaptive")
    assert quality.DEFAULT_AG_THRESHOLD == adaptive.DEFAULT_THRESHOLD
    assert next(c for c in quality.all_configs(3.0) if c.key == "ag-5").label.endswith(
        f"(γ̄ {adaptive.DEFAULT_THRESHOLD:g})")


def _boot_row(feats, correct, prompts, real, fd=0.0, attribute=0.0, scale=1.0, key="k"):
    import numpy as np
    return {"key": key, "scale": scale, "fd": fd, "attribute": attribute, "_feats": np.asarray(feats, float),
            "_correct": np.asarray(correct, bool), "_single": np.ones(len(prompts), bool),
            "_prompt": np.asarray(prompts), "_real": real}


def test_bootstrap_spreads_known_answers(quality):
    """Identical groups differ by exactly 0 in every draw; a group of identical rows has spread 0, so against a
    group whose rows differ (one shifted far in feature space, one always wrong) its spread is smaller in every
    draw; rows on other prompts are refused."""
    import numpy as np

    from bench import metrics
    rng = np.random.default_rng(0)
    prompts = np.repeat(np.arange(6), 4)
    base = rng.normal(size=(24, 5))
    real = metrics.feature_stats(rng.normal(size=(200, 5)))
    right, wrong = np.ones(24), np.zeros(24)
    varied = [_boot_row(base, right, prompts, real), _boot_row(base + 3.0, wrong, prompts, real)]
    flat = [_boot_row(base, right, prompts, real), _boot_row(base, right, prompts, real)]
    same = quality.bootstrap_spreads(varied, varied, draws=20)
    assert np.all(same["fd"] == 0) and np.all(same["attribute"] == 0)
    diff = quality.bootstrap_spreads(varied, flat, draws=20)
    assert np.all(diff["fd"] < -10) and np.all(diff["attribute"] == -1.0)
    other = [_boot_row(base, right, np.repeat(np.arange(1, 7), 4), real)] * 2
    assert quality.bootstrap_spreads(varied, other, draws=5) is None
    assert quality.bootstrap_spreads([quality.public(varied[0])], flat, draws=5) is None
    lines = quality.diffier_checks([
        {**_boot_row(base, right, prompts, real, fd=1.0, attribute=1.0, scale=w, key=f"cfg-{w:g}"),
         "label": f"CFG {w:g}", "nfe": 40, "s_per_image": 1.0, "relation": None}
        for w in quality.DIFFIER_SCALES] + [
        {**_boot_row(base, right, prompts, real, fd=1.0, attribute=1.0, scale=w, key=f"diffier-{w:g}"),
         "label": f"DiffIER {w:g}", "nfe": 60, "s_per_image": 1.0, "relation": None}
        for w in quality.DIFFIER_SCALES])
    assert any(line.startswith("  - Fréchet distance: DiffIER's spread minus CFG's, median +0.0") for line in lines)


def test_bootstrap_rows_recompute_each_row(quality):
    """Every draw of a row recomputes its own statistics: a row of always-right images reads 1.0 in every draw, a
    row with the right half of its prompts right reads between 0 and 1 and averages near 0.5; the Fréchet distance
    of a row whose features are the real set's own is the smallest in every draw."""
    import numpy as np

    from bench import metrics
    rng = np.random.default_rng(1)
    prompts = np.repeat(np.arange(10), 3)
    real_feats = rng.normal(size=(30, 4))
    real = metrics.feature_stats(real_feats)
    half = (prompts % 2 == 0)
    rows = [_boot_row(real_feats, np.ones(30), prompts, real), _boot_row(real_feats + 2.0, half, prompts, real)]
    boot = quality.bootstrap_rows(rows, draws=200)
    assert boot["fd"].shape == (200, 2) and boot["attribute"].shape == (200, 2)
    assert np.all(boot["attribute"][:, 0] == 1.0)
    assert 0.0 < boot["attribute"][:, 1].min() and boot["attribute"][:, 1].max() < 1.0
    assert abs(boot["attribute"][:, 1].mean() - 0.5) < 0.05
    assert np.all(boot["fd"][:, 0] < boot["fd"][:, 1])


def test_agd_checks_report_a_paired_interval(quality):
    """A distilled row identical to its CFG row: a difference of exactly 0 points and a ratio of exactly 1 in
    every draw."""
    import numpy as np

    from bench import metrics
    rng = np.random.default_rng(2)
    prompts = np.repeat(np.arange(8), 2)
    feats = rng.normal(size=(16, 4))
    real = metrics.feature_stats(rng.normal(size=(40, 4)))
    common = {"relation": None, "diversity": 1.0, "s_per_image": 1.0}
    cfg = {**_boot_row(feats, np.ones(16), prompts, real, fd=2.0, attribute=1.0, scale=3, key="cfg-3"),
           "label": "CFG 3", "nfe": 40, **common}
    agd = {**_boot_row(feats, np.ones(16), prompts, real, fd=2.0, attribute=1.0, scale=3, key="agd-3"),
           "label": "AGD 3", "nfe": 20, **common}
    lines = quality.agd_checks([cfg, agd])
    assert lines[0].startswith("- AGD 3 vs CFG 3:")
    assert "attribute accuracy difference [+0.0, +0.0] points (within 2 points in 100 % of draws)" in lines[1]
    assert "[×1.000, ×1.000]" in lines[1]


def test_adapter_info_records_what_the_agd_rows_ran(quality, tmp_path):
    """The AGD rows' adapter line: hash, architecture (omega_gain or the paper's adapter), parameters and command,
    read from the file itself."""
    import json

    import torch
    from safetensors.torch import save_file
    path = tmp_path / "a.safetensors"
    tensors = {"s.out.weight": torch.zeros(4, 3), "s.out.bias": torch.zeros(4)}
    meta = {"config": json.dumps({"hidden": 3, "features": 2, "omega_gain": True}),
            "info": json.dumps({"parameters": 16, "steps": 7, "objective": "relative", "command": "python x.py",
                                "rounds": [{}]})}
    save_file(tensors, str(path), metadata=meta)
    quality.REPO = tmp_path                              # shown relative to the repository root
    try:
        a = quality.adapter_info(path)
    finally:
        quality.REPO = REPO
    assert a["path"] == "a.safetensors" and len(a["sha256"]) == 16 and a["omega_gain"] is True
    assert (a["hidden"], a["features"], a["parameters"], a["steps"], a["rounds"]) == (3, 2, 16, 7, 2)
    assert quality.adapter_design_text(a) == "output × (ω − 1) (`omega_gain`), "
    meta["config"] = json.dumps({"hidden": 3, "features": 2, "heads": 4, "top_sites": True})
    save_file(tensors, str(path), metadata=meta)
    quality.REPO = tmp_path
    try:
        a = quality.adapter_info(path)
    finally:
        quality.REPO = REPO
    assert (a["omega_gain"], a["heads"], a["top_sites"]) == (False, 4, True)
    assert quality.adapter_design_text(a) == ("4 attention heads, adapters on the full-resolution output blocks too "
                                              "(`top_sites`), ")
    meta["config"] = json.dumps({"hidden": 3, "features": 2})
    save_file(tensors, str(path), metadata=meta)
    quality.REPO = tmp_path
    try:
        a = quality.adapter_info(path)                   # files without the keys: the paper's adapter
    finally:
        quality.REPO = REPO
    assert (a["omega_gain"], a["heads"], a["top_sites"]) == (False, 1, False)
    assert quality.adapter_design_text(a).startswith("the paper's adapter")


def test_agd_rows_can_run_a_candidate_adapter(quality, weights, tmp_path):
    """--agd-adapter: GL_AGDLoader loads the candidate file for the AGD rows (named in the row and the adapter line,
    hashed from that file), and the host's gl_agd folder list is as it was afterwards."""
    import shutil

    import folder_paths
    shipped = REPO / "demo" / "weights" / "demo_agd.safetensors"
    if not shipped.is_file():
        pytest.skip("no shipped adapter to copy")
    candidate = tmp_path / "candidate.safetensors"
    shutil.copy(shipped, candidate)
    before = folder_paths.get_folder_paths("gl_agd") if "gl_agd" in folder_paths.folder_names_and_paths else None
    md = tmp_path / "BENCH.md"
    rc = quality.main(["--weights", str(weights), "--quick", "--images", "2", "--per-prompt", "2", "--steps", "2",
                       "--configs", "agd-3", "--threads", "1", "--agd-adapter", str(candidate), "--out", str(md),
                       "--grid", str(tmp_path / "g.png"), "--json", str(tmp_path / "r.json"), "--section", "agd"])
    assert rc == 0
    text = md.read_text(encoding="utf-8")
    assert f"AGD adapter: `{candidate.resolve()}`" in text and "(candidate)" in text and "(demo_agd)" not in text
    assert quality.adapter_info(candidate)["sha256"] in text
    after = folder_paths.get_folder_paths("gl_agd")
    assert str(tmp_path) not in after and (before is None or after == before)
    with pytest.raises(SystemExit):
        quality.parse_args(["--agd-adapter", str(tmp_path / "missing.safetensors")])


def test_row_set_shorthands_name_their_section_unless_one_is_given(quality):
    """--agd alone writes section agd; with an explicit --section the run keeps that name (a second table of the
    same rows under other settings must not overwrite the first)."""
    plain = quality.parse_args(["--agd"])
    assert plain.section == "agd" and plain.configs == quality.ROW_SETS["agd"][0]
    named = quality.parse_args(["--agd", "--section", "agd_batch16", "--title", "AGD, 16 per batch"])
    assert named.section == "agd_batch16" and named.configs == plain.configs and named.title == "AGD, 16 per batch"
    assert named.json.endswith("agd_batch16.json") and named.grid.endswith("agd_batch16_grid.png")


def test_diffier_graph_text_names_the_settings_the_rows_ran(quality):
    """The Graphs line describes the DiffIER settings of the run's rows, not the node's defaults."""
    by_key = {c.key: c for c in quality.all_configs(3.0) + quality.extra_configs()}
    late = quality.diffier_graph_text([by_key["cfg-3"], by_key["diffier-latek3-3"], by_key["diffier-latek3-15"]])
    assert "3 iterations, step size 0.5, window 0.5–1" in late
    assert "window 0–0.5" not in late
    both = quality.diffier_graph_text([by_key["diffier-3"], by_key["diffier-latek3-3"]])
    assert "1 iteration, step size 0.5, window 0–0.5; 3 iterations, step size 0.5, window 0.5–1" in both
    assert quality.diffier_graph_text([by_key["cfg-3"]]) == ""
