"""The pack's demo text-to-image model, built only from ComfyUI's own classes.

* UNet: ComfyUI's SD1-style `UNetModel` through `comfy.supported_models.SD15` + `comfy.model_base.BaseModel`
  (EPS prediction, discrete SD1 schedule, cross-attention keys `attn2.to_k/to_v` as in SD1.5), working in pixel
  space: 3 input/output channels and a 3-channel identity latent format (`latent_formats.ChromaRadiance`).
* Text encoder: ComfyUI's `sd1_clip.SDClipModel` (inside `SD1ClipModel`, attribute `clip_l`) from a small config,
  with the CLIP BPE tokenizer that ships inside ComfyUI (`comfy/sd1_tokenizer`), wrapped as a real `comfy.sd.CLIP`,
  so core CLIPTextEncode / CLIPSetLastLayer work on it.
* VAE: the core pixel-space VAE (`comfy.sd.VAE(sd={"pixel_space_vae": ...})`, as VAELoader "pixel_space"):
  image [0, 1] <-> latent 2·img − 1.

File format: one safetensors file, float16 weights, keys `model.diffusion_model.*` (UNet) and
`cond_stage_model.*` (the SDClipModel state dict, as in an SD1.5 checkpoint, `transformer.text_model.*`), and string
metadata: `format`, `config` (JSON: unet / text / clip settings), the tokenizer's vocabulary hash, and whatever the
trainer adds (`training`, `world`, `train_seed`, `train_steps`, `git_commit`, `world_seed`, `world_size`, ...).
Loading casts the weights back to float32.

The token embedding (49408 CLIP vocabulary rows, most of a small text encoder) may be stored sparsely: only the rows
of tokens the model saw in training (key `...token_embedding.weight.ids`, int64, and `...token_embedding.weight.rows`,
float16; metadata `token_embedding` = "sparse"). Loading rebuilds the full matrix with zero rows for the other tokens
(they were never trained, so their initial random values carry no information). The optional config section
`sampling` holds the discrete noise schedule (`linear_start`, `linear_end`, `beta_schedule`, `timesteps`, as
ComfyUI's `sampling_settings`); without it the model has SD1.5's schedule.

Weights are looked up in the folder list `gl_demo_model` of ComfyUI's folder_paths: the pack's `demo/weights/`
plus any `gl_demo_model:` folder of extra_model_paths.yaml.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from pathlib import Path

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base

FORMAT = "guidance-lab-demo-model/1"
UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model."
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "demo" / "weights"
FOLDER_NAME = "gl_demo_model"  # folder_paths key (extra_model_paths.yaml can add folders under this name)
# checkpoint id -> file name; the "weak" file is an early checkpoint of the same training run (autoguidance)
CHECKPOINTS = {"demo_model": "demo_model.safetensors", "demo_model_weak": "demo_model_weak.safetensors"}
DEFAULT_PATH = WEIGHTS_DIR / CHECKPOINTS["demo_model"]
DEFAULT_WEAK_PATH = WEIGHTS_DIR / CHECKPOINTS["demo_model_weak"]
TRAIN_HINT = ("Produce them with the pack's training script: `python demo/train.py` (writes "
              "demo/weights/demo_model.safetensors and demo_model_weak.safetensors; 6 minutes on a GPU, hours on 2 "
              "CPU cores, see `python demo/train.py --help`), or copy trained files into demo/weights/.")

# keys of the "clip" section of a config and their defaults (SD1.5 checkpoint behaviour)
CLIP_DEFAULTS = {"layer": "last", "layer_idx": None, "layer_norm_hidden_state": True,
                 "return_projected_pooled": False, "max_length": 77}
SAMPLING_KEYS = ("beta_schedule", "linear_start", "linear_end", "timesteps")
TOKEN_EMBEDDING = TEXT_PREFIX + "transformer.text_model.embeddings.token_embedding.weight"
_TEXT_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "hidden_act",
              "max_position_embeddings", "eos_token_id")


class DemoModelError(ValueError):
    """A demo-model file is missing, is not a demo-model safetensors file, or does not match its config."""


# ----------------------------------------------------------------------------------------------------- config

def normalize_config(config: dict) -> dict:
    """A complete, JSON-serialisable copy of `config` ({"unet": ..., "text": ..., "clip": ...}) with the fixed
    parts of the design checked: pixel space (3 channels), EPS, context width = text width."""
    if not isinstance(config, dict) or "unet" not in config or "text" not in config:
        raise DemoModelError("a demo-model config needs the sections 'unet' and 'text'")
    cfg = {"unet": dict(config["unet"]), "text": dict(config["text"]),
           "clip": {**CLIP_DEFAULTS, **dict(config.get("clip") or {})},
           "sampling": dict(config.get("sampling") or {}),
           "model_type": config.get("model_type", "eps"), "latent_format": config.get("latent_format", "pixel_rgb")}
    unet, text = cfg["unet"], cfg["text"]
    missing = [k for k in _TEXT_KEYS if k not in text]
    if missing:
        raise DemoModelError(f"text config lacks {missing}")
    if unet.get("in_channels") != 3 or unet.get("out_channels") != 3:
        raise DemoModelError("the demo model works in pixel space: unet in_channels and out_channels must be 3")
    if unet.get("context_dim") != text["hidden_size"]:
        raise DemoModelError(f"unet context_dim ({unet.get('context_dim')}) must equal the text encoder width "
                             f"({text['hidden_size']})")
    unknown = sorted(set(cfg["sampling"]) - set(SAMPLING_KEYS))
    if unknown:
        raise DemoModelError(f"unknown keys {unknown} in the 'sampling' section (allowed: {list(SAMPLING_KEYS)})")
    if cfg["model_type"] != "eps":
        raise DemoModelError(f"model_type must be 'eps', got {cfg['model_type']!r}")
    if cfg["latent_format"] != "pixel_rgb":
        raise DemoModelError(f"latent_format must be 'pixel_rgb', got {cfg['latent_format']!r}")
    return json.loads(json.dumps(cfg))  # a deep copy, and proof that it serialises


# ------------------------------------------------------------------------------------------------- construction

def _make_unet(cfg: dict, device=None) -> comfy.model_base.BaseModel:
    model_config = comfy.supported_models.SD15(dict(cfg["unet"]))
    model_config.unet_config.update(cfg["unet"])  # SD15's unet_extra_config (8 heads) must not override ours
    model_config.latent_format = comfy.latent_formats.ChromaRadiance()  # 3-channel identity
    model_config.sampling_settings = dict(cfg.get("sampling") or {})  # read by ModelSamplingDiscrete
    return comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.EPS, device=device)


def _clip_target(cfg: dict) -> comfy.supported_models_base.ClipTarget:
    text, clip = cfg["text"], cfg["clip"]
    width = text["hidden_size"]

    def sd_tokenizer(embedding_directory=None, tokenizer_data=None):
        return comfy.sd1_clip.SDTokenizer(max_length=clip["max_length"], embedding_size=width, embedding_key="clip_l",
                                          embedding_directory=embedding_directory, tokenizer_data=tokenizer_data or {})

    def tokenizer(embedding_directory=None, tokenizer_data=None):
        return comfy.sd1_clip.SD1Tokenizer(embedding_directory=embedding_directory,
                                           tokenizer_data=tokenizer_data or {}, tokenizer=sd_tokenizer)

    def sd_clip_model(device="cpu", dtype=None, model_options=None):
        return comfy.sd1_clip.SDClipModel(
            device=device, dtype=dtype, model_options=model_options or {}, textmodel_json_config=copy.deepcopy(text),
            max_length=clip["max_length"], layer=clip["layer"], layer_idx=clip["layer_idx"],
            layer_norm_hidden_state=clip["layer_norm_hidden_state"],
            return_projected_pooled=clip["return_projected_pooled"])

    def clip_model(device="cpu", dtype=None, model_options=None):
        return comfy.sd1_clip.SD1ClipModel(device=device, dtype=dtype, model_options=model_options or {},
                                           clip_model=sd_clip_model)

    return comfy.supported_models_base.ClipTarget(tokenizer, clip_model)


def _text_param_count(text: dict) -> int:
    w, f, n = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    return (text.get("vocab_size", 49408) + text["max_position_embeddings"]) * w + n * (4 * w * w + 2 * w * f) + w * w


def _make_clip(cfg: dict, embedding_directory=None, device=None) -> comfy.sd.CLIP:
    """A float32 CLIP; on `device` only (load and offload) when given, else where ComfyUI puts text encoders."""
    options = {"dtype": torch.float32}
    if device is not None:
        options.update(load_device=device, offload_device=device, initial_device=device)
    return comfy.sd.CLIP(_clip_target(cfg), embedding_directory=embedding_directory,
                         parameters=_text_param_count(cfg["text"]), model_options=options)


def text_encoder(clip: comfy.sd.CLIP) -> comfy.sd1_clip.SDClipModel:
    """The SDClipModel inside a demo CLIP (its `forward(tokens)` gives (cond, pooled) with gradients)."""
    return clip.cond_stage_model.clip_l


def _out_of_place_clip_layer(layer):
    def forward(x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))
    return forward


def _batched_process_tokens(encoder: comfy.sd1_clip.SDClipModel):
    """`SDClipModel.process_tokens` for a batch of plain token-id lists of one length, in one embedding call: the
    host's version loops over every token in Python and embeds each caption on its own (a host-to-device copy, an
    embedding kernel and its backward per caption), which set the pace of GPU training. Same embeddings, attention
    mask (1 up to and including the first end token) and token counts; anything else (embeddings, weights, ragged
    lists) goes to the host's version."""
    host_version = encoder.process_tokens
    end = encoder.special_tokens.get("end")
    stop = end if end is not None else encoder.special_tokens.get("pad", -1)

    def process_tokens(tokens, device):
        plain = (len(tokens) > 0 and len({len(t) for t in tokens}) == 1
                 and all(type(y) is int for t in tokens for y in t))
        if not plain:
            return host_version(tokens, device)
        ids = torch.tensor(tokens, dtype=torch.long)
        hit = ids == stop
        seen = hit.long().cumsum(1)
        mask = (seen == 0) | ((seen == 1) & hit) if end is not None else seen == 0
        embeds = encoder.transformer.get_input_embeddings()(ids.to(device), out_dtype=torch.float32)
        return embeds, mask.long().to(device), mask.sum(1).tolist(), []
    return process_tokens


