"""demo/train.py as a user runs it (a subprocess on the real ComfyUI, one thread): 30 steps at batch 8 on 32×32
scenes lower the loss on the fixed probe batch, write a final and a weak checkpoint (sharing the text encoder) that
load through guiders/demo_model.py with the training facts in their metadata, and two runs with the same seed give
identical weights."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _train(out: Path, *args: str) -> str:
    import host as host_module
    env = {**os.environ, "GL_COMFYUI_ROOT": str(host_module.comfy_root())}
    cmd = [sys.executable, str(REPO / "demo" / "train.py"), "--out", str(out), "--threads", "1", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _summary(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("summary "))
    return json.loads(line[len("summary "):])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "demo_model.safetensors"
    stdout = _train(out, "--steps", "30", "--batch", "8", "--lr", "1e-3", "--warmup", "5", "--weak-at", "10",
                    "--log-every", "10", "--probe-every", "0", "--probe-batch", "8", "--seed", "7")
    return out, stdout


def test_thirty_steps_lower_the_probe_loss(run):
    _out, stdout = run
    summary = _summary(stdout)
    assert summary["steps_done"] == 30 and not summary["stopped_early"]
    (step0, raw0, ema0), (step1, raw1, ema1) = summary["probe"]
    assert (step0, step1) == (0, 30)
    assert all(math.isfinite(v) for v in (raw0, ema0, raw1, ema1))
    assert raw1 < 0.8 * raw0 and ema1 < raw0, summary["probe"]
    progress = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert len(progress) == 3 and all("loss" in line and "s/step" in line for line in progress)


def test_files_load_with_training_metadata(host, run):
    import torch
    dm = host.pack("guiders.demo_model")
    out, _stdout = run
    weak = out.with_name("demo_model_weak.safetensors")
    assert out.stat().st_size <= 25 * 10**6
    patcher, clip, vae = dm.load_demo_model(out)
    meta = patcher.model.demo_metadata
    assert meta["format"] == dm.FORMAT and meta["checkpoint"] == "final"
    assert (meta["train_seed"], meta["train_steps"], meta["world_size"], meta["world_seed"]) == ("7", "30", "32", "0")
    assert meta["git_commit"]  # HEAD (+dirty), or "unknown" outside a git checkout
    training, world = json.loads(meta["training"]), json.loads(meta["world"])
    assert training["batch"] == 8 and training["weights"] == "ema" and training["device"] == "cpu"
    assert world == {"seed": 0, "size": 32, "kind": "mixed", "split": "train", "caption_dropout": 0.1}
    assert json.loads(meta["config"])["unet"]["in_channels"] == 3
    weak_patcher, weak_clip, _vae = dm.load_demo_model(weak)
    assert weak_patcher.model.demo_metadata["checkpoint"] == "weak"
    assert weak_patcher.model.demo_metadata["train_steps"] == "10"
    assert training["freeze_text_at"] == 10          # default: frozen at the weak checkpoint ...
    final_sd, weak_sd = dm.state_dict(patcher, clip), dm.state_dict(weak_patcher, weak_clip)
    text_keys = [k for k in final_sd if k.startswith(dm.TEXT_PREFIX)]
    unet_keys = [k for k in final_sd if k.startswith(dm.UNET_PREFIX)]
    assert all(torch.equal(final_sd[k], weak_sd[k]) for k in text_keys)   # ... so both share one text encoder
    assert not all(torch.equal(final_sd[k], weak_sd[k]) for k in unet_keys)
    import nodes
    with torch.inference_mode():
        (cond,) = nodes.NODE_CLASS_MAPPINGS["CLIPTextEncode"]().encode(clip, "a red circle")
    assert cond[0][0].shape[-1] == json.loads(meta["config"])["text"]["hidden_size"]


def test_same_seed_same_weights(tmp_path):
    import safetensors.torch
    import torch
    files = []
    for name in ("a", "b"):
        out = tmp_path / name / "m.safetensors"
        _train(out, "--steps", "3", "--batch", "4", "--weak-at", "0", "--probe-batch", "4", "--seed", "3")
        files.append(safetensors.torch.load_file(str(out)))
    assert files[0].keys() == files[1].keys()
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])


def test_lowpass_loss_adds_the_low_frequency_image_error(tmp_path):
    """Same seed and probe batch: the probe loss at step 0 grows by the extra term, which is recorded in the file's
    metadata; a block size that does not divide the image is refused."""
    probes = {}
    for w in ("0", "1"):
        stdout = _train(tmp_path / w / "m.safetensors", "--steps", "1", "--batch", "4", "--weak-at", "0",
                        "--probe-batch", "4", "--seed", "3", "--lowpass-weight", w)
        probes[w] = _summary(stdout)["probe"][0][1]
    assert probes["1"] > probes["0"] * 1.01, probes
    import safetensors
    with safetensors.safe_open(str(tmp_path / "1" / "m.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["training"])["lowpass_weight"] == 1.0
    import host as host_module
    env = {**os.environ, "GL_COMFYUI_ROOT": str(host_module.comfy_root())}
    proc = subprocess.run([sys.executable, str(REPO / "demo" / "train.py"), "--lowpass-pool", "5"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=str(REPO))
    assert proc.returncode == 2 and "--lowpass-pool" in proc.stderr
