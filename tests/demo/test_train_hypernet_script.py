"""demo/train_hypernet.py as a user runs it (a subprocess on the real ComfyUI, one thread): continuing the shipped
demo hypernetwork for two steps writes a file that loads, keeps the architecture, adds the steps to the count and
keeps the earlier round's record under `rounds`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_resume_two_steps_writes_a_loadable_file(tmp_path, host):
    import host as host_module
    out = tmp_path / "h.safetensors"
    env = {**os.environ, "GL_COMFYUI_ROOT": str(host_module.comfy_root())}
    cmd = [sys.executable, str(REPO / "demo" / "train_hypernet.py"), "--resume", "--steps", "2", "--threads", "1",
           "--seed", "5", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    hn = host.pack("guiders.hypernet")
    shipped, trained = hn.load(REPO / "demo" / "weights" / "demo_hypernet.safetensors"), hn.load(out)
    assert trained.module.config == shipped.module.config and trained.layers == shipped.layers
    assert [t.key for t in trained.targets] == [t.key for t in shipped.targets]
    assert trained.info["steps"] == shipped.info["steps"] + 2 and trained.info["seed"] == 5
    assert trained.info["rounds"][-1]["steps"] == shipped.info["steps"]
    assert trained.info["command"].startswith("python demo/train_hypernet.py --resume")
    history = trained.info["loss_history"]
    assert [row[0] for row in history][-1] == 2 and all(v == v for row in history for v in row[1:])
    changed = [k for k, v in trained.module.state_dict().items()
               if not k.startswith("project.") and not (v == shipped.module.state_dict()[k]).all()]
    assert changed, "two training steps changed no weight"
    json.dumps(trained.info)                      # the metadata stays JSON
