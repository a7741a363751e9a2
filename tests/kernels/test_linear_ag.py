"""LinearAG kernel: the affine uncond predictor, the streaming per-step least-squares fit, the step schedule and
the safetensors coefficient files."""
import json
import math

import pytest
import torch

from kernels.linear_ag import (DEFAULT_COEFFICIENTS, FORMAT, LinearAGFit, load_coefficients, predict_uncond,
                               predicted_steps, save_coefficients)

SHAPES = [(2, 4, 8, 8), (2, 4, 3, 8, 8)]


def _randn(shape, g, dtype=torch.float64):
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _true_coefficients(n_steps):
    """Known per-step (a_k, b_k, c_k); row 0 is unused (no history)."""
    k = torch.arange(n_steps, dtype=torch.float64)
    return torch.stack([0.9 + 0.02 * k, 0.8 - 0.03 * k, -0.7 + 0.01 * k], dim=1)


def _trajectory(shape, n_steps, coeffs, seed, noise=0.0):
    """One prompt's (D_c, D_u) per step, D_u an exact linear recurrence in the coefficients (plus optional noise).

    D_c,k share a base so consecutive steps are correlated, as in a real run."""
    g = torch.Generator().manual_seed(seed)
    base = _randn(shape, g)
    dc = [base + 0.5 * _randn(shape, g) for _ in range(n_steps)]
    du = [_randn(shape, g)]
    for k in range(1, n_steps):
        a, b, c = coeffs[k].tolist()
        du.append(a * dc[k] + b * du[k - 1] + c * dc[k - 1] + noise * _randn(shape, g))
    return dc, du


def _fit(trajectories, n_steps, steps=None):
    fit = LinearAGFit(n_steps)
    for dc, du in trajectories:
        for k in (steps if steps is not None else range(1, n_steps)):
            fit.add(k, dc[k], du[k], dc[k - 1], du[k - 1])
    return fit


def _relative_residual(beta, dc, du, k):
    """‖D_u,k − D̂_u,k‖/‖D_u,k‖ over several prompts, computed directly from the tensors."""
    num = sum(float((u[k] - predict_uncond(beta, c[k], u[k - 1], c[k - 1])).pow(2).sum()) for c, u in zip(dc, du))
    den = sum(float(u[k].pow(2).sum()) for u in du)
    return math.sqrt(num / den)


# ---------------------------------------------------------------- predictor

@pytest.mark.parametrize("shape", SHAPES)
def test_default_predictor_reuses_previous_guidance_vector(shape):
    g = torch.Generator().manual_seed(0)
    dc, up, cp = (_randn(shape, g, torch.float32) for _ in range(3))
    assert DEFAULT_COEFFICIENTS == (1.0, 1.0, -1.0)
    out = predict_uncond(DEFAULT_COEFFICIENTS, dc, up, cp)
    assert out.dtype == torch.float32 and out.shape == dc.shape
    torch.testing.assert_close(out, dc - (cp - up))
    # with zero previous guidance vector, the prediction is D_c,k itself
    torch.testing.assert_close(predict_uncond(DEFAULT_COEFFICIENTS, dc, cp, cp), dc)


def test_predictor_is_the_affine_combination_for_tensor_and_sequence_coefficients():
    g = torch.Generator().manual_seed(1)
    dc, up, cp = (_randn((3, 4, 5, 5), g) for _ in range(3))
    expected = 0.7 * dc + 0.25 * up - 0.4 * cp
    torch.testing.assert_close(predict_uncond((0.7, 0.25, -0.4), dc, up, cp), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(predict_uncond(torch.tensor([0.7, 0.25, -0.4]), dc, up, cp), expected,
                               rtol=1e-6, atol=1e-6)
    assert predict_uncond([0.7, 0.25, -0.4], dc, up, cp).dtype == torch.float64


def test_predictor_float16_inputs_unchanged_and_dtype_preserved():
    g = torch.Generator().manual_seed(2)
    dc, up, cp = (_randn((2, 4, 8, 8), g, torch.float16) for _ in range(3))
    copies = [t.clone() for t in (dc, up, cp)]
    out = predict_uncond((1.1, 0.9, -0.8), dc, up, cp)
    assert out.dtype == torch.float16 and out.shape == dc.shape
    ref = 1.1 * dc.double() + 0.9 * up.double() - 0.8 * cp.double()
    assert (out.double() - ref).abs().max() < 1e-2
    assert all(torch.equal(a, b) for a, b in zip((dc, up, cp), copies))


@pytest.mark.parametrize("coefficients, match", [
    ((1.0, 1.0), "exactly 3 values"),
    (torch.ones(4), "exactly 3 values"),
    ((1.0, float("nan"), -1.0), "must be finite"),
    ("abc", "sequence of 3 numbers"),
    (None, "sequence of 3 numbers"),
])
def test_predictor_rejects_bad_coefficients(coefficients, match):
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match=match):
        predict_uncond(coefficients, x, x, x)


