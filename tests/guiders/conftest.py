"""Host tier: boots the real ComfyUI before collection (test modules import comfy at module level)."""
from __future__ import annotations

import host as _host
import pytest

_host.boot()


@pytest.fixture(scope="session")
def ag(host):
    """guiders.adaptive (GL_AdaptiveGuidance)."""
    return host.pack("guiders.adaptive")


@pytest.fixture(scope="session")
def nfe(host):
    """guiders.nfe (the pack's NFE counter)."""
    return host.pack("guiders.nfe")


@pytest.fixture(scope="session")
def er(host):
    """guiders.erasure (GL_ConceptErase, GL_SaveErasureLoRA)."""
    return host.pack("guiders.erasure")


@pytest.fixture(scope="module")
def classifier(host, tmp_path_factory):
    """A tiny random-weight classifier file (test_classifier_host._save_small_cnn) loaded as GL_ClassifierLoader
    loads it (inside inference mode, as a node executes)."""
    import torch
    from test_classifier_host import _save_small_cnn
    path = tmp_path_factory.mktemp("clf") / "tiny.safetensors"
    _save_small_cnn(path)
    with torch.inference_mode():
        return host.pack("guiders.classifier").load_classifier(path)
