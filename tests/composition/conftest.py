"""Composition tier: boots the real ComfyUI before collection (the test modules import comfy at module level), as
tests/guiders/conftest.py does (host.boot also sets torch.set_num_threads(1)); the same tiny-model fixtures."""
from __future__ import annotations

import host as _host
import pytest

_host.boot()


@pytest.fixture(scope="session")
def tiny(host):
    """tiny(arch, seed=0) -> ModelPatcher of a tiny random-weight model (cached per arch/seed)."""
    builder = host.pack("guiders.tiny_models")
    cache = {}

    def get(arch, seed=0):
        if (arch, seed) not in cache:
            cache[(arch, seed)] = builder.build_model(arch, seed)
        return cache[(arch, seed)]
    return get


@pytest.fixture(scope="session")
def text_model(host):
    """text_model(family) -> (ModelPatcher, CLIP): a tiny SDXL, SD3 or Flux model with the host's own text
    encoder classes shrunk to match (cached per family)."""
    builder = host.pack("guiders.tiny_models")
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = builder.build_text_model(family)
        return cache[family]
    return get
