"""GL_SamplerCFGPP in the real host: λ↔ω identity, flow correctness, core agreement, NFEs, errors."""
import pytest
import torch

from hostutil import count_rows, run


@pytest.fixture(scope="module")
def cfgpp(host):
    return host.pack("guiders.cfgpp")


@pytest.fixture(scope="module")
def kernels(host):
    import importlib
    return importlib.import_module(host.module_name + ".kernels.cfgpp"), \
        importlib.import_module(host.module_name + ".kernels.coords")


def _omega_patch(patcher, sigmas, omegas):
    """Plain CFG with a per-step scale ω_t (through the cfg-function slot, in x − D space)."""
    table = [(float(s), float(w)) for s, w in zip(sigmas[:-1], omegas)]
    m = patcher.clone()

    def cfg_fn(args):
        s = float(args["sigma"].max())
        w = min(table, key=lambda sw: abs(sw[0] - s))[1]
        return args["uncond"] + w * (args["cond"] - args["uncond"])
    m.set_model_sampler_cfg_function(cfg_fn, disable_cfg1_optimization=True)
    return m


@pytest.mark.parametrize("arch", ["sd15_eps", "sd15_v", "sd3", "flux"])
def test_euler_cfgpp_equals_euler_cfg_with_per_step_omega(cfgpp, kernels, tiny, cond, arch):
    import comfy.samplers
    kern, coords_mod = kernels
    m = tiny(arch)
    pos, neg = cond(arch, 1), cond(arch, 2)
    sig = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "simple", 6)
    lam = 0.6
    kind = "flow" if arch in ("sd3", "flux") else "ve"
    omegas = kern.equivalent_cfg(sig, lam, coords_mod.Coords(kind))
    ours = run(m, pos, neg, lam, sampler=cfgpp.make_cfgpp_sampler("euler"), sigmas=sig)
    ref = run(_omega_patch(m, sig, omegas), pos, neg, 2.0, sampler="euler", sigmas=sig)
    torch.testing.assert_close(ours, ref, rtol=2e-4, atol=2e-4)


def test_flow_run_is_not_the_ve_form(cfgpp, kernels, tiny, cond):
    """On a flow model, the VE-only algebra (x' = D_λ + σ'/σ·(x − D_u)) gives a different sample."""
    import comfy.samplers
    kern, coords_mod = kernels
    m = tiny("flux")
    pos, neg = cond("flux", 1), cond("flux", 2)
    sig = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "simple", 6)
    ours = run(m, pos, neg, 0.6, sampler=cfgpp.make_cfgpp_sampler("euler"), sigmas=sig)
    wrong_omegas = kern.equivalent_cfg(sig, 0.6, coords_mod.Coords("ve"))
    wrong = run(_omega_patch(m, sig, wrong_omegas), pos, neg, 2.0, sampler="euler", sigmas=sig)
    assert (ours - wrong).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
def test_lambda_zero_is_unconditional_sampling(cfgpp, tiny, cond, arch):
    m = tiny(arch)
    neg = cond(arch, 2)
    ours = run(m, cond(arch, 1), neg, 0.0, sampler=cfgpp.make_cfgpp_sampler("euler"))
    uncond_only = run(m, neg, neg, 1.0, sampler="euler")
    torch.testing.assert_close(ours, uncond_only, rtol=1e-4, atol=1e-4)


def test_lambda_one_still_evaluates_the_uncond(cfgpp, tiny, cond):
    m, counter = count_rows(tiny("sd15_eps"))
    run(m, cond("sd15_eps", 1), cond("sd15_eps", 2), 1.0, sampler=cfgpp.make_cfgpp_sampler("euler"), steps=5, batch=2)
    assert counter["rows"] == 5 * 2 * 2                  # 5 steps × (cond + uncond) × batch 2
    m2, counter2 = count_rows(tiny("sd15_eps"))          # the flag was set on the run's copy only
    run(m2, cond("sd15_eps", 1), cond("sd15_eps", 2), 1.0, sampler="euler", steps=5, batch=2)
    assert counter2["rows"] == 5 * 2
    assert "disable_cfg1_optimization" not in tiny("sd15_eps").model_options


def test_dpmpp_2m_equals_core_on_eps(cfgpp, tiny, cond):
    m = tiny("sd15_eps")
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)
    ours = run(m, pos, neg, 0.7, sampler=cfgpp.make_cfgpp_sampler("dpmpp_2m"), steps=6)
    core = run(m, pos, neg, 0.7, sampler="dpmpp_2m_cfg_pp", steps=6)
    torch.testing.assert_close(ours, core, rtol=2e-4, atol=2e-4)


def test_euler_ancestral_equals_core_on_eps_and_reproduces(cfgpp, tiny, cond):
    m = tiny("sd15_eps")
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)
    sampler = cfgpp.make_cfgpp_sampler("euler_ancestral", eta=1.0, s_noise=1.0)
    a = run(m, pos, neg, 0.6, sampler=sampler, seed=5)
    torch.testing.assert_close(a, run(m, pos, neg, 0.6, sampler="euler_ancestral_cfg_pp", seed=5),
                               rtol=2e-4, atol=2e-4)
    assert torch.equal(a, run(m, pos, neg, 0.6, sampler=sampler, seed=5))
    assert (a - run(m, pos, neg, 0.6, sampler=sampler, seed=6)).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m", "dpmpp_2s_ancestral"])
@pytest.mark.parametrize("arch", ["sd15_v", "sd3", "flux"])
def test_every_solver_runs_finite_with_batch_and_reproduces(cfgpp, tiny, cond, name, arch):
    m, counter = count_rows(tiny(arch))
    sampler = cfgpp.make_cfgpp_sampler(name)
    a = run(m, cond(arch, 1), cond(arch, 2), 0.6, sampler=sampler, steps=4, batch=3, seed=2)
    assert a.shape[0] == 3 and torch.isfinite(a).all()
    evals = {"dpmpp_2s_ancestral": 2 * 3 + 1}.get(name, 4)
    if name == "dpmpp_2s_ancestral" and arch in ("sd3", "flux"):
        evals -= 1                      # flow schedules start at σ = 1 (σ̃ = ∞): that step is first order
    assert counter["rows"] == evals * 2 * 3
    assert torch.equal(a, run(m, cond(arch, 1), cond(arch, 2), 0.6, sampler=sampler, steps=4, batch=3, seed=2))


def test_bad_input_errors_are_clear(cfgpp, tiny, cond):
    m = tiny("sd15_eps")
    with pytest.raises(ValueError, match=r"GL_SamplerCFGPP.*cfg = 7.*λ"):
        run(m, cond("sd15_eps", 1), cond("sd15_eps", 2), 7.0, sampler=cfgpp.make_cfgpp_sampler("euler"))
    import comfy_extras.nodes_custom_sampler as custom
    g = custom.Guider_Basic(m)                        # positive only: no uncond for CFG++ to re-noise with
    g.set_conds(cond("sd15_eps", 1))
    with pytest.raises(ValueError, match="GL_SamplerCFGPP.*negative"):
        run(m, None, None, 0.6, sampler=cfgpp.make_cfgpp_sampler("euler"), guider=g)
    with pytest.raises(ValueError, match="GL_SamplerCFGPP.*sampler_name"):
        cfgpp.make_cfgpp_sampler("heun")
