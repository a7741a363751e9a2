"""EluCD classifier guidance as a MODEL patch: one post-CFG hook, 0 extra NFE.

After the CFG combine (or whatever combine precedes it) the hook decodes the guided prediction D to an RGB image,
takes the gradient G of EluCD's objective through the (Softplus-smoothed, private copy of the) classifier — never
through the diffusion model — and returns D + scale·κ·(s_σ²/a_σ)·G (kernels/classifier_guidance.py). Works at any
cfg (no uncond needed), on EPS, V-prediction and flow models; per-image targets in a batch.

Decoders (what the classifier looks at):
* identity — pixel-space models (3-channel latents without RGB factors, e.g. the demo model): image = (z + 1)/2;
* linear — the model family's `latent_rgb_factors` (+ bias) from its latent format, the map ComfyUI's latent
  previews use, at latent resolution, then resized to the classifier (DESIGN: colours and layout only);
* vae — a connected VAE: ComfyUI's full image VAE of the model family, or a tiny TAESD decoder (VAELoader's
  taesd / taesdxl / taesd3 / taef1 entries), run differentiably on latent_format.process_out(z). The decoder is a
  private float32 copy made outside inference mode (ComfyUI's own VAE module holds inference tensors, which
  autograd cannot save), cached per VAE object; VAE weight patches are not applied to it.
"""
from __future__ import annotations

import copy
import logging
import weakref

import torch

from ..kernels.classifier_guidance import SCHEDULES, objective_gradient, schedule_factor, score_coefficient
from .classifier import ClassifierError
from .family import coords_for, in_window
from .nfe import install_nfe_counter
from .run_state import step_index

NODE = "GL_ClassifierGuidance"
DECODERS = ("auto", "identity", "linear", "vae")
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


def pick_decoder(latent_format, decoder: str, *, node: str = NODE, vae=None) -> str:
    """'identity', 'linear' or 'vae' for a model's latent format; ClassifierError when the choice cannot serve it.
    Pixel space: 3-channel latents whose preview factors are absent or the identity (ComfyUI's ChromaRadiance, the
    demo model). 'auto': identity in pixel space, else the VAE when one is connected, else linear."""
    factors = latent_format.latent_rgb_factors
    pixel = (getattr(latent_format, "latent_channels", None) == 3 and latent_format.latent_rgb_factors_bias is None
             and (factors is None or torch.equal(torch.tensor(factors, dtype=torch.float32), torch.eye(3))))
    if decoder not in DECODERS:
        raise ClassifierError(f"{node}: decoder {decoder!r} is not one of {DECODERS}; 'auto' picks for the model")
    if decoder == "auto":
        decoder = "identity" if pixel else ("vae" if vae is not None else "linear")
    if decoder == "identity" and not pixel:
        raise ClassifierError(f"{node}: decoder 'identity' needs a pixel-space model (3-channel latents); this "
                              f"model's latents have {latent_format.latent_channels} channels: use 'linear' or "
                              "'auto'")
    if decoder == "linear" and latent_format.latent_rgb_factors is None:
        raise ClassifierError(f"{node}: decoder 'linear' needs the model family's latent_rgb_factors, which "
                              f"{type(latent_format).__name__} does not have; connect a VAE and use 'vae' or 'auto'")
    if decoder == "vae":
        check_vae(vae, latent_format, node=node)
    return decoder