@contextlib.contextmanager
def trainable_text_encoder(clip: comfy.sd.CLIP):
    """The SDClipModel of `clip`, made differentiable for training: parameters require grad, and each
    `comfy.clip_model.CLIPLayer` runs an out-of-place copy of its forward (ComfyUI's `x += ...` overwrites a tensor
    that LayerNorm saved for backward, so backward fails); token lists are embedded in one batched call
    (`_batched_process_tokens`). Same values; restored on exit (instance attributes, as
    comfy_extras/nodes_train.py does for gradient checkpointing)."""
    import comfy.clip_model
    encoder = text_encoder(clip)
    layers = [m for m in encoder.modules() if isinstance(m, comfy.clip_model.CLIPLayer)]
    try:
        for layer in layers:
            layer.forward = _out_of_place_clip_layer(layer)
        encoder.process_tokens = _batched_process_tokens(encoder)
        encoder.requires_grad_(True)
        yield encoder
    finally:
        encoder.requires_grad_(False)
        encoder.__dict__.pop("process_tokens", None)
        for layer in layers:
            layer.__dict__.pop("forward", None)


def predict_noise(model: comfy.model_base.BaseModel, x: torch.Tensor, sigma: torch.Tensor,
                  context: torch.Tensor) -> torch.Tensor:
    """The network's EPS prediction for x = x0 + σ·n (σ per sample), with the input scaling and timestep that
    BaseModel._apply_model uses (so training matches sampling), differentiable, float32. `apply_model` returns the
    denoised x − σ·eps of the same computation."""
    ms = model.model_sampling
    xc = ms.calculate_input(sigma, x)
    return model.diffusion_model(xc, ms.timestep(sigma).float(), context=context).float()


