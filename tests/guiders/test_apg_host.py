"""GL_APG in the real host on tiny EPS / V / flow models."""
import pytest
import torch

from hostutil import run

ARCHS = ["sd15_eps", "sd15_v", "sd3", "flux"]


@pytest.fixture(scope="module")
def apg(host):
    return host.pack("guiders.apg")


@pytest.mark.parametrize("arch", ARCHS)
def test_neutral_settings_equal_plain_cfg(apg, tiny, cond, arch):
    m = tiny(arch)
    pos, neg = cond(arch, 1), cond(arch, 2)
    plain = run(m, pos, neg, 6.0)
    patched = apg.patch_apg(m, eta=1.0, norm_threshold=0.0, momentum=0.0)
    torch.testing.assert_close(run(patched, pos, neg, 6.0), plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
def test_default_settings_change_the_result_and_cfg1_is_noop(apg, tiny, cond, arch):
    m = tiny(arch)
    pos, neg = cond(arch, 1), cond(arch, 2)
    patched = apg.patch_apg(m, eta=0.0, norm_threshold=1.0, momentum=-0.5)
    assert (run(patched, pos, neg, 6.0) - run(m, pos, neg, 6.0)).abs().max() > 1e-3
    assert torch.equal(run(patched, pos, neg, 1.0), run(m, pos, neg, 1.0))


def test_patch_leaves_input_model_untouched(apg, tiny):
    m = tiny("sd15_eps")
    before = list(m.model_options.get("sampler_pre_cfg_function", []))
    patched = apg.patch_apg(m)
    assert m.model_options.get("sampler_pre_cfg_function", []) == before
    assert len(patched.model_options["sampler_pre_cfg_function"]) == len(before) + 1
    assert patched is not m


def test_two_runs_identical_no_leaked_momentum(apg, tiny, cond):
    m = apg.patch_apg(tiny("sd15_eps"), eta=0.0, norm_threshold=2.0, momentum=-0.7)
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)
    first = run(m, pos, neg, 8.0, steps=6)
    assert torch.equal(first, run(m, pos, neg, 8.0, steps=6))


def test_momentum_matters_and_heun_advances_once_per_step(apg, tiny, cond):
    base = tiny("sd15_eps")
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)
    no_mom = run(apg.patch_apg(base, norm_threshold=0.0, momentum=0.0), pos, neg, 8.0, steps=6)
    mom = run(apg.patch_apg(base, norm_threshold=0.0, momentum=-0.5), pos, neg, 8.0, steps=6)
    assert (mom - no_mom).abs().max() > 1e-4
    # multi-evaluation samplers: the momentum buffer is keyed by the schedule index of σ, so it advances once
    # per schedule entry however many evaluations share it (DPM-2's midpoints map to their step; Heun's
    # corrector runs at σ_{i+1}, i.e. at the next entry)
    seen = []
    m = apg.patch_apg(base, norm_threshold=0.0, momentum=-0.5)
    state_mod = pytest.importorskip("importlib").import_module(apg.__name__.rsplit(".", 1)[0] + ".run_state")

    def spy(args):
        seen.append(state_mod.step_index(args["model_options"], args["sigma"]))
        return args["conds_out"]
    m.set_model_sampler_pre_cfg_function(spy)
    run(m, pos, neg, 8.0, steps=4, sampler="dpm_2")
    assert seen == [0, 0, 1, 1, 2, 2, 3]           # last step: one evaluation (σ' = 0)
    seen.clear()
    run(m, pos, neg, 8.0, steps=4, sampler="heun")
    assert seen == [0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("node,widgets", [("CFGZeroStar", {}), ("RescaleCFG", {"multiplier": 0.7}),
                                          ("PerturbedAttentionGuidance", {"scale": 3.0})])
def test_stacks_with_core_post_cfg_nodes(apg, tiny, cond, node, widgets):
    import nodes
    core = nodes.NODE_CLASS_MAPPINGS[node]
    m = tiny("sd15_eps")
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)

    def apply_core(model):
        out = core().patch(model, **widgets) if hasattr(core, "patch") and not hasattr(core, "define_schema") \
            else core.execute(model, **widgets)
        return out[0] if isinstance(out, tuple) else out.result[0]
    ours = apg.patch_apg(m, eta=0.0, norm_threshold=1.0, momentum=0.0)
    both = apply_core(ours)
    r_ours, r_core, r_both = run(ours, pos, neg, 6.0), run(apply_core(m), pos, neg, 6.0), run(both, pos, neg, 6.0)
    assert (r_both - r_ours).abs().max() > 1e-4      # the core node acted
    assert (r_both - r_core).abs().max() > 1e-4      # and so did APG
    assert len(both.model_options["sampler_pre_cfg_function"]) == 1


