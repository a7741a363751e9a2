"""GL_AdaptiveGuidance and the pack's NFE counter in the real host, on tiny EPS / V / flow models.

NFEs are checked by an independent counter (a model function wrapper added by the test, counting batch rows)."""
import logging

import pytest
import torch

from hostutil import count_rows, run

STEPS = 6


def _details(nfe, model):
    report = nfe.last_report(model)
    assert report is not None
    return report, report.notes["_adaptive_guidance"]


@pytest.mark.parametrize("arch", ["sd15_eps", "sd15_v", "sd3", "flux"])
def test_threshold_above_one_is_cfg_bit_for_bit(ag, nfe, tiny, cond, arch):
    m = tiny(arch)
    pos, neg = cond(arch, 1), cond(arch, 2)
    patched = ag.patch_adaptive_guidance(m, threshold=1.5)
    assert torch.equal(run(patched, pos, neg, 5.0, steps=STEPS), run(m, pos, neg, 5.0, steps=STEPS))
    report, det = _details(nfe, patched)
    assert det["switch_step"] is None and det["cond_only_calls"] == 0
    assert report.nfe_per_image == 2 * STEPS and report.images == 2 and report.steps == STEPS


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
def test_threshold_minus_one_switches_after_first_step_steps_plus_one(ag, nfe, tiny, cond, arch):
    batch = 3
    counted, counter = count_rows(tiny(arch))
    patched = ag.patch_adaptive_guidance(counted, threshold=-1.0)
    pos, neg = cond(arch, 1), cond(arch, 2)
    out = run(patched, pos, neg, 5.0, steps=STEPS, batch=batch)
    assert counter["rows"] == (STEPS + 1) * batch                    # independent count
    report, det = _details(nfe, patched)
    assert report.rows == counter["rows"] and report.calls == counter["calls"]
    assert report.nfe_per_image == STEPS + 1
    assert det["switch_step"] == 0 and det["cond_only_calls"] == STEPS - 1
    assert torch.isfinite(out).all()
    assert (out - run(tiny(arch), pos, neg, 5.0, steps=STEPS, batch=batch)).abs().max() > 1e-4


def _split_reference(model, pos, neg, cfg, steps, switch_after, batch=2, seed=0):
    """EPS only: CFG on schedule steps 0..switch_after, then the host's cfg = 1 path, as two chained runs."""
    import comfy.samplers
    sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    first = run(model, pos, neg, cfg, sigmas=sig[:switch_after + 2], batch=batch, seed=seed)
    g = comfy.samplers.CFGGuider(model)
    g.set_conds(pos, neg)
    g.set_cfg(1.0)
    with torch.inference_mode():
        return g.sample(torch.zeros_like(first), first, comfy.samplers.sampler_object("euler"),
                        sig[switch_after + 1:], seed=seed, disable_pbar=True)


def test_after_the_switch_the_result_is_the_hosts_cfg1_path(ag, tiny, cond):
    m = tiny("sd15_eps")
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)
    out = run(ag.patch_adaptive_guidance(m, threshold=-1.0), pos, neg, 6.0, steps=STEPS)
    torch.testing.assert_close(out, _split_reference(m, pos, neg, 6.0, STEPS, 0), rtol=1e-5, atol=1e-5)


def test_later_predict_noise_wrappers_run_on_conditional_only_steps(ag, tiny, cond):
    """Another node's PREDICT_NOISE wrapper added after Adaptive Guidance (a cache, say) sees every step, the
    conditional-only ones included, and on those it sees the host's cfg = 1 call (no negative, scale 1)."""
    import comfy.patcher_extension
    m = tiny("sd15_eps")
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)
    seen = []

    def later(executor, x, timestep, model_options={}, seed=None):
        g = executor.class_obj
        seen.append((g.cfg, g.conds.get("negative") is not None))
        return executor(x, timestep, model_options, seed)
    patched = ag.patch_adaptive_guidance(m, threshold=-1.0).clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "test_later", later)
    out = run(patched, pos, neg, 6.0, steps=STEPS)
    assert seen == [(6.0, True)] + [(1.0, False)] * (STEPS - 1)
    torch.testing.assert_close(out, _split_reference(m, pos, neg, 6.0, STEPS, 0), rtol=1e-5, atol=1e-5)