def pixel_space_vae() -> comfy.sd.VAE:
    """The core identity pixel-space VAE (what VAELoader 'pixel_space' builds)."""
    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})


def _patcher(model) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def _torch_reset(module: torch.nn.Module) -> None:
    """Run torch's own reset_parameters of the module's torch.nn base class (comfy ops skip initialisation)."""
    for klass in type(module).__mro__:
        if klass.__module__.startswith("torch.nn.modules") and "reset_parameters" in klass.__dict__:
            klass.reset_parameters(module)
            return


def init_weights(diffusion_model: torch.nn.Module, text_model: torch.nn.Module, seed: int) -> None:
    """Fresh initialisation, deterministic in `seed` (the global RNG is left as it was).

    UNet: torch defaults per layer (Kaiming-uniform convolutions and linears, norms 1/0), then the LDM zero-init of
    each residual branch's last convolution, each transformer's proj_out and the output convolution, so the network
    starts as (almost) the identity on its skip paths. Text encoder: torch defaults, token embeddings N(0, 0.02),
    position embeddings N(0, 0.01), text_projection the identity.
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.default_generator.manual_seed(int(seed))  # CPU only: builds happen on the CPU
        for module in (diffusion_model, text_model):
            for mod in module.modules():
                _torch_reset(mod)
        for name, mod in diffusion_model.named_modules():
            if name.endswith("out_layers") or name == "out":
                torch.nn.init.zeros_(mod[-1].weight)
                torch.nn.init.zeros_(mod[-1].bias)
            elif name.endswith("proj_out"):
                torch.nn.init.zeros_(mod.weight)
                if mod.bias is not None:
                    torch.nn.init.zeros_(mod.bias)
        tm = text_model.transformer
        torch.nn.init.normal_(tm.text_model.embeddings.token_embedding.weight, std=0.02)
        torch.nn.init.normal_(tm.text_model.embeddings.position_embedding.weight, std=0.01)
        tm.text_projection.weight.copy_(torch.eye(tm.text_projection.weight.shape[0]))
    for name, value in list(diffusion_model.state_dict().items()) + list(text_model.state_dict().items()):
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise RuntimeError(f"initialisation left non-finite values in {name}")


def build_demo_model(config: dict, seed: int = 0, *, embedding_directory=None):
    """A freshly initialised demo model (training start): (ModelPatcher, CLIP, VAE), float32.

    Built and initialised on the CPU (the CLIP stays there), so the initial weights do not depend on the machine;
    a trainer moves the modules where it trains."""
    cfg = normalize_config(config)
    with torch.inference_mode(False):
        model = _make_unet(cfg, device=torch.device("cpu"))
        clip = _make_clip(cfg, embedding_directory, device=torch.device("cpu"))
        init_weights(model.diffusion_model, text_encoder(clip), seed)
    model.demo_config = cfg
    return _patcher(model), clip, pixel_space_vae()


# ----------------------------------------------------------------------------------------------- tokenizer

def tokenizer_fingerprint(clip: comfy.sd.CLIP) -> str:
    """sha256 of the CLIP tokenizer's vocabulary (token -> id), to notice a changed tokenizer."""
    vocab = clip.tokenizer.clip_l.tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=True).encode()).hexdigest()


