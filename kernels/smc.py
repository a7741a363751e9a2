"""Feynman–Kac correctors (FKC) — Skreta et al., ICML 2025, arXiv:2503.02819: particle weights and resampling.

A guided sampler driven by the effective denoiser D_eff = x̃ + Σ_i β_i·(D_i − x̃) does not sample the target its
scores suggest, p̃ = Π_i q_i^{β_i}. Feynman–Kac weights on a population of particles, with resampling, correct
this exactly in the limit of many particles (methods.md §5). Targets (`MODES`, expert order in brackets):

    cfg          q(x|c)^β · q(x)^{1−β}          β = (β, 1 − β)   [D_c, D_u]
    product      q₁ · q₂                        β = (1, 1)       [D_1, D_2]
    composition  q₁ · q₂ / q_u                  β = (1, 1, −1)   [D_1, D_2, D_u]
    annealing    q^β                            β = (β,)         [D]

Everything is written in VE-normalised coordinates x̃ = x/α, σ̃ = σ/α (`kernels.coords`), so EPS and V models
(α = 1) and flow models (CONST, α = 1 − σ) share one formula. With ε_i = (x − α·D_i)/σ = (x̃ − D_i)/σ̃ the
per-step log-weight increment of methods.md §5 (lines 414-422; the x0 form of the master formula, lines 394-406)

    Δlog w = ½·( ‖Σ_i β_i (D_i − x̃)‖² − Σ_i β_i ‖D_i − x̃‖² )·Δτ/σ̃_k⁴,   Δτ = σ̃_k² − σ̃_{k+1}²

is evaluated in the equivalent, cancellation-free form (S = Σ_i β_i)

    Δlog w = ½·( (S − 1)·Σ_i β_i ‖ε_i‖² − Σ_{i<j} β_i β_j ‖D_i − D_j‖²/σ̃_k² )·(1 − σ̃_{k+1}²/σ̃_k²)

which stays finite at σ̃_k = ∞ (σ = 1 on a flow model) and reduces to ½β(β−1)‖D_c − D_u‖²Δτ/σ̃⁴ for CFG,
⟨D₁ − x̃, D₂ − x̃⟩Δτ/σ̃⁴ for the product and ½β(β−1)‖D − x̃‖²Δτ/σ̃⁴ for annealing, exactly as listed there.

The weights are valid only together with the stochastic target-score SDE driven by D_eff (`propagate`):
Euler–Maruyama with the left-point factor Δτ/σ̃_k⁴ above (the pairing of methods.md Appendix A.2), or the DDPM /
Euler-ancestral (η = 1) step with the "exponential" factor Δτ/(σ̃_k²σ̃_{k+1}²) (`weight_quadrature_coefficients`;
DESIGN, derived here: DDPM freezes D over the step and this integrates the 1/σ̃⁴ rate exactly under the same
approximation — with the left-point factor DDPM leaves a −17 % variance error on A.2's CFG case at 200 steps).
`sample_fkc` picks the matching factor (`matched_quadrature`). A deterministic step with weights is rejected
(`check_propagation`).

Batch layout ("image-major groups"): the K particles of one requested image are consecutive rows of the batch,
row b = image·K + particle, i.e. a [images·K, ...] tensor viewed as [images, K, ...]. Weights are normalised, ESS
is measured and resampling happens inside each group of K; groups never exchange particles.

Status (methods.md §5): weight formulas DERIVED and checked on 1-D Gaussians (Appendix A.2); centring, clamping and
resampling at every step but the last follow the official EDM2 code (OFFICIAL); the weight temperature, the σ-window,
the ESS rule's use in the node, the initial-noise scale and the output choice are DESIGN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .coords import VE, Coords

MODES = ("cfg", "product", "composition", "annealing")
PROPAGATIONS = ("ddpm", "euler_maruyama", "euler")
STOCHASTIC_PROPAGATIONS = ("ddpm", "euler_maruyama")
RESAMPLE_RULES = ("every_step", "ess", "never")
OUTPUTS = ("best", "sample", "all")
QUADRATURES = ("left", "exponential")

_VE_COORDS = Coords(VE)
_SUM_ONE_TOL = 1e-9

ExpertDenoise = Callable[[torch.Tensor, float], Sequence[torch.Tensor]]


# ----------------------------------------------------------------------------------------------------- targets

def mode_betas(mode: str, beta: float | None = None) -> tuple[float, ...]:
    """Exponents β_i of the target p̃ = Π_i q_i^{β_i} for a named mode (methods.md §5 "Targets", lines 390-392,
    and the composition row of the node table, line 459).

    cfg: (β, 1 − β) for experts (D_c, D_u), β = the guider's cfg; product: (1, 1) for (D_1, D_2); composition:
    (1, 1, −1) for (D_1, D_2, D_u); annealing: (β,) for (D,). `beta` is required for cfg and annealing and
    ignored otherwise.
    """
    if mode not in MODES:
        raise ValueError(f"unknown FKC mode {mode!r}; expected one of {MODES}")
    if mode in ("cfg", "annealing"):
        if beta is None or not math.isfinite(float(beta)):
            raise ValueError(f"FKC mode {mode!r} needs a finite beta, got {beta!r}")
        beta = float(beta)
        if mode == "annealing" and beta <= 0:
            raise ValueError(f"annealing needs beta > 0 (target q^beta), got {beta}")
        return (beta, 1.0 - beta) if mode == "cfg" else (beta,)
    return (1.0, 1.0) if mode == "product" else (1.0, 1.0, -1.0)


def initial_noise_scale(betas: Sequence[float]) -> float:
    """Factor (Σβ_i)^(−1/2) for the initial noise, so that the particles start from the target's marginal.

    At noise levels far above the data scale every q_i,σ ≈ N(·, σ̃²) and Π q_i^{β_i} ≈ N(·, σ̃²/Σβ_i)
    (precision Σβ_i/(v_i + σ̃²), methods.md A.2, line 1213). CFG and composition (Σβ = 1) need no change; the
    product starts with variance σ̃²/2, annealing with σ̃²/β. The weights do not correct a wrong initial law, so the
    sampler should multiply its initial noise by this factor. DERIVED in the large-σ̃ Gaussian limit (the small
    mean offset of the target is neglected); applying it in the node is DESIGN, not from the paper's code.
    """
    s = float(sum(betas))
    if not s > 0:
        raise ValueError(f"the target's exponents must have a positive sum, got sum(betas) = {s}")
    return 1.0 / math.sqrt(s)


# ------------------------------------------------------------------------------------------------ coordinates

def _check_experts(x: torch.Tensor, denoised: Sequence[torch.Tensor], betas: Sequence[float]) -> None:
    if len(denoised) != len(betas) or not betas:
        raise ValueError(f"need one denoised prediction per exponent: got {len(denoised)} predictions "
                         f"for {len(betas)} betas")
    for i, d in enumerate(denoised):
        if d.shape != x.shape:
            raise ValueError(f"denoised[{i}] has shape {tuple(d.shape)}, expected {tuple(x.shape)} like x")
    if x.ndim < 2:
        raise ValueError(f"x must be [batch, ...] with at least one non-batch dim, got shape {tuple(x.shape)}")


def _step_tilde(sigma: float, sigma_next: float, coords: Coords) -> tuple[float, float, float]:
    """(σ̃_k, σ̃_{k+1}, 1 − σ̃_{k+1}²/σ̃_k²) of a step σ → σ_next, validated."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    if not sigma > 0:
        raise ValueError(f"FKC step needs sigma > 0, got {sigma}")
    if not 0 <= sigma_next <= sigma:
        raise ValueError(f"FKC step needs 0 <= sigma_next <= sigma, got sigma={sigma}, sigma_next={sigma_next}")
    st, st_next = coords.tilde(sigma), coords.tilde(sigma_next)
    if math.isinf(st_next):
        raise ValueError("FKC step to sigma_next with alpha = 0 (infinite sigma~) is not a denoising step")
    one_minus_r2 = 1.0 if math.isinf(st) else 1.0 - (st_next / st) ** 2
    return st, st_next, one_minus_r2


