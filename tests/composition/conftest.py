"""Composition tier: boots the real ComfyUI before collection (the test modules import comfy at module level), as
tests/guiders/conftest.py does (host.boot also sets torch.set_num_threads(1)); the tiny-model fixtures live in
tests/conftest.py."""
from __future__ import annotations

import host as _host

_host.boot()
