"""Tiny random-weight models of real architectures (SD1.5-like UNet eps/v, SD3 MMDiT, Flux) for smoke tests.

They run through exactly the host's code paths (supported_models config, BaseModel, ModelPatcher, conds) at a
size a CPU samples in milliseconds. All use a 3-channel identity latent format, so core EmptyLatentImage,
the "pixel_space" VAE and VAEDecode work with them unchanged. Weights are seeded, so a graph is reproducible.
"""
from __future__ import annotations

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.text_encoders.flux
import comfy.text_encoders.sd3_clip

ARCHS = ("sd15_eps", "sd15_v", "sd3", "flux")
CONTEXT_DIM = {"sd15_eps": 64, "sd15_v": 64, "sd3": 32, "flux": 32}
CHANNELS = 3

_SD15 = dict(image_size=32, in_channels=CHANNELS, out_channels=CHANNELS, model_channels=32, num_res_blocks=[1, 1],
             channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
             transformer_depth_middle=1, context_dim=64, use_linear_in_transformer=False, adm_in_channels=None,
             use_spatial_transformer=True, legacy=False, use_checkpoint=False, use_temporal_resblock=False,
             use_temporal_attention=False)
_FLUX = dict(image_model="flux", in_channels=CHANNELS, out_channels=CHANNELS, vec_in_dim=32, context_in_dim=32,
             hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12],
             theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
_SD3 = dict(in_channels=CHANNELS, out_channels=CHANNELS, patch_size=2, depth=2, adm_in_channels=32,
            context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
            pos_embed_max_size=16, num_patches=256, pos_embed_scaling_factor=None, input_size=None,
            x_block_self_attn_layers=[])


def _init_weights(module: torch.nn.Module, seed: int) -> None:
    """comfy ops skip initialisation: fill every parameter deterministically.

    Matrices and kernels: normal with std 1/sqrt(fan_in), so activations stay O(1) and the conditioning has a
    real effect; normalisation layers (found by class, whatever their parameter names): weight 1, bias 0;
    every other vector: 0. Floating buffers left uninitialised by the host (SD3's `pos_embed` is
    `torch.empty`) get a seeded normal(0, 0.02).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            is_norm = "Norm" in type(mod).__name__
            for name, p in mod.named_parameters(recurse=False):
                if is_norm:
                    p.fill_(0.0 if name == "bias" else 1.0)
                elif p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * max(1, p[0].numel()) ** -0.5)
                else:
                    p.zero_()
        for _name, b in module.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02)


def build_model(arch: str, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around a tiny random-weight model of `arch` (one of ARCHS)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    with torch.inference_mode(False):
        if arch.startswith("sd15"):
            config = comfy.supported_models.SD15(dict(_SD15))
            mtype = comfy.model_base.ModelType.V_PREDICTION if arch == "sd15_v" else comfy.model_base.ModelType.EPS
            model = comfy.model_base.BaseModel(config, model_type=mtype)
        elif arch == "flux":
            model = comfy.supported_models.Flux(dict(_FLUX)).get_model({})
        else:
            model = comfy.supported_models.SD3(dict(_SD3)).get_model({})
        _init_weights(model.diffusion_model, seed)
    model.latent_format = comfy.latent_formats.ChromaRadiance()
    model.model_config.latent_format = model.latent_format
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def build_conditioning(arch: str, seed: int, *, tokens: int = 4, batch: int = 1) -> list:
    """Conditioning in the family's format: [[context (B, T, D), {pooled_output, guidance…}]]."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, CONTEXT_DIM[arch], generator=gen)
    extra = {}
    if arch in ("sd3", "flux"):
        extra["pooled_output"] = torch.randn(batch, 32, generator=gen)
    if arch == "flux":
        extra["guidance"] = 3.5
    return [[context, extra]]


# ------------------------------------------------------------------------- models with their own text encoders
# The host's own text-encoder classes (SDXLClipModel, SD3ClipModel, FluxClipModel) shrunk through their
# `<name>_model_config` options, with the real tokenizers, paired with a tiny diffusion model whose text inputs
# have the widths those encoders produce. SD3's encoder pads CLIP states to 4096 and concatenates them with T5
# states along the tokens, so its T5 is 4096 wide (one small layer; the embedding table is most of its size).

TEXT_FAMILIES = ("sdxl", "sd3", "flux")
_CLIP_L = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
           "projection_dim": 32}
_CLIP_G = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
           "projection_dim": 32}
_T5 = {"d_ff": 64, "d_kv": 8, "num_heads": 2, "num_layers": 1}
_SDXL = dict(_SD15, model_channels=64, context_dim=64, use_linear_in_transformer=True, adm_in_channels=32 + 6 * 256,
             num_classes="sequential")


def _text_target(family: str):
    if family == "sdxl":
        return comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    if family == "sd3":
        return comfy.supported_models_base.ClipTarget(comfy.text_encoders.sd3_clip.SD3Tokenizer,
                                                      comfy.text_encoders.sd3_clip.sd3_clip())
    return comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer,
                                                  comfy.text_encoders.flux.flux_clip())


