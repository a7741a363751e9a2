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
