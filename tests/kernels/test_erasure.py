"""kernels/erasure.py: the UCE closed form against its defining formula and objective, the constrained
(protect_uncond) solve, token pairing and the LoRA truncation."""
from __future__ import annotations

import pytest
import torch

from kernels import erasure as ek


def _data(seed=0, out=12, d=16, ne=3, npres=4):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, d, generator=g, dtype=torch.float64)
    ce = torch.randn(d, ne, generator=g, dtype=torch.float64)
    ca = torch.randn(d, ne, generator=g, dtype=torch.float64)
    cp = torch.randn(d, npres, generator=g, dtype=torch.float64)
    return w, ce, ca, cp


def test_delta_equals_the_published_closed_form():
    w, ce, ca, cp = _data()
    lam, se, sp = 0.5, 1.3, 0.7
    v = w @ ca
    d = w.shape[1]
    m = lam * torch.eye(d, dtype=torch.float64) + se * ce @ ce.T + sp * cp @ cp.T
    w_new = (lam * w + se * v @ ce.T + sp * (w @ cp) @ cp.T) @ torch.linalg.inv(m)
    delta = ek.closed_form_delta(w, ce, v, cp, lam=lam, erase_scale=se, preserve_scale=sp)
    torch.testing.assert_close(delta, w_new - w, rtol=1e-9, atol=1e-10)


def _objective(w_new, w, ce, v, cp, lam, se, sp):
    return (se * ((w_new @ ce - v) ** 2).sum() + sp * ((w_new @ cp - w @ cp) ** 2).sum()
            + lam * ((w_new - w) ** 2).sum())


def test_delta_minimises_the_objective():
    w, ce, ca, cp = _data(1)
    v = w @ ca
    delta = ek.closed_form_delta(w, ce, v, cp, lam=0.5)
    best = _objective(w + delta, w, ce, v, cp, 0.5, 1.0, 1.0)
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        nudge = 1e-3 * torch.randn(delta.shape, generator=g, dtype=torch.float64)
        assert _objective(w + delta + nudge, w, ce, v, cp, 0.5, 1.0, 1.0) > best