def check_vae(vae, latent_format, *, node: str = NODE) -> None:
    """ClassifierError unless `vae` is an image VAE whose latents are this model's."""
    if vae is None:
        raise ClassifierError(f"{node}: decoder 'vae' needs a VAE: connect the checkpoint's VAE, or a TAESD from "
                              "VAELoader (taesd, taesdxl, taesd3, taef1) for a cheaper decode; or use 'linear'")
    if getattr(vae, "first_stage_model", None) is None:
        raise ClassifierError(f"{node}: the connected VAE has no weights (its file was not recognised); load a "
                              "VAE with VAELoader")
    if getattr(vae, "latent_dim", 2) != 2 or getattr(vae, "output_channels", 3) != 3:
        raise ClassifierError(f"{node}: the connected VAE is not an image VAE (latent_dim "
                              f"{getattr(vae, 'latent_dim', '?')}, {getattr(vae, 'output_channels', '?')} output "
                              "channels); classifier guidance reads RGB images: use an image VAE or 'linear'")
    channels = getattr(latent_format, "latent_channels", None)
    if channels is not None and vae.latent_channels != channels:
        raise ClassifierError(f"{node}: the connected VAE decodes {vae.latent_channels}-channel latents but this "
                              f"model's latents have {channels} channels; connect the VAE of the model's family "
                              "(or its TAESD)")


_PRIVATE_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def private_vae_decoder(vae) -> torch.nn.Module:
    """A float32, autograd-ready copy of `vae`'s decoder module (cached per VAE object)."""
    module = _PRIVATE_DECODERS.get(vae)
    if module is None:
        with torch.inference_mode(False):
            module = copy.deepcopy(vae.first_stage_model).float().eval().requires_grad_(False)  # normal tensors
            for name in ("encoder", "taesd_encoder"):       # only the decoder is needed
                if isinstance(getattr(module, name, None), torch.nn.Module):
                    setattr(module, name, None)
        _PRIVATE_DECODERS[vae] = module
    return module


def decode(z: torch.Tensor, latent_format, decoder: str, vae=None, *, node: str = NODE) -> torch.Tensor:
    """Differentiable RGB image in (about) [0, 1] of sampler-space latents z [B, C, H, W] (not clamped: the
    evaluators see out-of-range pixels). `vae`: the VAE object, for decoder 'vae'."""
    if decoder == "identity":
        return (z + 1) / 2
    if decoder == "vae":
        module = private_vae_decoder(vae).to(z.device)
        image = module.decode(latent_format.process_out(z.float()))
        if image.ndim != 4 or image.shape[1] != 3:
            raise ClassifierError(f"{node}: the VAE decoded an image of shape {list(image.shape)}, not "
                                  "[B, 3, H, W]; use an image VAE")
        return (image + 1) / 2
    factors = torch.tensor(latent_format.latent_rgb_factors, device=z.device, dtype=z.dtype)  # [C, 3]
    rgb = torch.einsum("bchw,cr->brhw", z, factors)
    bias = latent_format.latent_rgb_factors_bias
    if bias is not None:
        rgb = rgb + torch.tensor(bias, device=z.device, dtype=z.dtype).view(1, 3, 1, 1)
    return (rgb + 1) / 2


def patch_classifier_guidance(model, classifier, target: str, *, scale: float = 1.0, t1: float = 1.0,
                              marginal_discount: float = 0.5, softplus_beta: float = 3.0, gamma: float = 0.3,
                              schedule: str = "sine", decoder: str = "auto", start_percent: float = 0.0,
                              end_percent: float = 1.0, vae=None):
    """A clone of `model` with EluCD guidance towards `target` (labels of `classifier`, one per batch image)."""
    check_settings(scale=scale, t1=t1, marginal_discount=marginal_discount, softplus_beta=softplus_beta,
                   gamma=gamma, schedule=schedule, decoder=decoder, start_percent=start_percent,
                   end_percent=end_percent)
    classifier.target_indices(target, 1, node=NODE)          # fail at the node, not mid-run
    latent_format = model.get_model_object("latent_format")
    chosen = pick_decoder(latent_format, decoder, vae=vae)
    coords = coords_for(model.get_model_object("model_sampling"), node=NODE)
    net = classifier.smoothed(softplus_beta)
    t2 = t1 * marginal_discount
    m = model.clone()
    install_nfe_counter(m)

    def classify(z):
        return classifier.logits(decode(z, latent_format, chosen, vae), node=NODE, module=net)

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
