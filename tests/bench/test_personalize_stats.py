"""bench/personalize.py's paired changes between consecutive hybrid-model CFG rows: the mean difference and its
bootstrap interval, per sample or over groups of samples."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.personalize import hybrid_steps, paired_change  # noqa: E402


def test_paired_change_mean_and_interval():
    a = torch.rand(200, generator=torch.Generator().manual_seed(0))
    shift = paired_change(a, a + 0.25)                        # a constant shift: no spread at all
    assert abs(shift["mean"] - 0.25) < 1e-6 and abs(shift["high"] - shift["low"]) < 1e-6
    b = a + torch.randn(200, generator=torch.Generator().manual_seed(1))
    out = paired_change(a, b)
    d = (b - a).double()
    assert abs(out["mean"] - float(d.mean())) < 1e-12
    assert out["low"] < out["mean"] < out["high"]
    se = float(d.std() / len(d) ** 0.5)                      # the interval is about ±1.96 standard errors
    assert 0.8 * 3.92 * se < out["high"] - out["low"] < 1.2 * 3.92 * se


def test_hybrid_steps_pair_consecutive_scales_in_order():
    sims = {w: torch.full((4,), 0.5 + 0.1 * w) for w in (0.0, 1.0, 2.5)}
    per_image = {f"hybrid w_p {w:g}": {"similarity": s, "adherence": torch.tensor([1.0, 1.0, 0.0, float(w < 1)])}
                 for w, s in sims.items()}
    steps = hybrid_steps(per_image, [2.5, 0.0, 1.0])
    assert [(st["from"], st["to"]) for st in steps] == [(0.0, 1.0), (1.0, 2.5)]
    assert abs(steps[0]["similarity"]["mean"] - 0.1) < 1e-6 and abs(steps[1]["similarity"]["mean"] - 0.15) < 1e-6
    assert steps[0]["adherence"]["mean"] == -0.25 and steps[1]["adherence"]["mean"] == 0.0


def test_cluster_bootstrap_resamples_whole_groups():
    """Samples that move together within a group: the cluster interval is wider than the per-sample one, and with
    one sample per group the two are the same."""
    gen = torch.Generator().manual_seed(2)
    shifts = torch.randn(40, generator=gen).repeat_interleave(5)          # 40 groups of 5 equal changes
    a = torch.zeros(200)
    per_sample = paired_change(a, shifts)
    clustered = paired_change(a, shifts, torch.arange(200) // 5)
    assert abs(clustered["mean"] - per_sample["mean"]) < 1e-12
    assert clustered["high"] - clustered["low"] > 1.8 * (per_sample["high"] - per_sample["low"])
    assert paired_change(a, shifts, torch.arange(200)) == per_sample


def test_hybrid_window_reaches_the_guider_only():
    """--hybrid-start sets the guider's start_percent in the hybrid rows; the other rows have no guider."""
    from bench.personalize import graph
    g = graph("hybrid", 2.0, 0, "a red square", 1, 2, "h.safetensors", "", 0.3)
    guider = [n for n in g.values() if n["class_type"] == "GL_MultiModelGuider"]
    assert len(guider) == 1 and guider[0]["inputs"]["start_percent"] == 0.3
    assert guider[0]["inputs"]["scale_2"] == 2.0 and guider[0]["inputs"]["end_percent"] == 1.0
    assert graph("hybrid", 2.0, 0, "a red square", 1, 2, "h.safetensors")["13"]["inputs"]["start_percent"] == 0.0
    base = graph("base", 0.0, 0, "a red square", 1, 2, "h.safetensors", "", 0.3)
    assert not any(n["class_type"] == "GL_MultiModelGuider" for n in base.values())


def test_each_section_has_its_own_default_json():
    from bench.personalize import SECTION, json_path
    assert json_path(SECTION).name == "personalization.json"      # the main run's file, as before
    assert json_path("personalization_late") != json_path(SECTION)
    assert json_path("personalization_late").parent == json_path(SECTION).parent