def test_small_lambda_maps_erase_states_onto_the_alternative_and_keeps_preserved_ones():
    w, ce, ca, cp = _data(2, d=32)
    delta = ek.closed_form_delta(w, ce, w @ ca, cp, lam=1e-6)
    torch.testing.assert_close((w + delta) @ ce, w @ ca, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((w + delta) @ cp, w @ cp, rtol=1e-4, atol=1e-4)


def test_empty_erase_set_or_zero_scale_gives_a_zero_patch():
    w, _ce, _ca, cp = _data(3)
    empty = torch.zeros(w.shape[1], 0, dtype=w.dtype)
    assert torch.equal(ek.closed_form_delta(w, empty, torch.zeros(w.shape[0], 0, dtype=w.dtype), cp),
                       torch.zeros_like(w))
    _w, ce, ca, _cp = _data(3)
    assert torch.equal(ek.closed_form_delta(w, ce, w @ ca, cp, erase_scale=0.0), torch.zeros_like(w))


def test_erasing_a_concept_onto_itself_changes_nothing():
    w, ce, _ca, cp = _data(4)
    assert torch.count_nonzero(ek.closed_form_delta(w, ce, w @ ce, cp)) == 0


def test_protected_span_is_kept_exactly_and_the_constrained_solve_beats_projection():
    w, ce, ca, cp = _data(5, d=24)
    g = torch.Generator().manual_seed(9)
    u = torch.randn(24, 6, generator=g, dtype=torch.float64)
    q = ek.span_basis(u)
    assert q.shape == (24, 6)
    v = w @ ca
    constrained = ek.closed_form_delta(w, ce, v, cp, protect=q)
    projected = ek.project_off(ek.closed_form_delta(w, ce, v, cp), q)
    for delta in (constrained, projected):
        assert float((delta @ u).abs().max()) < 1e-10 * float(w.abs().max())
    assert _objective(w + constrained, w, ce, v, cp, 0.5, 1, 1) < _objective(w + projected, w, ce, v, cp, 0.5, 1, 1)


def test_span_basis_drops_dependent_directions_and_surviving_fraction():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(10, 3, generator=g, dtype=torch.float64)
    u = torch.cat([a, a @ torch.randn(3, 4, generator=g, dtype=torch.float64)], 1)   # rank 3
    q = ek.span_basis(u)
    assert q.shape == (10, 3)
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=torch.float64))
    inside, outside = a[:, :1], torch.linalg.svd(a, full_matrices=True)[0][:, 3:4]
    torch.testing.assert_close(ek.surviving_fraction(inside, q), torch.zeros(1, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(ek.surviving_fraction(outside, q), torch.ones(1, dtype=torch.float64))


def test_inputs_are_not_modified_and_float32_comes_back_float32():
    w, ce, ca, cp = (t.float() for t in _data(6))
    copies = [t.clone() for t in (w, ce, ca, cp)]
    delta = ek.closed_form_delta(w, ce, w @ ca, cp, protect=ek.span_basis(cp[:, :1]))
    assert delta.dtype == torch.float32 and delta.shape == w.shape
    assert all(torch.equal(a, b) for a, b in zip((w, ce, ca, cp), copies))


def test_bad_arguments_raise_clear_errors():
    w, ce, ca, cp = _data(7)
    with pytest.raises(ValueError, match="lam must be > 0"):
        ek.closed_form_delta(w, ce, w @ ca, cp, lam=0.0)
    with pytest.raises(ValueError, match="shapes do not fit"):
        ek.closed_form_delta(w, ce[:-1], w @ ca, cp)
    with pytest.raises(ValueError, match="preserve vectors have width"):
        ek.closed_form_delta(w, ce, w @ ca, cp[:-1])
    with pytest.raises(ValueError, match="token mode"):
        ek.pair_positions("first", 2, 2, 77)


def test_pair_positions():
    assert ek.pair_positions("last_content", 3, 1, 77) == [(3, 1)]
    assert ek.pair_positions("last_content", 2, 0, 77) == [(2, 0)]          # empty alternative: its start token
    assert ek.pair_positions("all_content", 3, 2, 77) == [(3, 2), (2, 1), (1, 0)]
    assert ek.pair_positions("all_content", 1, 3, 77) == [(1, 3)]
    assert ek.pair_positions("all", 2, 5, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_pair_positions_without_start_token():
    """T5-style sequences: content from position 0, the end token right after it (empty prompt: the end token)."""
    assert ek.pair_positions("last_content", 3, 1, 77, first=0) == [(2, 0)]
    assert ek.pair_positions("last_content", 2, 0, 77, first=0) == [(1, 0)]
    assert ek.pair_positions("all_content", 3, 2, 77, first=0) == [(2, 1), (1, 0), (0, 0)]
    assert ek.pair_positions("all_content", 0, 0, 77, first=0) == [(0, 0)]
    assert ek.pair_positions("all", 2, 5, 3, first=0) == [(0, 0), (1, 1), (2, 2)]
    with pytest.raises(ValueError, match="first content position"):
        ek.pair_positions("last_content", 1, 1, 77, first=2)


def test_low_rank_by_rank_and_by_energy():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(20, 3, generator=g) @ torch.randn(3, 30, generator=g)              # rank 3
    up, down, err = ek.low_rank(delta, energy=1.0)
    assert up.shape == (20, 3) and down.shape == (3, 30) and err < 1e-5
    torch.testing.assert_close(up @ down, delta, rtol=1e-4, atol=1e-4)
    up1, down1, err1 = ek.low_rank(delta, rank=1)
    expected = float(torch.linalg.matrix_norm(delta - up1 @ down1) / torch.linalg.matrix_norm(delta))
    assert up1.shape == (20, 1) and abs(err1 - expected) < 1e-5 and err1 > 0.1
    _u, _d, err_e = ek.low_rank(delta, energy=0.5)
    assert err_e <= 0.5 ** 0.5 + 1e-6
    with pytest.raises(ValueError, match="rank > 0 or an energy"):
        ek.low_rank(delta, rank=0, energy=0.0)


def test_surgical_losses_values_and_the_stop_gradient():
    g = torch.Generator().manual_seed(0)
    e_erase, e_unc, r_alt, r_unc, e_p, r_p = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(6))
    e_erase.requires_grad_(True)
    e_unc.requires_grad_(True)
    out = ek.surgical_losses(e_erase, e_unc, r_alt, r_unc, eta=0.5, eps_preserve=e_p, ref_preserve=r_p)
    per = lambda a, b: (a - b).square().flatten(1).mean(1).mean()                        # noqa: E731
    torch.testing.assert_close(out["guidance"], per(e_erase - e_unc, 0.5 * (r_alt - r_unc)))
    torch.testing.assert_close(out["uncond"], per(e_unc, r_unc))
    torch.testing.assert_close(out["preserve"], per(e_p, r_p))
    (grad_unc,) = torch.autograd.grad(out["guidance"], e_unc, allow_unused=True, retain_graph=True)
    assert grad_unc is None or torch.count_nonzero(grad_unc) == 0                         # sg[ε'(x, ∅)] in L_g
    (grad_e,) = torch.autograd.grad(out["guidance"], e_erase)
    assert torch.count_nonzero(grad_e) > 0
    none = ek.surgical_losses(e_erase, e_unc, r_alt, r_unc)
    assert float(none["preserve"]) == 0.0
    # the tuned model equal to the frozen one with the alternative's guidance term: zero loss
    zero = ek.surgical_losses(r_unc + (r_alt - r_unc), r_unc, r_alt, r_unc)
    assert float(zero["guidance"]) < 1e-12 and float(zero["uncond"]) == 0.0
