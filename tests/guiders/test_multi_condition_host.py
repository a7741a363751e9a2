"""GL_MultiConditionGuider's guider in the real host on tiny EPS and flow models."""
import pytest
import torch

from hostutil import run


@pytest.fixture(scope="module")
def mcg(host):
    return host.pack("guiders.multi_condition")


def _guider(mcg, m, negative, conditions, scales, **kw):
    combine_inputs = kw.pop("combine_inputs", False)
    g = mcg.MultiConditionGuider(m, scales=scales, **kw)
    g.set_conds(negative, conditions, combine_inputs=combine_inputs)
    return g


def _rows(nfe, g):
    rep = nfe.last_report(g.model_patcher)
    return rep.rows / rep.images


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
def test_one_condition_and_equal_scales_are_cfg(mcg, tiny, cond, nfe, arch):
    m, neg = tiny(arch), cond(arch, 2)
    c1, c12 = cond(arch, 1), cond(arch, 5)                           # c_≤1 and c_≤2 (nested inputs)
    for form in ("nested", "composable"):
        g = _guider(mcg, m, neg, [c1], [4.0], form=form)
        assert torch.equal(run(m, None, None, 1.0, batch=2, guider=g), run(m, c1, neg, 4.0, batch=2))
    joint = run(m, c12, neg, 4.0, batch=2, steps=4)
    g = _guider(mcg, m, neg, [c1, c12], [4.0, 4.0])
    assert torch.equal(run(m, None, None, 1.0, batch=2, steps=4, guider=g), joint)
    assert _rows(nfe, g) == 2 * 4                                    # c_≤1 is not needed: 2 rows per step


def test_combine_inputs_builds_the_cumulative_conditionings(mcg, tiny, cond):
    arch = "sd15_eps"
    m, neg, a, b = tiny(arch), cond(arch, 2), cond(arch, 1), cond(arch, 6)
    joint = run(m, a + b, neg, 3.0, batch=2)                        # ConditioningCombine(a, b) is list concat
    g = _guider(mcg, m, neg, [a, b], [3.0, 3.0], combine_inputs=True)
    assert torch.equal(run(m, None, None, 1.0, batch=2, guider=g), joint)


@pytest.mark.parametrize("form", ["nested", "composable"])
def test_separate_scales_match_the_formula_in_one_batched_call(mcg, tiny, cond, nfe, form):
    arch = "flux"
    m, neg, c1, c2, c3 = tiny(arch), cond(arch, 2), cond(arch, 1), cond(arch, 5), cond(arch, 7)
    import comfy.samplers
    sig = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "simple", 1)
    d = [run(m, c, c, 1.0, sigmas=sig, batch=2) for c in (neg, c1, c2, c3)]
    s = [5.0, 2.0, 3.0]
    g = _guider(mcg, m, neg, [c1, c2, c3], s, form=form)
    out = run(m, None, None, 1.0, sigmas=sig, batch=2, guider=g)
    if form == "nested":
        expect = d[0] + s[0] * (d[1] - d[0]) + s[1] * (d[2] - d[1]) + s[2] * (d[3] - d[2])
    else:
        expect = d[0] + sum(si * (di - d[0]) for si, di in zip(s, d[1:]))
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)
    rep = nfe.last_report(g.model_patcher)
    assert rep.rows == 2 * 4 and rep.calls == 1                      # N + 1 rows per image, one model call


def test_window_saves_the_outer_condition_outside_it(mcg, tiny, cond, nfe):
    arch = "sd15_eps"
    m, neg, c1, c12 = tiny(arch), cond(arch, 2), cond(arch, 1), cond(arch, 5)
    steps = 4
    g = _guider(mcg, m, neg, [c1, c12], [5.0, 2.0], windows=[(0.0, 1.0), (0.0, 0.5)])
    out = run(m, None, None, 1.0, batch=2, steps=steps, guider=g)
    import comfy.samplers
    ms = m.get_model_object("model_sampling")
    sig = comfy.samplers.calculate_sigmas(ms, "simple", steps)
    inside = sum(float(x) >= float(ms.percent_to_sigma(0.5)) for x in sig[:-1])
    assert 0 < inside < steps
    assert _rows(nfe, g) == 3 * inside + 2 * (steps - inside)
    # outside the window the step is CFG at s_1 on c_≤1 alone
    late = _guider(mcg, m, neg, [c1, c12], [5.0, 2.0], windows=[(0.0, 1.0), (0.0, 0.01)])
    only_first = _guider(mcg, m, neg, [c1], [5.0])
    sig_late = sig[inside:]
    torch.testing.assert_close(run(m, None, None, 1.0, sigmas=sig_late, batch=2, guider=late),
                               run(m, None, None, 1.0, sigmas=sig_late, batch=2, guider=only_first))
    assert torch.isfinite(out).all()


