"""Concept erasure as a closed-form edit of text-reading projections (methods.md §12.1).

Unified Concept Editing (UCE; Gandikota, Orgad, Belinkov, Materzyńska, Bau; WACV 2024, arXiv 2308.14761): every
projection W that reads text-encoder states (cross-attention K and V) is re-solved so that the erased concept's
states c_i map to what W gives a guide (alternative) concept, v*_i = W·c_i^alt, while preserved states c_j keep
W·c_j:

    W_new = (λ·W + s_e·Σ_i v*_i c_iᵀ + s_p·Σ_j (W c_j) c_jᵀ) · (λ·I + s_e·Σ_i c_i c_iᵀ + s_p·Σ_j c_j c_jᵀ)⁻¹

Subtracting W·M from both sides gives the update alone, which is what a weight patch stores:

    ΔW = W_new − W = s_e·Σ_i (v*_i − W c_i) c_iᵀ · M⁻¹,     M = λ·I + s_e·C_e C_eᵀ + s_p·C_p C_pᵀ

so an empty erase set gives ΔW = 0 exactly. Exact unconditional preservation (Guidance Lab design, methods.md
§12.1): with Q an orthonormal basis of the span of every unconditional token state, ΔW·(I − QQᵀ) leaves W·u
unchanged for every u in that span (in exact arithmetic; to float rounding in practice); `closed_form_delta(...,
protect=Q)` minimises the same objective under that constraint.

Vectors are columns: C_e, C_alt, C_p are [d, n] (d = text width), W is [out, d]. Solves run in float64.
"""
from __future__ import annotations

import torch

from ._tensor import per_sample_mse

TOKEN_MODES = ("last_content", "all_content", "all")