def _core(node, model, **widgets):
    import nodes
    cls = nodes.NODE_CLASS_MAPPINGS[node]
    out = cls.execute(model, **widgets) if hasattr(cls, "define_schema") else getattr(cls(), cls.FUNCTION)(
        model, **widgets)
    return out[0] if isinstance(out, tuple) else out.result[0]


def test_core_pre_and_post_cfg_nodes_act_before_and_after_the_switch(ag, tiny, cond):
    base = tiny("sd15_eps")
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)
    stacked = _core("PerturbedAttentionGuidance",
                    _core("APG", base, eta=0.0, norm_threshold=2.0, momentum=0.0), scale=2.0)
    # before the switch (threshold never reached): AG on top of the stack changes nothing
    never = ag.patch_adaptive_guidance(stacked, threshold=1.5)
    assert torch.equal(run(never, pos, neg, 6.0, steps=STEPS), run(stacked, pos, neg, 6.0, steps=STEPS))
    # switch after step 0: the result is the stack's own CFG-then-cfg-1 trajectory, so both nodes still act
    # after the switch (the reference differs from the same split without them)
    at = ag.patch_adaptive_guidance(stacked, threshold=-1.0)
    ref = _split_reference(stacked, pos, neg, 6.0, STEPS, 0)
    torch.testing.assert_close(run(at, pos, neg, 6.0, steps=STEPS), ref, rtol=1e-5, atol=1e-5)
    assert (ref - _split_reference(base, pos, neg, 6.0, STEPS, 0)).abs().max() > 1e-3
    # and the other way round: AG first, then the core nodes on top
    reordered = _core("PerturbedAttentionGuidance",
                      _core("APG", ag.patch_adaptive_guidance(base, threshold=-1.0), eta=0.0, norm_threshold=2.0,
                            momentum=0.0), scale=2.0)
    torch.testing.assert_close(run(reordered, pos, neg, 6.0, steps=STEPS), ref, rtol=1e-5, atol=1e-5)


def test_mixed_prompt_batch_switches_on_the_all_samples_rule(ag, nfe, tiny, cond):
    m = tiny("sd15_eps")
    p1, p2, n = cond("sd15_eps", 11), cond("sd15_eps", 12), cond("sd15_eps", 13)
    pos = [[torch.cat([p1[0][0], p2[0][0]]), {}]]
    neg = [[torch.cat([n[0][0], n[0][0]]), {}]]
    probe = ag.patch_adaptive_guidance(m, threshold=1.5)
    run(probe, pos, neg, 5.0, steps=8, batch=2)
    measured = dict(_details(nfe, probe)[1]["measured"])
    assert sorted(measured) == list(range(8))
    assert all(len(g) == 2 for g in measured.values())
    lows = {k: min(g) for k, g in measured.items()}
    means = {k: sum(g) / 2 for k, g in measured.items()}
    # a threshold between the per-sample values at some step: the "all" rule waits, the "mean" rule may not
    k = max(measured, key=lambda i: abs(measured[i][0] - measured[i][1]))
    thr = (measured[k][0] + measured[k][1]) / 2
    expected_all = next((i for i in range(8) if lows[i] > thr), None)
    expected_mean = next((i for i in range(8) if means[i] > thr), None)
    for policy, expected in (("all", expected_all), ("mean", expected_mean)):
        counted, counter = count_rows(m)
        patched = ag.patch_adaptive_guidance(counted, threshold=thr, batch_policy=policy)
        run(patched, pos, neg, 5.0, steps=8, batch=2)
        det = _details(nfe, patched)[1]
        assert det["switch_step"] == expected, policy
        n_cfg = 8 if expected is None else expected + 1
        assert counter["rows"] == 2 * (2 * n_cfg + (8 - n_cfg))


def test_state_does_not_leak_between_runs(ag, nfe, tiny, cond):
    m = ag.patch_adaptive_guidance(tiny("flux"), threshold=-1.0)
    pos, neg = cond("flux", 1), cond("flux", 2)
    first = run(m, pos, neg, 4.0, steps=STEPS)
    r1 = nfe.last_report(m).rows
    second = run(m, pos, neg, 4.0, steps=STEPS)
    assert torch.equal(first, second) and nfe.last_report(m).rows == r1
    never = ag.patch_adaptive_guidance(tiny("flux"), threshold=1.5)
    run(never, pos, neg, 4.0, steps=STEPS)
    assert nfe.last_report(never).rows == 2 * 2 * STEPS


