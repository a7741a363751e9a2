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
