"""Classifier guidance math: EluCD (Ma, Hu, Wang, Sun; ICLR 2024; arXiv 2310.11311) in ComfyUI's x0 terms.

An off-the-shelf classifier trained on clean images reads the model's predicted clean image D (decoded to pixels)
and its gradient steers the prediction:

    J(x̂0)  = T1·l_y − log Σ_k exp(T2·l_k)             joint / marginal temperature split (T2 = r·T1)
    G      = ∇_{x̂0} J                                  autograd through the classifier (and decoder) only
    D'     = D + scale·κ(step)·(s_σ²/a_σ)·G            score form: G stands in for ∇ log p(y | x_t) of the
                                                        variance-preserving state x_t = a_σ·x0 + s_σ·n
    κ      = 1 + γ·(Σ_max/Σ_i)·sin(π·u_i)             the released code's sine bump, u_i = (N − 1 − i)/N

EPS / V-prediction models (ComfyUI σ): a_σ = 1/√(1+σ²), s_σ = σ/√(1+σ²), so s²/a = σ²/√(1+σ²); flow models:
a_σ = 1 − σ, s_σ = σ, so s²/a = σ²/(1 − σ). Σ_i is the posterior variance of the sampler's step σ_i → σ_{i+1},
computed from VE-normalised σ̃ (ᾱ = 1/(1+σ̃²)); Σ_max its value at the first step.

Pure torch; the classifier and decoder are callables.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .coords import Coords

SCHEDULES = ("sine", "sine_simple", "constant")


def elucd_objective(logits: torch.Tensor, targets: torch.Tensor, t1: float = 1.0, t2: float = 0.5) -> torch.Tensor:
    """J per sample [B]: T1·l_y − logsumexp(T2·l) (float32; float64 logits stay float64); `targets` [B] indices."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    picked = logits.gather(1, targets.long().view(-1, 1).to(logits.device)).squeeze(1)
    return t1 * picked - torch.logsumexp(t2 * logits, dim=1)


