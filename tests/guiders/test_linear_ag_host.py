"""GL_LinearAG and its calibration in the real host, on tiny EPS / V / flow models.

NFEs are checked by an independent counter (a model function wrapper added by the test, counting batch rows); the
predicted unconditional values by a post-CFG recorder added by the test (post-CFG hooks see the raw predictions)."""
import logging

import pytest
import torch

from hostutil import count_rows, run

STEPS = 6


@pytest.fixture(scope="module")
def lag(host):
    return host.pack("guiders.linear_ag")


@pytest.fixture(scope="module")
def cal(host):
    return host.pack("guiders.linear_ag_calibration")


@pytest.fixture(scope="module")
def kernel(host):
    return host.pack("kernels.linear_ag")


def _notes(nfe, model):
    report = nfe.last_report(model)
    assert report is not None
    return report, report.notes["_linear_ag"]


def _recorded(model):
    """Clone with a post-CFG hook appended that records {step: (D_c, D_u)} of the first evaluation per step."""
    m = model.clone()
    rec = {}

    def post(args):
        sigmas = args["model_options"]["transformer_options"]["sample_sigmas"]
        s = float(args["sigma"].max())
        k = int((sigmas >= s * (1 - 1e-5)).nonzero()[-1])
        if abs(float(sigmas[k]) - s) <= 1e-5 * s and k not in rec:
            rec[k] = (args["cond_denoised"].clone(), args["uncond_denoised"].clone())
        return args["denoised"]
    m.set_model_sampler_post_cfg_function(post)
    return m, rec


def _core(node, model, **widgets):
    import nodes
    cls = nodes.NODE_CLASS_MAPPINGS[node]
    out = cls.execute(model, **widgets)
    return out[0] if isinstance(out, tuple) else out.result[0]


def _batch_conds(cond, arch, seeds):
    """Conditioning for a batch of different prompts (one per seed), and a matching negative."""
    pos = [cond(arch, s) for s in seeds]
    neg = cond(arch, 99)
    extra = {k: (torch.cat([p[0][1][k] for p in pos]) if isinstance(v, torch.Tensor) else v)
             for k, v in pos[0][0][1].items()}
    neg_extra = {k: (torch.cat([v] * len(seeds)) if isinstance(v, torch.Tensor) else v) for k, v in neg[0][1].items()}
    return ([[torch.cat([p[0][0] for p in pos]), extra]],
            [[torch.cat([neg[0][0]] * len(seeds)), neg_extra]])


def _close(actual, expected, rel=1e-3):
    """Equal up to float noise: batch-1 and batch-2 network calls differ by ~1e-7, which these random models
    amplify ~10x per step (still far below the differences the tests look for)."""
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(expected.abs().max()))


# ---------------------------------------------------------------- the mechanism