def _eps(x: torch.Tensor, d: torch.Tensor, sigma: float, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """ε(D) = (x − α·D)/σ = (x̃ − D)/σ̃, finite also where α = 0."""
    return (x.to(dtype) - alpha * d.to(dtype)) / sigma


def _sq_norm(a: torch.Tensor) -> torch.Tensor:
    """‖a_b‖² per sample over all non-batch dims, [B]."""
    return a.reshape(a.shape[0], -1).pow(2).sum(dim=1)


# ---------------------------------------------------------------------------------------------------- weights

def weight_quadrature_coefficients(sigma: float, sigma_next: float, quadrature: str = "left", *,
                                   coords: Coords = _VE_COORDS) -> tuple[float, float]:
    """(κ, σ̃²κ) of one step: the factor κ that multiplies the squared D-differences in `log_weight_increment`.

    "left":        κ = Δτ/σ̃_k⁴                      methods.md §5 lines 414-422 (rate frozen at the start point)
    "exponential": κ = Δτ/(σ̃_k²σ̃_{k+1}²) = 1/σ̃_{k+1}² − 1/σ̃_k²  = ∫ dτ/τ² over the step (D frozen)

    "left" is the rule of methods.md and of Appendix A.2 (paired there with Euler–Maruyama). "exponential"
    integrates the 1/σ̃⁴ factor exactly while the x0-predictions are held fixed over the step — the same
    approximation the DDPM step makes, so it is the consistent pairing for `propagate(method="ddpm")`. It is
    DERIVED here, not in methods.md or the paper's code (DESIGN). On the A.2 Gaussian cases (Karras 200 steps,
    N → ∞ limit computed exactly) DDPM + "left" misses CFG β = 3 by +0.039 in the mean and −17 % in the variance,
    while DDPM + "exponential" is off by −5.7 %, the same as DDPM's own error on the unguided model (−5.9 %), as
    is Euler–Maruyama + "left" (+5.7 % vs +5.5 %). Both factors agree to first order in the step.
    σ̃_k = ∞ (flow σ = 1): "left" gives κ = 0, σ̃²κ = 1; "exponential" κ = 1/σ̃_{k+1}², σ̃²κ = ∞.
    "exponential" needs σ̃_{k+1} > 0 (the last step is never weighted).
    """
    if quadrature not in QUADRATURES:
        raise ValueError(f"unknown weight quadrature {quadrature!r}; expected one of {QUADRATURES}")
    st, st_next, one_minus_r2 = _step_tilde(sigma, sigma_next, coords)
    if quadrature == "left":
        return (0.0 if math.isinf(st) else one_minus_r2 / st ** 2), one_minus_r2
    if st_next == 0.0:
        raise ValueError("the 'exponential' weight quadrature is undefined on a step to sigma = 0 "
                         "(that last step is never weighted)")
    if math.isinf(st):
        return 1.0 / st_next ** 2, math.inf
    return 1.0 / st_next ** 2 - 1.0 / st ** 2, (st / st_next) ** 2 - 1.0


def log_weight_increment(x: torch.Tensor, denoised: Sequence[torch.Tensor], betas: Sequence[float], sigma: float,
                         sigma_next: float, *, coords: Coords = _VE_COORDS, quadrature: str = "left") -> torch.Tensor:
    """FKC log-weight increment of one step σ → σ_next for the target Π_i q_i^{β_i}, per particle, float64 [B].

    `x` is the state in the model's own coordinates (x = α·x̃), `denoised[i]` the x0-prediction D_i of expert i at
    (x, σ), all of the same shape [B, ...]; reductions run over every non-batch dim in float64. Formula (methods.md
    §5, lines 414-422, "general"), evaluated at the current particle:

        Δlog w = ½·( ‖Σ_i β_i (D_i − x̃)‖² − Σ_i β_i ‖D_i − x̃‖² )·κ,      κ = Δτ/σ̃_k⁴  ("left")

    computed in the algebraically identical, cancellation-free form (S = Σβ_i, ε_i = (x − α·D_i)/σ =
    (x̃ − D_i)/σ̃_k, so that nothing divides by α)

        Δlog w = ½·( (S − 1)·Σ_i β_i ‖ε_i‖²·σ̃_k²κ − Σ_{i<j} β_i β_j ‖D_i − D_j‖²·κ ).

    CFG (β, 1 − β) gives ½β(β−1)‖D_c − D_u‖²κ, product (1, 1) ⟨D₁ − x̃, D₂ − x̃⟩κ, annealing (β,)
    ½β(β−1)‖D − x̃‖²κ (lines 418-420). `quadrature` chooses κ (`weight_quadrature_coefficients`; "exponential"
    is the DESIGN pairing for DDPM propagation). The x-independent (Σβ_i − 1)∇·f term of the master formula
    (line 405) cancels after normalisation and is omitted. Valid only for the stochastic propagation of
    `propagate` (see `check_propagation`) and constant β_i. The caller decides whether a step is weighted
    (`weights_active`: never on the last step).
    """
    _check_experts(x, denoised, betas)
    kappa, kappa_s = weight_quadrature_coefficients(sigma, sigma_next, quadrature, coords=coords)
    f64 = torch.float64
    out = torch.zeros(x.shape[0], dtype=f64, device=x.device)
    s = float(sum(betas))
    if abs(s - 1.0) > _SUM_ONE_TOL:
        if math.isinf(kappa_s):
            raise ValueError(f"sum(betas) = {s} != 1 with the 'exponential' quadrature is singular at sigma~ = inf "
                             f"(sigma = {sigma} on a flow model); start the schedule below sigma = 1")
        alpha = coords.alpha(sigma)
        for b, d in zip(betas, denoised):
            if b:
                out = out + ((s - 1.0) * float(b) * kappa_s) * _sq_norm(_eps(x, d, float(sigma), alpha, f64))
    if kappa:
        for i in range(len(betas)):
            for j in range(i + 1, len(betas)):
                if betas[i] and betas[j]:
                    diff = denoised[i].to(f64) - denoised[j].to(f64)
                    out = out - (float(betas[i]) * float(betas[j]) * kappa) * _sq_norm(diff)
    return 0.5 * out


def cfg_log_weight_increment(x: torch.Tensor, d_cond: torch.Tensor, d_uncond: torch.Tensor, beta: float,
                             sigma: float, sigma_next: float, *, coords: Coords = _VE_COORDS,
                             quadrature: str = "left") -> torch.Tensor:
    """CFG target q(x|c)^β q(x)^{1−β}: Δlog w = ½·β(β−1)·‖D_c − D_u‖²·Δτ/σ̃⁴ per particle, float64 [B]
    (methods.md §5, line 418). Same as `log_weight_increment` with betas (β, 1 − β)."""
    return log_weight_increment(x, (d_cond, d_uncond), (float(beta), 1.0 - float(beta)), sigma, sigma_next,
                                coords=coords, quadrature=quadrature)


def matched_quadrature(propagation: str) -> str:
    """The weight quadrature that goes with a propagation: "exponential" for "ddpm", "left" otherwise (DESIGN,
    see `weight_quadrature_coefficients`)."""
    return "exponential" if propagation == "ddpm" else "left"


def weights_active(step: int, sigmas: Sequence[float] | torch.Tensor,
                   sigma_window: tuple[float, float] | None = None) -> bool:
    """Whether step `step` (σ_step → σ_step+1 of the schedule `sigmas`) updates the weights and may resample.

    Never on the last step of the schedule (OFFICIAL EDM2: "no weight update on the last step", methods.md §5,
    lines 449-451) nor on any step to σ = 0. `sigma_window = (sigma_start, sigma_end)` restricts weighting to
    σ_end ≤ σ_step ≤ σ_start (methods.md §0.4 window convention); outside it the sampler still propagates with
    D_eff, so the result is then no longer the exact target (the window is DESIGN, a stabiliser like the clamp).
    """
    n_steps = len(sigmas) - 1
    if not 0 <= step < n_steps:
        raise ValueError(f"step {step} outside the schedule's {n_steps} steps")
    if step == n_steps - 1 or float(sigmas[step + 1]) == 0.0:
        return False
    if sigma_window is not None:
        s_start, s_end = float(sigma_window[0]), float(sigma_window[1])
        return s_end <= float(sigmas[step]) <= s_start
    return True


def temper_increments(increments: torch.Tensor, k: int, *, temperature: float = 1.0,
                      clamp: float = 0.0) -> torch.Tensor:
    """Stabilised increments: τ·Δlog w, centred over the K particles of each group, then clipped to [−c, c].

    Centring changes nothing after normalisation; the clip (c > 0) does. The official EDM2 code centres and clips
    to [−2, 2] (Heun) / [−1, 1] (Euler–Maruyama) (OFFICIAL, methods.md §5 lines 446-448); neither the clip nor the
    temperature τ is in the theory: with τ ≠ 1 or an active clip the particles no longer target p̃ exactly
    (temperature: DESIGN). τ = 1, c = 0 returns the increments unchanged (float64).
    """
    if temperature < 0 or clamp < 0:
        raise ValueError(f"temperature and clamp must be >= 0, got {temperature}, {clamp}")
    n = num_groups(increments.shape[0], k)
    inc = increments.to(torch.float64)
    if temperature == 1.0 and clamp == 0.0:
        return inc
    inc = (temperature * inc).reshape(n, k)
    if clamp > 0:
        inc = (inc - inc.mean(dim=1, keepdim=True)).clamp(-clamp, clamp)
    return inc.reshape(-1)


# ---------------------------------------------------------------------------------------------------- layout

def num_groups(batch: int, k: int) -> int:
    """Number of images in a [images·K, ...] particle batch; raises unless K ≥ 1 divides the batch."""
    if int(k) < 1:
        raise ValueError(f"K (particles per image) must be >= 1, got {k}")
    if batch % int(k):
        raise ValueError(f"batch of {batch} rows is not a whole number of groups of K = {k} particles")
    return batch // int(k)


def expand_particles(x: torch.Tensor, k: int) -> torch.Tensor:
    """[images, ...] → [images·K, ...] in the image-major layout (row = image·K + particle)."""
    return x.repeat_interleave(int(k), dim=0)


def gather_particles(t: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    """Rows of `t` (particles or any per-particle state) picked by global ancestor indices from a resampler."""
    return t.index_select(0, ancestors.to(t.device))


# --------------------------------------------------------------------------------------- normalisation, ESS

def _grouped_log_weights(log_w: torch.Tensor, k: int) -> torch.Tensor:
    if log_w.ndim != 1:
        raise ValueError(f"log-weights must be a flat [images·K] tensor, got shape {tuple(log_w.shape)}")
    n = num_groups(log_w.shape[0], k)
    lw = log_w.to(torch.float64).reshape(n, int(k))
    if torch.isnan(lw).any() or (lw == math.inf).any():
        raise ValueError("log-weights contain NaN or +inf")
    if (lw == -math.inf).all(dim=1).any():
        raise ValueError("a group of particles has all log-weights = -inf (no particle left)")
    return lw


def normalize_log_weights(log_w: torch.Tensor, k: int) -> torch.Tensor:
    """log w̄ = log w − logsumexp_group(log w): normalised log-weights per group of K, float64 [images·K].

    Stable for any finite magnitude (e.g. ±1e4)."""
    lw = _grouped_log_weights(log_w, k)
    return (lw - torch.logsumexp(lw, dim=1, keepdim=True)).reshape(-1)


def normalized_weights(log_w: torch.Tensor, k: int) -> torch.Tensor:
    """w̄ = exp(normalised log-weights): sums to 1 in each group of K, float64 [images·K]."""
    return normalize_log_weights(log_w, k).exp()


def effective_sample_size(log_w: torch.Tensor, k: int) -> torch.Tensor:
    """ESS = 1/Σ w̄² per group of K (K for uniform weights, 1 for a one-hot), float64 [images].

    Computed in log space as exp(2·logsumexp(log w) − logsumexp(2·log w))."""
    lw = _grouped_log_weights(log_w, k)
    return torch.exp(2.0 * torch.logsumexp(lw, dim=1) - torch.logsumexp(2.0 * lw, dim=1))


# ------------------------------------------------------------------------------------------------ resampling

def resample_mask(log_w: torch.Tensor, k: int, rule: str = "every_step", kappa: float = 0.5) -> torch.Tensor:
    """Which groups resample now, bool [images]: "every_step" (OFFICIAL EDM2 default), "ess" (ESS < κ·K, the
    usual SMC rule; κ = 0.5 in methods.md's node table), "never". Always False for K = 1 (nothing to resample).
    Whether the step may resample at all is `weights_active`'s call (never on the last step)."""
    if rule not in RESAMPLE_RULES:
        raise ValueError(f"unknown resampling rule {rule!r}; expected one of {RESAMPLE_RULES}")
    n = num_groups(log_w.shape[0], k)
    if k == 1 or rule == "never":
        return torch.zeros(n, dtype=torch.bool, device=log_w.device)
    if rule == "every_step":
        return torch.ones(n, dtype=torch.bool, device=log_w.device)
    if not 0 <= kappa <= 1:
        raise ValueError(f"kappa must be in [0, 1], got {kappa}")
    return effective_sample_size(log_w, k) < kappa * k


def systematic_resample(log_w: torch.Tensor, k: int, generator: torch.Generator | None = None,
                        mask: torch.Tensor | None = None, floor: float = 0.0) -> torch.Tensor:
    """Systematic resampling inside each group of K; returns global ancestor indices, int64 [images·K].

    Per group one u₀ ~ U(0, 1] (drawn from `generator`, in group order; `None` uses torch's global RNG), points
    u_j = (u₀ + j)/K for j = 0…K−1, ancestor a_j = the first i with cumsum_i(w̄) ≥ u_j (methods.md §5, lines 449-451;
    u₀ is taken in (0, 1] rather than [0, 1) so that a zero-weight first particle can never be hit by u = 0).
    Particle i is copied ⌊K·w̄_i⌋ or ⌈K·w̄_i⌉ times, K·w̄_i on average (unbiased);
    zero-weight particles are never chosen. Ancestors stay inside their own group. Groups where `mask` [images]
    is False keep their particles (identity indices); a u₀ is drawn for every group all the same, so
    each call advances the generator by exactly one number per group. `floor` > 0 clips
    the normalised weights from below before the cumulative sum (the official EDM2 code uses 1e-6, OFFICIAL; it
    biases towards low-weight particles, default off). For K = 1 the identity is returned without drawing.
    """
    lw = _grouped_log_weights(log_w, k)
    n, device = lw.shape[0], lw.device
    k = int(k)
    identity = torch.arange(n * k, device=device)
    if k == 1:
        return identity
    w = torch.softmax(lw, dim=1)
    if floor > 0:
        w = w.clamp_min(float(floor))
    c = torch.cumsum(w, dim=1)
    c = torch.cat([torch.zeros_like(c[:, :1]), c / c[:, -1:]], dim=1)               # 0 = c_0 ≤ … ≤ c_K = 1
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u0 = 1.0 - torch.rand(n, generator=generator, dtype=torch.float64, device=gen_device).to(device)   # (0, 1]
    # #{j : u_j ≤ c} = clamp(⌊K·c − u₀⌋ + 1, 0, K); particle i receives the points in (c_{i−1}, c_i]
    below = (torch.floor(k * c - u0[:, None]) + 1).clamp_(0, k).to(torch.int64)
    below[:, -1] = k
    counts = (below[:, 1:] - below[:, :-1]).reshape(-1)
    idx = torch.repeat_interleave(identity, counts)
    if mask is not None:
        keep = ~mask.to(device=device, dtype=torch.bool).repeat_interleave(k)
        idx = torch.where(keep, identity, idx)
    return idx


# ---------------------------------------------------------------------------------------------- propagation

def check_propagation(method: str, *, weighted: bool = True) -> None:
    """Raise ValueError unless `method` is a known propagation, and a stochastic one when weights are used.

    The FKC weights are derived for the stochastic reverse SDE with the pretrained process's noise level
    (methods.md §5, lines 424-433: "Deterministic ODE samplers are not covered by these weights"). "ddpm" and
    "euler_maruyama" qualify; "euler" (the deterministic probability-flow step with D_eff) is accepted only for
    unweighted runs (e.g. K = 1 or a comparison baseline).
    """
    if method not in PROPAGATIONS:
        raise ValueError(f"unknown FKC propagation {method!r}; expected one of {PROPAGATIONS}")
    if weighted and method not in STOCHASTIC_PROPAGATIONS:
        raise ValueError(f"FKC weights are only valid for a stochastic propagation {STOCHASTIC_PROPAGATIONS}; "
                         f"{method!r} is deterministic (an ODE step), so weighting and resampling its particles "
                         f"would not target the intended distribution")


def effective_denoised(x: torch.Tensor, denoised: Sequence[torch.Tensor], betas: Sequence[float], sigma: float, *,
                       coords: Coords = _VE_COORDS) -> torch.Tensor:
    """D_eff = x̃ + Σ_i β_i (D_i − x̃) = Σ_i β_i D_i + (1 − S)·x̃ (methods.md §5, line 424; CFG: D_u + β(D_c − D_u)).

    The x0-prediction whose score is the target score Σβ_i s_i. Computed in float32 or wider and returned in that
    dtype. For S = Σβ_i ≠ 1 (product, annealing) it contains x̃ and is undefined where σ̃ = ∞ (σ = 1 on a flow
    model): ValueError there — start such flow schedules just below σ = 1.
    """
    _check_experts(x, denoised, betas)
    dt = torch.promote_types(x.dtype, torch.float32)
    out = sum(float(b) * d.to(dt) for b, d in zip(betas, denoised))
    s = float(sum(betas))
    if abs(s - 1.0) > _SUM_ONE_TOL:
        alpha = coords.alpha(sigma)
        if alpha <= 0:
            raise ValueError(f"sum(betas) = {s} != 1: the target score is singular at sigma~ = inf (sigma = "
                             f"{sigma} on a flow model); start the schedule below sigma = 1")
        out = out + (1.0 - s) * (x.to(dt) / alpha)
    return out


def propagate(x: torch.Tensor, denoised: Sequence[torch.Tensor], betas: Sequence[float], sigma: float,
              sigma_next: float, noise: torch.Tensor | None = None, *, coords: Coords = _VE_COORDS,
              method: str = "ddpm") -> torch.Tensor:
    """One step σ → σ_next of the target-score reverse SDE driven by D_eff (methods.md §5, lines 424-431).

        ddpm (Euler-a, η = 1):  x̃' = D_eff + r²(x̃ − D_eff) + σ̃'·√(1 − r²)·z          r² = σ̃'²/σ̃²
        euler_maruyama:         x̃' = x̃ + (Δτ/σ̃²)(D_eff − x̃) + √Δτ·z                 Δτ = σ̃² − σ̃'²
        euler (deterministic):  x̃' = D_eff + σ̃'·(x̃ − D_eff)/σ̃      — unweighted runs only
        x' = α(σ_next)·x̃'

    (Both stochastic rules have the same mean D_eff + r²(x̃ − D_eff); they differ in the noise.) Implemented with
    x̃ − D_eff = σ̃·Σβ_i ε_i, so the ddpm and euler rules are finite at σ̃ = ∞ when Σβ_i = 1 (first step of a flow
    schedule); Euler–Maruyama needs a finite σ̃. A step to σ_next = 0 returns D_eff without noise (the final
    denoising step of every ComfyUI sampler). `noise` z ~ N(0, I) shaped like x is required by the stochastic
    rules. The noise level is the pretrained process's (no s_noise: other levels void the weights, line 412).
    Computed in float32 or wider, returned in x's dtype.
    """
    if method not in PROPAGATIONS:
        raise ValueError(f"unknown FKC propagation {method!r}; expected one of {PROPAGATIONS}")
    st, st_next, one_minus_r2 = _step_tilde(sigma, sigma_next, coords)
    d_eff = effective_denoised(x, denoised, betas, sigma, coords=coords)
    if float(sigma_next) == 0.0:
        return d_eff.to(x.dtype)
    dt = d_eff.dtype
    if method in STOCHASTIC_PROPAGATIONS and noise is None:
        raise ValueError(f"propagation {method!r} is stochastic and needs a noise tensor")
    if method == "euler_maruyama" and math.isinf(st):
        raise ValueError("Euler–Maruyama needs a finite sigma~ (its step from sigma~ = inf is infinite); "
                         "use 'ddpm' or start the flow schedule below sigma = 1")
    alpha = coords.alpha(sigma)
    eps_eff = sum(float(b) * _eps(x, d, float(sigma), alpha, dt) for b, d in zip(betas, denoised))
    if method == "euler":
        out = d_eff + st_next * eps_eff
    else:
        out = d_eff if math.isinf(st) else d_eff + (st_next ** 2 / st) * eps_eff
        std = st_next * math.sqrt(one_minus_r2) if method == "ddpm" else st * math.sqrt(one_minus_r2)
        if std > 0:
            out = out + std * noise.to(device=out.device, dtype=dt)
    return (coords.alpha(sigma_next) * out).to(x.dtype)


# ------------------------------------------------------------------------------------------------------ output

def select_output(x: torch.Tensor, log_w: torch.Tensor, k: int, output: str = "best",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the returned sample(s) from the final particles [images·K, ...].

    "best": per group the particle of highest final log-weight, [images, ...] (ties → lowest index; after a
    resampling the weights are uniform and this is particle 0 of the group, as the official EDM2 code saves);
    "sample": one particle per group drawn with probability w̄ (multinomial, `generator` on CPU); "all": every
    particle, x unchanged. The choice rule is DESIGN (methods.md §5 node table, line 466).
    """
    if output not in OUTPUTS:
        raise ValueError(f"unknown output choice {output!r}; expected one of {OUTPUTS}")
    if log_w.shape[0] != x.shape[0]:
        raise ValueError(f"{log_w.shape[0]} log-weights for {x.shape[0]} particles")
    if output == "all":
        return x
    lw = _grouped_log_weights(log_w, k)
    n = lw.shape[0]
    if output == "best":
        j = lw.argmax(dim=1)
    else:
        j = torch.multinomial(torch.softmax(lw, dim=1).cpu(), 1, generator=generator).reshape(-1).to(lw.device)
    idx = j + int(k) * torch.arange(n, device=lw.device)
    return gather_particles(x, idx)


# -------------------------------------------------------------------------------------------------- the loop

@dataclass
class FKCResult:
    """Outcome of `sample_fkc`: final particles [images·K, ...], their log-weights (float64 [images·K], not
    normalised), ESS per group after each weighted step (before resampling), resamplings per group, the
    number of weighted steps, and whether the run was the plain guided SDE (K = 1)."""

    x: torch.Tensor
    log_w: torch.Tensor
    ess: list[torch.Tensor] = field(default_factory=list)
    resamplings: torch.Tensor | None = None
    weighted_steps: int = 0
    plain_sde: bool = False


def sample_fkc(denoise_experts: ExpertDenoise, x: torch.Tensor, sigmas, *, k: int, betas: Sequence[float],
               coords: Coords = _VE_COORDS, propagation: str = "ddpm", resample: str = "every_step",
               kappa: float = 0.5, temperature: float = 1.0, clamp: float = 0.0,
               sigma_window: tuple[float, float] | None = None, generator: torch.Generator | None = None,
               noise_sampler: Callable[[float, float], torch.Tensor] | None = None, resample_floor: float = 0.0,
               quadrature: str | None = None, callback=None) -> FKCResult:
    """FKC particle sampler over a schedule `sigmas` (σ_0 > … ≥ 0), particles [images·K, ...] image-major.

    Per step k: D_i = denoise_experts(x, σ_k) (one batched call per expert over all particles); if
    `weights_active` (not the last step, inside `sigma_window`) add the tempered increment
    `log_weight_increment` to the log-weights; take the `propagate` step with fresh noise (from `noise_sampler(σ,
    σ_next)` or, without one, torch.randn with `generator`); then, on weighted steps, resample the groups chosen by
    `resample_mask` systematically (`generator`) and reset their log-weights to 0 (OFFICIAL EDM2 order and reset).
    The weight at step k uses the particle before the move; resampling after the move is equivalent because the
    move is independent per particle. The initial x must already follow the target's marginal at σ_0 (see
    `initial_noise_scale`). `quadrature` None picks `matched_quadrature(propagation)`. K = 1: no weights, no
    resampling — the plain guided SDE with D_eff (`plain_sde`). A deterministic propagation with K > 1 raises
    (`check_propagation`). `temperature`/`clamp` go to `temper_increments` (defaults: exact, untempered),
    `resample_floor` to `systematic_resample`. `callback(info)` gets, per step, the pre-move particles, σ, σ_next,
    the experts' D_i, the log-weights after this step's increment and whether the step was weighted. Same
    generator state ⇒ same result.
    """
    n = num_groups(x.shape[0], k)
    check_propagation(propagation, weighted=k > 1)
    if resample not in RESAMPLE_RULES:
        raise ValueError(f"unknown resampling rule {resample!r}; expected one of {RESAMPLE_RULES}")
    quadrature = matched_quadrature(propagation) if quadrature is None else quadrature
    if quadrature not in QUADRATURES:
        raise ValueError(f"unknown weight quadrature {quadrature!r}; expected one of {QUADRATURES}")
    sigmas = [float(s) for s in sigmas]
    log_w = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    result = FKCResult(x=x, log_w=log_w, resamplings=torch.zeros(n, dtype=torch.int64), plain_sde=(k == 1))
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = list(denoise_experts(x, s))
        weighted = k > 1 and weights_active(i, sigmas, sigma_window)
        if weighted:
            inc = log_weight_increment(x, denoised, betas, s, s_next, coords=coords, quadrature=quadrature)
            log_w = log_w + temper_increments(inc, k, temperature=temperature, clamp=clamp)
        noise = None
        if s_next > 0 and propagation in STOCHASTIC_PROPAGATIONS:
            if noise_sampler is not None:
                noise = noise_sampler(s, s_next)
            else:
                gen_device = generator.device if generator is not None else torch.device("cpu")
                noise = torch.randn(x.shape, generator=generator, dtype=torch.float32 if x.dtype in (
                    torch.float16, torch.bfloat16) else x.dtype, device=gen_device).to(x.device)
        x_next = propagate(x, denoised, betas, s, s_next, noise, coords=coords, method=propagation)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": denoised, "log_w": log_w,
                      "weighted": weighted})
        x = x_next
        if weighted:
            result.weighted_steps += 1
            result.ess.append(effective_sample_size(log_w, k))
            mask = resample_mask(log_w, k, resample, kappa)
            if bool(mask.any()):
                idx = systematic_resample(log_w, k, generator, mask=mask, floor=resample_floor)
                x = gather_particles(x, idx)
                log_w = torch.where(mask.to(log_w.device).repeat_interleave(k), torch.zeros_like(log_w), log_w)
                result.resamplings += mask.to(torch.int64).cpu()
    result.x, result.log_w = x, log_w
    return result
