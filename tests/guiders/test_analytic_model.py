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


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_fast_timestep_matches_the_hosts_lookup(host, kind):
    """The analytic model's binary-search timestep returns the host's argmin index for every σ (schedule values,
    midpoints between table entries, random values, both ends out of range)."""
    import comfy.model_sampling
    import comfy.samplers
    patcher, _ = build_gmm_model([0.0], [1.0], [1.0], kind=kind)
    ms = patcher.get_model_object("model_sampling")
    assert ms.timestep.__func__ is not comfy.model_sampling.ModelSamplingDiscrete.timestep
    table = ms.log_sigmas
    sigmas = torch.cat([
        ms.sigmas, ((table[1:] + table[:-1]) / 2).exp(),                       # on and between the table's entries
        torch.exp(torch.empty(20000).uniform_(float(table[0]) - 2, float(table[-1]) + 2,
                                              generator=torch.Generator().manual_seed(3))),
        comfy.samplers.calculate_sigmas(ms, "karras", 1000)[:-1],
        torch.tensor([1e-6, 1e3])])
    reference = comfy.model_sampling.ModelSamplingDiscrete.timestep(ms, sigmas)
    assert torch.equal(ms.timestep(sigmas), reference)
    even = sigmas[: sigmas.numel() // 2 * 2]                                    # a 2-D σ keeps its shape
    assert torch.equal(ms.timestep(even.view(2, -1)), reference[: even.numel()].view(2, -1))