@pytest.mark.parametrize("arch", ["sd15_eps", "sd15_v", "sd3", "flux"])
def test_exact_predictor_reproduces_cfg_with_fewer_calls(lag, kernel, nfe, tiny, cond, arch):
    """A predictor that returns the true D_u (recorded in a reference CFG run from the same noise) gives the CFG
    result: the predicted value really replaces the uncond, at the real cfg scale, and nothing else changes."""
    m = tiny(arch)
    pos, neg = cond(arch, 1), cond(arch, 2)
    recorder, true = _recorded(m)
    reference = run(recorder, pos, neg, 5.0, steps=STEPS)
    counted, counter = count_rows(m)
    oracle = lag.patch_linear_ag(counted, first_fraction=1.0, _predictor=lambda k, dc, up, cp: true[k][1])
    out = run(oracle, pos, neg, 5.0, steps=STEPS)
    _close(out, reference)
    schedule = kernel.predicted_steps(STEPS, first_fraction=1.0)
    assert _notes(nfe, oracle)[1]["predicted_steps"] == [k for k, on in enumerate(schedule) if on] == [1, 3, 5]
    assert counter["rows"] == 2 * (2 * STEPS - 3)
    # the default predictor is not the truth on these models: the same check would fail if it were ignored
    default = run(lag.patch_linear_ag(m, first_fraction=1.0), pos, neg, 5.0, steps=STEPS)
    assert (default - reference).abs().max() > 1e-2 * reference.abs().max()


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
def test_default_predictor_reuses_the_previous_guidance_vector_per_sample(lag, nfe, tiny, cond, arch):
    """Batch of two different prompts: on predicted steps the uncond the host combines is D_c,k − (D_c,k−1 −
    D_u,k−1) of each sample."""
    pos, neg = _batch_conds(cond, arch, (11, 12))
    patched = lag.patch_linear_ag(tiny(arch))
    recorder, rec = _recorded(patched)
    out = run(recorder, pos, neg, 5.0, steps=10, batch=2)
    assert torch.isfinite(out).all()
    predicted = _notes(nfe, recorder)[1]["predicted_steps"]
    assert predicted == [1, 3]
    for k in predicted:
        dc, du = rec[k]
        dc_prev, du_prev = rec[k - 1]
        _close(du, dc - (dc_prev - du_prev), rel=1e-6)
        delta = dc_prev - du_prev
        assert (delta[0] - delta[1]).abs().max() > 1e-3        # the two prompts' guidance vectors differ
    # a step that is not predicted carries the true uncond (it differs from the reuse formula)
    dc, du = rec[2]
    assert (du - (dc - (rec[1][0] - rec[1][1]))).abs().max() > 1e-4


@pytest.mark.parametrize("arch,steps,first_fraction,batch", [("sd15_eps", 10, 0.5, 1), ("flux", 10, 0.5, 3),
                                                            ("sd3", 7, 1.0, 2), ("sd15_v", 5, 0.0, 2)])
def test_nfe_is_exactly_what_the_schedule_says(lag, kernel, nfe, tiny, cond, arch, steps, first_fraction, batch):
    counted, counter = count_rows(tiny(arch))
    patched = lag.patch_linear_ag(counted, first_fraction=first_fraction)
    run(patched, cond(arch, 1), cond(arch, 2), 5.0, steps=steps, batch=batch)
    n_pred = sum(kernel.predicted_steps(steps, first_fraction=first_fraction))
    assert counter["rows"] == batch * (2 * steps - n_pred)            # independent count
    report, det = _notes(nfe, patched)
    assert report.rows == counter["rows"] and report.nfe_per_image == 2 * steps - n_pred
    assert det["predicted_calls"] == n_pred and det["cfg_calls"] == steps - n_pred
    if (arch, steps) == ("sd15_eps", 10):
        assert report.nfe_per_image == 18                              # 2·10 − 2 (steps 1 and 3)
    assert f"uncond predicted at {n_pred} of {steps} steps" in report.notes["linear ag"]


def test_state_does_not_leak_between_runs(lag, nfe, tiny, cond):
    m = lag.patch_linear_ag(tiny("flux"))
    pos, neg = cond("flux", 1), cond("flux", 2)
    first = run(m, pos, neg, 4.0, steps=STEPS)
    rows = nfe.last_report(m).rows
    second = run(m, pos, neg, 4.0, steps=STEPS)
    assert torch.equal(first, second) and nfe.last_report(m).rows == rows
    # another step count on the same patched model: a fresh schedule, no history from the previous run
    run(m, pos, neg, 4.0, steps=4)
    report, det = _notes(nfe, m)
    assert det["predicted_steps"] == [1] and report.rows == 2 * (2 * 4 - 1)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2s_ancestral", "dpmpp_2m"])
def test_multi_evaluation_samplers_predict_once_per_scheduled_step(lag, kernel, nfe, tiny, cond, sampler):
    counted, counter = count_rows(tiny("sd15_eps"))
    patched = lag.patch_linear_ag(counted, first_fraction=1.0)
    out = run(patched, cond("sd15_eps", 1), cond("sd15_eps", 2), 5.0, steps=STEPS, sampler=sampler)
    assert torch.isfinite(out).all()
    report, det = _notes(nfe, patched)
    assert det["predicted_steps"] == [1, 3, 5]
    assert counter["rows"] == report.rows == 2 * (2 * det["cfg_calls"] + det["predicted_calls"])
    if sampler != "dpmpp_2m":
        assert det["cfg_calls"] + det["predicted_calls"] > STEPS          # really several evaluations per step