def test_start_and_end_percent(ag, nfe, tiny, cond):
    m = tiny("sd15_eps")
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)
    late = ag.patch_adaptive_guidance(m, threshold=-1.0, start_percent=0.5)
    run(late, pos, neg, 5.0, steps=STEPS)
    import comfy.samplers
    ms = m.get_model_object("model_sampling")
    sig = comfy.samplers.calculate_sigmas(ms, "simple", STEPS)
    first_allowed = next(i for i in range(STEPS) if float(sig[i]) <= float(ms.percent_to_sigma(0.5)) * (1 + 1e-6))
    assert _details(nfe, late)[1]["switch_step"] == first_allowed > 0
    forced = ag.patch_adaptive_guidance(m, threshold=1.5, end_percent=0.7)
    run(forced, pos, neg, 5.0, steps=STEPS)
    det = _details(nfe, forced)[1]
    first_forced = next(i for i in range(STEPS) if float(sig[i]) <= float(ms.percent_to_sigma(0.7)))
    assert det["forced"] and det["switch_step"] == first_forced


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "euler_ancestral"])
def test_other_samplers_run_and_count(ag, nfe, tiny, cond, sampler):
    counted, counter = count_rows(tiny("sd15_eps"))
    patched = ag.patch_adaptive_guidance(counted, threshold=-1.0)
    out = run(patched, cond("sd15_eps", 1), cond("sd15_eps", 2), 5.0, steps=STEPS, sampler=sampler)
    assert torch.isfinite(out).all()
    report, det = _details(nfe, patched)
    assert report.rows == counter["rows"]
    assert counter["rows"] == 2 * (2 * det["cfg_calls"] + det["cond_only_calls"])
    assert det["cond_only_calls"] > 0


def test_fallbacks_save_nothing_and_warn_once(ag, nfe, tiny, cond, caplog):
    m = tiny("sd15_eps")
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)
    # another node needs D_u at every step
    needs_uncond = m.clone()
    needs_uncond.set_model_sampler_post_cfg_function(lambda args: args["denoised"], disable_cfg1_optimization=True)
    patched = ag.patch_adaptive_guidance(needs_uncond, threshold=-1.0)
    counted, counter = count_rows(patched)
    with caplog.at_level(logging.WARNING, logger="guidance_lab"):
        out = run(counted, pos, neg, 5.0, steps=STEPS)
    assert torch.equal(out, run(needs_uncond, pos, neg, 5.0, steps=STEPS))
    assert counter["rows"] == 2 * 2 * STEPS
    assert sum("disable_cfg1_optimization" in r.message for r in caplog.records) == 1
    # cfg 1: nothing to skip, host behaviour unchanged
    patched = ag.patch_adaptive_guidance(m, threshold=-1.0)
    assert torch.equal(run(patched, pos, neg, 1.0, steps=STEPS), run(m, pos, neg, 1.0, steps=STEPS))
    assert "cfg is 1" in nfe.last_report(patched).notes["adaptive guidance"]
    # a guider that computes its own guidance (core DualCFGGuider) is left alone
    import comfy_extras.nodes_custom_sampler as cs
    guider = cs.Guider_DualCFG(patched)
    guider.set_conds(pos, cond("sd15_eps", 3), neg)
    guider.set_cfg(5.0, 2.0)
    plain = cs.Guider_DualCFG(m)
    plain.set_conds(pos, cond("sd15_eps", 3), neg)
    plain.set_cfg(5.0, 2.0)
    assert torch.equal(run(patched, None, None, 0, guider=guider), run(m, None, None, 0, guider=plain))