def tokenize(clip: comfy.sd.CLIP, captions: list[str]) -> list[list[int]]:
    """Token ids as CLIPTextEncode gives them to the encoder (one 77-token chunk per caption; weights ignored)."""
    out = []
    for caption in captions:
        chunks = clip.tokenize(caption)["l"]
        if len(chunks) != 1:
            raise ValueError(f"caption longer than one CLIP chunk: {caption!r}")
        out.append([int(t) for t, _w in chunks[0]])
    return out


# ----------------------------------------------------------------------------------------------------- files

def state_dict(model_or_patcher, clip: comfy.sd.CLIP) -> dict[str, torch.Tensor]:
    """The file layout: UNet under `model.diffusion_model.`, SDClipModel under `cond_stage_model.` (float32)."""
    model = getattr(model_or_patcher, "model", model_or_patcher)
    sd = {UNET_PREFIX + k: v for k, v in model.diffusion_model.state_dict().items()}
    sd.update({TEXT_PREFIX + k: v for k, v in text_encoder(clip).state_dict().items()})
    return sd


def save_demo_file(path, tensors: dict[str, torch.Tensor], config: dict, clip: comfy.sd.CLIP,
                   metadata: dict | None = None, *, token_ids=None) -> Path:
    """Write `tensors` (a `state_dict` layout, any float dtype) as float16 safetensors with the config and the
    tokenizer fingerprint in the metadata; `metadata` values must be strings (others are JSON-encoded).

    `token_ids` (the token ids the text encoder was trained on): store only those rows of the token embedding
    (see the module docstring); loading gives the other rows zeros."""
    import safetensors.torch
    cfg = normalize_config(config)
    tensors = dict(tensors)
    sparse = token_ids is not None
    if sparse:
        ids = torch.tensor(sorted({int(t) for t in token_ids}), dtype=torch.int64)
        weight = tensors.pop(TOKEN_EMBEDDING)
        if len(ids) == 0 or ids.min() < 0 or ids.max() >= weight.shape[0]:
            raise DemoModelError(f"token ids must lie in [0, {weight.shape[0]}), got {len(ids)} ids")
        tensors[TOKEN_EMBEDDING + ".ids"] = ids
        tensors[TOKEN_EMBEDDING + ".rows"] = weight.detach().to("cpu")[ids]
    out = {}
    for k, v in tensors.items():
        v = v.detach().to("cpu")
        if v.is_floating_point():
            v = v.to(torch.float16)
            if not torch.isfinite(v).all():
                raise DemoModelError(f"{k} does not fit float16 (non-finite after the cast)")
        out[k] = v.contiguous()
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta.update(format=FORMAT, config=json.dumps(cfg, sort_keys=True), tokenizer="comfy/sd1_tokenizer",
                tokenizer_vocab_sha256=tokenizer_fingerprint(clip), token_embedding="sparse" if sparse else "dense")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file(out, str(tmp), metadata=meta)
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def save_demo_model(path, model_or_patcher, clip: comfy.sd.CLIP, metadata: dict | None = None) -> Path:
    """Save a demo model (its current weights) with the config it was built from."""
    model = getattr(model_or_patcher, "model", model_or_patcher)
    return save_demo_file(path, state_dict(model, clip), model.demo_config, clip, metadata)