def test_accelerated_variant_counts_and_stays_cfg_with_equal_scales(mcg, tiny, cond, nfe):
    arch = "flux"
    m, neg, c1, c2, c3 = tiny(arch), cond(arch, 2), cond(arch, 1), cond(arch, 5), cond(arch, 7)
    steps = 6
    exact = _guider(mcg, m, neg, [c1, c2, c3], [4.0, 4.0, 4.0])
    fast = _guider(mcg, m, neg, [c1, c2, c3], [4.0, 4.0, 4.0], refresh_every=2)
    torch.testing.assert_close(run(m, None, None, 1.0, batch=2, steps=steps, guider=fast),
                               run(m, None, None, 1.0, batch=2, steps=steps, guider=exact), rtol=1e-4, atol=1e-4)
    assert _rows(nfe, fast) == 3 * 4 + 3 * 2                         # refresh steps 0, 2, 4: N+1; others: 2
    one = _guider(mcg, m, neg, [c1, c2, c3], [5.0, 2.0, 3.0], refresh_every=1)
    also = _guider(mcg, m, neg, [c1, c2, c3], [5.0, 2.0, 3.0])
    assert torch.equal(run(m, None, None, 1.0, batch=2, guider=one), run(m, None, None, 1.0, batch=2, guider=also))
    differs = _guider(mcg, m, neg, [c1, c2, c3], [5.0, 2.0, 3.0], refresh_every=3)
    first = run(m, None, None, 1.0, batch=2, steps=steps, guider=differs)
    assert (first - run(m, None, None, 1.0, batch=2, steps=steps, guider=also)).abs().max() > 1e-6
    assert torch.equal(first, run(m, None, None, 1.0, batch=2, steps=steps, guider=differs))   # state per run


def test_foreign_hooks_run_on_the_pair(mcg, tiny, cond):
    arch = "sd15_eps"
    m = tiny(arch).clone()
    seen = {"pre": [], "post": []}

    def pre(args):
        seen["pre"].append((len(args["conds_out"]), args["cond_scale"]))
        return args["conds_out"]

    def post(args):
        seen["post"].append(args["cond_scale"])
        return args["denoised"] * 1.0

    m.set_model_sampler_pre_cfg_function(pre)
    m.set_model_sampler_post_cfg_function(post)
    g = _guider(mcg, m, cond(arch, 2), [cond(arch, 1), cond(arch, 5)], [5.0, 2.0])
    run(m, None, None, 1.0, steps=3, batch=2, guider=g)
    assert seen["pre"] == [(3, 2.0)] * 3 and seen["post"] == [2.0] * 3


def test_clear_errors(mcg, tiny):
    m = tiny("sd15_eps")
    with pytest.raises(ValueError, match="GL_MultiConditionGuider: unknown form"):
        mcg.MultiConditionGuider(m, scales=[1.0, 2.0], form="bogus")
    with pytest.raises(ValueError, match="needs form 'nested'"):
        mcg.MultiConditionGuider(m, scales=[1.0, 2.0], form="composable", refresh_every=2)
    with pytest.raises(ValueError, match="condition 2 window"):
        mcg.MultiConditionGuider(m, scales=[1.0, 2.0], windows=[(0.0, 1.0), (0.6, 0.2)])
    with pytest.raises(ValueError, match="connect 1 to 4"):
        mcg.MultiConditionGuider(m, scales=[1.0] * 5)
