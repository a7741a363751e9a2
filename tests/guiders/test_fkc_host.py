"""GL_SamplerFKC / GL_FKCGuider in the real host: exactness on the analytic model, plumbing on tiny real
architectures, batching (no loop over particles), determinism, errors, interruption."""
import importlib
import logging
import math
import sys
from pathlib import Path

import pytest
import torch

from analytic import build_gmm_model, component_cond
from hostutil import count_rows, run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from gaussian_targets import Gaussian1D, exact_fkc_law, target_1d  # noqa: E402

# cond = component 0 ~ N(2, 0.5²), negative = component 1 ~ N(0, 1.5²): methods.md A.2's CFG case
MEANS, STDS = [2.0, 0.0], [0.5, 1.5]
EXPERTS = [Gaussian1D(2, 0.25), Gaussian1D(0, 2.25)]


@pytest.fixture(scope="module")
def fkc(host):
    return host.pack("guiders.fkc")


@pytest.fixture(scope="module")
def smc(host):
    return importlib.import_module(host.module_name + ".kernels.smc")


def _gmm(kind):
    patcher, _net = build_gmm_model(MEANS, STDS, [0.5, 0.5], kind=kind)
    return patcher


def _sigmas(patcher, steps, scheduler="karras"):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), scheduler, steps)


def _moments(out):
    v = out.double().flatten()
    return v.mean().item(), v.var().item()


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_cfg_particles_follow_the_exact_law_and_unweighted_is_biased(fkc, smc, kind):
    """CFG β = 3 on two Gaussians (2 images × K = 8192 particles × 4 elements, as many as the kernel tests use:
    the SMC bias shrinks like 1/K): the particles match the N → ∞ law of the same discretised chain (computed from
    the kernels; VE) and the closed-form target; with the weights off the same sampler is far too narrow.
    The weighted moments pool 4 seeds: one run's mean and variance ratio scatter by about ±0.015 and ±0.045 around
    the law (seeds 0–5 on one machine), as wide as the tolerances, so a single seed passed or failed with the
    CPU's rounding; pooled, the scatter halves."""
    from kernels.coords import Coords
    patcher = _gmm(kind)
    sig = _sigmas(patcher, 200, "karras" if kind == "eps" else "simple")
    tm, tv = target_1d(EXPERTS, (3.0, -2.0))
    common = dict(sigmas=sig, batch=2, size=1, channels=4)
    sampler = fkc.FKCSampler(particles=8192, clamp=0.0, output="all")
    m, v = _moments(torch.cat([run(patcher, component_cond(0, 2), component_cond(1, 2), 3.0, sampler=sampler,
                                   seed=seed, **common) for seed in range(4)]))
    if kind == "eps":
        law_m, law_c = exact_fkc_law(EXPERTS, (3.0, -2.0), [float(s) for s in sig], smc=smc, coords=Coords("ve"),
                                     propagation="ddpm")
        assert abs(m - float(law_m[0])) < 0.02 and abs(v / float(law_c[0, 0]) - 1) < 0.06, (m, v, law_m, law_c)
    assert abs(m - tm) < 0.03 and abs(v / tv - 1) < 0.1, (m, v, tm, tv)
    plain = fkc.FKCSampler(particles=8192, clamp=0.0, temperature=0.0, output="all")
    pm, pv = _moments(run(patcher, component_cond(0, 2), component_cond(1, 2), 3.0, sampler=plain, **common))
    assert pv / tv - 1 < -0.2, (pv, tv)           # unweighted: far too narrow (kernel table: −35 %)
    assert abs(v / tv - 1) < abs(pv / tv - 1) / 3


