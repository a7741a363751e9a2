"""kernels/agd.py: the ω embedding, the zero-initialised attention adapter, the CFG teacher and the distillation
loss against the ε-MSE it stands for."""
from __future__ import annotations

import pytest
import torch

from kernels import agd


def test_omega_embedding_is_deterministic_and_its_fourier_buffers_are_saved():
    a, b = agd.OmegaEmbedding(16, seed=3), agd.OmegaEmbedding(16, seed=3)
    assert torch.equal(a.freqs, b.freqs) and torch.equal(a.phases, b.phases)
    assert {"freqs", "phases"} <= set(a.state_dict())
    assert not torch.equal(agd.OmegaEmbedding(16, seed=4).freqs, a.freqs)
    torch.manual_seed(0)
    e = agd.OmegaEmbedding(16)
    out = e(torch.tensor([1.0, 7.5, 12.0]))
    assert out.shape == (3, 16)
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(out.mean(1), torch.zeros(3), atol=1e-5, rtol=0)       # LayerNorm output


def test_untrained_adapter_adds_exactly_nothing_and_learns_through_its_output():
    torch.manual_seed(0)
    ad = agd.AttentionAdapter(24, hidden=32, d_time=8, d_context=12)
    h, w = torch.randn(2, 10, 24), torch.tensor([3.0, 9.0])
    t, c = torch.randn(2, 8), torch.randn(2, 5, 12)
    out = ad(h, w, t, c)
    assert out.shape == h.shape and torch.count_nonzero(out) == 0
    out.sum().backward()                                 # W_o = 0: the gradient reaches W_o (and its bias) only
    assert ad.out.weight.grad.abs().sum() > 0 and ad.q.weight.grad.abs().sum() == 0
    with torch.no_grad():
        ad.out.weight.normal_(std=0.1)
    a, b = ad(h, w, t, c), ad(h, torch.tensor([3.0, 4.0]), t, c)
    assert torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])     # per-sample ω
    assert ad.tokens(w, t, c).shape == (2, 1 + 1 + 5, 32)
    with pytest.raises(ValueError, match="pass time_emb"):
        ad(h, w, None, c)