def objective_gradient(classify: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, targets: torch.Tensor,
                       t1: float = 1.0, t2: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(∇_z Σ_b J_b, J [B]) for `classify(z) -> logits`; z is detached first (no gradient reaches whatever made
    it), the samples are independent so the sum's gradient is the per-sample gradient. Works when the caller is
    inside torch.inference_mode (an inference-mode tensor is copied to a normal one)."""
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    with torch.inference_mode(False), torch.enable_grad():
        zz = z.detach().clone().to(dtype).requires_grad_(True)
        j = elucd_objective(classify(zz), targets.clone(), t1, t2)
        (grad,) = torch.autograd.grad(j.sum(), zz)
    return grad.to(z.dtype), j.detach()


MAX_SIGMA_TILDE = 14.6  # SD1's sigma_max: the coefficient is held there beyond it (DESIGN, see score_coefficient)


def score_coefficient(sigma: torch.Tensor, coords: Coords, max_sigma_tilde: float = MAX_SIGMA_TILDE) -> torch.Tensor:
    """s_σ²/a_σ per sample (float32): σ²/√(1+σ²) for VE states, σ²/(1−σ) for flow states (0 where σ = 0).

    DESIGN guard: σ is held at VE-normalised σ̃ ≤ `max_sigma_tilde` (σ ≤ 14.6 for VE, σ ≤ 14.6/15.6 ≈ 0.936 for
    flow), because the flow coefficient diverges as σ → 1 (a_σ → 0, where the prediction carries no signal of x)
    and the VP formula was made for schedules that stop near SD1's σ_max. Below the cap the two families give
    about the same coefficient at equal σ̃ (flow 13.7 vs VE 14.6 at σ̃ = 14.6)."""
    s = sigma.float()
    if coords.kind == "ve":
        s = s.clamp_max(max_sigma_tilde)
        return s.square() / torch.sqrt(1 + s.square())
    s = s.clamp_max(max_sigma_tilde / (1 + max_sigma_tilde))
    return s.square() / (1 - s)


def posterior_variance(sigma_tilde: float, sigma_tilde_next: float) -> float:
    """Σ of a DDPM step between VE-normalised noise levels σ̃ → σ̃' (0 for a step to σ̃' = 0 or a non-decreasing
    one): ᾱ = 1/(1+σ̃²), β = 1 − ᾱ/ᾱ', Σ = β·(1 − ᾱ')/(1 − ᾱ)."""
    if not sigma_tilde > sigma_tilde_next or sigma_tilde_next <= 0:
        return 0.0
    if math.isinf(sigma_tilde):
        abar = 0.0
    else:
        abar = 1.0 / (1.0 + sigma_tilde ** 2)
    abar_next = 1.0 / (1.0 + sigma_tilde_next ** 2)
    beta = 1.0 - abar / abar_next
    return beta * (1.0 - abar_next) / (1.0 - abar)


def schedule_factor(step: int, sigmas: list[float], coords: Coords, gamma: float = 0.3,
                    schedule: str = "sine") -> float:
    """κ at step `step` of the sampler's schedule `sigmas` (N + 1 values, last usually 0).

    sine:        1 + γ·(Σ_max/Σ_i)·sin(π·u), u = (N − 1 − i)/N (the released code's bump relative to the step
                 variance; 1 where Σ_i = 0, i.e. the final step, where sin(π·u) = 0 as well)
    sine_simple: 1 + γ·sin(π·u)
    constant:    1"""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    n = len(sigmas) - 1
    if schedule == "constant" or n < 1 or gamma == 0:
        return 1.0
    i = min(max(int(step), 0), n - 1)
    bump = math.sin(math.pi * (n - 1 - i) / n)
    if schedule == "sine_simple":
        return 1.0 + gamma * bump
    var = [posterior_variance(coords.tilde(sigmas[k]), coords.tilde(sigmas[k + 1])) for k in (0, i)]
    if var[1] <= 0.0 or bump <= 0.0:
        return 1.0
    return 1.0 + gamma * (var[0] / var[1]) * bump


def replace_relu_with_softplus(module: torch.nn.Module, beta: float) -> int:
    """Swap every torch.nn.ReLU submodule of `module` (in place; pass a private copy) for Softplus(β); returns how
    many were swapped. Functional relu calls inside forward methods are not reachable this way."""
    swapped = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.ReLU):
            setattr(module, name, torch.nn.Softplus(beta=beta))
            swapped += 1
        else:
            swapped += replace_relu_with_softplus(child, beta)
    return swapped


# ---------------------------------------------------------------------------------------------------- GFCG
# Gradient-free classifier guidance (Shenoy et al., arXiv 2411.15393). The paper's exact reference-class and scale
# rules are not confirmed; this is the Guidance Lab design of ../shared methods.md §7:
#     r = argmax_{j ≠ y, j ∈ candidates} p_j,   s = s_max·p_r/(p_y + p_r),   D̂ = D_cfg + s·(D_c − D(x; r))
# with p the classifier's softmax on the previous evaluation's conditional prediction (lag 1).

def gfcg_reference(probs: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference class [B], p_r/(p_y + p_r) [B]) from class probabilities [B, K] and targets [B]; the reference
    is the most probable candidate other than the target (candidates: a [K] bool mask, default all classes)."""
    probs = probs.float()
    b = torch.arange(probs.shape[0], device=probs.device)
    allowed = torch.ones_like(probs, dtype=torch.bool) if candidates is None else \
        candidates.to(probs.device).bool().expand_as(probs).clone()
    allowed[b, targets] = False
    if not allowed.any(dim=1).all():
        raise ValueError("no candidate class other than the target")
    ref = probs.masked_fill(~allowed, -1.0).argmax(dim=1)
    p_r, p_y = probs[b, ref], probs[b, targets]
    return ref, p_r / (p_y + p_r).clamp_min(1e-12)


def gfcg_term(d_cond: torch.Tensor, d_ref: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """s·(D_c − D_r) with a per-sample scale [B] broadcast over every non-batch dim."""
    return scale.to(d_cond).view(-1, *([1] * (d_cond.ndim - 1))) * (d_cond - d_ref)