def test_product_mode_on_flow_starts_below_one_and_hits_its_target(fkc, smc, caplog):
    patcher = _gmm("flow")
    g = fkc.FKCGuider(patcher, "product")
    g.set_expert_conds(positive=component_cond(0, 2), positive_2=component_cond(1, 2))
    sig = _sigmas(patcher, 200, "simple")
    tm, tv = target_1d(EXPERTS, (1.0, 1.0))
    with caplog.at_level(logging.INFO, logger="guidance_lab"):
        out = run(patcher, None, None, 1.0, guider=g, sampler=fkc.FKCSampler(particles=8192, clamp=0.0,
                                                                             output="all"),
                  sigmas=sig, batch=2, size=1, channels=4)
    m, v = _moments(out)
    assert abs(m - tm) < 0.03 and abs(v / tv - 1) < 0.1, (m, v, tm, tv)
    assert any("starts at σ = 0.995" in r.message for r in caplog.records)


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
def test_one_particle_deterministic_step_equals_core_euler(fkc, tiny, cond, arch):
    """K = 1 with the deterministic step is core Euler with CFG: noise scaling, layout and unscaling are the host's."""
    m = tiny(arch)
    pos, neg = cond(arch, 1), cond(arch, 2)
    ours = run(m, pos, neg, 4.0, sampler=fkc.FKCSampler(particles=1, propagation="euler"), steps=5, batch=2)
    ref = run(m, pos, neg, 4.0, sampler="euler", steps=5, batch=2)
    torch.testing.assert_close(ours, ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
def test_fkc_guider_cfg_mode_is_cfg_for_core_samplers(fkc, tiny, cond, arch):
    m = tiny(arch)
    pos, neg = cond(arch, 1), cond(arch, 2)
    g = fkc.FKCGuider(m, "cfg", 3.0)
    g.set_expert_conds(positive=pos, negative=neg)
    ours = run(m, None, None, 1.0, guider=g, sampler="euler", steps=4, batch=2)
    ref = run(m, pos, neg, 3.0, sampler="euler", steps=4, batch=2)
    torch.testing.assert_close(ours, ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
@pytest.mark.parametrize("mode", ["cfg", "product", "composition", "annealing"])
def test_every_mode_runs_batched_and_deterministic(fkc, tiny, cond, arch, mode):
    """K = 4 particles × batch 2 × experts rows per step in ONE model call per step; same seed, same result."""
    m, counter = count_rows(tiny(arch))
    g = fkc.FKCGuider(m, mode, 2.0)
    g.set_expert_conds(positive=cond(arch, 1), positive_2=cond(arch, 3), negative=cond(arch, 2))
    sampler = fkc.FKCSampler(particles=4)
    a = run(m, None, None, 1.0, guider=g, sampler=sampler, steps=5, batch=2, seed=7)
    experts = len(fkc.MODE_EXPERTS[mode])
    assert counter["rows"] == 5 * 2 * 4 * experts
    assert counter["calls"] == 5
    assert a.shape[0] == 2 and torch.isfinite(a).all()
    b = run(m, None, None, 1.0, guider=g, sampler=fkc.FKCSampler(particles=4), steps=5, batch=2, seed=7)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = run(m, None, None, 1.0, guider=g, sampler=fkc.FKCSampler(particles=4), steps=5, batch=2, seed=8)
    assert (a - c).abs().max() > 1e-3
    assert sampler.last_result.weighted_steps == 4          # 5 steps: the last one (to σ = 0) is not weighted


def test_cfg_guider_counts_and_output_all(fkc, tiny, cond):
    m, counter = count_rows(tiny("sd15_eps"))
    sampler = fkc.FKCSampler(particles=3, output="all", resample="ess")
    out = run(m, cond("sd15_eps", 1), cond("sd15_eps", 2), 5.0, sampler=sampler, steps=4, batch=2)
    assert out.shape[0] == 6
    assert counter["rows"] == 4 * 2 * 3 * 2 and counter["calls"] == 4


def test_particles_keep_their_image_conditioning(fkc, host):
    """A conditioning batch (one prompt per image) reaches every particle of its own image."""
    patcher, _ = build_gmm_model([-3.0, 3.0], [0.3, 0.3], [0.5, 0.5], kind="eps")
    import comfy_extras.nodes_custom_sampler as cs
    two = [[torch.cat([component_cond(0, 2)[0][0], component_cond(1, 2)[0][0]]), {}]]
    basic = cs.Guider_Basic(patcher)
    basic.set_conds(two)
    out = run(patcher, None, None, 1.0, guider=basic, sampler=fkc.FKCSampler(particles=4, output="all"), steps=30,
              batch=2, size=1, channels=4)
    first, second = out[:4].mean().item(), out[4:].mean().item()
    assert first < -2.5 and second > 2.5, (first, second)


def test_inpainting_mask_keeps_the_unmasked_latent(fkc, tiny, cond):
    import comfy.samplers
    m = tiny("sd15_eps")
    g = comfy.samplers.CFGGuider(m)
    g.set_conds(cond("sd15_eps", 1), cond("sd15_eps", 2))
    g.set_cfg(3.0)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 16, 16, generator=gen)
    latent = torch.randn(2, 3, 16, 16, generator=gen) * 0.5
    mask = torch.ones(2, 1, 16, 16)
    mask[..., :8] = 0.0                                    # left half kept
    sig = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "simple", 4)
    with torch.inference_mode():
        out = g.sample(noise, latent, fkc.FKCSampler(particles=3), sig, denoise_mask=mask, seed=0, disable_pbar=True)
    torch.testing.assert_close(out[..., :8], latent[..., :8], rtol=1e-4, atol=1e-4)
    assert (out[..., 8:] - latent[..., 8:]).abs().mean() > 0.05


