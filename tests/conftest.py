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


@pytest.fixture(scope="session")
def demo_model(host):
    """The shipped demo model: (ModelPatcher, CLIP, VAE) — an SD1-style EPS UNet with its own CLIP."""
    dm = host.pack("guiders.demo_model")
    return dm.load_demo_model(REPO / "demo" / "weights" / "demo_model.safetensors")


@pytest.fixture(scope="session")
def clip64(host):
    """A random SD1-style CLIP whose states are 64 wide (the tiny SD1.5 UNets' context width)."""
    from demo import model_config
    dm = host.pack("guiders.demo_model")
    cfg = model_config.model_config()
    cfg["text"].update(hidden_size=64, intermediate_size=128, num_attention_heads=2, projection_dim=64)
    cfg["unet"]["context_dim"] = 64
    return dm.build_demo_model(cfg, 3)[1]


# tiny random-weight models of the real architectures, shared by the host tiers (guiders/, composition/)
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
