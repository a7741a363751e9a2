"""Adapter Guidance Distillation (Jensen & Sadat, TMLR 2025, arXiv 2503.07274): small adapters, with the base model
frozen, trained so that one conditional forward pass reproduces the CFG-guided prediction at a requested scale ω
(methods.md §14; the adapter architecture and placement follow the authors' released code).

Pieces (pure torch, no ComfyUI import):
    OmegaEmbedding     ψ(ω) = LayerNorm(MLP(cos(2π(f·ω + φ)))), f ~ N(0, 1) and φ ~ U(0, 1) fixed random Fourier
                       buffers (kept in the state dict: an adapter file must carry them).
    AttentionAdapter   the "attention" adapter: its query is a linear map of the wrapped cross-attention's input
                       hidden states; keys/values are a short token sequence — ψ(ω), optionally a projection of a
                       time embedding and of the prompt tokens — with a sinusoidal position code per token
                       index; one head, scale 1/√d_h (`heads` > 1 splits the width into heads, each scaled by
                       1/√(its width): Guidance Lab design); the output projection back to the block width starts
                       at zero, so an untrained adapter adds exactly nothing. Its output is added to the wrapped
                       module's.
    AdditiveAdapter    the "additive" adapter (the authors' DiT type): e = ψ(ω) (+ a projection of the block's
                       conditioning vector, which carries the time) → SiLU → zero-initialised linear → one offset
                       vector added to every token.
    omega_gain         ω − 1 per sample: the factor an adapter built with `omega_gain=True` multiplies its output by
                       (Guidance Lab design, not the paper's). CFG is D_c + (ω − 1)·(D_c − D_u), so the correction
                       to learn grows linearly with ω − 1 and vanishes at ω = 1; a gained adapter has that shape
                       built in and learns only what multiplies it.
    timestep_features  sinusoidal features of the model timestep (what the time token projects).
    cfg_target         the teacher: D_u + ω·(D_c − D_u), per sample.
    distill_loss       mean((D_s − D_t)²·α²/σ²) per sample over all non-batch dims = the paper's ε-MSE written in
                       denoised terms (DERIVED: ε = (x − α·D)/σ, so ε_s − ε_t = −α·(D_s − D_t)/σ).
    relative_distill_loss
                       ‖D_s − D_t‖²/‖D_c − D_t‖² per sample (Guidance Lab design): the error relative to the
                       guidance the adapter must add, so every noise level and scale weighs alike;
                       `relative_from_gap` is the same from the per-sample parts (`per_sample_mse`), for a trainer that
                       keeps each evaluation's gap ‖D_c − D_t‖² instead of recomputing it.
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

from ._tensor import per_sample_mse


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
                 features: int = 256, omega_gain: bool = False, heads: int = 1):
        super().__init__()
        if heads < 1 or hidden % heads:
            raise ValueError(f"the adapter's width {hidden} does not split into {heads} heads")
        self.hidden, self.heads = hidden, int(heads)
        self.omega_gain = bool(omega_gain)
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
        k, v = self.k(seq), self.v(seq)
        att = _merge_heads(F.scaled_dot_product_attention(*(_split_heads(t, self.heads) for t in (q, k, v))))
        out = self.out(att)
        if self.omega_gain:
            out = out * omega_gain(omega).to(out.device).reshape(-1, 1, 1)
        return out.to(h.dtype)


class FoldedAttention:
    """Inference form of a trained AttentionAdapter: the same function (float rounding aside) in fewer, cheaper ops.

    Folded once (DERIVED, linear algebra): keys/values come from one stacked map [k·s; v] (s = 1/√d_h folded into
    the keys), composed with each token kind's projection — K,V of the time token = (W_kv·W_time)·t_emb + const,
    of the prompt tokens = (W_kv·W_prompt)·context + const[position], of ψ(ω) = W_kv·(ψ(ω) + pos_0) + b — so each
    kind costs one matmul instead of two. `omega_kv` is separate so a caller can keep it for a constant ω. On CPU
    the attention is two batched matmuls and a softmax: for these short key sequences (≈ 80) that measured faster
    than F.scaled_dot_product_attention's CPU kernel; elsewhere SDPA. The folded tensors are snapshots: fold again
    once the adapter's parameters change (`stale()` says when)."""

    def __init__(self, adapter: AttentionAdapter, device=None):
        a = adapter
        dev = torch.device(device) if device is not None else a.q.weight.device
        with torch.no_grad():
            hid = a.hidden
            self.hidden, self.device, self.heads = hid, dev, a.heads
            self.omega_gain = a.omega_gain
            self._params = list(a.parameters())
            self.version = _versions(self._params)
            scale = (hid // a.heads) ** -0.5                    # per head: 1/√(width of a head)
            wkv = torch.cat([a.k.weight * scale, a.v.weight]).float().to(dev)
            bkv = torch.cat([a.k.bias * scale, a.v.bias]).float().to(dev)
            self.n_fixed = 1 + (a.time is not None)
            pos = token_positions(self.n_fixed, hid, dev)
            self._omega, self._wkv, self._bkv, self._pos0 = a.omega, wkv, bkv, pos[0]
            self.time = None
            if a.time is not None:
                self.time = (wkv @ a.time.weight.float().to(dev), (a.time.bias.float().to(dev) + pos[1]) @ wkv.T + bkv)
            self.prompt = None
            if a.prompt is not None:
                self.prompt = (wkv @ a.prompt.weight.float().to(dev), a.prompt.bias.float().to(dev) @ wkv.T + bkv)
            self._prompt_bias: dict[int, torch.Tensor] = {}
            self._constant: dict[tuple, torch.Tensor] = {}
            self.q = (a.q.weight.float().to(dev), a.q.bias.float().to(dev))
            self.out = (a.out.weight.float().to(dev), a.out.bias.float().to(dev))
            self._gained_out: dict[float, tuple] = {}      # output maps with a constant gain folded in

    def stale(self) -> bool:
        """True once the adapter's parameters were updated or moved after folding (then fold again)."""
        return _versions(self._params) != self.version

    def omega_kv(self, omega: torch.Tensor) -> torch.Tensor:
        """K,V rows of the ψ(ω) token [B, 1, 2·hidden]."""
        with torch.no_grad():
            psi = self._omega(omega.to(self._wkv.device))
            return ((psi + self._pos0) @ self._wkv.T + self._bkv)[:, None]

    def constant_omega_kv(self, omega: float, rows: int) -> torch.Tensor:
        """omega_kv for one ω shared by all rows, kept per (ω, rows)."""
        key = (float(omega), int(rows))
        out = self._constant.get(key)
        if out is None:
            out = self._constant[key] = self.omega_kv(torch.full((rows,), float(omega), device=self._wkv.device))
        return out

    def prompt_kv(self, context: torch.Tensor) -> torch.Tensor:
        """K,V rows of the prompt tokens [B, T, 2·hidden] (a caller may keep them while the prompt is unchanged)."""
        n = context.shape[1]
        bias = self._prompt_bias.get(n)
        if bias is None:
            pos = token_positions(self.n_fixed + n, self.hidden, self._wkv.device)[self.n_fixed:]
            bias = self._prompt_bias[n] = self.prompt[1] + pos @ self._wkv.T
        return F.linear(context.float(), self.prompt[0]) + bias

    def kv(self, omega_kv: torch.Tensor, time_emb: torch.Tensor | None = None,
           context: torch.Tensor | None = None, *, prompt_kv: torch.Tensor | None = None) -> torch.Tensor:
        """The key/value sequence [B, n, 2·hidden] (keys pre-scaled) in AttentionAdapter.tokens' order; omega_kv
        from `omega_kv` with the same B rows; the prompt part from `context`, or given as `prompt_kv`."""
        parts = [omega_kv]
        if self.time is not None:
            if time_emb is None:
                raise ValueError("this adapter reads the time embedding; pass time_emb")
            parts.append(F.linear(time_emb.float(), *self.time)[:, None])
        if self.prompt is not None:
            if prompt_kv is None and context is None:
                raise ValueError("this adapter reads the prompt tokens; pass context")
            parts.append(prompt_kv if prompt_kv is not None else self.prompt_kv(context))
        return torch.cat(parts, dim=1)

    def __call__(self, h: torch.Tensor, kv: torch.Tensor, *, gain: torch.Tensor | float | None = None,
                 matmul_softmax: bool | None = None) -> torch.Tensor:
        """The adapter's residual for hidden states h [B, N, d_in] given kv from `kv` (h's dtype). gain: the rows'
        `omega_gain(ω)` [B] (or one number for all rows), required when the adapter was built with omega_gain.
        matmul_softmax: attention as matmuls + softmax (default on CPU) or through SDPA (default elsewhere)."""
        if self.omega_gain and gain is None:
            raise ValueError("this adapter scales its output by ω − 1; pass gain=omega_gain(ω)")
        hid = self.hidden
        q = F.linear(h.float(), *self.q)
        k, v = kv[..., :hid], kv[..., hid:]
        q, k, v = (_split_heads(t, self.heads) for t in (q, k, v))
        if matmul_softmax if matmul_softmax is not None else q.device.type == "cpu":
            att = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1), v)
        else:
            att = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        att = _merge_heads(att)
        if self.omega_gain and not torch.is_tensor(gain):       # one gain for all rows: folded into W_o, b_o
            maps = self._gained_out.get(float(gain))
            if maps is None:
                maps = self._gained_out[float(gain)] = (self.out[0] * float(gain), self.out[1] * float(gain))
            return F.linear(att, *maps).to(h.dtype)
        out = F.linear(att, *self.out)
        if self.omega_gain:
            out = out * gain.to(out.device, out.dtype).reshape(-1, 1, 1)
        return out.to(h.dtype)


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, n, H·d] → [B, H, n, d]."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """[B, H, n, d] → [B, n, H·d]."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def _versions(params: list) -> tuple:
    """A key that changes whenever one of these parameters is updated in place or moved."""
    return tuple((p.data_ptr(), _version(p), p.device) for p in params)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:                # an inference tensor: it has no version counter (and outside inference
        return -1                       # mode it cannot be updated in place)


