"""Shared fixtures. Kernel tests import `kernels` directly; every other tier goes through the real host."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# appended (not prepended) so ComfyUI's own top-level `nodes` module always wins over our nodes/ package
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def host():
    import host as host_module
    return host_module.boot()