def test_token_positions():
    p = agd.token_positions(4, 6)
    assert p.shape == (4, 6)
    torch.testing.assert_close(p[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    assert p[1, 0] == pytest.approx(torch.sin(torch.tensor(1.0)).item())


def test_cfg_target_and_the_loss_equal_the_eps_mse():
    g = torch.Generator().manual_seed(1)
    x, dc, du, ds = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(4))
    omega = torch.tensor([1.0, 5.0, 12.0])
    t = agd.cfg_target(dc, du, omega)
    torch.testing.assert_close(t[0], dc[0])
    torch.testing.assert_close(t[2], du[2] + 12 * (dc[2] - du[2]))
    sigma, alpha = torch.tensor([0.2, 1.0, 3.0]), torch.tensor([0.8, 0.5, 1.0])
    a, s = alpha[:, None, None, None], sigma[:, None, None, None]
    eps_s, eps_t = (x - a * ds) / s, (x - a * t) / s
    torch.testing.assert_close(agd.distill_loss(ds, t, sigma, alpha), (eps_s - eps_t).square().mean(dim=(1, 2, 3)))
    torch.testing.assert_close(agd.distill_loss(ds, t, sigma), ((ds - t) / s).square().mean(dim=(1, 2, 3)))


def test_relative_loss_is_the_error_over_the_guidance_gap_and_scores_the_conditional_model_one():
    g = torch.Generator().manual_seed(2)
    dc, dt, ds = (torch.randn(4, 2, 3, 3, 2, generator=g) for _ in range(3))      # 5-D: video-shaped latents
    gap = (dc - dt).square().flatten(1).mean(1)
    torch.testing.assert_close(agd.relative_distill_loss(ds, dt, dc), (ds - dt).square().flatten(1).mean(1) / gap)
    torch.testing.assert_close(agd.relative_distill_loss(dc, dt, dc), torch.ones(4))  # untrained adapter = 1
    assert torch.equal(agd.relative_distill_loss(dt, dt, dc), torch.zeros(4))
    # the same relative error at every scale of the guidance counts alike (the ε-MSE would weigh it by scale²)
    scale = torch.tensor([0.3, 1.0, 2.0, 3.0]).reshape(-1, 1, 1, 1, 1)
    rel = agd.relative_distill_loss(dt + scale * (ds - dt), dt, dt + scale * (dc - dt))
    torch.testing.assert_close(rel, agd.relative_distill_loss(ds, dt, dc))
    # a row with (almost) no guidance to add is held at the floor, not divided by ~0
    dc2 = dc.clone()
    dc2[0] = dt[0]
    out = agd.relative_distill_loss(ds, dt, dc2, floor=0.01)
    floor = 0.01 * float((dc2 - dt).square().flatten(1).mean(1).mean())
    torch.testing.assert_close(out[0], (ds[0] - dt[0]).square().mean() / floor)
    assert torch.isfinite(out).all()
    # the same from its per-sample parts (what a trainer keeps per recorded evaluation)
    parts = agd.relative_from_gap(agd.per_sample_mse(ds, dt), agd.per_sample_mse(dc2, dt), floor=0.01)
    assert torch.equal(parts, out)
    torch.testing.assert_close(agd.per_sample_mse(ds.half(), dt), (ds.half().float() - dt).square().flatten(1).mean(1))


def test_additive_adapter_starts_at_zero_and_depends_on_omega_and_vec():
    torch.manual_seed(0)
    ad = agd.AdditiveAdapter(20, hidden=16, d_vec=12, features=32)
    w, vec = torch.tensor([2.0, 8.0]), torch.randn(2, 12)
    out = ad(w, vec)
    assert out.shape == (2, 20) and torch.count_nonzero(out) == 0
    out.sum().backward()
    assert ad.out.weight.grad.abs().sum() > 0 and ad.vec.weight.grad.abs().sum() == 0
    with torch.no_grad():
        ad.out.weight.normal_(std=0.1)
    a = ad(w, vec)
    assert not torch.allclose(a, ad(torch.tensor([2.0, 3.0]), vec))
    torch.testing.assert_close(a[0], ad(torch.tensor([2.0, 3.0]), vec)[0])            # per sample
    assert not torch.allclose(a, ad(w, vec + 1))
    with pytest.raises(ValueError, match="pass vec"):
        ad(w)
    assert agd.AdditiveAdapter(20, hidden=16)(w).shape == (2, 20)


def test_timestep_features():
    f = agd.timestep_features(torch.tensor([0.0, 999.0]), 8)
    assert f.shape == (2, 8)
    torch.testing.assert_close(f[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    assert f[1, 0] == pytest.approx(float(torch.cos(torch.tensor(999.0))), abs=1e-4)
    torch.testing.assert_close(f.square()[:, :4] + f.square()[:, 4:], torch.ones(2, 4))


def test_native_target_is_eps_on_ve_states_and_velocity_on_flow_states():
    g = torch.Generator().manual_seed(2)
    x0, n = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.05, 1.0, 14.6])
    s = sigma[:, None, None, None]
    torch.testing.assert_close(agd.native_target(x0 + s * n, x0, sigma), n)                   # VE: ε
    fs = torch.tensor([0.02, 0.5, 1.0])
    f = fs[:, None, None, None]
    torch.testing.assert_close(agd.native_target((1 - f) * x0 + f * n, x0, fs), n - x0)       # flow: velocity
    x = x0 + s * n
    u = agd.native_target(x, x0 + 0.1, sigma)
    torch.testing.assert_close(agd.denoised_from_native(x, u, sigma), x0 + 0.1)
    # the loss in stored terms is the ε-MSE (VE) / velocity MSE (flow): w(σ) = 1/σ²
    d_s = x0 + 0.3
    torch.testing.assert_close(agd.distill_loss(d_s, x0, sigma),
                               (agd.native_target(x, d_s, sigma) - agd.native_target(x, x0, sigma)).square()
                               .mean(dim=(1, 2, 3)))


def test_lr_factor_warms_up_then_decays_to_the_floor():
    total = 100
    f = [agd.lr_factor(i, total) for i in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)                 # 10 warm-up steps
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(1e-4) and f[10] == pytest.approx(1.0)
    assert agd.lr_factor(0, 1) == pytest.approx(1.0)


@pytest.mark.parametrize("time_token,prompt", [(True, True), (True, False), (False, True), (False, False)])
def test_folded_attention_is_the_adapter(time_token, prompt):
    torch.manual_seed(0)
    ad = agd.AttentionAdapter(24, hidden=16, d_time=8 if time_token else 0, d_context=12 if prompt else 0)
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(std=0.3)
    h, w = torch.randn(3, 10, 24), torch.tensor([3.0, 9.0, 1.5])
    t, c = torch.randn(3, 8) if time_token else None, torch.randn(3, 5, 12) if prompt else None
    want = ad(h, w, t, c)
    f = agd.FoldedAttention(ad)
    kv = f.kv(f.omega_kv(w), t, c)
    assert kv.shape == (3, 1 + time_token + (5 if prompt else 0), 32)
    for manual in (True, False):
        torch.testing.assert_close(f(h, kv, matmul_softmax=manual), want, atol=1e-5, rtol=1e-5)
    if prompt:                                           # the prompt part given precomputed
        assert torch.equal(f.kv(f.omega_kv(w), t, prompt_kv=f.prompt_kv(c)), kv)
    # a constant ω is kept per (ω, rows) and equals the per-row form
    one = f.constant_omega_kv(9.0, 3)
    assert one is f.constant_omega_kv(9.0, 3)
    torch.testing.assert_close(one, f.omega_kv(torch.full((3,), 9.0)))
    # another prompt length gets its own position rows
    if prompt:
        c7 = torch.randn(3, 7, 12)
        torch.testing.assert_close(f(h, f.kv(f.omega_kv(w), t, c7)), ad(h, w, t, c7), atol=1e-5, rtol=1e-5)


def test_multi_head_adapter_attends_per_head_and_folds_alike():
    """heads (Guidance Lab design; the paper's adapter has one): each head a softmax over the same tokens with its own
    slice of the query/key/value width, scale 1/√(head width); the folded form gives the same output."""
    torch.manual_seed(1)
    ad = agd.AttentionAdapter(24, hidden=16, d_time=8, d_context=12, heads=4)
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(std=0.3)
    h, w, t, c = torch.randn(3, 10, 24), torch.tensor([3.0, 9.0, 1.5]), torch.randn(3, 8), torch.randn(3, 5, 12)
    seq = ad.tokens(w, t, c)
    q, k, v = ad.q(h), ad.k(seq), ad.v(seq)
    parts = []
    for i in range(4):                                  # by hand: four independent 4-wide attentions, concatenated
        sl = slice(4 * i, 4 * i + 4)
        parts.append(torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0, dim=-1) @ v[..., sl])
    want = ad.out(torch.cat(parts, dim=-1))
    torch.testing.assert_close(ad(h, w, t, c), want, atol=1e-5, rtol=1e-5)
    f = agd.FoldedAttention(ad)
    for manual in (True, False):
        torch.testing.assert_close(f(h, f.kv(f.omega_kv(w), t, c), matmul_softmax=manual), want, atol=1e-5,
                                   rtol=1e-5)
    one = agd.AttentionAdapter(24, hidden=16, d_time=8, d_context=12)
    one.load_state_dict(ad.state_dict())                # the same parameters, one head: another function
    assert not torch.allclose(one(h, w, t, c), want, atol=1e-3)
    with pytest.raises(ValueError, match="does not split into 3 heads"):
        agd.AttentionAdapter(24, hidden=16, heads=3)