# ---------------------------------------------------------------- composing with other nodes

def test_core_post_cfg_node_acts_on_predicted_steps_in_both_orders(lag, tiny, cond):
    """CFGZeroStar (post-CFG, uses the uncond): with the exact predictor, LinearAG under or over it gives the
    stack's own CFG result, which differs from CFG without it."""
    base = tiny("sd15_eps")
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)
    stack = _core("CFGZeroStar", base)
    recorder, true = _recorded(stack)
    reference = run(recorder, pos, neg, 5.0, steps=STEPS)
    assert (reference - run(base, pos, neg, 5.0, steps=STEPS)).abs().max() > 1e-2 * reference.abs().max()
    oracle = lambda k, dc, up, cp: true[k][1]   # noqa: E731
    over = lag.patch_linear_ag(stack, first_fraction=1.0, _predictor=oracle)
    under = _core("CFGZeroStar", lag.patch_linear_ag(base, first_fraction=1.0, _predictor=oracle))
    _close(run(over, pos, neg, 5.0, steps=STEPS), reference)
    _close(run(under, pos, neg, 5.0, steps=STEPS), reference)


def test_a_previous_calc_cond_batch_function_is_called_not_replaced(lag, nfe, tiny, cond):
    import comfy.samplers
    base = tiny("sd15_eps").clone()
    seen = []

    def calc(args):
        seen.append(args["conds"][1] is None)
        out = comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                             args["model_options"])
        return [out[0] + 0.25, *out[1:]]                  # visible in the result
    base.set_model_sampler_calc_cond_batch_function(calc)
    counted, counter = count_rows(base)
    patched = lag.patch_linear_ag(counted)
    recorder, rec = _recorded(patched)
    run(recorder, cond("sd15_eps", 1), cond("sd15_eps", 2), 5.0, steps=10)
    assert seen == [k in (1, 3) for k in range(10)]       # every step went through it; uncond left out on 1, 3
    assert counter["rows"] == 2 * 18 and _notes(nfe, recorder)[1]["predicted_steps"] == [1, 3]
    dc, du = rec[3]
    _close(du, dc - (rec[2][0] - rec[2][1]), rel=1e-6)     # the prediction used its (shifted) D_c


def _first_forced_step(model, end_percent, steps):
    import comfy.samplers
    ms = model.get_model_object("model_sampling")
    sig = comfy.samplers.calculate_sigmas(ms, "simple", steps)
    return next(i for i in range(steps) if float(sig[i]) <= float(ms.percent_to_sigma(end_percent)))


@pytest.mark.parametrize("order", ["linear_ag_outer", "adaptive_outer"])
def test_chained_with_adaptive_guidance_nfe_follows_both_schedules(lag, ag, kernel, nfe, tiny, cond, order):
    base = tiny("sd15_eps")
    steps = 10
    counted, counter = count_rows(base)
    if order == "linear_ag_outer":
        patched = lag.patch_linear_ag(ag.patch_adaptive_guidance(counted, threshold=1.5, end_percent=0.6),
                                      first_fraction=1.0)
    else:
        patched = ag.patch_adaptive_guidance(lag.patch_linear_ag(counted, first_fraction=1.0), threshold=1.5,
                                             end_percent=0.6)
    run(patched, cond("sd15_eps", 1), cond("sd15_eps", 2), 5.0, steps=steps)
    switch = _first_forced_step(base, 0.6, steps)
    assert 2 < switch < steps - 2                                  # both methods get to act
    schedule = kernel.predicted_steps(steps, first_fraction=1.0)
    cost = [1 if k > switch or schedule[k] else 2 for k in range(steps)]
    assert counter["rows"] == 2 * sum(cost)
    report = nfe.last_report(patched)
    assert report.notes["_adaptive_guidance"]["switch_step"] == switch
    assert report.notes["_linear_ag"]["predicted_steps"] == [k for k in range(switch + 1) if schedule[k]]


