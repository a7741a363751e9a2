"""demo/train_classifier.py: a short run lowers the loss, writes a safetensors file with the metadata the loader
reads, and the same seed gives the same weights."""
from __future__ import annotations

import json

import torch
from safetensors import safe_open


def _run(out, steps=6):
    from demo import train_classifier
    return train_classifier.main(["--steps", str(steps), "--batch", "16", "--out", str(out), "--threads", "1"])


def test_short_run_writes_a_loadable_reproducible_classifier(host, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    result = _run(a)
    _run(b)
    assert set(result["accuracy"]) == {"clean", "noise_0.05"}
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        meta = fa.metadata()
        assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())
    assert meta["architecture"] == "gl_small_cnn" and len(json.loads(meta["labels"])) == 36
    assert json.loads(meta["training"])["steps"] == 6 and "guidance" in meta["purpose"]
    c = host.pack("guiders.classifier").load_classifier(a)
    assert c.labels[7] == "green square" and c.input_size == (32, 32)
