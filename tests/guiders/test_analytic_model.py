"""The analytic Gaussian-mixture model is exact in the real host (later tiers use it as an oracle)."""
import pytest
import torch

from analytic import build_gmm_model, component_cond
from hostutil import run


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_denoiser_is_exact_posterior_mean(host, kind):
    means, stds, weights = [-2.0, 3.0], [0.5, 1.0], [0.3, 0.7]
    patcher, net = build_gmm_model(means, stds, weights, kind=kind)
    x = torch.randn(3, 4, 2, 2)
    sigma = torch.full((3,), 0.7)
    ms = patcher.get_model_object("model_sampling")
    x_state = ms.noise_scaling(sigma.view(-1, 1, 1, 1), x, torch.zeros_like(x))  # a valid state at σ
    mask = component_cond(None, 2)[0][0].expand(3, 1, 2)
    with torch.inference_mode():
        out = patcher.model.apply_model(x_state, sigma, c_crossattn=mask, transformer_options={"sigmas": sigma})
    expect = net.posterior_mean(x_state.double(), sigma.double(), torch.ones(3, 2, dtype=torch.float64))
    torch.testing.assert_close(out.double(), expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_sampling_one_component_hits_its_law(host, kind):
    means, stds, weights = [-2.0, 3.0], [0.5, 1.0], [0.5, 0.5]
    patcher, _ = build_gmm_model(means, stds, weights, kind=kind)
    out = run(patcher, component_cond(1, 2), component_cond(None, 2), 1.0, steps=60, batch=4000, size=1,
              channels=4, sampler="euler")
    vals = out.double().flatten()
    # the VE schedule starts at a finite σ_max from zero-mean noise; the exact ODE map of N(m, s²) then ends at
    # mean m·(1 − s/√(s² + σ_max²)) (flow models start at σ = 1, exactly the prior)
    s_max = float(patcher.get_model_object("model_sampling").sigma_max)
    expect = 3.0 if kind == "flow" else 3.0 * (1 - 1.0 / (1.0 + s_max ** 2) ** 0.5)
    assert abs(vals.mean().item() - expect) < 0.05
    assert abs(vals.std().item() - 1.0) < 0.05