def test_predictor_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"same shape.*d_cond_prev \(1, 4, 2, 3\)"):
        predict_uncond(DEFAULT_COEFFICIENTS, torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2),
                       torch.zeros(1, 4, 2, 3))


# ---------------------------------------------------------------- least-squares fit

@pytest.mark.parametrize("shape", SHAPES)
def test_fit_recovers_exact_recurrence(shape):
    n = 8
    truth = _true_coefficients(n)
    trajs = [_trajectory(shape, n, truth, seed=10 + p) for p in range(3)]
    fit = _fit(trajs, n)
    coefficients, residuals = fit.solve()
    assert coefficients.dtype == torch.float64 and coefficients.shape == (n, 3)
    assert residuals.dtype == torch.float64 and residuals.shape == (n,)
    assert (coefficients[1:] - truth[1:]).abs().max() <= 1e-6
    assert residuals[1:].max() < 1e-6
    assert fit.count(3) == 3 * shape[0]
    # the fitted predictor reproduces the true D_u on every recorded step
    dc, du = trajs[1]
    for k in range(1, n):
        torch.testing.assert_close(predict_uncond(coefficients[k], dc[k], du[k - 1], dc[k - 1]), du[k],
                                   rtol=1e-6, atol=1e-6)


def test_fit_with_plain_least_squares_also_exact():
    n = 5
    truth = _true_coefficients(n)
    fit = _fit([_trajectory(SHAPES[0], n, truth, seed=20 + p) for p in range(2)], n)
    coefficients, residuals = fit.solve(ridge=0.0)
    assert (coefficients[1:] - truth[1:]).abs().max() <= 1e-8
    assert residuals[1:].max() < 1e-6


def test_fit_on_noisy_data_has_positive_residual_equal_to_the_direct_one():
    n, sigma = 6, 0.05
    truth = _true_coefficients(n)
    trajs = [_trajectory(SHAPES[1], n, truth, seed=30 + p, noise=sigma) for p in range(3)]
    coefficients, residuals = _fit(trajs, n).solve()
    assert (coefficients[1:] - truth[1:]).abs().max() < 0.02
    assert (residuals[1:] > 1e-3).all()
    dc, du = [t[0] for t in trajs], [t[1] for t in trajs]
    for k in range(1, n):
        direct = _relative_residual(coefficients[k], dc, du, k)
        assert residuals[k].item() == pytest.approx(direct, rel=1e-6)
        # least squares is no worse than the true coefficients, whose residual is the injected noise
        assert residuals[k].item() <= _relative_residual(truth[k], dc, du, k) * (1 + 1e-9)


