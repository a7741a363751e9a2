"""kernels/two_model.py: the unified multi-term family and its presets."""
import pytest
import torch

from kernels import two_model as tm


def _preds(seed=0, shape=(3, 4, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(4)]


def test_cfg_is_the_two_term_member():
    d_c, d_u, _, _ = _preds()
    r = tm.preset("cfg", cfg=6.0)
    out = tm.reference_combine(d_c, [d_u], [t.coefficient for t in r.terms])
    torch.testing.assert_close(out, d_u + 6.0 * (d_c - d_u), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", tm.MODES)
def test_weights_sum_to_one_and_match_the_published_coefficients(mode):
    w, s2 = 5.0, 0.3
    r = tm.preset(mode, cfg=w, scale_2=s2)
    coeffs = [t.coefficient for t in r.terms]
    a = tm.weights(coeffs)
    assert sum(a) == pytest.approx(1.0, abs=1e-12)
    expected_ref = {"cfg": w, "autoguidance": w, "npo": w, "cfg+autoguidance": w + s2 - 1.0,
                    "sine": w * (1 - s2), "hybrid": w - s2}[mode]
    assert a[0] == pytest.approx(expected_ref)
    assert sum(t.pair for t in r.terms) == 1


def test_sine_outside_its_window_is_cfg_and_hybrid_equals_its_expanded_form():
    d_c, d_u, d_x, _ = _preds(1)
    w, v = 7.5, 0.3
    sine = tm.preset("sine", cfg=w, scale_2=v)
    coeff = {t.cond: t.coefficient for t in sine.terms}
    inside = tm.reference_combine(d_c, [d_u, d_x], [coeff["negative"], coeff["positive_2"]])
    torch.testing.assert_close(inside, d_u + w * ((1 - v) * d_c + v * d_x - d_u), rtol=1e-5, atol=1e-4)
    outside = tm.reference_combine(d_c, [d_u, d_x], [coeff["negative"], 0.0])
    torch.testing.assert_close(outside, d_u + w * (d_c - d_u), rtol=1e-5, atol=1e-4)
    wb, wp = 7.5, 2.0
    hy = tm.preset("hybrid", cfg=wb, scale_2=wp)
    c = {t.cond: t.coefficient for t in hy.terms}
    out = tm.reference_combine(d_c, [d_u, d_x], [c["negative"], c["positive_2"]])
    torch.testing.assert_close(out, d_u + wb * (d_c - d_u) + wp * (d_x - d_c), rtol=1e-5, atol=1e-4)


def test_autoguidance_with_an_identical_guide_is_the_conditional_prediction():
    d_c = _preds(2)[0]
    r = tm.preset("autoguidance", cfg=2.3)
    assert torch.equal(tm.reference_combine(d_c, [d_c.clone()], [r.terms[0].coefficient]), d_c)


def test_per_sample_coefficients_and_cap_are_per_sample():
    d_ref, d_k, _, _ = _preds(3, shape=(2, 3, 4, 4, 4))          # 5-D video latent
    out = tm.reference_combine(d_ref, [d_k], [torch.tensor([0.0, -1.0])])
    assert torch.equal(out[0], d_ref[0])
    torch.testing.assert_close(out[1], 2 * d_ref[1] - d_k[1])
    big = d_ref + 0.01 * (d_k - d_ref)                             # sample 0: far below the cap
    big[1] = d_ref[1] + 100 * (d_k[1] - d_ref[1])                   # sample 1: far above it
    capped = tm.cap_ratio(big - d_ref, d_ref, 0.5)
    norms = capped.flatten(1).norm(dim=1)
    ref_norms = d_ref.flatten(1).norm(dim=1)
    assert float(norms[1]) == pytest.approx(0.5 * float(ref_norms[1]), rel=1e-5)
    assert torch.equal(capped[0], (big - d_ref)[0])
    assert torch.equal(tm.cap_ratio(big - d_ref, d_ref, 0.0), big - d_ref)


def test_inputs_are_not_modified_and_dtype_is_kept():
    d_ref, d_k, _, _ = [p.half() for p in _preds(4)]
    before = (d_ref.clone(), d_k.clone())
    out = tm.reference_combine(d_ref, [d_k], [-1.5], max_ratio=0.2)
    assert out.dtype == torch.float16
    assert torch.equal(d_ref, before[0]) and torch.equal(d_k, before[1])


def test_bad_input():
    with pytest.raises(ValueError, match="unknown mode"):
        tm.preset("bogus", cfg=1.0)
    d = _preds()[0]
    with pytest.raises(ValueError, match="coefficients"):
        tm.reference_combine(d, [d, d], [1.0])