def test_core_ksampler_nodes_and_sampler_custom_advanced(ag, nfe, tiny, cond):
    import nodes
    m = tiny("sd15_eps")
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)
    counted, counter = count_rows(m)
    patched = ag.patch_adaptive_guidance(counted, threshold=-1.0)
    latent = {"samples": torch.zeros(2, 3, 16, 16)}
    with torch.inference_mode():
        nodes.KSampler().sample(patched, 7, STEPS, 5.0, "euler", "simple", pos, neg, latent, denoise=1.0)
    assert counter["rows"] == 2 * (STEPS + 1)
    counter.update(rows=0, calls=0)
    with torch.inference_mode():
        nodes.KSamplerAdvanced().sample(patched, "enable", 7, STEPS, 5.0, "euler", "simple", pos, neg, latent,
                                        start_at_step=2, end_at_step=STEPS, return_with_leftover_noise="disable")
    assert counter["rows"] == 2 * (STEPS - 2 + 1)
    import comfy_extras.nodes_custom_sampler as cs
    counter.update(rows=0, calls=0)
    guider = cs.CFGGuider.execute(patched, pos, neg, 5.0)
    guider = guider[0] if isinstance(guider, tuple) else guider.result[0]
    sigmas = cs.BasicScheduler.execute(patched, "simple", STEPS, 1.0)
    sigmas = sigmas[0] if isinstance(sigmas, tuple) else sigmas.result[0]
    sampler = cs.KSamplerSelect.execute("euler")
    sampler = sampler[0] if isinstance(sampler, tuple) else sampler.result[0]
    noise = cs.RandomNoise.execute(3)
    noise = noise[0] if isinstance(noise, tuple) else noise.result[0]
    with torch.inference_mode():
        cs.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent)
    assert counter["rows"] == 2 * (STEPS + 1)
    assert nfe.last_report(patched).rows == counter["rows"]


def test_bad_input_errors_name_the_node(ag, tiny):
    m = tiny("sd15_eps")
    with pytest.raises(ValueError, match="GL_AdaptiveGuidance.*end_percent"):
        ag.patch_adaptive_guidance(m, start_percent=0.6, end_percent=0.4)
    with pytest.raises(ValueError, match="GL_AdaptiveGuidance.*threshold"):
        ag.patch_adaptive_guidance(m, threshold=float("nan"))
    with pytest.raises(ValueError, match="GL_AdaptiveGuidance.*batch_policy"):
        ag.patch_adaptive_guidance(m, batch_policy="any")
    with pytest.raises(ValueError, match="GL_AdaptiveGuidance.*space"):
        ag.patch_adaptive_guidance(m, space="latent")


def test_patch_leaves_the_input_model_untouched(ag, tiny):
    m = tiny("sd15_eps")
    before = {k: {kk: list(vv) for kk, vv in v.items()} for k, v in m.wrappers.items()}
    patched = ag.patch_adaptive_guidance(m)
    assert {k: {kk: list(vv) for kk, vv in v.items()} for k, v in m.wrappers.items()} == before
    assert patched is not m


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
def test_similarity_spaces_measure_what_they_say(ag, nfe, tiny, cond, arch):
    """The recorded γ equal the cosines of the raw denoised predictions (default) or of their noise predictions,
    recomputed here from a spy that sees the same raw predictions."""
    import comfy.samplers
    m = tiny(arch)
    pos, neg = cond(arch, 1), cond(arch, 2)
    flow = arch == "flux"
    for space in ("denoised", "noise"):
        patched = ag.patch_adaptive_guidance(m, threshold=1.5, space=space)
        seen = []

        def spy(args):
            seen.append((args["input"].clone(), args["sigma"].clone(), args["conds_out"][0].clone(),
                         args["conds_out"][1].clone()))
            return args["conds_out"]
        patched.set_model_sampler_pre_cfg_function(spy)
        run(patched, pos, neg, 5.0, steps=4)
        measured = dict(_details(nfe, patched)[1]["measured"])
        sig = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "simple", 4)
        assert len(seen) == 4 and sorted(measured) == [0, 1, 2, 3]
        for k, (x, s, c, u) in enumerate(seen):
            assert float(s.max()) == pytest.approx(float(sig[k]))
            if space == "noise":
                a = (1 - s).view(-1, 1, 1, 1) if flow else 1.0
                c, u = (x - a * c) / s.view(-1, 1, 1, 1), (x - a * u) / s.view(-1, 1, 1, 1)
            ref = torch.nn.functional.cosine_similarity(c.flatten(1).double(), u.flatten(1).double(), dim=1)
            assert measured[k] == pytest.approx(ref.tolist(), abs=1e-5)
