"""CFG++ samplers — Chung, Kim, Park, Nam, Ye, ICLR 2025, arXiv:2406.08070.

CFG++ forms the clean estimate with the guided prediction D_λ = D_u + λ·(D_c − D_u), λ ∈ [0, 1], and re-noises
with the *unconditional* noise ε_u = (x − α·D_u)/σ. Every update is written with α(σ) and σ̃ = σ/α
(`kernels.coords`), so it is correct on VE (EPS, V) and flow (CONST) states alike:

    Euler / DDIM:        x' = α'·D_λ + σ'·ε_u
    Euler ancestral:     x' = α'·(D_λ + σ̃_down·ε_u + s_noise·σ̃_up·z),  (σ̃_down, σ̃_up) = ancestral(σ̃, σ̃', η)
    DPM++ 2M:            x̃' = D_λ + σ̃'·ε_u + (1 − σ̃'/σ̃)/(2r)·(D_λ − D_u,prev),  r = h_prev/h, t = −log σ̃
    DPM++ 2S ancestral:  the official solver's form (midpoint with D_u, update with D_λ and D_u at the midpoint)

(the update rules of the authors' released solvers, rewritten in (x̃, σ̃) and mapped back with x = α·x̃).
`denoise(x, sigma) -> (D_λ, D_u)` is the only interface to the model; `sigma` is a float, one σ per batch.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .coords import Coords, ancestral_step

Denoise = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]

SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2s_ancestral")
ANCESTRAL = ("euler_ancestral", "dpmpp_2s_ancestral")


def _eps(x: torch.Tensor, d: torch.Tensor, sigma: float, coords: Coords) -> torch.Tensor:
    return (x - coords.alpha(sigma) * d) / sigma                       # noise implied by x0-prediction d


def _report(callback, i, x, sigma, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


def ancestral_cfgpp_step(x, d_guided, d_uncond, sigma, sigma_next, coords, *, eta=0.0, s_noise=1.0, noise=None):
    """One Euler (eta = 0) or Euler-ancestral CFG++ step σ → σ_next in α-form."""
    if sigma_next == 0:
        return d_guided
    a_next = coords.alpha(sigma_next)
    down, up = ancestral_step(coords.tilde(sigma), coords.tilde(sigma_next), eta)
    out = d_guided + down * _eps(x, d_uncond, sigma, coords)
    if up > 0 and s_noise > 0 and noise is not None:
        out = out + (s_noise * up) * noise
    return a_next * out


def sample_ancestral(denoise: Denoise, x, sigmas, *, coords: Coords, eta=1.0, s_noise=1.0, noise_sampler=None,
                     callback=None):
    """Euler-ancestral CFG++ (eta = 0 gives Euler / DDIM CFG++)."""
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d_guided, d_uncond = denoise(x, s)
        _report(callback, i, x, sigmas[i], d_guided)
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) if (eta > 0 and s_next > 0 and noise_sampler) else None
        x = ancestral_cfgpp_step(x, d_guided, d_uncond, s, s_next, coords, eta=eta, s_noise=s_noise, noise=noise)
    return x


def sample_dpmpp_2m(denoise: Denoise, x, sigmas, *, coords: Coords, callback=None):
    """DPM++ 2M CFG++ in (x̃, σ̃); first-order on the first step, the last step and after an infinite σ̃."""
    prev_uncond, prev_tilde = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d_guided, d_uncond = denoise(x, s)
        _report(callback, i, x, sigmas[i], d_guided)
        if s_next == 0:
            x = d_guided
            break
        st, st_next = coords.tilde(s), coords.tilde(s_next)
        x_t = d_guided + st_next * _eps(x, d_uncond, s, coords)          # first-order part (x̃ coordinates)
        if prev_uncond is not None and math.isfinite(st) and math.isfinite(prev_tilde):
            h = math.log(st / st_next)
            r = math.log(prev_tilde / st) / h
            x_t = x_t + ((1.0 - st_next / st) / (2.0 * r)) * (d_guided - prev_uncond)
        x = coords.alpha(s_next) * x_t
        prev_uncond, prev_tilde = d_uncond, st
    return x


def sample_dpmpp_2s_ancestral(denoise: Denoise, x, sigmas, *, coords: Coords, eta=1.0, s_noise=1.0,
                              noise_sampler=None, callback=None):
    """DPM++ 2S-ancestral CFG++ (official form) in (x̃, σ̃); 2 evaluations per step, 1 on the last step."""
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d_guided, d_uncond = denoise(x, s)
        _report(callback, i, x, sigmas[i], d_guided)
        st, st_next = coords.tilde(s), coords.tilde(s_next)
        down, up = ancestral_step(st, st_next, eta)
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) if (up > 0 and s_noise > 0 and noise_sampler) else None
        if down == 0 or math.isinf(st):
            # last step, or σ̃ = ∞ at the start of a flow schedule: the midpoint degenerates, take Euler-a CFG++
            x = ancestral_cfgpp_step(x, d_guided, d_uncond, s, s_next, coords, eta=eta, s_noise=s_noise,
                                     noise=noise)
            continue
        st_mid = math.sqrt(st * down)                                    # t_mid = t + h/2,  t = −log σ̃
        s_mid = coords.sigma_of_tilde(st_mid)
        x_mid = coords.alpha(s_mid) * (st_mid * x / s + (1.0 - st_mid / st) * d_uncond)
        d_guided_2, d_uncond_2 = denoise(x_mid, s_mid)
        out = d_guided_2 + down * _eps(x, d_uncond_2, s, coords)
        if noise is not None:
            out = out + (s_noise * up) * noise
        x = coords.alpha(s_next) * out
    return x


def equivalent_cfg(sigmas, lam: float, coords: Coords, *, eta: float = 0.0) -> list[float]:
    """Per-step CFG scale ω_t that a first-order CFG step needs to match CFG++ at λ (exact for Euler/DDIM/Euler-a).

    ω_t = λ·σ̃/(σ̃ − σ̃_down), and ω = λ on the last step (σ' = 0) and where σ̃ = ∞.
    """
    out = []
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        st = coords.tilde(s)
        down, _ = ancestral_step(st, coords.tilde(s_next), eta)
        if s_next == 0 or math.isinf(st):
            out.append(float(lam))
        else:
            out.append(float(lam) * st / (st - down))
    return out
