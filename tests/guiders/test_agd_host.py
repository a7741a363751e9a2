"""Adapter guidance distillation in the real host (guiders/agd*.py): adapter sites, zero adapters = the base model
(UNet, SD3, Flux), one model call per step at cfg 1, recorded targets reproduce the CFG trajectory, resumable
collection, training lowers the held-out loss (EPS demo model and Flux), file round trip, LoRA composition and
clear errors."""
from __future__ import annotations

import pytest
import torch

from hostutil import count_rows, encode, run


@pytest.fixture(scope="module")
def agd(host):
    return host.pack("guiders.agd")


@pytest.fixture(scope="module")
def col(host):
    return host.pack("guiders.agd_collect")


@pytest.fixture(scope="module")
def trn(host):
    return host.pack("guiders.agd_train")


def _randomise(adapter, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapter.modules.values():
            a.out.weight.copy_(torch.randn(a.out.weight.shape, generator=g) * std)
    return adapter


def _collect(col, patcher, clip, name, **kw):
    settings = dict(trajectories_per_prompt=2, steps=4, omega_min=2.0, omega_max=8.0, precision="fp32", name=name,
                    progress=lambda done, total: None)
    settings.update(kw)
    latent = {"samples": torch.zeros(2, 3, 16, 16)}
    with torch.inference_mode():
        return col.collect(patcher, clip, ["a red circle", "a blue square"], latent, **settings)


def test_sites_are_every_cross_attention(agd, demo_model, text_model):
    patcher, _clip, _vae = demo_model
    s = agd.sites(patcher)
    n_attn2 = sum(1 for k in patcher.model_state_dict() if k.endswith("attn2.to_q.weight"))
    assert len(s) == n_attn2 == 11
    assert all(ctx == 96 for _w, ctx in s.values()) and {w for w, _c in s.values()} == {64}
    assert "middle_0_0" in s and "input_4_0" in s
    flux, _ = text_model("flux")
    assert agd.sites(flux) == {"double_0": (64,), "single_0": (64,)}
    sd3, _ = text_model("sd3")
    assert set(agd.sites(sd3)) == {"double_0", "double_1"}


def test_zero_adapters_are_the_base_model_and_one_call_per_step(agd, demo_model):
    patcher, clip, _vae = demo_model
    pos, neg = encode(clip, "a red circle"), encode(clip, "")
    base = run(patcher, pos, neg, 1.0, batch=2, steps=4)
    adapter = agd.build_adapters(patcher, hidden=32, features=16)
    m = agd.apply_adapters(patcher, adapter, 5.0)
    counted, counter = count_rows(m)
    out = run(counted, pos, neg, 1.0, batch=2, steps=4)
    assert torch.equal(out, base)
    assert counter["rows"] == 2 * 4 and counter["calls"] == 4            # cfg 1: one row per image per step
    _randomise(adapter)
    moved = run(agd.apply_adapters(patcher, adapter, 5.0), pos, neg, 1.0, batch=2, steps=4)
    other_scale = run(agd.apply_adapters(patcher, adapter, 9.0), pos, neg, 1.0, batch=2, steps=4)
    half = run(agd.apply_adapters(patcher, adapter, 5.0, strength=0.0), pos, neg, 1.0, batch=2, steps=4)
    assert not torch.allclose(moved, base) and not torch.allclose(moved, other_scale)
    assert torch.equal(half, base)
    assert torch.equal(run(patcher, pos, neg, 1.0, batch=2, steps=4), base)        # the input model is untouched


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_flow_models_zero_adapters_identical_and_one_call_per_step(agd, text_model, family):
    patcher, clip = text_model(family)
    pos, neg = encode(clip, "a red circle"), encode(clip, "")
    base = run(patcher, pos, neg, 1.0, batch=2, steps=3)
    adapter = agd.build_adapters(patcher, hidden=16, features=16)
    counted, counter = count_rows(agd.apply_adapters(patcher, adapter, 4.0))
    assert torch.equal(run(counted, pos, neg, 1.0, batch=2, steps=3), base)
    assert counter["rows"] == 2 * 3
    _randomise(adapter, std=0.2)
    a = run(agd.apply_adapters(patcher, adapter, 4.0), pos, neg, 1.0, batch=2, steps=3)
    b = run(agd.apply_adapters(patcher, adapter, 8.0), pos, neg, 1.0, batch=2, steps=3)
    assert not torch.allclose(a, base) and not torch.allclose(a, b)


def test_an_existing_block_replacement_is_called_not_dropped(agd, text_model):
    patcher, clip = text_model("flux")
    pos, neg = encode(clip, "a red circle"), encode(clip, "")
    calls = []

    def foreign(args, extra):
        calls.append(1)
        return extra["original_block"](args)
    m = patcher.clone()
    m.set_model_patch_replace(foreign, "dit", "double_block", 0)
    base = run(m, pos, neg, 1.0, batch=2, steps=2)
    n = len(calls)
    out = run(agd.apply_adapters(m, agd.build_adapters(m, hidden=16, features=16), 4.0), pos, neg, 1.0, batch=2,
              steps=2)
    assert n == 2 and len(calls) == 4 and torch.equal(out, base)


def test_recorded_targets_are_the_cfg_predictions_of_the_sampled_trajectory(col, demo_model):
    import comfy.samplers
    patcher, clip, _vae = demo_model
    data = _collect(col, patcher, clip, "agd_test_record")
    assert len(data) == 2 * 2 * 4 * 2                 # prompts × trajectories × steps × images per trajectory
    assert data.x.dtype == torch.float32 and len(data.conds) == 2 and data.conds[0]["c_crossattn"].shape[0] == 1
    t = data.trajectory
    for j in range(4):
        rows = (t == j).nonzero().reshape(-1)
        x, u, s = data.x[rows], data.u[rows], data.sigma[rows]
        assert data.omega[rows].unique().numel() == 1 and 2.0 <= float(data.omega[rows][0]) <= 8.0
        assert int(data.prompt[rows][0]) == j % 2
        for k in range(3):                        # euler: x_{k+1} = x_k + (σ_{k+1} − σ_k)·u_k, per image
            a, b = rows[2 * k:2 * k + 2] - rows[0], rows[2 * k + 2:2 * k + 4] - rows[0]
            step = x[a] + (s[b] - s[a])[:, None, None, None] * u[a]
            torch.testing.assert_close(x[b], step, atol=1e-5, rtol=1e-5)
    # the stored target is D_u + ω·(D_c − D_u) of the model at the stored state
    i = (t == 1).nonzero().reshape(-1)[2:4]
    x, sigma, omega = data.x[i], data.sigma[i], float(data.omega[i][0])
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(encode(clip, "a blue square"), encode(clip, ""))
    guider.set_cfg(omega)
    want = data.x[i] - data.sigma[i][:, None, None, None] * data.u[i]
    torch.testing.assert_close(_predict(guider, x, sigma), want, atol=1e-4, rtol=1e-4)


def _predict(guider, x, sigma, *, grad=False):
    """The guider's prediction at (x, σ), through the host's whole sampling set-up (a one-call sampler); grad=True
    runs it with autograd on (as training does) instead of in inference mode."""
    import contextlib

    import comfy.samplers
    seen = {}

    def one_call(model, noise, sigmas, extra_args=None, callback=None, disable=None):
        seen["d"] = model(x, sigma, **(extra_args or {}))
        return x
    mode = contextlib.ExitStack()
    if grad:
        mode.enter_context(torch.inference_mode(False))
        mode.enter_context(torch.enable_grad())
    else:
        mode.enter_context(torch.inference_mode())
    with mode:
        guider.sample(torch.zeros_like(x), torch.zeros_like(x), comfy.samplers.KSAMPLER(one_call),
                      torch.tensor([float(sigma[0]), 0.0]), seed=0, disable_pbar=True)
    return seen["d"]


def _predictor(clip, x, sigma):
    """predict(model, grad=False): the model's cfg-1 prediction for 'a red circle' at (x, σ) through a CFGGuider."""
    import comfy.samplers

    def predict(m, grad=False):
        guider = comfy.samplers.CFGGuider(m)
        guider.set_conds(encode(clip, "a red circle"), encode(clip, ""))
        guider.set_cfg(1.0)
        return _predict(guider, x, sigma, grad=grad).detach()
    return predict


def test_inference_runs_the_folded_adapters_with_the_modules_outputs(agd, demo_model):
    """In inference the UNet sites run kernels' FoldedAttention (folded key/value maps, one ψ(ω) per run); with
    autograd on (training) they run the modules. Both give the same prediction, for the node's ω and per-row ω."""
    patcher, clip, _vae = demo_model
    adapter = _randomise(agd.build_adapters(patcher, hidden=32, features=16), std=0.2)
    adapter.modules.requires_grad_(False)     # the host's weights are inference tensors: autograd on, nothing tracked
    g = torch.Generator().manual_seed(3)
    x, sigma = torch.randn(2, 3, 16, 16, generator=g) * 3.0, torch.tensor([3.0, 3.0])

    predict = _predictor(clip, x, sigma)
    base = predict(patcher, False)
    m = agd.apply_adapters(patcher, adapter, 5.0)
    folded, module = predict(m, False), predict(m, True)
    assert (folded - base).abs().max() > 1e-2                        # the adapters act
    torch.testing.assert_close(folded, module, atol=1e-4, rtol=1e-4)
    per_row = agd.apply_adapters(patcher, adapter, 5.0)
    per_row.model_options["transformer_options"]["guidance_lab"] = {"agd_omega": torch.tensor([5.0, 9.0])}
    rows_folded, rows_module = predict(per_row, False), predict(per_row, True)
    torch.testing.assert_close(rows_folded, rows_module, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rows_folded[0], folded[0], atol=1e-5, rtol=1e-5)
    nine = predict(agd.apply_adapters(patcher, adapter, 9.0), False)
    torch.testing.assert_close(rows_folded[1], nine[1], atol=1e-5, rtol=1e-5)
    # retrained in place (a training step): the next inference call refolds
    with torch.no_grad():
        for a in adapter.modules.values():
            a.out.weight.mul_(-1.0)
    torch.testing.assert_close(predict(m, False), predict(m, True), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(predict(m, False), folded, atol=1e-3)


def test_gained_adapters_vanish_at_omega_one_and_run_alike_in_every_form(agd, demo_model, text_model, tmp_path):
    """omega_gain (Guidance Lab design): the residual is multiplied by ω − 1, so at ω = 1 the adapted model is the
    base model whatever the weights; the folded inference form, the training form and a reloaded file agree."""
    patcher, clip, _vae = demo_model
    adapter = _randomise(agd.build_adapters(patcher, hidden=32, features=16, omega_gain=True), std=0.2)
    adapter.modules.requires_grad_(False)
    assert adapter.config["omega_gain"] is True
    assert "omega_gain" not in agd.build_adapters(patcher, hidden=8, features=4).config   # the paper's architecture
    g = torch.Generator().manual_seed(4)
    x, sigma = torch.randn(2, 3, 16, 16, generator=g) * 3.0, torch.tensor([3.0, 3.0])

    predict = _predictor(clip, x, sigma)
    base = predict(patcher)
    assert torch.equal(predict(agd.apply_adapters(patcher, adapter, 1.0)), base)
    five = agd.apply_adapters(patcher, adapter, 5.0)
    folded = predict(five)
    assert (folded - base).abs().max() > 1e-2
    torch.testing.assert_close(predict(five, True), folded, atol=1e-4, rtol=1e-4)
    rows = agd.apply_adapters(patcher, adapter, 5.0)
    rows.model_options["transformer_options"]["guidance_lab"] = {"agd_omega": torch.tensor([1.0, 5.0])}
    for grad in (False, True):
        got = predict(rows, grad)
        torch.testing.assert_close(got[0], base[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], folded[1], atol=1e-4, rtol=1e-4)
    back = agd.load(agd.save(adapter, tmp_path / "gained.safetensors"))
    assert back.config == adapter.config and torch.equal(predict(agd.apply_adapters(patcher, back, 5.0)), folded)
    flux, fclip = text_model("flux")
    pos, neg = encode(fclip, "a red circle"), encode(fclip, "")
    dit = _randomise(agd.build_adapters(flux, hidden=16, features=16, omega_gain=True), std=0.2)
    fbase = run(flux, pos, neg, 1.0, batch=2, steps=3)
    assert torch.equal(run(agd.apply_adapters(flux, dit, 1.0), pos, neg, 1.0, batch=2, steps=3), fbase)
    assert not torch.allclose(run(agd.apply_adapters(flux, dit, 4.0), pos, neg, 1.0, batch=2, steps=3), fbase)


def test_top_sites_and_heads_run_alike_in_every_form(agd, demo_model, tmp_path):
    """top_sites and heads (Guidance Lab design): adapters also on the inputs of the UNet's full-resolution output
    blocks, with several attention heads. Zero adapters are the base model; the folded and training forms and a
    reloaded file agree; files without the keys keep the paper's placement and one head."""
    patcher, clip, _vae = demo_model
    plain = agd.sites(patcher)
    top = agd.sites(patcher, top=True)
    assert set(top) - set(plain) == {"top_6", "top_7", "top_8"}            # 3 output blocks at 32×32 (levels 2, 1, 0)
    assert all(top[k] == (64, 96) for k in ("top_6", "top_7", "top_8")) and all(top[k] == plain[k] for k in plain)
    adapter = agd.build_adapters(patcher, hidden=32, features=16, top_sites=True, heads=4)
    paper = agd.build_adapters(patcher, hidden=8).config
    assert adapter.config["top_sites"] is True and adapter.config["heads"] == 4
    assert "top_sites" not in paper and "heads" not in paper
    assert all(a.heads == 4 for a in adapter.modules.values())
    g = torch.Generator().manual_seed(5)
    x, sigma = torch.randn(2, 3, 16, 16, generator=g) * 3.0, torch.tensor([3.0, 3.0])

    predict = _predictor(clip, x, sigma)
    base = predict(patcher)
    assert torch.equal(predict(agd.apply_adapters(patcher, adapter, 5.0)), base)
    _randomise(adapter, std=0.2)
    adapter.modules.requires_grad_(False)
    seen = []
    for name in ("top_6", "top_8"):
        adapter.modules[name].register_forward_hook(lambda mod, args, out, name=name: seen.append(name))
    with torch.no_grad():                                # only the top sites act: their effect alone moves the output
        only_top = agd.AGDAdapter(adapter.modules, adapter.family, adapter.config, adapter.sites)
        for name, a in only_top.modules.items():
            if not name.startswith("top_"):
                a.out.weight.zero_()
    m = agd.apply_adapters(patcher, only_top, 5.0)
    folded = predict(m)
    assert (folded - base).abs().max() > 1e-2
    module = predict(m, True)
    torch.testing.assert_close(folded, module, atol=1e-4, rtol=1e-4)
    assert seen == ["top_6", "top_8"]                    # the training form ran the modules, once per site
    back = agd.load(agd.save(adapter, tmp_path / "top.safetensors"))
    assert back.config == adapter.config and back.sites == adapter.sites
    assert all(a.heads == 4 for a in back.modules.values())
    assert torch.equal(predict(agd.apply_adapters(patcher, back, 5.0)), folded)


def test_the_prompt_keys_kept_between_calls_follow_the_prompt(agd, demo_model):
    """The prompt tokens' keys/values are kept while the prompt stays the same (checked by value once per call on
    CPU); a new prompt, or a batch of two prompts, on the same patched model gives what a fresh one gives."""
    patcher, clip, _vae = demo_model
    adapter = _randomise(agd.build_adapters(patcher, hidden=32, features=16), std=0.2)
    neg = encode(clip, "")
    m = agd.apply_adapters(patcher, adapter, 5.0)
    red, blue = encode(clip, "a red circle"), encode(clip, "a blue square")
    first = run(m, red, neg, 1.0, batch=2, steps=3)
    second = run(m, blue, neg, 1.0, batch=2, steps=3)
    fresh = run(agd.apply_adapters(patcher, adapter, 5.0), blue, neg, 1.0, batch=2, steps=3)
    assert torch.equal(second, fresh) and not torch.allclose(first, second)
    assert torch.equal(run(m, red, neg, 1.0, batch=2, steps=3), first)
    # two prompts in one batch (the rows of a combined conditioning): each row gets its own prompt's keys
    both = [[torch.cat([red[0][0], blue[0][0]]), dict(red[0][1])]]
    mixed = run(m, both, neg, 1.0, batch=2, steps=3)
    torch.testing.assert_close(mixed[0], first[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], second[1], atol=1e-5, rtol=1e-5)


def test_collection_resumes_from_its_shards_and_refuses_other_settings(col, demo_model):
    patcher, clip, _vae = demo_model
    first = _collect(col, patcher, clip, "agd_test_resume", steps=2, trajectories_per_prompt=1)
    counted, counter = count_rows(patcher)
    again = _collect(col, counted, clip, "agd_test_resume", steps=2, trajectories_per_prompt=1)
    assert counter["calls"] == 0 and torch.equal(first.x, again.x) and torch.equal(first.u, again.u)
    with pytest.raises(ValueError, match=r"GL_AGDCollect: .* already holds a collection made with other settings"):
        _collect(col, patcher, clip, "agd_test_resume", steps=3, trajectories_per_prompt=1)
    with pytest.raises(ValueError, match=r"GL_AGDCollect: the guidance range \[5.0, 2.0\]"):
        _collect(col, patcher, clip, "agd_test_bad", omega_min=5.0, omega_max=2.0)


def test_training_lowers_the_held_out_loss_and_the_file_round_trips(agd, col, trn, demo_model, text_model,
                                                                   tmp_path):
    patcher, clip, _vae = demo_model
    data = _collect(col, patcher, clip, "agd_test_train", precision="fp16")
    assert data.x.dtype == torch.float16
    with torch.inference_mode():
        adapter = trn.train_agd(patcher, data, hidden=16, features=16, steps=12, batch_size=8, learning_rate=3e-3)
    hist = adapter.info["loss_history"]
    assert hist[0][0] == 0 and hist[-1][0] == 12 and hist[-1][1] < 0.97 * hist[0][1]
    assert adapter.info["parameters"] == adapter.parameters() < 0.05 * sum(
        v.numel() for k, v in patcher.model_state_dict().items() if k.startswith("diffusion_model."))
    path = agd.save(adapter, tmp_path / "a.safetensors")
    back = agd.load(path)
    assert back.family == "UNet" and back.sites == adapter.sites and back.config == adapter.config
    sd_a, sd_b = adapter.modules.state_dict(), back.modules.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert any(k.endswith("omega.freqs") for k in sd_b)                  # the Fourier buffers travel with the file
    pos, neg = encode(clip, "a red circle"), encode(clip, "")
    a = run(agd.apply_adapters(patcher, adapter, 5.0), pos, neg, 1.0, batch=2, steps=3)
    b = run(agd.apply_adapters(patcher, back, 5.0), pos, neg, 1.0, batch=2, steps=3)
    assert torch.equal(a, b) and not torch.equal(a, run(patcher, pos, neg, 1.0, batch=2, steps=3))
    with pytest.raises(ValueError, match="GL_AGDTrain: the data in .* was collected from another model"):
        trn.train_agd(text_model("flux")[0], data, steps=1)


@pytest.mark.parametrize("family", ["demo", "flux"])
def test_relative_objective_lowers_its_held_out_loss(col, trn, demo_model, text_model, family):
    patcher, clip = demo_model[:2] if family == "demo" else text_model("flux")
    data = _collect(col, patcher, clip, f"agd_test_relative_{family}", steps=3)
    with torch.inference_mode():
        adapter = trn.train_agd(patcher, data, hidden=16, features=16, steps=12, batch_size=8, learning_rate=1e-2,
                                objective="relative")
    hist = adapter.info["loss_history"]
    assert adapter.info["objective"] == "relative" and all(len(row) == 3 for row in hist)
    # step 0 is the conditional model itself: relative loss 1 on every row whose gap is above the floor
    assert 0.5 < hist[0][2] <= 1.0 + 1e-6 and hist[-1][2] < 0.97 * hist[0][2]
    with pytest.raises(ValueError, match="GL_AGDTrain: objective must be one of paper, relative; got 'l1'"):
        trn.train_agd(patcher, data, steps=1, objective="l1")


def test_relative_gaps_are_computed_once_per_row_and_match_a_fresh_forward(agd, col, trn, demo_model):
    patcher, clip, _vae = demo_model
    data = _collect(col, patcher, clip, "agd_test_relative_demo", steps=3)
    adapter = agd.build_adapters(patcher, hidden=16, features=16)
    with torch.inference_mode():
        t = agd.apply_adapters(patcher, _randomise(adapter), 5.0)
        batches = trn._Batches(t, patcher, data, torch.device("cpu"), "eps", 1.0)
        idx = torch.tensor([0, 3, 3, 5])
        gaps = batches.gaps(idx)
        assert batches.base_forwards == 3 and torch.equal(gaps[1], gaps[2])
        x, sigma, _omega, cond, target = batches._rows(idx)
        base = patcher.model.apply_model(x, sigma, transformer_options={"sigmas": sigma}, **cond)
        expected = (base.float() - target).square().flatten(1).mean(1)
        torch.testing.assert_close(gaps, expected, rtol=1e-5, atol=1e-9)
        batches.gaps(torch.tensor([3, 5, 7]))
        assert batches.base_forwards == 4                              # only row 7 is new
        # the relative loss from the kept gaps is the one a fresh forward gives
        paper, rel = batches.losses(idx, True)
        student = t.model.apply_model(x, sigma, transformer_options={
            **t.model_options["transformer_options"], "sigmas": sigma,
            "guidance_lab": {agd.OMEGA_KEY: data.omega[idx]}}, **cond)
        torch.testing.assert_close(rel, trn.ak.relative_distill_loss(student, target, base).mean(), rtol=1e-5,
                                   atol=1e-7)


def test_bf16_training_lowers_the_loss_and_measures_the_history_in_float32(col, trn, demo_model):
    patcher, clip, _vae = demo_model
    data = _collect(col, patcher, clip, "agd_test_relative_demo", steps=3)
    kw = dict(hidden=16, features=16, steps=12, batch_size=8, learning_rate=1e-2, objective="relative")
    with torch.inference_mode():
        bf16 = trn.train_agd(patcher, data, precision="bf16", **kw)
        fp32 = trn.train_agd(patcher, data, steps=1, **{k: v for k, v in kw.items() if k != "steps"})
    hist = bf16.info["loss_history"]
    assert bf16.info["precision"] == "bf16" and hist[-1][2] < 0.97 * hist[0][2]
    assert hist[0] == fp32.info["loss_history"][0]           # the untrained rows, measured alike in both
    with pytest.raises(ValueError, match="GL_AGDTrain: precision must be one of fp32, bf16; got 'fp16'"):
        trn.train_agd(patcher, data, steps=1, precision="fp16")


def test_training_on_a_flow_model_lowers_the_held_out_loss(col, trn, text_model):
    patcher, clip = text_model("flux")
    data = _collect(col, patcher, clip, "agd_test_flux", steps=3)
    with torch.inference_mode():
        adapter = trn.train_agd(patcher, data, hidden=16, features=16, steps=12, batch_size=8, learning_rate=1e-2)
    hist = adapter.info["loss_history"]
    assert adapter.family == "Flux" and hist[-1][1] < 0.97 * hist[0][1]


def test_adapters_compose_with_a_lora(agd, demo_model):
    patcher, clip, _vae = demo_model
    pos, neg = encode(clip, "a red circle"), encode(clip, "")
    key = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"
    w = patcher.model_state_dict()[key]
    lora = patcher.clone()
    lora.add_patches({key: (torch.randn(w.shape, generator=torch.Generator().manual_seed(3)) * 0.2,)}, 1.0)
    adapter = _randomise(agd.build_adapters(patcher, hidden=16, features=16))
    both, counter = count_rows(agd.apply_adapters(lora, adapter, 5.0))
    out = run(both, pos, neg, 1.0, batch=2, steps=3)
    only_lora = run(lora, pos, neg, 1.0, batch=2, steps=3)
    only_adapter = run(agd.apply_adapters(patcher, adapter, 5.0), pos, neg, 1.0, batch=2, steps=3)
    assert counter["rows"] == 6
    assert not torch.allclose(out, only_lora) and not torch.allclose(out, only_adapter)


def test_mismatched_models_get_clear_errors(agd, demo_model, tiny):
    patcher, _clip, _vae = demo_model
    adapter = agd.build_adapters(patcher, hidden=16, features=16)
    with pytest.raises(agd.AGDError, match=r"GL_AGDApply: the adapter was made for a UNet model \(BaseModel\) "
                                           r"with 11 sites; this UNet model \(BaseModel\) has 7 and they differ"):
        agd.apply_adapters(tiny("sd15_eps"), adapter, 5.0)
    with pytest.raises(agd.AGDError, match=r"GL_AGDApply: the adapter .* made for a UNet .* this Flux model"):
        agd.apply_adapters(tiny("flux"), adapter, 5.0)
    with pytest.raises(agd.AGDError, match="GL_AGDApply: connect a GL_AGD_ADAPTER"):
        agd.apply_adapters(patcher, {"not": "an adapter"}, 5.0)


def test_sampling_the_distilled_model_with_cfg_above_one_is_warned_once(agd, demo_model, caplog):
    import logging
    patcher, clip, _vae = demo_model
    pos, neg = encode(clip, "a red circle"), encode(clip, "")
    m = agd.apply_adapters(patcher, agd.build_adapters(patcher, hidden=16, features=16), 5.0)
    with caplog.at_level(logging.WARNING):
        run(m, pos, neg, 1.0, batch=1, steps=2)
        assert "sampled with cfg != 1" not in caplog.text
        run(m, pos, neg, 5.0, batch=1, steps=2)
    assert caplog.text.count("GL_AGDApply: the model with distilled guidance is being sampled with cfg != 1") == 1
