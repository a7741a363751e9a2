"""Host tier: boots the real ComfyUI before collection (test modules import comfy at module level)."""
from __future__ import annotations

import host as _host
import pytest

_host.boot()


@pytest.fixture(scope="session")
def tiny(host):
    """tiny(arch, seed=0) -> ModelPatcher (cached per arch/seed)."""
    builder = host.pack("guiders.tiny_models")
    cache = {}

    def get(arch, seed=0):
        if (arch, seed) not in cache:
            cache[(arch, seed)] = builder.build_model(arch, seed)
        return cache[(arch, seed)]
    return get


@pytest.fixture(scope="session")
def cond(host):
    builder = host.pack("guiders.tiny_models")
    return builder.build_conditioning


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