def closed_form_delta(weight: torch.Tensor, erase: torch.Tensor, target: torch.Tensor, preserve: torch.Tensor | None,
                      *, lam: float = 0.5, erase_scale: float = 1.0, preserve_scale: float = 1.0,
                      protect: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW of the UCE closed form. weight [out, d]; erase [d, n_e]; target [out, n_e] (the v*_i); preserve [d, n_p]
    or None. Returns ΔW [out, d] in weight's dtype.

    protect: an orthonormal basis Q [d, r] (span_basis) of inputs whose outputs must not change (design). The same
    objective s_e·Σ‖W'c_i − v*_i‖² + s_p·Σ‖W'c_j − W c_j‖² + λ‖W' − W‖² is then minimised under ΔW·Q = 0: with
    P = I − QQᵀ, ΔW = s_e·R·(P C_e)ᵀ·(λI + s_e·P C_e C_eᵀ P + s_p·P C_p C_pᵀ P)⁻¹, R = V* − W C_e (the residual of
    the full states), which re-optimises inside the allowed subspace instead of projecting the free solution."""
    if lam <= 0:
        raise ValueError(f"lam must be > 0 (it keeps the solve well-posed and weights the old projection), got {lam}")
    out_dim, d = weight.shape
    if erase.shape[0] != d or target.shape != (out_dim, erase.shape[1]):
        raise ValueError(f"shapes do not fit: weight {tuple(weight.shape)}, erase {tuple(erase.shape)}, "
                         f"target {tuple(target.shape)}")
    if erase.shape[1] == 0 or erase_scale == 0:
        return torch.zeros_like(weight)
    w, ce, v = weight.double(), erase.double(), target.double()
    residual = erase_scale * (v - w @ ce)                          # [out, n_e], from the full states
    q = protect.double() if protect is not None and protect.shape[1] else None
    if q is not None:
        ce = ce - q @ (q.T @ ce)                                   # P C_e
    m = lam * torch.eye(d, dtype=torch.float64, device=w.device) + erase_scale * ce @ ce.T
    if preserve is not None and preserve.shape[1]:
        if preserve.shape[0] != d:
            raise ValueError(f"preserve vectors have width {preserve.shape[0]}, the projection reads {d}")
        cp = preserve.double()
        if q is not None:
            cp = cp - q @ (q.T @ cp)
        m = m + preserve_scale * cp @ cp.T
    delta_t = torch.linalg.solve(m, ce @ residual.T)               # M symmetric: ΔWᵀ = M⁻¹ C_e Rᵀ   [d, out]
    if q is not None:
        delta_t = delta_t - q @ (q.T @ delta_t)                     # exact in theory; removes float residue
    return delta_t.T.to(weight.dtype)


def span_basis(vectors: torch.Tensor, *, rtol: float = 1e-4) -> torch.Tensor:
    """Orthonormal basis Q [d, r] of the column span of `vectors` [d, n]; singular values below rtol·max dropped."""
    if vectors.numel() == 0:
        return vectors.new_zeros((vectors.shape[0], 0), dtype=torch.float64)
    u, s, _vh = torch.linalg.svd(vectors.double(), full_matrices=False)
    keep = s > rtol * s.max() if s.numel() and s.max() > 0 else torch.zeros_like(s, dtype=torch.bool)
    return u[:, keep]


def project_off(delta: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """ΔW·(I − QQᵀ): the update with every direction in span(Q) of its input removed (so ΔW·u = 0 there)."""
    if basis.shape[1] == 0:
        return delta
    d = delta.double()
    return (d - (d @ basis) @ basis.T).to(delta.dtype)


def surviving_fraction(vectors: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """‖(I − QQᵀ)c‖ / ‖c‖ per column of `vectors` [d, n]: how much of each erase direction the projection keeps."""
    c = vectors.double()
    rest = c - basis @ (basis.T @ c) if basis.shape[1] else c
    return torch.linalg.vector_norm(rest, dim=0) / torch.linalg.vector_norm(c, dim=0).clamp_min(1e-30)


def pair_positions(mode: str, erase_content: int, alt_content: int, length: int,
                   first: int = 1) -> list[tuple[int, int]]:
    """Token positions (erase prompt, alternative prompt) whose states are paired, for prompts of `length` tokens
    whose `erase_content` / `alt_content` content tokens start at position `first` (1 after a start token, as in
    CLIP; 0 without one, as in T5).

    last_content: the last content token of each (for an empty prompt, the token before the first content
    position: the start token, or without one the end token at 0).
    all_content (design): content tokens paired from the end; erase tokens beyond the alternative's length pair with
    that same fallback token.
    all (design): every position, index by index (a causal text encoder's end and padding states carry the prompt).
    """
    if mode not in TOKEN_MODES:
        raise ValueError(f"token mode {mode!r}: choose one of {', '.join(TOKEN_MODES)}")
    if first not in (0, 1):
        raise ValueError(f"first content position must be 0 or 1, got {first}")
    if mode == "all":
        return [(i, i) for i in range(length)]

    def last(content: int, k: int = 0) -> int:
        return max(first + content - 1 - k, 0)
    if mode == "last_content":
        return [(last(erase_content), last(alt_content))]
    return [(last(erase_content, k), last(alt_content, k)) for k in range(erase_content)] or [(last(0), last(0))]


def low_rank(delta: torch.Tensor, *, rank: int = 0, energy: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD of ΔW [out, d]: (up [out, r], down [r, d], relative Frobenius error) with up@down ≈ ΔW.

    rank > 0 fixes r (capped at min(out, d)); else the smallest r keeping `energy` of Σσ² (0 < energy ≤ 1)."""
    if rank <= 0 and not 0 < energy <= 1:
        raise ValueError(f"give a rank > 0 or an energy in (0, 1]; got rank {rank}, energy {energy}")
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    total = float((s ** 2).sum())
    if total == 0:
        r = 1
    elif rank > 0:
        r = min(rank, s.numel())
    else:
        cumulative = torch.cumsum(s ** 2, 0) / total
        r = int((cumulative < energy - 1e-12).sum()) + 1
        r = min(r, s.numel())
    up, down = u[:, :r] * s[:r], vh[:r]
    err = float(torch.linalg.matrix_norm(delta.double() - up @ down)) / max(total ** 0.5, 1e-30) if total else 0.0
    return up.to(delta.dtype), down.to(delta.dtype), err


# ------------------------------------------------------------------------- All-but-One style fine-tuning (design)

def surgical_losses(eps_erase: torch.Tensor, eps_uncond: torch.Tensor, ref_alt: torch.Tensor,
                    ref_uncond: torch.Tensor, *, eta: float = 1.0, eps_preserve: torch.Tensor | None = None,
                    ref_preserve: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The All-but-One objective as methods.md §12.2 reconstructs it (DESIGN; the paper's code is not public).

    ε' = the model being tuned, ε = the frozen original (ref_*), sg = stop-gradient:
        L_g = ‖(ε'(x, c_e) − sg[ε'(x, ∅)]) − η·(ε(x, c_a) − ε(x, ∅))‖²   (the guidance term moved to the alternative's)
        L_u = ‖ε'(x, ∅) − ε(x, ∅)‖²                                       (unconditional drift)
        L_p = ‖ε'(x, c_p) − ε(x, c_p)‖²                                   (preserved concepts)
    each a mean over every non-batch element, then over the batch. Returns {"guidance", "uncond", "preserve"}."""
    g = eps_erase - eps_uncond.detach()
    out = {"guidance": per_sample_mse(g, eta * (ref_alt - ref_uncond)).mean(),
           "uncond": per_sample_mse(eps_uncond, ref_uncond).mean()}
    if eps_preserve is not None and ref_preserve is not None:
        out["preserve"] = per_sample_mse(eps_preserve, ref_preserve).mean()
    else:
        out["preserve"] = eps_erase.new_zeros((), dtype=torch.float32)
    return out
