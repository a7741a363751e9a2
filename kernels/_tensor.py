"""Per-sample tensor helpers shared by the kernels (reductions over every non-batch dim)."""
from __future__ import annotations

import torch


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a [B] (or scalar) tensor as [B, 1, ..., 1] with `ndim` dims in total."""
    v = torch.as_tensor(v)
    if v.ndim == 0:
        return v.reshape([1] * ndim)
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


def per_sample_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a_i, b_i> for every sample i, keepdim so it broadcasts back: [B, 1, ..., 1]."""
    dims = tuple(range(1, a.ndim))
    return (a * b).sum(dim=dims, keepdim=True)


def per_sample_norm(a: torch.Tensor) -> torch.Tensor:
    """||a_i||_2 for every sample i, keepdim: [B, 1, ..., 1]."""
    dims = tuple(range(1, a.ndim))
    return torch.linalg.vector_norm(a, dim=dims, keepdim=True)


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean((a_i − b_i)²) over every non-batch dim, in float32: [B]."""
    return (a.float() - b.float()).square().flatten(1).mean(1)


def elements_per_sample(a: torch.Tensor) -> int:
    """d = number of elements of one sample (C*H*W, or C*T*H*W for video latents)."""
    return int(a[0].numel()) if a.shape[0] else 0