@pytest.mark.parametrize("ridge", [0.0, 1e-10, 1e-6])
def test_fit_singular_system_when_uncond_history_equals_cond(ridge):
    n = 6
    truth = _true_coefficients(n)
    fit = LinearAGFit(n)
    data = []
    for p in range(2):
        g = torch.Generator().manual_seed(40 + p)
        dc = [_randn(SHAPES[0], g) for _ in range(n)]
        # D_u,k−1 == D_c,k−1: the columns b and c are identical, only b + c is determined
        y = [None] + [truth[k, 0] * dc[k] + (truth[k, 1] + truth[k, 2]) * dc[k - 1] for k in range(1, n)]
        for k in range(1, n):
            fit.add(k, dc[k], y[k], dc[k - 1], dc[k - 1])
        data.append((dc, y))
    coefficients, residuals = fit.solve(ridge=ridge)
    assert torch.isfinite(coefficients).all()
    tol = 1e-6 if ridge <= 1e-10 else 1e-4
    assert (coefficients[1:, 0] - truth[1:, 0]).abs().max() < tol
    assert ((coefficients[1:, 1] + coefficients[1:, 2]) - (truth[1:, 1] + truth[1:, 2])).abs().max() < tol
    # the undetermined direction b − c keeps the default's value 1 − (−1) = 2
    assert ((coefficients[1:, 1] - coefficients[1:, 2]) - 2.0).abs().max() < 1e-6
    assert residuals[1:].max() < max(tol, 1e-6)
    dc, y = data[0]
    for k in range(1, n):
        torch.testing.assert_close(predict_uncond(coefficients[k], dc[k], dc[k - 1], dc[k - 1]), y[k],
                                   rtol=tol, atol=tol)


def test_fit_all_zero_data_keeps_defaults():
    fit = LinearAGFit(3)
    z = torch.zeros(2, 4, 4, 4)
    fit.add(1, z, z, z, z)
    coefficients, residuals = fit.solve()
    assert coefficients[1].tolist() == list(DEFAULT_COEFFICIENTS)
    assert residuals[1].item() == 0.0


def test_step_zero_and_unrecorded_steps_get_defaults_and_nan():
    n = 6
    truth = _true_coefficients(n)
    fit = _fit([_trajectory(SHAPES[0], n, truth, seed=50)], n, steps=[1, 3])
    coefficients, residuals = fit.solve()
    for k in (0, 2, 4, 5):
        assert coefficients[k].tolist() == list(DEFAULT_COEFFICIENTS)
        assert math.isnan(residuals[k].item())
        assert fit.count(k) == 0
    for k in (1, 3):
        assert math.isfinite(residuals[k].item())
        assert fit.count(k) == 2
        assert (coefficients[k] - truth[k]).abs().max() <= 1e-6


def test_fit_is_independent_of_batch_split():
    n = 4
    truth = _true_coefficients(n)
    dc, du = _trajectory(SHAPES[1], n, truth, seed=60, noise=0.1)
    whole = _fit([(dc, du)], n)
    split = LinearAGFit(n)
    for i in range(2):
        for k in range(1, n):
            split.add(k, dc[k][i:i + 1], du[k][i:i + 1], dc[k - 1][i:i + 1], du[k - 1][i:i + 1])
    for a, b in zip(whole.solve(), split.solve()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, equal_nan=True)
    assert whole.count(2) == split.count(2) == 2


def test_fit_float16_inputs():
    n = 5
    truth = _true_coefficients(n)
    trajs = [_trajectory(SHAPES[0], n, truth, seed=70 + p) for p in range(2)]
    fit = LinearAGFit(n)
    for dc, du in trajs:
        for k in range(1, n):
            fit.add(k, *(t.to(torch.float16) for t in (dc[k], du[k], dc[k - 1], du[k - 1])))
    coefficients, residuals = fit.solve()
    assert (coefficients[1:] - truth[1:]).abs().max() < 1e-2
    assert (residuals[1:] > 0).all() and (residuals[1:] < 5e-3).all()   # float16 rounding, nothing else


@pytest.mark.parametrize("n_steps", [0, -3, 2.5, True, "10"])
def test_fit_rejects_bad_step_count(n_steps):
    with pytest.raises(ValueError, match="n_steps must be an integer >= 1"):
        LinearAGFit(n_steps)