def test_folded_attention_goes_stale_when_the_parameters_change():
    ad = agd.AttentionAdapter(8, hidden=8, d_time=4, d_context=4)
    f = agd.FoldedAttention(ad)
    assert not f.stale()
    with torch.no_grad():
        ad.out.weight.add_(1.0)
    assert f.stale() and not agd.FoldedAttention(ad).stale()
    with pytest.raises(ValueError, match="pass time_emb"):
        f.kv(f.omega_kv(torch.ones(2)), None, torch.randn(2, 3, 4))


def test_omega_gain_scales_the_output_by_omega_minus_one_in_every_form():
    torch.manual_seed(0)
    plain = agd.AttentionAdapter(24, hidden=16, d_time=8, d_context=12)
    gained = agd.AttentionAdapter(24, hidden=16, d_time=8, d_context=12, omega_gain=True)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(std=0.3)
    gained.load_state_dict(plain.state_dict())         # the same parameters: the gain adds none
    h, t, c = torch.randn(4, 10, 24), torch.randn(4, 8), torch.randn(4, 5, 12)
    w = torch.tensor([1.0, 3.0, 7.5, 12.0])
    want = plain(h, w, t, c) * (w - 1).reshape(-1, 1, 1)
    got = gained(h, w, t, c)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert torch.count_nonzero(got[0]) == 0 and torch.count_nonzero(got[1]) > 0      # ω = 1: exactly CFG's cond term
    torch.testing.assert_close(agd.omega_gain(w), torch.tensor([0.0, 2.0, 6.5, 11.0]))
    f = agd.FoldedAttention(gained)
    kv = f.kv(f.omega_kv(w), t, c)
    for manual in (True, False):
        torch.testing.assert_close(f(h, kv, gain=agd.omega_gain(w), matmul_softmax=manual), want, atol=1e-5,
                                   rtol=1e-5)
    same = torch.full((4,), 5.0)                        # one ω for every row: the gain may be a number
    torch.testing.assert_close(f(h, f.kv(f.omega_kv(same), t, c), gain=4.0), gained(h, same, t, c), atol=1e-5,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="pass gain"):
        f(h, kv)
    # the additive (DiT) adapter
    add_plain, add_gained = agd.AdditiveAdapter(20, hidden=16, d_vec=12), agd.AdditiveAdapter(20, hidden=16, d_vec=12,
                                                                                            omega_gain=True)
    with torch.no_grad():
        add_plain.out.weight.normal_(std=0.3)
    add_gained.load_state_dict(add_plain.state_dict())
    vec = torch.randn(4, 12)
    torch.testing.assert_close(add_gained(w, vec), add_plain(w, vec) * (w - 1)[:, None], atol=1e-6, rtol=1e-6)
    assert torch.count_nonzero(add_gained(w, vec)[0]) == 0