def read_demo_file(path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(config, tensors as stored, metadata) of a demo-model file, with clear errors naming the file."""
    import safetensors
    path = Path(path)
    if not path.is_file():
        raise DemoModelError(f"demo-model weights not found: {path}. {TRAIN_HINT}")
    if path.suffix not in (".safetensors", ".sft"):
        raise DemoModelError(f"{path}: demo-model weights must be a .safetensors file")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise DemoModelError(f"{path} is not a readable safetensors file: {e}") from e
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise DemoModelError(f"{path} is not a Guidance Lab demo-model file: its metadata lacks format={FORMAT!r} "
                             f"and a 'config' entry (found keys {sorted(metadata)})")
    try:
        config = normalize_config(json.loads(metadata["config"]))
    except (json.JSONDecodeError, DemoModelError) as e:
        raise DemoModelError(f"{path}: invalid demo-model config in the metadata: {e}") from e
    if metadata.get("token_embedding") == "sparse":
        tensors = _densify_token_embedding(tensors, config, path)
    return config, tensors, metadata


def _densify_token_embedding(tensors: dict, config: dict, path: Path) -> dict:
    """Full token-embedding matrix from the stored rows (zeros for tokens never trained)."""
    ids, rows = tensors.pop(TOKEN_EMBEDDING + ".ids", None), tensors.pop(TOKEN_EMBEDDING + ".rows", None)
    vocab, width = config["text"].get("vocab_size", 49408), config["text"]["hidden_size"]
    if ids is None or rows is None or ids.ndim != 1 or rows.shape != (len(ids), width) or (
            len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab)):
        raise DemoModelError(f"{path}: metadata says the token embedding is stored sparsely, but the "
                             f"'{TOKEN_EMBEDDING}.ids'/'.rows' tensors are missing or inconsistent")
    dense = torch.zeros(vocab, width, dtype=rows.dtype)
    dense[ids.long()] = rows
    tensors[TOKEN_EMBEDDING] = dense
    return tensors


def _load_into(module: torch.nn.Module, tensors: dict, prefix: str, path: Path, what: str) -> None:
    sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sub))
    unexpected = sorted(set(sub) - set(expected))
    wrong = sorted(k for k in set(sub) & set(expected) if sub[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise DemoModelError(f"{path}: the {what} weights do not match the config in the file's metadata "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}; "
                             f"keys start with {prefix!r})")
    with torch.no_grad():
        for k, v in sub.items():
            expected[k].copy_(v.to(expected[k].dtype))


def load_demo_model(path=DEFAULT_PATH, *, embedding_directory=None):
    """(ModelPatcher, CLIP, VAE) from a demo-model safetensors file, config from its metadata, float32 weights.

    The loaded model carries `demo_config` and `demo_metadata` (the file's metadata) attributes."""
    path = Path(path)
    config, tensors, metadata = read_demo_file(path)
    others = [k for k in tensors if not k.startswith((UNET_PREFIX, TEXT_PREFIX))]
    if others:
        raise DemoModelError(f"{path}: unexpected tensors {others[:5]} (expected keys under {UNET_PREFIX!r} and "
                             f"{TEXT_PREFIX!r})")
    with torch.inference_mode(False):
        model = _make_unet(config)
        _load_into(model.diffusion_model, tensors, UNET_PREFIX, path, "UNet")
        clip = _make_clip(config, embedding_directory)
        _load_into(text_encoder(clip), tensors, TEXT_PREFIX, path, "text encoder")
    model.demo_config = config
    model.demo_metadata = metadata
    stored = metadata.get("tokenizer_vocab_sha256")
    if stored and stored != tokenizer_fingerprint(clip):
        import logging
        logging.warning("Guidance Lab demo model %s was trained with a different CLIP tokenizer vocabulary than "
                        "this ComfyUI ships; prompts may encode differently.", path)
    return _patcher(model), clip, pixel_space_vae()


# ------------------------------------------------------------------------------------------- file locations

def weight_folders() -> list[str]:
    """Folders searched for demo-model files: folder_paths' `gl_demo_model` list, the pack's demo/weights/ last."""
    import folder_paths
    default = str(WEIGHTS_DIR)
    if FOLDER_NAME not in folder_paths.folder_names_and_paths or default not in folder_paths.get_folder_paths(
            FOLDER_NAME):
        folder_paths.add_model_folder_path(FOLDER_NAME, default)
        folder_paths.folder_names_and_paths[FOLDER_NAME][1].add(".safetensors")
    return folder_paths.get_folder_paths(FOLDER_NAME)


def find_checkpoint(name: str) -> Path | None:
    """The file of checkpoint `name` (a key of CHECKPOINTS) in the first folder holding it, or None."""
    filename = CHECKPOINTS[name]
    for folder in weight_folders():
        candidate = Path(folder) / filename
        if candidate.is_file():
            return candidate
    return None


def available_checkpoints() -> list[str]:
    """Checkpoint names whose files exist, in CHECKPOINTS order."""
    return [name for name in CHECKPOINTS if find_checkpoint(name) is not None]
