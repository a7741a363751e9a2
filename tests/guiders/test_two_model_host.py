"""GL_MultiModelGuider's guider in the real host on tiny EPS and flow models."""
import pytest
import torch

from hostutil import run


@pytest.fixture(scope="module")
def tmg(host):
    return host.pack("guiders.two_model")


@pytest.fixture(scope="module")
def builder(host):
    return host.pack("guiders.tiny_models")


def _sigmas(m, steps):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "simple", steps)


def _one_step(m):
    """[σ_max, 0]: one Euler step to σ = 0 returns the guided denoised prediction at x = σ_max·noise."""
    return _sigmas(m, 1)


def _denoised(m, cond, sigmas, batch=2):
    """D(x; cond) of model m alone (CFG at 1 evaluates the cond only)."""
    return run(m, cond, cond, 1.0, sigmas=sigmas, batch=batch)


def _guider(tmg, m, mode, cfg, *, positive, negative=None, positive_2=None, **kw):
    g = tmg.MultiModelGuider(m, mode, cfg=cfg, **kw)
    g.set_conds(positive, negative, positive_2)
    return g


def _rows(nfe, g):
    rep = nfe.last_report(g.model_patcher)
    return rep.rows / rep.images / rep.steps


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
def test_cfg_mode_is_core_cfg_bit_for_bit(tmg, tiny, cond, arch):
    m = tiny(arch)
    plain = run(m, cond(arch, 1), cond(arch, 2), 4.0, batch=2)
    g = _guider(tmg, m, "cfg", 4.0, positive=cond(arch, 1), negative=cond(arch, 2))
    assert torch.equal(run(m, None, None, 4.0, batch=2, guider=g), plain)


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
def test_autoguidance_is_the_lerp_of_main_and_weak(tmg, tiny, cond, nfe, arch):
    main, weak = tiny(arch, 0), tiny(arch, 1)
    sig = _one_step(main)
    d_main, d_weak = _denoised(main, cond(arch, 1), sig), _denoised(weak, cond(arch, 1), sig)
    g = _guider(tmg, main, "autoguidance", 2.3, positive=cond(arch, 1), model_2=weak)
    out = run(main, None, None, 1.0, sigmas=sig, batch=2, guider=g)
    torch.testing.assert_close(out, d_weak + 2.3 * (d_main - d_weak), rtol=1e-4, atol=1e-4)
    assert _rows(nfe, g) == 2


def test_identical_guide_gives_the_conditional_prediction(tmg, tiny, builder, cond, nfe):
    arch = "sd15_eps"
    main = tiny(arch)
    cond_only = run(main, cond(arch, 1), cond(arch, 1), 1.0, batch=2)
    same = _guider(tmg, main, "autoguidance", 2.0, positive=cond(arch, 1), model_2=main)
    assert torch.equal(run(main, None, None, 1.0, batch=2, guider=same), cond_only)
    assert _rows(nfe, same) == 1                                     # one network: evaluated once
    twin = builder.build_model(arch, 0)                              # same weights, a separate network
    assert twin.model is not main.model
    g = _guider(tmg, main, "autoguidance", 2.0, positive=cond(arch, 1), model_2=twin)
    torch.testing.assert_close(run(main, None, None, 1.0, batch=2, guider=g), cond_only, rtol=1e-5, atol=1e-5)
    assert _rows(nfe, g) == 2


@pytest.mark.parametrize("mode, rows", [("cfg+autoguidance", 3), ("npo", 2), ("sine", 3), ("hybrid", 3)])
def test_each_mode_matches_its_formula_and_counts_its_rows(tmg, tiny, cond, nfe, mode, rows):
    arch = "flux"
    main, second = tiny(arch, 0), tiny(arch, 2)
    sig = _one_step(main)
    pos, neg, pos2 = cond(arch, 1), cond(arch, 2), cond(arch, 3)
    w, s2 = 4.0, {"cfg+autoguidance": 2.0, "sine": 0.3, "hybrid": 1.5, "npo": 1.0}[mode]
    g = _guider(tmg, main, mode, w, scale_2=s2, positive=pos, negative=neg, model_2=second,
                positive_2=pos2 if mode in ("sine", "hybrid") else None)
    out = run(main, None, None, 1.0, sigmas=sig, batch=2, guider=g)
    d_c, d_u = _denoised(main, pos, sig), _denoised(main, neg, sig)
    if mode == "cfg+autoguidance":
        d_bad = _denoised(second, pos, sig)
        expect = d_c + (w - 1) * (d_c - d_u) + (s2 - 1) * (d_c - d_bad)
    elif mode == "npo":
        d_neg = _denoised(second, neg, sig)                           # the negative really comes from model_2
        expect = d_neg + w * (d_c - d_neg)
    elif mode == "sine":
        d_ft = _denoised(second, pos2, sig)
        expect = d_u + w * ((1 - s2) * d_c + s2 * d_ft - d_u)
    else:
        d_p = _denoised(second, pos2, sig)
        expect = d_u + w * (d_c - d_u) + s2 * (d_p - d_c)
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)
    assert _rows(nfe, g) == rows