def test_batch_with_different_prompts_equals_per_item_runs(apg, tiny, cond):
    m = apg.patch_apg(tiny("sd15_eps"), eta=0.0, norm_threshold=1.0, momentum=-0.5)
    p1, p2 = cond("sd15_eps", 11), cond("sd15_eps", 12)
    n = cond("sd15_eps", 13)
    pos = [[torch.cat([p1[0][0], p2[0][0]]), {}]]
    neg = [[torch.cat([n[0][0], n[0][0]]), {}]]
    both = run(m, pos, neg, 7.0, batch=2, seed=3)
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 3, 16, 16, generator=gen)
    import comfy.samplers
    sig = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "simple", 4)
    for i, p in enumerate((p1, p2)):
        g = comfy.samplers.CFGGuider(m)
        g.set_conds(p, n)
        g.set_cfg(7.0)
        with torch.inference_mode():
            single = g.sample(noise[i:i + 1], torch.zeros_like(noise[i:i + 1]), comfy.samplers.sampler_object("euler"),
                              sig, seed=3, disable_pbar=True)
        torch.testing.assert_close(both[i:i + 1], single, rtol=1e-4, atol=1e-4)


def test_video_latents_5d(apg, tiny):
    m = apg.patch_apg(tiny("sd15_eps"), eta=0.0, norm_threshold=3.0, momentum=0.0)
    hook = m.model_options["sampler_pre_cfg_function"][-1]
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 4, 3, 8, 8, generator=g)
    args = {"conds_out": [c, u], "conds": [[{}], [{}]], "cond_scale": 5.0, "sigma": torch.tensor([1.0, 1.0]),
            "model": m.model, "model_options": {}, "input": torch.zeros_like(c), "timestep": torch.tensor([1.0, 1.0])}
    out = hook(args)
    guided = u + 5.0 * (out[0] - u)
    kern = pytest.importorskip("importlib").import_module(apg.__name__.rsplit(".", 2)[0] + ".kernels.apg")
    torch.testing.assert_close(guided, kern.apg(c, u, 5.0, eta=0.0, norm_threshold=3.0), rtol=1e-4, atol=1e-4)
    for i in range(2):   # per-sample over all of C, T, H, W
        torch.testing.assert_close(guided[i:i + 1], kern.apg(c[i:i + 1], u[i:i + 1], 5.0, eta=0.0, norm_threshold=3.0),
                                   rtol=1e-4, atol=1e-4)


def test_window_outside_is_plain_cfg(apg, tiny, cond):
    m = tiny("sd3")
    pos, neg = cond("sd3", 1), cond("sd3", 2)
    # a window no step of a 4-step run falls into (σ in the model schedule between 0.999 and 0.9995 fractions)
    patched = apg.patch_apg(m, eta=0.0, norm_threshold=1.0, momentum=0.0, start_percent=0.9991, end_percent=0.9995)
    torch.testing.assert_close(run(patched, pos, neg, 5.0), run(m, pos, neg, 5.0))


def test_bad_input_errors_name_the_node(apg, tiny, cond):
    with pytest.raises(ValueError, match="GL_APG.*start_percent"):
        apg.patch_apg(tiny("sd15_eps"), start_percent=0.6, end_percent=0.4)
    with pytest.raises(ValueError, match="GL_APG.*momentum"):
        apg.patch_apg(tiny("sd15_eps"), momentum=1.5)
    m = apg.patch_apg(tiny("sd15_eps"))
    with pytest.raises(ValueError, match="GL_APG.*cfg = 0"):
        run(m, cond("sd15_eps", 1), cond("sd15_eps", 2), 0.0)