class AdditiveAdapter(nn.Module):
    """Residual offset of one DiT block: offset = W_o·SiLU(ψ(ω) + W_v·vec) (W_o = 0 at start), the same vector
    for every token. vec: the block's conditioning vector [B, d_vec] (time, pooled text, guidance embedding)."""

    def __init__(self, d_out: int, *, hidden: int = 256, d_vec: int = 0, seed: int = 0, features: int = 256,
                 omega_gain: bool = False):
        super().__init__()
        self.hidden = hidden
        self.omega_gain = bool(omega_gain)
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
        out = self.out(F.silu(e))
        return out * omega_gain(omega).to(out.device).reshape(-1, 1) if self.omega_gain else out


def omega_gain(omega: torch.Tensor) -> torch.Tensor:
    """ω − 1 per sample (float32): zero at ω = 1, where CFG is the conditional prediction itself."""
    return omega.float().reshape(-1) - 1.0


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
    return per_sample_mse(d_student, d_teacher) * (a / s) ** 2


def relative_distill_loss(d_student: torch.Tensor, d_teacher: torch.Tensor, d_cond: torch.Tensor, *,
                          floor: float = 0.01) -> torch.Tensor:
    """Per-sample ‖D_s − D_t‖² / ‖D_c − D_t‖² (means over all non-batch dims): the student's error relative to the
    guidance it has to add (D_c = the frozen conditional prediction, i.e. the untrained adapter, which scores 1).
    Every (σ, ω) counts alike, where the ε-MSE is ruled by large ω and small σ. The denominator is held at
    ≥ `floor` × its batch mean so a row with almost no guidance (ω ≈ 1) cannot blow up. Guidance Lab design."""
    return relative_from_gap(per_sample_mse(d_student, d_teacher), per_sample_mse(d_cond, d_teacher), floor=floor)


def relative_from_gap(err: torch.Tensor, gap: torch.Tensor, *, floor: float = 0.01) -> torch.Tensor:
    """`relative_distill_loss` from its per-sample parts: err = ‖D_s − D_t‖², gap = ‖D_c − D_t‖² (the gap depends on
    the frozen model only, so a trainer can compute it once per recorded evaluation and keep it)."""
    gap = gap.float()
    return err.float() / gap.clamp_min(floor * gap.mean() + 1e-12)     # a tensor bound: no host sync per step


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