def test_window_drops_the_second_model_term_and_its_rows(tmg, tiny, cond, nfe):
    arch = "sd15_eps"
    main, second = tiny(arch, 0), tiny(arch, 2)
    pos, neg, pos2 = cond(arch, 1), cond(arch, 2), cond(arch, 3)
    steps = 4
    g = _guider(tmg, main, "sine", 5.0, scale_2=0.4, positive=pos, negative=neg, positive_2=pos2, model_2=second,
                end_percent=0.5)
    out = run(main, None, None, 1.0, steps=steps, batch=2, guider=g)
    rep = nfe.last_report(g.model_patcher)
    ms = main.get_model_object("model_sampling")
    inside = sum(float(s) >= float(ms.percent_to_sigma(0.5)) for s in _sigmas(main, steps)[:-1])
    assert 0 < inside < steps
    assert rep.rows == 2 * (3 * inside + 2 * (steps - inside))
    full = _guider(tmg, main, "sine", 5.0, scale_2=0.4, positive=pos, negative=neg, positive_2=pos2,
                   model_2=second)
    assert (run(main, None, None, 1.0, steps=steps, batch=2, guider=full) - out).abs().max() > 1e-5


def test_npo_with_a_hook_on_the_negative_equals_the_second_model(tmg, tiny, cond, host):
    import comfy.hooks
    arch = "sd15_eps"
    main, negative_model = tiny(arch, 0), tiny(arch, 3)
    pos, neg = cond(arch, 1), cond(arch, 2)
    hook = comfy.hooks.create_hook_model_as_lora(comfy.hooks.get_patch_weights_from_model(negative_model), None,
                                                 1.0, 0.0)
    hooked_neg = comfy.hooks.set_hooks_for_conditioning(neg, hook)
    sig = _sigmas(main, 3)
    before = {k: v.clone() for k, v in main.model.diffusion_model.state_dict().items()}
    via_hook = run(main, None, None, 1.0, sigmas=sig, batch=2,
                   guider=_guider(tmg, main, "npo", 5.0, positive=pos, negative=hooked_neg))
    via_model = run(main, None, None, 1.0, sigmas=sig, batch=2,
                    guider=_guider(tmg, main, "npo", 5.0, positive=pos, negative=neg, model_2=negative_model))
    torch.testing.assert_close(via_hook, via_model, rtol=1e-4, atol=1e-4)
    plain = run(main, pos, neg, 5.0, sigmas=sig, batch=2)
    assert (via_model - plain).abs().max() > 1e-4
    # the hooked weights were swapped back: the main network is bit-identical after the runs
    assert all(torch.equal(v, main.model.diffusion_model.state_dict()[k]) for k, v in before.items())


def test_foreign_hooks_see_the_pair_and_run_once_per_evaluation(tmg, tiny, cond):
    arch = "sd15_eps"
    m = tiny(arch).clone()
    seen = {"pre": [], "post": [], "cfg": 0}

    def pre(args):
        seen["pre"].append((len(args["conds_out"]), args["cond_scale"]))
        return args["conds_out"]

    def post(args):
        seen["post"].append(args["uncond_denoised"] is not None)
        return args["denoised"]

    def cfg_fn(args):
        seen["cfg"] += 1
        return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]

    m.set_model_sampler_pre_cfg_function(pre)
    m.set_model_sampler_post_cfg_function(post)
    m.set_model_sampler_cfg_function(cfg_fn)
    g = _guider(tmg, m, "cfg+autoguidance", 4.0, scale_2=2.0, positive=cond(arch, 1), negative=cond(arch, 2),
                model_2=tiny(arch, 2))
    run(m, None, None, 1.0, steps=3, batch=2, guider=g)
    assert seen["pre"] == [(3, 4.0)] * 3 and len(seen["post"]) == 3 and seen["cfg"] == 3


def test_clear_errors(tmg, tiny, cond):
    arch = "sd15_eps"
    main = tiny(arch)
    with pytest.raises(ValueError, match="GL_MultiModelGuider: unknown mode"):
        tmg.MultiModelGuider(main, "bogus", cfg=2.0)
    with pytest.raises(ValueError, match="needs the weak model"):
        _guider(tmg, main, "autoguidance", 2.0, positive=cond(arch, 1))
    with pytest.raises(ValueError, match="needs a negative"):
        _guider(tmg, main, "cfg", 2.0, positive=cond(arch, 1))
    with pytest.raises(ValueError, match="attach the NPO LoRA"):
        _guider(tmg, main, "npo", 2.0, positive=cond(arch, 1), negative=cond(arch, 2))
    patched = main.clone()
    key = next(iter(main.model.diffusion_model.state_dict()))
    patched.add_patches({f"diffusion_model.{key}": (torch.zeros_like(main.model.diffusion_model.state_dict()[key]),)})
    with pytest.raises(ValueError, match="CreateHookLora"):
        tmg.MultiModelGuider(main, "autoguidance", cfg=2.0, model_2=patched)
    with pytest.raises(ValueError, match="model is eps but model_2 is flow"):
        tmg.MultiModelGuider(main, "autoguidance", cfg=2.0, model_2=tiny("flux"))
    with pytest.raises(ValueError, match="v, the fine-tuned"):
        tmg.MultiModelGuider(main, "sine", cfg=2.0, scale_2=1.5, model_2=tiny(arch, 2))


def test_cfg_one_skips_the_pair_like_core(tmg, tiny, cond, nfe):
    arch = "sd15_v"
    m = tiny(arch)
    plain = run(m, cond(arch, 1), cond(arch, 2), 1.0, batch=2, steps=3)
    g = _guider(tmg, m, "cfg", 1.0, positive=cond(arch, 1), negative=cond(arch, 2))
    assert torch.equal(run(m, None, None, 1.0, batch=2, steps=3, guider=g), plain)
    assert _rows(nfe, g) == 1
    weak = tiny(arch, 1)
    g = _guider(tmg, m, "autoguidance", 1.0, positive=cond(arch, 1), model_2=weak)
    assert torch.equal(run(m, None, None, 1.0, batch=2, steps=3, guider=g), plain)   # w = 1: the main model alone
    assert _rows(nfe, g) == 1