def test_errors_name_the_node_and_the_fix(fkc, tiny, cond):
    with pytest.raises(ValueError, match="GL_SamplerFKC.*deterministic.*ddpm"):
        fkc.FKCSampler(particles=4, propagation="euler")
    with pytest.raises(ValueError, match="GL_SamplerFKC.*particles = 0"):
        fkc.FKCSampler(particles=0)
    with pytest.raises(ValueError, match="GL_SamplerFKC.*start_percent"):
        fkc.FKCSampler(start_percent=0.8, end_percent=0.2)
    m = tiny("sd15_eps")
    g = fkc.FKCGuider(m, "product")
    with pytest.raises(ValueError, match="GL_FKCGuider.*'product' needs a second prompt"):
        g.set_expert_conds(positive=cond("sd15_eps", 1))
    with pytest.raises(ValueError, match="GL_FKCGuider.*'composition' needs.*negative"):
        fkc.FKCGuider(m, "composition").set_expert_conds(positive=cond("sd15_eps", 1),
                                                         positive_2=cond("sd15_eps", 2))
    with pytest.raises(ValueError, match="GL_FKCGuider.*beta > 0"):
        fkc.FKCGuider(m, "annealing", 0.0)
    import comfy_extras.nodes_custom_sampler as cs
    dual = cs.Guider_DualCFG(m)
    dual.set_conds(cond("sd15_eps", 1), cond("sd15_eps", 3), cond("sd15_eps", 2))
    dual.set_cfg(3.0, 2.0)
    with pytest.raises(ValueError, match="GL_SamplerFKC.*Guider_DualCFG.*GL_FKCGuider"):
        run(m, None, None, 1.0, guider=dual, sampler=fkc.FKCSampler(particles=2), steps=3)


def test_one_particle_and_no_negative_are_logged_fallbacks(fkc, tiny, cond, caplog):
    import comfy_extras.nodes_custom_sampler as cs
    m = tiny("sd15_eps")
    with caplog.at_level(logging.WARNING, logger="guidance_lab"):
        out = run(m, cond("sd15_eps", 1), cond("sd15_eps", 2), 3.0, sampler=fkc.FKCSampler(particles=1), steps=3)
    assert torch.isfinite(out).all()
    assert any("particles = 1" in r.message and "no correction" in r.message for r in caplog.records)
    basic = cs.Guider_Basic(m)
    basic.set_conds(cond("sd15_eps", 1))
    sampler = fkc.FKCSampler(particles=3)
    run(m, None, None, 1.0, guider=basic, sampler=sampler, steps=4)
    assert float(sampler.last_result.log_w.abs().max()) == 0.0      # target q(x|c): every weight is 1


def test_interrupt_stops_the_run(fkc, tiny, cond):
    import comfy.model_management as mm
    m = tiny("sd15_eps")
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(m, cond("sd15_eps", 1), cond("sd15_eps", 2), 3.0, sampler=fkc.FKCSampler(particles=2), steps=3)
    finally:
        mm.interrupt_current_processing(False)


def test_progress_callback_sees_every_step(fkc, tiny, cond):
    import comfy.samplers
    m = tiny("flux")
    g = comfy.samplers.CFGGuider(m)
    g.set_conds(cond("flux", 1), cond("flux", 2))
    g.set_cfg(2.0)
    seen = []
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sig = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "simple", 5)
    with torch.inference_mode():
        g.sample(noise, torch.zeros_like(noise), fkc.FKCSampler(particles=2), sig, seed=0, disable_pbar=True,
                 callback=lambda i, d, x, total: seen.append((i, tuple(d.shape), total)))
    assert [s[0] for s in seen] == list(range(5)) and all(s[1][0] == 2 and s[2] == 5 for s in seen)
    assert not math.isnan(seen[-1][0])