def test_fit_add_and_solve_error_paths():
    fit = LinearAGFit(4)
    x = torch.zeros(2, 4, 2, 2)
    with pytest.raises(ValueError, match="step 0 has no previous step"):
        fit.add(0, x, x, x, x)
    with pytest.raises(ValueError, match=r"\[1, 4\).*got 4"):
        fit.add(4, x, x, x, x)
    with pytest.raises(ValueError, match="integer step index"):
        fit.add(1.0, x, x, x, x)
    with pytest.raises(ValueError, match=r"same shape.*d_uncond_prev \(1, 4, 2, 2\)"):
        fit.add(1, x, x, x, torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="no elements"):
        e = torch.zeros(2, 0, 2, 2)
        fit.add(1, e, e, e, e)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="step 2 contain NaN/inf"):
        fit.add(2, x, bad, x, x)
    assert fit.count(1) == 0 and fit.count(2) == 0             # rejected data left no trace
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        fit.count(5)
    for ridge in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ridge must be a finite number >= 0"):
            fit.solve(ridge=ridge)


# ---------------------------------------------------------------- schedule

def test_predicted_steps_alternate_in_first_half():
    F, T = False, True
    assert predicted_steps(10) == [F, T, F, T, F, F, F, F, F, F]
    twenty = predicted_steps(20)
    assert len(twenty) == 20 and [k for k, on in enumerate(twenty) if on] == [1, 3, 5, 7, 9]
    assert predicted_steps(1) == [F]
    assert predicted_steps(2) == [F, F]                       # k = 1 is not below 0.5·2
    assert [k for k, on in enumerate(predicted_steps(10, first_fraction=1.0)) if on] == [1, 3, 5, 7, 9]
    assert not any(predicted_steps(10, first_fraction=0.0))


def test_predicted_steps_residual_gating():
    nan, inf = float("nan"), float("inf")
    res = [nan, 0.01, 0.01, 0.2, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]
    assert [k for k, on in enumerate(predicted_steps(10, residuals=res)) if on] == [1]
    assert [k for k, on in enumerate(predicted_steps(10, residuals=res, tau=0.5)) if on] == [1, 3]
    res2 = [0.0, nan, 0.0, inf, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert not any(predicted_steps(10, residuals=torch.tensor(res2, dtype=torch.float64)))
    assert predicted_steps(10, residuals=[0.05] * 10) == [False] * 10   # strictly below tau


def test_predicted_steps_with_fitted_residuals():
    n = 10
    truth = _true_coefficients(n)
    fit = _fit([_trajectory(SHAPES[0], n, truth, seed=80)], n, steps=[1, 2, 3])   # k = 3 recorded, 5+ not
    _, residuals = fit.solve()
    assert [k for k, on in enumerate(predicted_steps(n, residuals=residuals)) if on] == [1, 3]


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_steps=0), "n_steps must be an integer >= 1"),
    (dict(n_steps=4.0), "n_steps must be an integer >= 1"),
    (dict(n_steps=10, first_fraction=-0.1), r"first_fraction must lie in \[0, 1\]"),
    (dict(n_steps=10, first_fraction=1.5), r"first_fraction must lie in \[0, 1\]"),
    (dict(n_steps=10, tau=0.0), "tau must be > 0"),
    (dict(n_steps=10, tau=float("nan")), "tau must be > 0"),
    (dict(n_steps=10, residuals=[0.0] * 9), r"one value per step \(10\), got 9"),
    (dict(n_steps=2, residuals=["a", "b"]), "sequence or tensor of numbers"),
])
def test_predicted_steps_rejects_bad_arguments(kwargs, match):
    n = kwargs.pop("n_steps")
    with pytest.raises(ValueError, match=match):
        predicted_steps(n, **kwargs)


# ---------------------------------------------------------------- files

def _table(n=6, seed=90):
    truth = _true_coefficients(n)
    return _fit([_trajectory(SHAPES[0], n, truth, seed=seed, noise=0.05)], n).solve()


