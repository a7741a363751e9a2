"""Adapter Guidance Distillation (Jensen & Sadat, TMLR 2025, arXiv 2503.07274): small adapters, with the base model
frozen, trained so that one conditional forward pass reproduces the CFG-guided prediction at a requested scale ω
(methods.md §14; the adapter architecture and placement follow the authors' released code).

Pieces (pure torch, no ComfyUI import):
    OmegaEmbedding     ψ(ω) = LayerNorm(MLP(cos(2π(f·ω + φ)))), f ~ N(0, 1) and φ ~ U(0, 1) fixed random Fourier
                       buffers (kept in the state dict: an adapter file must carry them).
    AttentionAdapter   the "attention" adapter: its query is a linear map of the wrapped cross-attention's input
                       hidden states; keys/values are a short token sequence — ψ(ω), optionally a projection of the
                       model's time embedding and of the prompt tokens — with a sinusoidal position code per token
                       index; one head, scale 1/√d_h; the output projection back to the block width starts at zero,
                       so an untrained adapter adds exactly nothing. Its output is added to the wrapped module's.
    cfg_target         the teacher: D_u + ω·(D_c − D_u), per sample.
    distill_loss       mean((D_s − D_t)²·α²/σ²) per sample over all non-batch dims = the paper's ε-MSE written in
                       denoised terms (DERIVED: ε = (x − α·D)/σ, so ε_s − ε_t = −α·(D_s − D_t)/σ).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class OmegaEmbedding(nn.Module):
    """ψ(ω): random Fourier features of the guidance scale → MLP → LayerNorm; [B] → [B, dim]."""

    def __init__(self, dim: int, features: int = 256, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(features, generator=gen))
        self.register_buffer("phases", torch.rand(features, generator=gen))
        self.mlp = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, omega: torch.Tensor) -> torch.Tensor:
        w = omega.float().reshape(-1, 1)
        feats = torch.cos(2 * math.pi * (w * self.freqs + self.phases))
        return self.norm(self.mlp(feats))


def token_positions(n: int, dim: int, device=None) -> torch.Tensor:
    """Sinusoidal position code [n, dim] by token index (sin on even channels, cos on odd ones)."""
    pos = torch.arange(n, dtype=torch.float32, device=device)[:, None]
    i = torch.arange(0, dim, 2, dtype=torch.float32, device=device)
    angle = pos / (10000 ** (i / dim))
    out = torch.zeros(n, dim, device=device)
    out[:, 0::2] = torch.sin(angle)
    out[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return out


class AttentionAdapter(nn.Module):
    """Residual adapter of one cross-attention layer: out = Attention(q = W_q·h, kv = tokens)·W_o (W_o = 0 at start).

    h: the wrapped layer's input hidden states [B, N, d_in]; ω [B]; optional time embedding [B, d_time] and prompt
    tokens [B, T, d_context]."""

    def __init__(self, d_in: int, *, hidden: int = 320, d_time: int = 0, d_context: int = 0, seed: int = 0):
        super().__init__()
        self.hidden = hidden
        self.omega = OmegaEmbedding(hidden, seed=seed)
        self.time = nn.Linear(d_time, hidden) if d_time else None
        self.prompt = nn.Linear(d_context, hidden) if d_context else None
        self.q = nn.Linear(d_in, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, d_in)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def tokens(self, omega: torch.Tensor, time_emb: torch.Tensor | None = None,
               context: torch.Tensor | None = None) -> torch.Tensor:
        """The key/value sequence [B, n, hidden]: ψ(ω), then the time token, then the prompt tokens."""
        parts = [self.omega(omega)[:, None]]
        if self.time is not None:
            if time_emb is None:
                raise ValueError("this adapter reads the time embedding; pass time_emb")
            parts.append(self.time(time_emb.float())[:, None])
        if self.prompt is not None:
            if context is None:
                raise ValueError("this adapter reads the prompt tokens; pass context")
            parts.append(self.prompt(context.float()))
        seq = torch.cat(parts, dim=1)
        return seq + token_positions(seq.shape[1], self.hidden, seq.device)

    def forward(self, h: torch.Tensor, omega: torch.Tensor, time_emb: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        seq = self.tokens(omega, time_emb, context)
        q = self.q(h.float())
        att = F.scaled_dot_product_attention(q[:, None], self.k(seq)[:, None], self.v(seq)[:, None])[:, 0]
        return self.out(att).to(h.dtype)


def cfg_target(d_cond: torch.Tensor, d_uncond: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """The teacher's prediction D_u + ω·(D_c − D_u) with one ω per sample (float32)."""
    w = omega.float().reshape(-1, *([1] * (d_cond.ndim - 1)))
    return d_uncond.float() + w * (d_cond.float() - d_uncond.float())


def distill_loss(d_student: torch.Tensor, d_teacher: torch.Tensor, sigma: torch.Tensor,
                 alpha: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean of (D_s − D_t)²·α²/σ² over all non-batch dims (α = 1 for x = x0 + σ·n; flow: α = 1 − σ)."""
    s = sigma.float().reshape(-1)
    a = torch.ones_like(s) if alpha is None else alpha.float().reshape(-1)
    err = (d_student.float() - d_teacher.float()).square().flatten(1).mean(1)
    return err * (a / s) ** 2