def build_text_model(family: str, seed: int = 0) -> tuple[comfy.model_patcher.ModelPatcher, comfy.sd.CLIP]:
    """(ModelPatcher, CLIP) of a tiny random-weight model of `family` (one of TEXT_FAMILIES) and its text encoder,
    both float32 on the CPU; the CLIP output feeds the model as in the real family."""
    if family not in TEXT_FAMILIES:
        raise ValueError(f"unknown tiny text family {family!r}; choose one of {', '.join(TEXT_FAMILIES)}")
    t5 = dict(_T5, d_model=4096 if family == "sd3" else 32)
    cpu = torch.device("cpu")
    options = {"dtype": torch.float32, "load_device": cpu, "offload_device": cpu, "initial_device": cpu,
               "clip_l_model_config": dict(_CLIP_L), "clip_g_model_config": dict(_CLIP_G), "t5xxl_model_config": t5}
    with torch.inference_mode(False):
        clip = comfy.sd.CLIP(_text_target(family), model_options=options)
        _init_weights(clip.cond_stage_model, seed + 1)
        if family == "sdxl":
            model = comfy.supported_models.SDXL(dict(_SDXL)).get_model({})
        elif family == "sd3":
            config = dict(_SD3, adm_in_channels=_CLIP_L["hidden_size"] + _CLIP_G["projection_dim"])
            config["context_embedder_config"] = {"target": "torch.nn.Linear",
                                                 "params": {"in_features": 4096, "out_features": 128}}
            model = comfy.supported_models.SD3(config).get_model({})
        else:
            model = comfy.supported_models.Flux(dict(_FLUX, vec_in_dim=_CLIP_L["hidden_size"],
                                                     context_in_dim=t5["d_model"])).get_model({})
        _init_weights(model.diffusion_model, seed)
    model.latent_format = comfy.latent_formats.ChromaRadiance()
    model.model_config.latent_format = model.latent_format
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher, clip


# ------------------------------------------------------------------------------------------------ tiny VAEs
# Built through comfy.sd.VAE exactly as VAELoader builds them: a TAESD (state dict keys taesd_decoder.* /
# taesd_encoder.*, the host picks comfy.taesd.taesd.TAESD) and a small AutoencoderKL (the host's class, through
# VAE's `config` argument). Random weights; `latent_channels` must match the model they decode for.

def build_taesd_vae(latent_channels: int = 4, seed: int = 0) -> comfy.sd.VAE:
    """A random-weight TAESD VAE object (what VAELoader returns for 'taesd')."""
    import comfy.taesd.taesd
    with torch.inference_mode(False):
        torch.manual_seed(seed)
        net = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
        _init_weights(net, seed)                 # the host's ops leave weights uninitialised
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        state["vae_scale"] = torch.tensor(1.5)
        state["vae_shift"] = torch.tensor(0.1)
    return comfy.sd.VAE(sd=state)


def build_kl_vae(latent_channels: int = 4, seed: int = 0) -> comfy.sd.VAE:
    """A small random-weight AutoencoderKL VAE object (2 resolution levels: 2× up/down)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ddconfig = {"double_z": True, "z_channels": latent_channels, "resolution": 32, "in_channels": 3, "out_ch": 3,
                "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    config = {"params": {"ddconfig": ddconfig, "embed_dim": latent_channels}}
    with torch.inference_mode(False):
        torch.manual_seed(seed)
        net = AutoencoderKL(**config["params"])
        _init_weights(net, seed)
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    vae = comfy.sd.VAE(sd=state, config=config)
    vae.latent_channels = latent_channels
    vae.downscale_ratio = vae.upscale_ratio = 2
    return vae


# ------------------------------------------------------------------------------------------ tiny CLIP vision
def build_clip_vision(projection_dim: int | None = 32, seed: int = 0, *, image_size: int = 32, patch_size: int = 8):
    """A tiny random-weight comfy.clip_vision.ClipVisionModel (CLIP ViT layout) with `projection_dim` embeddings,
    built in the caller's inference mode (as CLIPVisionLoader builds it inside the executor)."""
    import json
    import os
    import tempfile

    import comfy.clip_vision
    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32,
              "image_size": image_size, "initializer_factor": 1.0, "initializer_range": 0.02,
              "intermediate_size": 64, "layer_norm_eps": 1e-5, "model_type": "clip_vision_model",
              "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2, "patch_size": patch_size}
    if projection_dim is not None:                # None: no projection, as the host's SigLIP encoders
        config["projection_dim"] = projection_dim
    fd, path = tempfile.mkstemp(suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        cv = comfy.clip_vision.ClipVisionModel(path)     # in the caller's mode, as CLIPVisionLoader
    finally:
        os.unlink(path)
    _init_weights(cv.model, seed)
    return cv
