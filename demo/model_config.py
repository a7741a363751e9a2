"""Configuration of the demo text-to-image model and of its training run (pure data, no ComfyUI import).

`guiders/demo_model.py` builds the model from such a config (ComfyUI's SD1-style UNetModel + SDClipModel) and
stores it in the weights file's metadata, so a file always loads with the config it was trained with; this module
is only the starting point of `demo/train.py`.
"""
from __future__ import annotations

import copy

TEXT_WIDTH = 96


def unet_config(*, model_channels: int, channel_mult: list[int], num_res_blocks: int, attention: list[int],
                context_dim: int, head_channels: int = 32, image_size: int = 32) -> dict:
    """An SD1-style UNetModel config (the keys ComfyUI's model detection produces for SD1.5), pixel space.

    `attention[i]` is the transformer depth at level i (0 = full resolution); SD1.5 itself is
    model_channels 320, channel_mult [1, 2, 4, 4], num_res_blocks 2, attention [1, 1, 1, 0], 8 heads."""
    if len(attention) != len(channel_mult):
        raise ValueError("one attention depth per level")
    return dict(
        image_size=image_size, in_channels=3, out_channels=3, model_channels=model_channels,
        num_res_blocks=[num_res_blocks] * len(channel_mult), channel_mult=list(channel_mult),
        transformer_depth=[a for a in attention for _ in range(num_res_blocks)],
        transformer_depth_output=[a for a in attention for _ in range(num_res_blocks + 1)],
        transformer_depth_middle=max(attention), context_dim=context_dim, use_linear_in_transformer=False,
        adm_in_channels=None, use_spatial_transformer=True, legacy=False, use_checkpoint=False,
        use_temporal_resblock=False, use_temporal_attention=False, num_heads=-1, num_head_channels=head_channels)


# CLIP-style text transformer (the keys comfy.clip_model.CLIPTextModel reads; vocabulary of the CLIP BPE tokenizer)
TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
    "hidden_size": TEXT_WIDTH, "intermediate_size": 4 * TEXT_WIDTH, "num_attention_heads": 3,
    "num_hidden_layers": 3, "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": TEXT_WIDTH,
    "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
}

# SD1.5 checkpoint behaviour: last layer (CLIPSetLastLayer -1/-2/-3 picks a hidden layer), unprojected pooled output
CLIP_CONFIG = {"layer": "last", "layer_idx": None, "layer_norm_hidden_state": True,
               "return_projected_pooled": False, "max_length": 77}

MODEL_CONFIG = {
    "unet": unet_config(model_channels=64, channel_mult=[1, 1, 1], num_res_blocks=2, attention=[0, 1, 1],
                        context_dim=TEXT_WIDTH),
    # The architecture of the shipped checkpoint. Why 64 channels: ComfyUI's UNet normalises with GroupNorm(32
    # groups), so at model_channels 32 (the first shipped file) the output block's norm is per channel and removes
    # every feature's spatial mean; the network could not copy the input noise's per-channel mean into its eps
    # prediction, and at high sigma its denoised image kept the noise's colour cast (0.115 vs the noise's 0.121 at
    # sigma 14.6) — coloured, noisy backgrounds. At 64 channels (2 per group) the cast is gone (0.0007 after 6000
    # CPU steps with --lowpass-weight 0.3). channel_mult [1, 1, 1] keeps the sampling cost of the old
    # 32-channel [1, 2, 4] UNet (3.2 M parameters). A 64-channel CPU run that froze the text encoder at step 1500
    # of 6000 ignored its prompts (5.7 % attribute accuracy): the shipped run trains it for 40 % of its steps.
    # The noise schedule is SD1's (no "sampling" section: sigma_max 14.6). A run with
    # "sampling": {"linear_start": 0.00085, "linear_end": 0.025} (sigma_max 167) and channel_mult [1, 2, 3], 6000
    # steps, did not work with EPS prediction: the eps prediction's small amplitude errors are multiplied by sigma
    # along the sampler's path and samples end at |x| up to 19 (80 % of pixels outside [-1, 1]).
    "text": TEXT_CONFIG,
    "clip": CLIP_CONFIG,
    "model_type": "eps",
    "latent_format": "pixel_rgb",
}

# the data the model learns: demo/world.py scenes
WORLD = {"seed": 0, "size": 32, "kind": "mixed", "split": "train"}

# training defaults of demo/train.py = the recipe of the shipped files (their metadata records every value used;
# they were trained with --device cuda --precision bf16 --threads 8, on one GPU: 1800 steps of 1024 images in 7.4
# minutes on an NVIDIA H200)
TRAIN = {
    "seed": 0, "steps": 1800, "batch": 1024, "lr": 1e-3, "warmup": 200, "min_lr_ratio": 0.1, "weight_decay": 0.01,
    "grad_clip": 1.0, "ema_decay": 0.999, "caption_dropout": 0.1,
    "lowpass_weight": 0.3, "lowpass_pool": 8, "weak_at": 700, "log_every": 250,
    "probe_every": 1000, "probe_batch": 32,
}


def model_config() -> dict:
    """A fresh copy of the default model config."""
    return copy.deepcopy(MODEL_CONFIG)
