"""kernels/multi_condition.py: nested and composable multi-condition CFG, accelerated nested variant."""
import pytest
import torch

from kernels import multi_condition as mc


def _preds(n, seed=0, shape=(2, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), [torch.randn(shape, generator=g) for _ in range(n)]


def _nested_literal(d_u, d_cum, scales):
    out, prev = d_u.clone(), d_u
    for s, d in zip(scales, d_cum):
        out = out + s * (d - prev)
        prev = d
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_nested_matches_the_literal_telescoping_sum(n):
    d_u, d = _preds(n, seed=n)
    scales = [7.5, 3.0, 2.0, 5.0][:n]
    out = mc.combine(d_u, d, mc.effective_coefficients(scales, mc.NESTED))
    torch.testing.assert_close(out, _nested_literal(d_u, d, scales), rtol=1e-5, atol=1e-5)


def test_equal_scales_nested_is_cfg_on_the_joint_condition_and_n1_is_cfg():
    d_u, d = _preds(3, seed=5)
    e = mc.effective_coefficients([4.0, 4.0, 4.0], mc.NESTED)
    assert e == [0.0, 0.0, 4.0]                 # only the joint condition is needed
    out = mc.combine(d_u, [None, None, d[2]], e)
    torch.testing.assert_close(out, d_u + 4.0 * (d[2] - d_u))
    for form in mc.FORMS:
        torch.testing.assert_close(mc.combine(d_u, d[:1], mc.effective_coefficients([6.0], form)),
                                   d_u + 6.0 * (d[0] - d_u))


def test_composable_is_a_sum_of_independent_contrasts():
    d_u, d = _preds(2, seed=7)
    out = mc.combine(d_u, d, mc.effective_coefficients([3.0, 2.0], mc.COMPOSABLE))
    torch.testing.assert_close(out, d_u + 3.0 * (d[0] - d_u) + 2.0 * (d[1] - d_u), rtol=1e-5, atol=1e-5)


def test_accelerated_reuse_keeps_the_telescoping_exact():
    d_u, d = _preds(3, seed=9)
    cache = mc.PartialDifferences()
    cache.store(0, d_u, d)
    assert cache.ready(3, 2) and not cache.ready(3, 4) and not cache.ready(2, 2)
    # same step again: the filled predictions reproduce the measured ones
    filled = cache.fill(d_u, d[2])
    for a, b in zip(filled, d):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # a later step with a new ∅ and joint prediction: equal scales still give exact CFG on the joint condition
    d_u2, new = _preds(1, seed=10)
    filled = cache.fill(d_u2, new[0])
    out = mc.combine(d_u2, filled, mc.effective_coefficients([5.0, 5.0, 5.0], mc.NESTED))
    torch.testing.assert_close(out, d_u2 + 5.0 * (new[0] - d_u2))
    assert [mc.refresh_due(i, 2) for i in range(4)] == [True, False, True, False]
    assert mc.refresh_due(3, 1) and mc.refresh_due(None, 3)


def test_inputs_unchanged_and_bad_input():
    d_u, d = _preds(2, seed=11)
    before = [t.clone() for t in [d_u, *d]]
    mc.combine(d_u, d, [1.0, 2.0])
    assert all(torch.equal(a, b) for a, b in zip(before, [d_u, *d]))
    with pytest.raises(ValueError, match="unknown form"):
        mc.effective_coefficients([1.0], "bogus")
    with pytest.raises(ValueError, match="not evaluated"):
        mc.combine(d_u, [None], [2.0])
