"""demo/train_agd.py as a user runs it (a subprocess on the real ComfyUI, one thread): a small collection, then the
shipped demo adapter continued for two steps with the relative objective writes a file that loads, keeps the
architecture, adds the steps to the count, records the objective and keeps the earlier round under `rounds`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_resume_two_relative_steps_writes_a_loadable_file(tmp_path, host):
    import host as host_module
    out = tmp_path / "a.safetensors"
    shipped_path = REPO / "demo" / "weights" / "demo_agd.safetensors"
    env = {**os.environ, "GL_COMFYUI_ROOT": str(host_module.comfy_root())}
    cmd = [sys.executable, str(REPO / "demo" / "train_agd.py"), "--prompts", "2", "--images", "1",
           "--sample-steps", "2", "--steps", "2", "--batch", "4", "--threads", "1", "--objective", "relative",
           "--resume", str(shipped_path), "--train-seed", "3", "--output-dir", str(tmp_path / "out"),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ag = host.pack("guiders.agd")
    shipped, trained = ag.load(shipped_path), ag.load(out)
    assert trained.config == shipped.config and trained.sites == shipped.sites
    assert trained.info["steps"] == shipped.info["steps"] + 2 and trained.info["seed"] == 3
    assert trained.info["objective"] == "relative" and trained.info["prompts"] == 2
    assert trained.info["rounds"][-1]["steps"] == shipped.info["steps"]
    assert trained.info["rounds"][-1]["loss_history"] == shipped.info["loss_history"]
    history = trained.info["loss_history"]
    assert [row[0] for row in history] == [0, 1, 2] and all(len(row) == 3 and row[2] > 0 for row in history)
    sd_s, sd_t = shipped.modules.state_dict(), trained.modules.state_dict()
    assert any(not (sd_t[k] == sd_s[k]).all() for k in sd_s), "two training steps changed no weight"
    assert trained.info["command"] == ("python demo/train_agd.py --prompts 2 --images 1 --sample-steps 2 --steps 2 "
                                       "--batch 4 --threads 1 --objective relative --resume "
                                       "demo/weights/demo_agd.safetensors --train-seed 3")   # no local paths
    json.dumps(trained.info)                      # the metadata stays JSON
