"""Adapter Guidance Distillation (Jensen & Sadat, TMLR 2025, arXiv 2503.07274): small adapters, with the base model
frozen, trained so that one conditional forward pass reproduces the CFG-guided prediction at a requested scale ω
(methods.md §14; the adapter architecture and placement follow the authors' released code).

Pieces (pure torch, no ComfyUI import):
    OmegaEmbedding     ψ(ω) = LayerNorm(MLP(cos(2π(f·ω + φ)))), f ~ N(0, 1) and φ ~ U(0, 1) fixed random Fourier
                       buffers (kept in the state dict: an adapter file must carry them).
    AttentionAdapter   the "attention" adapter: its query is a linear map of the wrapped cross-attention's input
                       hidden states; keys/values are a short token sequence — ψ(ω), optionally a projection of a
                       time embedding and of the prompt tokens — with a sinusoidal position code per token
                       index; one head, scale 1/√d_h; the output projection back to the block width starts at zero,
                       so an untrained adapter adds exactly nothing. Its output is added to the wrapped module's.
    AdditiveAdapter    the "additive" adapter (the authors' DiT type): e = ψ(ω) (+ a projection of the block's
                       conditioning vector, which carries the time) → SiLU → zero-initialised linear → one offset
                       vector added to every token.
    timestep_features  sinusoidal features of the model timestep (what the time token projects).
    cfg_target         the teacher: D_u + ω·(D_c − D_u), per sample.
    distill_loss       mean((D_s − D_t)²·α²/σ²) per sample over all non-batch dims = the paper's ε-MSE written in
                       denoised terms (DERIVED: ε = (x − α·D)/σ, so ε_s − ε_t = −α·(D_s − D_t)/σ).
    relative_distill_loss
                       ‖D_s − D_t‖²/‖D_c − D_t‖² per sample (Guidance Lab design): the error relative to the
                       guidance the adapter must add, so every noise level and scale weighs alike.
    native_target / denoised_from_native
                       u = (x − D)/σ, the noise-like quantity stored for training (ε on EPS/V states, the velocity
                       on flow states, x = (1−σ)·x0 + σ·n) and its inverse D = x − σ·u; finite at every σ > 0.
    lr_factor          linear warm-up then cosine decay to a floor (the authors' schedule: 10 % warm-up, cosine
                       to lr·1e-4).
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

    def __init__(self, d_in: int, *, hidden: int = 320, d_time: int = 0, d_context: int = 0, seed: int = 0,
                 features: int = 256):
        super().__init__()
        self.hidden = hidden
        self.omega = OmegaEmbedding(hidden, features=features, seed=seed)
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


class AdditiveAdapter(nn.Module):
    """Residual offset of one DiT block: offset = W_o·SiLU(ψ(ω) + W_v·vec) (W_o = 0 at start), the same vector
    for every token. vec: the block's conditioning vector [B, d_vec] (time, pooled text, guidance embedding)."""

    def __init__(self, d_out: int, *, hidden: int = 256, d_vec: int = 0, seed: int = 0, features: int = 256):
        super().__init__()
        self.hidden = hidden
        self.omega = OmegaEmbedding(hidden, features=features, seed=seed)
        self.vec = nn.Linear(d_vec, hidden) if d_vec else None
        self.out = nn.Linear(hidden, d_out)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, omega: torch.Tensor, vec: torch.Tensor | None = None) -> torch.Tensor:
        """[B, d_out] (broadcast it over the tokens: out[:, None])."""
        e = self.omega(omega)
        if self.vec is not None:
            if vec is None:
                raise ValueError("this adapter reads the block's conditioning vector; pass vec")
            e = e + self.vec(vec.float())
        return self.out(F.silu(e))


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [B, dim] of timesteps t [B] (cos half, then sin half; dim even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angle = t.float().reshape(-1, 1) * freqs
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)


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


def relative_distill_loss(d_student: torch.Tensor, d_teacher: torch.Tensor, d_cond: torch.Tensor, *,
                          floor: float = 0.01) -> torch.Tensor:
    """Per-sample ‖D_s − D_t‖² / ‖D_c − D_t‖² (means over all non-batch dims): the student's error relative to the
    guidance it has to add (D_c = the frozen conditional prediction, i.e. the untrained adapter, which scores 1).
    Every (σ, ω) counts alike, where the ε-MSE is ruled by large ω and small σ. The denominator is held at
    ≥ `floor` × its batch mean so a row with almost no guidance (ω ≈ 1) cannot blow up. Guidance Lab design."""
    err = (d_student.float() - d_teacher.float()).square().flatten(1).mean(1)
    gap = (d_cond.float() - d_teacher.float()).square().flatten(1).mean(1)
    return err / gap.clamp_min(floor * gap.mean() + 1e-12)        # a tensor bound: no host sync per step


def native_target(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """u = (x − D)/σ per sample (float32): ε for x = x0 + σ·n, the velocity n − x0 for x = (1−σ)·x0 + σ·n."""
    s = sigma.float().reshape(-1, *([1] * (x.ndim - 1)))
    return (x.float() - denoised.float()) / s


def denoised_from_native(x: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """D = x − σ·u (the inverse of native_target)."""
    s = sigma.float().reshape(-1, *([1] * (x.ndim - 1)))
    return x.float() - s * u.float()


def lr_factor(step: int, total: int, *, warmup: float = 0.1, floor: float = 1e-4) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based) of `total`: linear warm-up over the first
    `warmup` fraction, then cosine from 1 to `floor` at the last step."""
    n_warm = max(1, int(round(warmup * total)))
    if step < n_warm:
        return (step + 1) / n_warm
    span = max(1, total - 1 - n_warm)
    progress = min(1.0, (step - n_warm) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