def test_save_load_round_trip_is_bit_exact(tmp_path):
    coefficients, residuals = _table()
    meta = {"model": "sd15", "prompts": ["a red cube", "a blue ball"], "n_prompts": 2, "tau": 0.05}
    path = save_coefficients(tmp_path / "sub" / "linear_ag.safetensors", coefficients, residuals, meta)
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == ["linear_ag.safetensors"]
    c2, r2, m2 = load_coefficients(path)
    assert c2.dtype == r2.dtype == torch.float64
    assert torch.equal(c2.view(torch.int64), coefficients.view(torch.int64))
    assert torch.equal(r2.view(torch.int64), residuals.view(torch.int64))    # the NaN of step 0 included
    assert math.isnan(r2[0].item())
    assert m2["format"] == FORMAT and m2["model"] == "sd15"
    assert json.loads(m2["prompts"]) == meta["prompts"]
    assert json.loads(m2["n_prompts"]) == 2 and json.loads(m2["tau"]) == 0.05
    # overwriting an existing file replaces it in place
    save_coefficients(path, torch.tensor([DEFAULT_COEFFICIENTS] * 3, dtype=torch.float32),
                      [float("nan"), 0.1, 0.2], {})
    c3, r3, m3 = load_coefficients(path)
    assert c3.shape == (3, 3) and c3.dtype == torch.float64 and c3[2].tolist() == list(DEFAULT_COEFFICIENTS)
    assert r3[1].item() == pytest.approx(0.1) and set(m3) == {"format"}
    assert len(list(path.parent.iterdir())) == 1


@pytest.mark.parametrize("coefficients, residuals, metadata, match", [
    (torch.zeros(4, 2), torch.zeros(4), {}, r"shape \[n_steps, 3\]"),
    (torch.zeros(0, 3), torch.zeros(0), {}, r"shape \[n_steps, 3\]"),
    (torch.zeros(4, 3), torch.zeros(3), {}, r"residuals must have shape \[4\]"),
    (torch.tensor([[1.0, float("inf"), -1.0]]), torch.zeros(1), {}, r"must be finite, steps \[0\]"),
    (torch.zeros(2, 3), torch.tensor([0.0, -0.1]), {}, "negative"),
    (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2), {}, "floating point"),
    (torch.zeros(2, 3), torch.zeros(2), {1: "x"}, "keys must be strings"),
    (torch.zeros(2, 3), torch.zeros(2), {"x": object()}, "JSON-serialisable"),
    (torch.zeros(2, 3), torch.zeros(2), {"format": "other/2"}, "reserved"),
])
def test_save_rejects_bad_tables(tmp_path, coefficients, residuals, metadata, match):
    with pytest.raises(ValueError, match=match):
        save_coefficients(tmp_path / "c.safetensors", coefficients, residuals, metadata)
    assert list(tmp_path.iterdir()) == []


def _raw(path, tensors, metadata):
    import safetensors.torch
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def test_load_error_paths(tmp_path):
    with pytest.raises(ValueError, match="coefficient file not found"):
        load_coefficients(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not a safetensors header")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_coefficients(junk)
    good = {"coefficients": torch.zeros(2, 3, dtype=torch.float64), "residuals": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(ValueError, match="not a LinearAG coefficient file.*format=None"):
        load_coefficients(_raw(tmp_path / "nometa.safetensors", good, None))
    with pytest.raises(ValueError, match="format='other/1'"):
        load_coefficients(_raw(tmp_path / "other.safetensors", good, {"format": "other/1"}))
    fmt = {"format": FORMAT}
    with pytest.raises(ValueError, match=r"lacks the tensor\(s\) \['residuals'\]"):
        load_coefficients(_raw(tmp_path / "half.safetensors", {"coefficients": good["coefficients"]}, fmt))
    with pytest.raises(ValueError, match=r"shape \[n_steps, 3\].*\(2, 4\)"):
        load_coefficients(_raw(tmp_path / "shape.safetensors",
                               {"coefficients": torch.zeros(2, 4, dtype=torch.float64),
                                "residuals": good["residuals"]}, fmt))
    with pytest.raises(ValueError, match=r"residuals must have shape \[2\]"):
        load_coefficients(_raw(tmp_path / "res.safetensors",
                               {"coefficients": good["coefficients"],
                                "residuals": torch.zeros(3, dtype=torch.float64)}, fmt))
    nan = good["coefficients"].clone()
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"must be finite, steps \[1\]"):
        load_coefficients(_raw(tmp_path / "nan.safetensors", {"coefficients": nan, "residuals": good["residuals"]},
                               fmt))
    # the same tensors with the right metadata load fine
    c, r, m = load_coefficients(_raw(tmp_path / "ok.safetensors", good, fmt))
    assert torch.equal(c, good["coefficients"]) and m == fmt
