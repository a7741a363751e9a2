"""Dynamic CFG by online feedback (inspired by Papalampidi et al., arXiv 2509.16131): per step and per sample, pick
the guidance scale from a candidate grid by scoring each candidate's prediction with small evaluators.

Candidates are linear combinations of the same two predictions, D_w = D_u + w·(D_c − D_u), so scoring them costs
no model call. The paper's grid, evaluators, normalisation and weights are not published; this is the Guidance Lab
design (methods.md §8): scores z-normalised over the candidates per sample, weighted by λ_j(progress), the best
candidate taken under a limit on the change from the previous step's choice.
"""
from __future__ import annotations

import torch


def candidate_scales(cfg: float, multipliers: list[float]) -> torch.Tensor:
    """The grid cfg·m for the multipliers m (sorted, duplicates removed), float32 [K]."""
    return torch.tensor(sorted({float(cfg) * float(m) for m in multipliers}), dtype=torch.float32)


def zscore(scores: torch.Tensor) -> torch.Tensor:
    """Per-row z-score over the candidates [B, K] (rows with no spread give zeros)."""
    scores = scores.float()
    mean = scores.mean(dim=1, keepdim=True)
    std = scores.std(dim=1, unbiased=False, keepdim=True)
    return torch.where(std > 1e-12, (scores - mean) / std.clamp_min(1e-12), torch.zeros_like(scores))


def progress_weights(progress: float) -> tuple[float, float]:
    """(λ_alignment, λ_fidelity) at run progress u ∈ [0, 1] (0 = first step): 1 → 0.3 and 0.3 → 1, linear."""
    u = min(max(float(progress), 0.0), 1.0)
    return 1.0 - 0.7 * u, 0.3 + 0.7 * u


def clipping_penalty(images: torch.Tensor) -> torch.Tensor:
    """Mean distance of the pixels outside [0, 1] per sample [B] (images [B, 3, H, W] meant to lie in [0, 1])."""
    over = torch.relu(images.float() - 1) + torch.relu(-images.float())
    return over.flatten(1).mean(dim=1)


def choose(total: torch.Tensor, scales: torch.Tensor, previous: torch.Tensor | None = None,
           max_change: float = 0.0) -> torch.Tensor:
    """Per-sample scale [B]: the candidate with the highest total score [B, K]; with `previous` [B] and
    max_change > 0 only candidates within max_change of it compete (none: the candidate closest to it)."""
    scales = scales.to(total.device, torch.float32)
    scores = total.float().clone()
    if previous is not None and max_change > 0:
        allowed = (scales.view(1, -1) - previous.view(-1, 1).float()).abs() <= max_change + 1e-6
        nearest = (scales.view(1, -1) - previous.view(-1, 1).float()).abs().argmin(dim=1)
        allowed[torch.arange(len(nearest)), nearest] = True
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scales[scores.argmax(dim=1)]


def as_cond(d_cond: torch.Tensor, d_uncond: torch.Tensor, chosen: torch.Tensor, cfg: float) -> torch.Tensor:
    """The conditional prediction that makes the host's combine D_u + cfg·(c' − D_u) equal D_u + w*·(D_c − D_u):
    c' = D_u + (w*/cfg)·(D_c − D_u), per sample (cfg ≠ 0)."""
    ratio = (chosen.float() / float(cfg)).view(-1, *([1] * (d_cond.ndim - 1))).to(d_cond)
    return d_uncond + ratio * (d_cond - d_uncond)