# ---------------------------------------------------------------- calibration

def test_calibration_fits_the_recorded_trajectory_and_round_trips_a_file(lag, cal, kernel, nfe, tiny, cond):
    import comfy.sample
    m = tiny("sd15_eps")
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)
    latent = {"samples": torch.zeros(1, 3, 16, 16)}
    progress = []
    with torch.inference_mode():
        coeffs, residuals, meta = cal.calibrate_linear_ag(
            m, [pos], neg, steps=STEPS, cfg=5.0, sampler_name="euler", scheduler="simple", seed=3, latent=latent,
            progress=lambda done, total: progress.append((done, total)))
    assert coeffs.shape == (STEPS, 3) and torch.isfinite(coeffs).all()
    assert torch.isnan(residuals[0]) and torch.isfinite(residuals[1:]).all()
    assert progress[-1] == (STEPS, STEPS) and len(progress) == STEPS
    assert meta["steps"] == STEPS and meta["sampler"] == "euler" and meta["scheduler"] == "simple"
    assert meta["prompts"] == 1 and meta["latent_shape"] == [1, 3, 16, 16] and meta["seed"] == 3
    assert meta["model_fingerprint"] == cal.model_fingerprint(m) and meta["model_class"] == "BaseModel"
    # the same run recorded independently (core KSampler path, same noise): the fit is the least-squares solution
    # over the pairs (k, k−1), and its residuals are the real relative errors
    recorder, rec = _recorded(m)
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(latent["samples"], 3)
        comfy.sample.sample(recorder, noise, STEPS, 5.0, "euler", "simple", pos, neg, latent["samples"],
                            disable_pbar=True, seed=3)
    for k in range(1, STEPS):
        dc, du = (t.double().reshape(-1) for t in rec[k])
        dcp, dup = (t.double().reshape(-1) for t in rec[k - 1])
        x = torch.stack([dc, dup, dcp], dim=1)
        beta = torch.linalg.lstsq(x, du.unsqueeze(1)).solution.squeeze(1)
        best = float((du - x @ beta).norm() / du.norm())
        direct = float((du - x @ coeffs[k]).norm() / du.norm())
        # optimal up to the kernel's tiny ridge (it moves ill-determined directions by ~1e-5); a recorder that
        # paired step k with anything but step k−1 would fit these pairs worse
        assert direct <= best * (1 + 1e-3) + 1e-6, (k, direct, best)
        assert residuals[k] == pytest.approx(direct, rel=1e-3, abs=1e-7)
    # save under output/linear_ag with a counter, list it, load it back
    saved = cal.save_calibration(cal.LinearAGCoefficients(coeffs, residuals, meta), "unit_test")
    again = cal.save_calibration(cal.LinearAGCoefficients(coeffs, residuals, meta), "unit_test")
    names = cal.coefficient_files()
    assert saved.source != again.source
    assert {"unit_test_00001_.safetensors", "unit_test_00002_.safetensors"} <= set(names)
    loaded = cal.load_calibration("unit_test_00001_.safetensors")
    assert torch.equal(loaded.coefficients, coeffs)
    assert torch.equal(torch.isnan(loaded.residuals), torch.isnan(residuals))
    assert loaded.metadata["model_fingerprint"] == meta["model_fingerprint"] and loaded.metadata["steps"] == str(STEPS)
    assert f"for {STEPS} steps" in loaded.summary() and "DESIGN" in loaded.summary()


