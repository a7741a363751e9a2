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


def test_basis_from_prototype_fits_then_end_to_end(tmp_path, host):
    """--basis: prototypes chosen by the shipped network's encoder, fitted into the --fits collection (batched),
    a basis-decoder network built from them and trained one step end to end; the file loads and records the
    prototypes, and a second run reuses the fits."""
    import host as host_module
    out, fits = tmp_path / "b.safetensors", tmp_path / "fits.safetensors"
    env = {**os.environ, "GL_COMFYUI_ROOT": str(host_module.comfy_root())}
    cmd = [sys.executable, str(REPO / "demo" / "train_hypernet.py"), "--resume", "--basis", "2", "--basis-pool", "6",
           "--fits", str(fits), "--fit-steps", "2", "--fit-images", "4", "--fit-parallel", "2", "--steps", "1",
           "--subjects-per-step", "1", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    hn, ht = host.pack("guiders.hypernet"), host.pack("guiders.hypernet_train")
    net, collection = hn.load(out), ht.load_fits(fits)
    basis = net.info["rounds"][-1]["basis"]
    assert net.module.config["decoder"] == "basis" and net.module.config["basis_size"] == len(basis["prototypes"])
    assert sorted(collection["B"]) == sorted(basis["prototypes"]) and basis["temperature"] == 0.02
    assert net.info["loss_history"][-1][0] == 1 and net.info["command"].startswith("python demo/train_hypernet.py")
    again = subprocess.run([*cmd[:-2], "--steps", "0", "--out", str(tmp_path / "c.safetensors")], capture_output=True,
                           text=True, env=env, timeout=600, cwd=str(REPO))
    assert again.returncode == 0 and "fitted" not in again.stdout + again.stderr, again.stderr[-2000:]
    json.dumps(net.info)
