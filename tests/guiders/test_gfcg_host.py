"""GL_GradientFreeGuidance's guider in the real host on tiny EPS and flow models."""
import pytest
import torch

from hostutil import count_rows, run


@pytest.fixture(scope="module")
def gfcg(host):
    return host.pack("guiders.gfcg")


def _guider(gfcg, classifier, m, cond, arch, *, s_max, target="red circle, green star", cfg=4.0, **kw):
    class_conds = {i: cond(arch, 20 + i) for i in range(4)}
    g = gfcg.GFCGGuider(m, classifier, target, class_conds, s_max=s_max, **kw)
    g.set_conds(cond(arch, 1), cond(arch, 2))
    g.set_cfg(cfg)
    return g


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
def test_s_max_zero_is_plain_cfg_and_guidance_changes_the_result(gfcg, classifier, tiny, cond, arch):
    m = tiny(arch)
    plain = run(m, cond(arch, 1), cond(arch, 2), 4.0, batch=2)
    off = _guider(gfcg, classifier, m, cond, arch, s_max=0.0)
    assert torch.equal(run(m, None, None, 4.0, batch=2, guider=off), plain)
    on = _guider(gfcg, classifier, m, cond, arch, s_max=3.0)
    guided = run(m, None, None, 4.0, batch=2, guider=on)
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-4
    # lag 1: no reference at the first of 4 evaluations, then one per evaluation; per-image references and scales
    assert len(on.trace) == 3
    for _sigma, refs, scales in on.trace:
        assert refs[0] != 0 and refs[1] != 2                         # never the image's own target
        assert all(0.0 <= s <= 3.0 for s in scales)


def test_reference_rows_are_counted_and_state_resets_per_run(gfcg, classifier, tiny, cond):
    counted, counter = count_rows(tiny("sd15_eps"))
    g = _guider(gfcg, classifier, counted, cond, "sd15_eps", s_max=2.0, target="blue square")
    first = run(counted, None, None, 4.0, batch=2, steps=4, guider=g)
    distinct = [len(set(refs)) for _s, refs, _sc in g.trace]
    assert len(distinct) == 3 and counter["rows"] == 4 * 2 * 2 + 3 * 2     # +1 row per image after step 1
    again = run(counted, None, None, 4.0, batch=2, steps=4, guider=g)
    assert torch.equal(first, again)                                 # no state leaks into the next run


def test_composes_with_other_post_cfg_functions(gfcg, classifier, tiny, cond):
    m = tiny("sd15_eps").clone()
    calls = []

    def other(args):
        calls.append(1)
        return args["denoised"]
    m.set_model_sampler_post_cfg_function(other)
    g = _guider(gfcg, classifier, m, cond, "sd15_eps", s_max=2.0)
    run(m, None, None, 4.0, batch=2, steps=3, guider=g)
    assert len(calls) == 3
    assert len(m.model_options["sampler_post_cfg_function"]) == 1    # the guider appends only for its own calls


def test_bad_settings_give_clear_errors(gfcg, classifier, tiny, cond):
    m = tiny("sd15_eps")
    with pytest.raises(ValueError, match="GL_GradientFreeGuidance: s_max"):
        _guider(gfcg, classifier, m, cond, "sd15_eps", s_max=-1.0)
    with pytest.raises(ValueError, match="at least two candidate classes"):
        gfcg.GFCGGuider(m, classifier, "red circle", {0: cond("sd15_eps", 3)})
    with pytest.raises(ValueError, match="not a class"):
        _guider(gfcg, classifier, m, cond, "sd15_eps", s_max=1.0, target="mauve")
    assert gfcg.candidate_indices(classifier, "") == [0, 1, 2, 3]
    assert gfcg.candidate_indices(classifier, "green star, red circle") == [0, 2]


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
def test_reference_rows_equal_the_full_batch_evaluation(gfcg, classifier, tiny, cond, arch):
    """Images with different reference classes: each row equals that class evaluated on the whole batch."""
    import comfy.samplers
    m = tiny(arch)
    g = _guider(gfcg, classifier, m, cond, arch, s_max=1.0)
    seen = {}
    real = g.reference_prediction

    def spy(x, timestep, ref, model_options):
        out = real(x, timestep, torch.tensor([1, 3, 1]), model_options)
        full = {r: comfy.samplers.calc_cond_batch(g.inner_model, [g.conds[f"{gfcg.PREFIX}{r}"]], x, timestep,
                                                  model_options)[0] for r in (1, 3)}
        seen["ok"] = all(torch.allclose(out[b], full[r][b], atol=1e-5) for b, r in enumerate([1, 3, 1]))
        return real(x, timestep, ref, model_options)
    g.reference_prediction = spy
    run(m, None, None, 4.0, batch=3, steps=2, guider=g)
    assert seen["ok"]