def test_calibrated_coefficients_and_tau_drive_the_prediction(lag, nfe, tiny, cond):
    m = tiny("sd15_eps")
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)
    coeffs = torch.tensor([[1.0, 1.0, -1.0], [0.9, 0.3, -0.2], [1.0, 0.0, 0.0], [1.1, 0.5, -0.6]],
                          dtype=torch.float64)
    residuals = torch.tensor([float("nan"), 0.01, 0.02, 0.2], dtype=torch.float64)
    patched = lag.patch_linear_ag(m, coefficients=coeffs, residuals=residuals, first_fraction=1.0, tau=0.05)
    recorder, rec = _recorded(patched)
    run(recorder, pos, neg, 5.0, steps=4)
    det = _notes(nfe, recorder)[1]
    assert det["predicted_steps"] == [1] and det["coefficients"] == "calibrated"   # step 3: residual 0.2 ≥ τ
    dc, du = rec[1]
    _close(du, 0.9 * dc + 0.3 * rec[0][1] - 0.2 * rec[0][0], rel=1e-6)              # row 1 of the table, not (1,1,−1)
    loose = lag.patch_linear_ag(m, coefficients=coeffs, residuals=residuals, first_fraction=1.0, tau=0.5)
    run(loose, pos, neg, 5.0, steps=4)
    assert _notes(nfe, loose)[1]["predicted_steps"] == [1, 3]


def test_coefficients_for_another_step_count_are_refused(lag, tiny, cond):
    table = torch.tensor([[1.0, 1.0, -1.0]] * 6, dtype=torch.float64)
    patched = lag.patch_linear_ag(tiny("sd15_eps"), coefficients=table)
    with pytest.raises(ValueError, match=r"GL_LinearAG: .*calibrated for 6 steps.*samples 4 steps.*same steps"):
        run(patched, cond("sd15_eps", 1), cond("sd15_eps", 2), 5.0, steps=4)


def test_coefficients_from_another_model_warn(lag, cal, tiny, caplog):
    table = torch.tensor([[1.0, 1.0, -1.0]] * 4, dtype=torch.float64)
    other = cal.model_fingerprint(tiny("sd15_eps", seed=1))
    assert other != cal.model_fingerprint(tiny("sd15_eps"))
    with caplog.at_level(logging.WARNING, logger="guidance_lab"):
        lag.patch_linear_ag(tiny("sd15_eps"), coefficients=table, calibration_meta={"model_fingerprint": other})
        lag.patch_linear_ag(tiny("sd15_eps", seed=1), coefficients=table, calibration_meta={"model_fingerprint": other})
    assert sum("calibrated on another model" in r.message for r in caplog.records) == 1


def test_calibration_errors_name_the_node(cal, tiny, cond):
    m = tiny("sd15_eps")
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)
    kw = dict(steps=4, cfg=5.0, sampler_name="euler", scheduler="simple", seed=0,
              latent={"samples": torch.zeros(1, 3, 16, 16)})
    for change, pattern in (({"cfg": 1.0}, "cfg.*1"), ({"steps": 1}, "steps"), ({"sampler_name": "nope"}, "nope"),
                            ({"scheduler": "nope"}, "nope")):
        with pytest.raises(ValueError, match=f"GL_LinearAGCalibrate.*{pattern}"):
            cal.calibrate_linear_ag(m, [pos], neg, **{**kw, **change})
    with pytest.raises(ValueError, match="GL_LinearAGCalibrate.*negative"):
        cal.calibrate_linear_ag(m, [pos], None, **kw)
    with pytest.raises(ValueError, match="GL_LinearAGLoad.*not found"):
        cal.load_calibration("no_such_file.safetensors")


# ---------------------------------------------------------------- fallbacks and input checks

