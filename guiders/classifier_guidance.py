"""EluCD classifier guidance as a MODEL patch: one post-CFG hook, 0 extra NFE.

After the CFG combine (or whatever combine precedes it) the hook decodes the guided prediction D to an RGB image,
takes the gradient G of EluCD's objective through the (Softplus-smoothed, private copy of the) classifier — never
through the diffusion model — and returns D + scale·κ·(s_σ²/a_σ)·G (kernels/classifier_guidance.py). Works at any
cfg (no uncond needed), on EPS, V-prediction and flow models; per-image targets in a batch.

Decoders (what the classifier looks at):
* identity — pixel-space models (3-channel latents without RGB factors, e.g. the demo model): image = (z + 1)/2;
* linear — the model family's `latent_rgb_factors` (+ bias) from its latent format, the map ComfyUI's latent
  previews use, at latent resolution, then resized to the classifier (DESIGN: colours and layout only).
"""
from __future__ import annotations

import logging

import torch

from ..kernels.classifier_guidance import SCHEDULES, objective_gradient, schedule_factor, score_coefficient
from .classifier import ClassifierError
from .family import coords_for, in_window
from .nfe import install_nfe_counter
from .run_state import step_index

NODE = "GL_ClassifierGuidance"
DECODERS = ("auto", "identity", "linear")
log = logging.getLogger("guidance_lab")


def check_settings(*, scale, t1, marginal_discount, softplus_beta, gamma, schedule, decoder, start_percent,
                   end_percent) -> None:
    if not 0.0 <= start_percent < end_percent <= 1.0:
        raise ValueError(f"{NODE}: start_percent ({start_percent}) must be smaller than end_percent "
                         f"({end_percent}), both in [0, 1]")
    if scale < 0:
        raise ValueError(f"{NODE}: scale ({scale}) must be >= 0 (0 turns the guidance off)")
    if t1 <= 0 or marginal_discount < 0:
        raise ValueError(f"{NODE}: joint_temperature ({t1}) must be > 0 and marginal_discount "
                         f"({marginal_discount}) >= 0 (paper: 1.0 and 0.5)")
    if softplus_beta < 0 or gamma < 0:
        raise ValueError(f"{NODE}: softplus_beta ({softplus_beta}) and gamma ({gamma}) must be >= 0")
    if schedule not in SCHEDULES:
        raise ValueError(f"{NODE}: schedule '{schedule}' is not one of {SCHEDULES}")
    if decoder not in DECODERS:
        raise ValueError(f"{NODE}: decoder '{decoder}' is not one of {DECODERS}")


def pick_decoder(latent_format, decoder: str, *, node: str = NODE) -> str:
    """'identity' or 'linear' for a model's latent format; ClassifierError when neither can serve it. Pixel space:
    3-channel latents whose preview factors are absent or the identity (ComfyUI's ChromaRadiance, the demo
    model)."""
    factors = latent_format.latent_rgb_factors
    pixel = (getattr(latent_format, "latent_channels", None) == 3 and latent_format.latent_rgb_factors_bias is None
             and (factors is None or torch.equal(torch.tensor(factors, dtype=torch.float32), torch.eye(3))))
    if decoder not in DECODERS:
        raise ClassifierError(f"{node}: decoder {decoder!r} is not one of {DECODERS}; 'auto' picks for the model")
    if decoder == "auto":
        decoder = "identity" if pixel else "linear"
    if decoder == "identity" and not pixel:
        raise ClassifierError(f"{node}: decoder 'identity' needs a pixel-space model (3-channel latents); this "
                              f"model's latents have {latent_format.latent_channels} channels: use 'linear' or "
                              "'auto'")
    if decoder == "linear" and latent_format.latent_rgb_factors is None:
        raise ClassifierError(f"{node}: decoder 'linear' needs the model family's latent_rgb_factors, which "
                              f"{type(latent_format).__name__} does not have; use 'auto'")
    return decoder


def decode(z: torch.Tensor, latent_format, decoder: str) -> torch.Tensor:
    """Differentiable RGB image in (about) [0, 1] of sampler-space latents z [B, C, H, W]."""
    if decoder == "identity":
        return (z + 1) / 2
    factors = torch.tensor(latent_format.latent_rgb_factors, device=z.device, dtype=z.dtype)  # [C, 3]
    rgb = torch.einsum("bchw,cr->brhw", z, factors)
    bias = latent_format.latent_rgb_factors_bias
    if bias is not None:
        rgb = rgb + torch.tensor(bias, device=z.device, dtype=z.dtype).view(1, 3, 1, 1)
    return (rgb + 1) / 2


def patch_classifier_guidance(model, classifier, target: str, *, scale: float = 1.0, t1: float = 1.0,
                              marginal_discount: float = 0.5, softplus_beta: float = 3.0, gamma: float = 0.3,
                              schedule: str = "sine", decoder: str = "auto", start_percent: float = 0.0,
                              end_percent: float = 1.0):
    """A clone of `model` with EluCD guidance towards `target` (labels of `classifier`, one per batch image)."""
    check_settings(scale=scale, t1=t1, marginal_discount=marginal_discount, softplus_beta=softplus_beta,
                   gamma=gamma, schedule=schedule, decoder=decoder, start_percent=start_percent,
                   end_percent=end_percent)
    classifier.target_indices(target, 1, node=NODE)          # fail at the node, not mid-run
    latent_format = model.get_model_object("latent_format")
    chosen = pick_decoder(latent_format, decoder)
    coords = coords_for(model.get_model_object("model_sampling"), node=NODE)
    net = classifier.smoothed(softplus_beta)
    t2 = t1 * marginal_discount
    m = model.clone()
    install_nfe_counter(m)

    def classify(z):
        return classifier.logits(decode(z, latent_format, chosen), node=NODE, module=net)

    def post_cfg(args):
        denoised = args["denoised"]
        if scale == 0:
            return denoised
        if denoised.ndim != 4:
            raise ClassifierError(f"{NODE}: latents of shape {list(denoised.shape)} are not supported (image "
                                  "classifiers read 4-D image latents [B, C, H, W]; video is not supported)")
        ms = args["model"].model_sampling
        sigma = args["sigma"]
        top = float(sigma.max())
        if not in_window(ms, top, start_percent, end_percent):
            return denoised
        targets = classifier.target_indices(target, denoised.shape[0], node=NODE)
        grad, _j = objective_gradient(classify, denoised, targets.to(denoised.device), t1, t2)
        kappa = 1.0
        model_options = args.get("model_options")
        sigmas = (model_options or {}).get("transformer_options", {}).get("sample_sigmas")
        step = step_index(model_options, sigma)
        if step is not None and len(sigmas) > 1:
            kappa = schedule_factor(step, [float(s) for s in sigmas], coords, gamma, schedule)
        coef = score_coefficient(sigma.to(denoised.device), coords).view(-1, 1, 1, 1)
        if coef.shape[0] != denoised.shape[0]:
            coef = coef[:1].expand(denoised.shape[0], 1, 1, 1)
        return denoised + (scale * kappa * coef * grad.float()).to(denoised.dtype)

    m.set_model_sampler_post_cfg_function(post_cfg)
    return m