def test_fallbacks_save_nothing_and_warn_once(lag, nfe, tiny, cond, caplog):
    m = tiny("sd15_eps")
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)
    needs_uncond = m.clone()
    needs_uncond.set_model_sampler_post_cfg_function(lambda args: args["denoised"], disable_cfg1_optimization=True)
    counted, counter = count_rows(lag.patch_linear_ag(needs_uncond))
    with caplog.at_level(logging.WARNING, logger="guidance_lab"):
        out = run(counted, pos, neg, 5.0, steps=STEPS)
    assert torch.equal(out, run(needs_uncond, pos, neg, 5.0, steps=STEPS))
    assert counter["rows"] == 2 * 2 * STEPS
    assert sum("GL_LinearAG" in r.message and "disable_cfg1_optimization" in r.message for r in caplog.records) == 1
    # cfg 1: nothing to skip, host behaviour unchanged
    patched = lag.patch_linear_ag(m)
    assert torch.equal(run(patched, pos, neg, 1.0, steps=STEPS), run(m, pos, neg, 1.0, steps=STEPS))
    assert "cfg is 1" in nfe.last_report(patched).notes["linear ag"]
    # no negative: the host's own path (it fills the uncond slot with zeros)
    import comfy.samplers
    guiders = []
    for model in (patched, m):
        g = comfy.samplers.CFGGuider(model)
        g.inner_set_conds({"positive": pos})
        g.set_cfg(5.0)
        guiders.append(g)
    assert torch.equal(run(patched, None, None, 0, guider=guiders[0]), run(m, None, None, 0, guider=guiders[1]))
    assert "no negative" in nfe.last_report(patched).notes["linear ag"]
    # a guider that computes its own guidance (core DualCFGGuider) is left alone
    import comfy_extras.nodes_custom_sampler as cs
    duals = []
    for model in (patched, m):
        g = cs.Guider_DualCFG(model)
        g.set_conds(pos, cond("sd15_eps", 3), neg)
        g.set_cfg(5.0, 2.0)
        duals.append(g)
    assert torch.equal(run(patched, None, None, 0, guider=duals[0]), run(m, None, None, 0, guider=duals[1]))


def test_core_ksampler_node_counts_the_saving(lag, tiny, cond):
    import nodes
    counted, counter = count_rows(tiny("sd15_eps"))
    patched = lag.patch_linear_ag(counted)
    latent = {"samples": torch.zeros(2, 3, 16, 16)}
    with torch.inference_mode():
        nodes.KSampler().sample(patched, 7, 10, 5.0, "euler", "normal", cond("sd15_eps", 1), cond("sd15_eps", 2),
                                latent, denoise=1.0)
    assert counter["rows"] == 2 * 18


def test_bad_settings_name_the_node(lag, tiny):
    m = tiny("sd15_eps")
    table = torch.tensor([[1.0, 1.0, -1.0]] * 4, dtype=torch.float64)
    for kwargs, pattern in (({"first_fraction": 1.5}, "first_fraction"), ({"tau": 0.0}, "tau"),
                            ({"residuals": torch.zeros(4)}, "residuals"),
                            ({"coefficients": torch.zeros(4, 2)}, "coefficients"),
                            ({"coefficients": table, "residuals": torch.zeros(3)}, "residuals")):
        with pytest.raises(ValueError, match=f"GL_LinearAG: .*{pattern}"):
            lag.patch_linear_ag(m, **kwargs)


def test_patch_leaves_the_input_model_untouched(lag, tiny):
    m = tiny("sd15_eps")
    before = {k: {kk: list(vv) for kk, vv in v.items()} for k, v in m.wrappers.items()}
    patched = lag.patch_linear_ag(m)
    assert {k: {kk: list(vv) for kk, vv in v.items()} for k, v in m.wrappers.items()} == before
    assert patched is not m and "guidance_lab.linear_ag" in patched.wrappers["predict_noise"]


def test_a_second_linear_ag_replaces_the_first(lag, nfe, tiny, cond):
    counted, counter = count_rows(tiny("sd15_eps"))
    twice = lag.patch_linear_ag(lag.patch_linear_ag(counted, first_fraction=0.5), first_fraction=1.0)
    assert len(twice.wrappers["predict_noise"]["guidance_lab.linear_ag"]) == 1
    run(twice, cond("sd15_eps", 1), cond("sd15_eps", 2), 5.0, steps=STEPS)
    assert _notes(nfe, twice)[1]["predicted_steps"] == [1, 3, 5] and counter["rows"] == 2 * (2 * STEPS - 3)
