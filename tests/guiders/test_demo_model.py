"""The demo model in ComfyUI-native form (guiders/demo_model.py, GL_DemoModelLoader), on the real host: config and
file size, save/load round trip (weights, config, tokenizer), clear errors, core CLIPTextEncode / CLIPSetLastLayer,
and an in-process API graph GL_DemoModelLoader -> CLIPTextEncode -> KSampler -> VAEDecode -> SaveImage reading a
temporary weights file (found through the `gl_demo_model` folder list of folder_paths, as extra_model_paths.yaml
would add it). Random-weight models only: what the trained file produces is measured elsewhere."""
from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from pathlib import Path

import host
import numpy as np
import pytest
import torch

SEED = 5
MAX_BYTES = 25 * 10**6


@pytest.fixture(scope="module")
def dm(host):
    return host.pack("guiders.demo_model")


@pytest.fixture(scope="module")
def config(host):
    return host.pack("demo.model_config").model_config()


@pytest.fixture(scope="module")
def built(dm, config):
    return dm.build_demo_model(config, SEED)


@pytest.fixture(scope="module")
def saved(dm, built, tmp_path_factory):
    """A weights folder holding demo_model.safetensors (and the weak file) of the seed-SEED random model."""
    folder = tmp_path_factory.mktemp("gl_demo_weights")
    patcher, clip, _vae = built
    meta = {"train_seed": str(SEED), "train_steps": "0", "git_commit": "test", "world_seed": "0", "world_size": "32",
            "training": {"steps": 0}}
    dm.save_demo_model(folder / "demo_model.safetensors", patcher, clip, meta)
    dm.save_demo_model(folder / "demo_model_weak.safetensors", patcher, clip, {**meta, "checkpoint": "weak"})
    return folder


@contextlib.contextmanager
def weights_folder(dm, folder):
    """Put `folder` first in the `gl_demo_model` folder list (what extra_model_paths.yaml does), then restore."""
    import folder_paths
    dm.weight_folders()
    paths = folder_paths.folder_names_and_paths[dm.FOLDER_NAME][0]
    saved = list(paths)
    paths.insert(0, str(folder))
    try:
        yield
    finally:
        paths[:] = saved


# ------------------------------------------------------------------------------------------------- the model

def test_architecture_is_sd1_style_pixel_space(dm, built, config):
    import comfy.latent_formats
    import comfy.model_base
    import comfy.sd
    import comfy.sd1_clip
    patcher, clip, vae = built
    model = patcher.model
    assert type(model) is comfy.model_base.BaseModel and model.model_type == comfy.model_base.ModelType.EPS
    import comfy.model_sampling
    assert isinstance(model.model_sampling, comfy.model_sampling.ModelSamplingDiscrete)
    assert isinstance(model.model_sampling, comfy.model_sampling.EPS)
    assert len(model.model_sampling.sigmas) == 1000
    assert isinstance(patcher.get_model_object("latent_format"), comfy.latent_formats.ChromaRadiance)
    keys = model.diffusion_model.state_dict()
    width = config["text"]["hidden_size"]
    for block in ("input_blocks.4.1", "input_blocks.7.1", "middle_block.1", "output_blocks.3.1"):
        assert keys[f"{block}.transformer_blocks.0.attn2.to_k.weight"].shape[1] == width      # SD1.5 key names
        assert f"{block}.transformer_blocks.0.attn2.to_v.weight" in keys
    assert not any(k.startswith("input_blocks.1.1.") for k in keys)   # no attention at full resolution
    unet_params = sum(p.numel() for p in model.diffusion_model.parameters())
    assert unet_params <= 6.5e6, unet_params
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(dm.text_encoder(clip), comfy.sd1_clip.SDClipModel)
    assert all(p.dtype == torch.float32 for p in model.diffusion_model.parameters())
    assert all(p.dtype == torch.float32 for p in dm.text_encoder(clip).parameters())
    assert vae.latent_channels == 3 and vae.downscale_ratio == 1


def test_lora_key_maps_are_those_of_sd15(built):
    """LoRA / erasure files address the UNet and text encoder by SD1.5's names (ComfyUI's own key maps)."""
    import comfy.lora
    patcher, clip, _vae = built
    unet_keys = comfy.lora.model_lora_keys_unet(patcher.model, {})
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k" in unet_keys
    assert unet_keys["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v"] == (
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight")
    clip_keys = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    assert "lora_te_text_model_encoder_layers_0_self_attn_k_proj" in clip_keys


def test_build_is_deterministic_in_seed(dm, config, built):
    again = dm.state_dict(*dm.build_demo_model(config, SEED)[:2])
    ref = dm.state_dict(*built[:2])
    assert ref.keys() == again.keys() and all(torch.equal(ref[k], again[k]) for k in ref)
    other = dm.state_dict(*dm.build_demo_model(config, SEED + 1)[:2])
    key = dm.UNET_PREFIX + "input_blocks.0.0.weight"
    assert not torch.equal(ref[key], other[key])
    assert all(torch.isfinite(v).all() for v in ref.values() if v.is_floating_point())


def test_saved_file_fits_the_size_budget(saved):
    size = (saved / "demo_model.safetensors").stat().st_size
    assert size <= MAX_BYTES, f"{size / 1e6:.1f} MB"


def test_round_trip_weights_config_tokenizer(dm, built, config, saved):
    path = saved / "demo_model.safetensors"
    patcher, clip, vae = dm.load_demo_model(path)
    ref, got = dm.state_dict(*built[:2]), dm.state_dict(patcher, clip)
    assert ref.keys() == got.keys()
    for k, v in ref.items():
        assert got[k].dtype == v.dtype, k
        expected = v.to(torch.float16).to(v.dtype) if v.is_floating_point() else v
        assert torch.equal(got[k], expected), k                      # bit-identical to the float16 rounding
    assert patcher.model.demo_config == dm.normalize_config(config)
    meta = patcher.model.demo_metadata
    assert json.loads(meta["config"]) == dm.normalize_config(config)
    assert meta["train_seed"] == str(SEED) and meta["world_size"] == "32" and meta["git_commit"] == "test"
    assert json.loads(meta["training"]) == {"steps": 0}
    assert meta["tokenizer_vocab_sha256"] == dm.tokenizer_fingerprint(clip) == dm.tokenizer_fingerprint(built[1])
    caption = "a large red circle left of a small blue square on a white background"
    assert clip.tokenize(caption) == built[1].tokenize(caption)
    assert dm.tokenize(clip, [caption])[0] == [t for t, _w in clip.tokenize(caption)["l"][0]]
    assert clip.tokenizer.clip_l.embedding_size == config["text"]["hidden_size"]
    # same weights up to float16 rounding -> (nearly) the same conditioning and prediction
    ref_cond = built[1].encode_from_tokens(built[1].tokenize(caption))
    got_cond = clip.encode_from_tokens(clip.tokenize(caption))
    assert torch.allclose(ref_cond, got_cond, atol=0.05)
    assert vae.latent_channels == 3


def test_sparse_token_embedding_round_trip(dm, built, tmp_path):
    """Only the trained rows are stored; loading restores them exactly (float16) and gives the others zeros."""
    patcher, clip, _vae = built
    caption = "a red circle left of a blue square"
    ids = set(dm.tokenize(clip, [caption, ""])[0]) | set(dm.tokenize(clip, [""])[0])
    path = dm.save_demo_file(tmp_path / "sparse.safetensors", dm.state_dict(patcher, clip), patcher.model.demo_config,
                             clip, {"checkpoint": "test"}, token_ids=ids)
    dense = dm.save_demo_model(tmp_path / "dense.safetensors", patcher, clip)
    assert path.stat().st_size < dense.stat().st_size - 9 * 10**6      # 49408 x 96 float16 rows left out
    loaded, lclip, _ = dm.load_demo_model(path)
    assert loaded.model.demo_metadata["token_embedding"] == "sparse"
    full = dm.state_dict(patcher, clip)[dm.TOKEN_EMBEDDING]
    got = dm.state_dict(loaded, lclip)[dm.TOKEN_EMBEDDING]
    assert got.shape == full.shape
    rows = torch.tensor(sorted(ids))
    assert torch.equal(got[rows], full[rows].to(torch.float16).float())
    others = torch.ones(len(full), dtype=torch.bool)
    others[rows] = False
    assert int(others.sum()) == len(full) - len(ids) and torch.count_nonzero(got[others]) == 0
    # a caption made of stored tokens encodes as with the dense weights
    ref = clip.encode_from_tokens(clip.tokenize(caption))
    assert torch.allclose(lclip.encode_from_tokens(lclip.tokenize(caption)), ref, atol=0.05)
    with pytest.raises(dm.DemoModelError, match="token ids"):
        dm.save_demo_file(tmp_path / "bad.safetensors", dm.state_dict(patcher, clip), patcher.model.demo_config,
                          clip, token_ids=[10**6])


def test_sampling_section_sets_the_noise_schedule(dm, config):
    """The config's `sampling` section is the model's discrete schedule (what KSampler's schedulers read);
    without it the model has SD1.5's schedule (sigma_max 14.6)."""
    cfg = json.loads(json.dumps(config))
    cfg["sampling"] = {"linear_start": 0.00085, "linear_end": 0.025}
    patcher, _clip, _vae = dm.build_demo_model(cfg, SEED)
    assert float(patcher.model.model_sampling.sigma_max) == pytest.approx(166.80, abs=0.05)
    cfg.pop("sampling")
    patcher, _clip, _vae = dm.build_demo_model(cfg, SEED)
    assert float(patcher.model.model_sampling.sigma_max) == pytest.approx(14.61, abs=0.01)
    cfg["sampling"] = {"linear_stop": 0.02}
    with pytest.raises(dm.DemoModelError, match="linear_stop"):
        dm.normalize_config(cfg)


def test_file_layout_is_an_sd1_checkpoint_layout(saved):
    import safetensors
    with safetensors.safe_open(str(saved / "demo_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys[:50]}
    assert all(k.startswith(("model.diffusion_model.", "cond_stage_model.")) for k in keys)
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert dtypes == {torch.float16}


def test_clear_errors_name_the_file(dm, tmp_path, saved):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(dm.DemoModelError, match="demo/train.py") as err:
        dm.load_demo_model(missing)
    assert str(missing) in str(err.value)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(dm.DemoModelError, match="garbage.safetensors"):
        dm.load_demo_model(garbage)
    import safetensors.torch
    bare = tmp_path / "bare.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(bare))
    with pytest.raises(dm.DemoModelError, match="bare.safetensors.*config"):
        dm.load_demo_model(bare)
    # right metadata, a tensor missing
    with safetensors.safe_open(str(saved / "demo_model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors.pop("model.diffusion_model.out.2.weight")
    cut = tmp_path / "cut.safetensors"
    safetensors.torch.save_file(tensors, str(cut), metadata=meta)
    with pytest.raises(dm.DemoModelError, match="cut.safetensors.*out.2.weight"):
        dm.load_demo_model(cut)
    pt = tmp_path / "model.ckpt"
    pt.write_bytes(b"x")
    with pytest.raises(dm.DemoModelError, match="safetensors"):
        dm.load_demo_model(pt)


def test_bad_configs_are_refused(dm, config):
    bad = json.loads(json.dumps(config))
    bad["unet"]["context_dim"] = 64
    with pytest.raises(dm.DemoModelError, match="context_dim"):
        dm.normalize_config(bad)
    bad = json.loads(json.dumps(config))
    bad["unet"]["in_channels"] = 4
    with pytest.raises(dm.DemoModelError, match="pixel space"):
        dm.normalize_config(bad)


# ------------------------------------------------------------------------------------ core nodes on the CLIP

def test_core_clip_text_encode_and_set_last_layer(built, config):
    import nodes
    _patcher, clip, _vae = built
    encode = nodes.NODE_CLASS_MAPPINGS["CLIPTextEncode"]()
    set_last = nodes.NODE_CLASS_MAPPINGS["CLIPSetLastLayer"]()
    with torch.inference_mode():
        (cond,) = encode.encode(clip, "a red circle")
        assert len(cond) == 1 and cond[0][0].shape == (1, 77, config["text"]["hidden_size"])
        assert torch.isfinite(cond[0][0]).all() and "pooled_output" in cond[0][1]
        (long_cond,) = encode.encode(clip, "a red circle, " * 30)                 # > 77 tokens: two chunks
        assert long_cond[0][0].shape[1] == 154
        (weighted,) = encode.encode(clip, "a (red:1.3) circle")                  # prompt weights work
        assert weighted[0][0].shape == (1, 77, config["text"]["hidden_size"])
        layers = {}
        for layer in (-1, -2, -3, -24):
            (c,) = set_last.set_last_layer(clip, layer)
            (layers[layer],) = encode.encode(c, "a red circle")
        assert torch.equal(layers[-1][0][0], cond[0][0]) and torch.equal(layers[-24][0][0], cond[0][0])
        assert not torch.equal(layers[-2][0][0], cond[0][0])
        (empty,) = encode.encode(clip, "")
        assert not torch.equal(empty[0][0], cond[0][0])


def test_training_prediction_is_what_sampling_uses(dm, config):
    """predict_noise (the trainer's forward) equals ComfyUI's apply_model path: denoised = x − σ·eps."""
    patcher, clip, _vae = dm.build_demo_model(config, SEED)
    model = patcher.model
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():      # a non-zero output layer, so the comparison is not 0 == 0
        out = model.diffusion_model.out[-1]
        out.weight.copy_(torch.randn(out.weight.shape, generator=gen) * 0.05)
    context = clip.encode_from_tokens(clip.tokenize("a blue square"))
    context = torch.cat([context, clip.encode_from_tokens(clip.tokenize(""))])
    sigma = model.model_sampling.sigmas[torch.tensor([20, 700])]
    x0, noise = torch.randn(2, 2, 3, 32, 32, generator=gen)
    x = x0 * 0.5 + noise * sigma.view(-1, 1, 1, 1)
    with torch.inference_mode():
        eps = dm.predict_noise(model, x, sigma, context)
        denoised = model.apply_model(x, sigma, c_crossattn=context)
    assert eps.abs().mean() > 1e-3
    assert torch.allclose(denoised, x - sigma.view(-1, 1, 1, 1) * eps, atol=1e-4, rtol=1e-4)


def test_trainable_text_encoder_gives_gradients_and_same_values(dm, config):
    _patcher, clip, _vae = dm.build_demo_model(config, SEED)
    tokens = dm.tokenize(clip, ["a green star above a purple cross", ""])
    reference = clip.encode_from_tokens(clip.tokenize("a green star above a purple cross"))
    with torch.inference_mode(False), torch.enable_grad():
        with dm.trainable_text_encoder(clip) as encoder:
            z, _pooled = encoder(tokens)
            assert torch.allclose(z[:1].detach(), reference, atol=1e-5)
            z.square().mean().backward()
            grad = encoder.transformer.text_model.embeddings.token_embedding.weight.grad
            assert grad is not None and grad.abs().sum() > 0
    assert not any(p.requires_grad for p in dm.text_encoder(clip).parameters())
    assert all("forward" not in m.__dict__ for m in dm.text_encoder(clip).modules())
    assert "process_tokens" not in dm.text_encoder(clip).__dict__


def test_batched_token_embedding_matches_the_hosts_loop(dm, config):
    """The training path embeds a batch of captions in one call; embeddings, masks and counts equal the host's."""
    _patcher, clip, _vae = dm.build_demo_model(config, SEED)
    captions = ["a green star above a purple cross", "", "a red circle", "a red circle left of a blue square"]
    tokens = dm.tokenize(clip, captions)
    tokens[2] = tokens[2][:10] + [49407] * 3 + tokens[2][13:]   # several end tokens in a row
    encoder = dm.text_encoder(clip)
    expected = encoder.process_tokens(tokens, "cpu")
    with torch.inference_mode(False), torch.enable_grad():
        with dm.trainable_text_encoder(clip) as trainable:
            got = trainable.process_tokens(tokens, "cpu")
            numpy_ids = trainable.process_tokens([[np.int64(t) for t in tokens[0]]], "cpu")  # the host's loop
    assert torch.equal(got[0].detach(), expected[0]) and torch.equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3] == []
    assert expected[2][1] == 2                                   # "" = start + end
    assert torch.equal(numpy_ids[0], expected[0][:1]) and numpy_ids[2] == [expected[2][0]]


# --------------------------------------------------------------------------------- the node, in a real graph



def _execute(prompt: dict) -> dict:
    import execution
    prompt_id = uuid.uuid4().hex
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    assert valid, f"validation failed: {error} {json.dumps(node_errors)[:2000]}"
    ex = host.new_executor()
    ex.execute(prompt, prompt_id, {}, outputs)
    errors = [data for event, data in ex.status_messages if event == "execution_error"]
    assert ex.success and not errors, errors and (errors[0]["exception_message"], "".join(errors[0]["traceback"]))
    return ex.history_result["outputs"]


def _graph(checkpoint: str, latent: dict, text: str = "a red circle on a white background") -> dict:
    return {
        "1": {"class_type": "GL_DemoModelLoader", "inputs": {"checkpoint": checkpoint}},
        "2": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["1", 1], "stop_at_clip_layer": -1}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["2", 0]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": latent,
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 3, "steps": 4, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "gl_demo_model_test"}},
    }


LATENTS = {
    "EmptyLatentImage": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 2}},
    "EmptyChromaRadianceLatentImage": {"class_type": "EmptyChromaRadianceLatentImage",
                                       "inputs": {"width": 32, "height": 32, "batch_size": 2}},
}


@pytest.mark.parametrize("checkpoint,latent", [
    ("demo_model", "EmptyLatentImage"),
    ("demo_model_weak (early checkpoint, for autoguidance)", "EmptyChromaRadianceLatentImage"),
])
def test_loader_in_core_graph_samples_32px_images(dm, saved, checkpoint, latent):
    import folder_paths
    from PIL import Image
    with weights_folder(dm, saved):
        outputs = _execute(_graph(checkpoint, LATENTS[latent]))
    images = outputs["8"]["images"]
    assert len(images) == 2
    for img in images:
        with Image.open(Path(folder_paths.get_output_directory()) / img["subfolder"] / img["filename"]) as im:
            assert im.size == (32, 32)
            assert any(lo != hi for lo, hi in im.getextrema()), "flat image (NaN latents decode to black)"


def test_loader_lists_existing_checkpoints_and_loads_them(host, dm, saved):
    node = host.pack("nodes.demo_model")
    with weights_folder(dm, saved):
        options = node.DemoModelLoader.INPUT_TYPES()["required"]["checkpoint"][1]["options"]
        assert options == ["demo_model", node.WEAK_LABEL]
        assert node.DemoModelLoader.validate_inputs(checkpoint="demo_model") is True
        fingerprint = node.DemoModelLoader.fingerprint_inputs(checkpoint="demo_model")
        assert fingerprint[0] == str(saved / "demo_model.safetensors")
        model, clip, vae = node.DemoModelLoader.execute(checkpoint=node.WEAK_LABEL).result
    assert model.model.demo_metadata["checkpoint"] == "weak"


def test_loader_without_weights_explains_how_to_make_them(host, dm, tmp_path, monkeypatch):
    import folder_paths
    node = host.pack("nodes.demo_model")
    monkeypatch.setattr(dm, "WEIGHTS_DIR", tmp_path / "empty")                # as on a fresh install
    monkeypatch.setitem(folder_paths.folder_names_and_paths, dm.FOLDER_NAME, ([], set()))
    options = node.DemoModelLoader.INPUT_TYPES()["required"]["checkpoint"][1]["options"]
    assert options == ["demo_model"]                                          # still placeable in a graph
    message = node.DemoModelLoader.validate_inputs(checkpoint="demo_model")
    assert isinstance(message, str) and "demo/train.py" in message and "demo_model.safetensors" in message
    assert "unknown checkpoint" in node.DemoModelLoader.validate_inputs(checkpoint="something else")
    with pytest.raises(FileNotFoundError, match="demo/train.py"):
        node.DemoModelLoader.execute(checkpoint="demo_model")
    import execution
    valid, _error, _outputs, node_errors = asyncio.run(execution.validate_prompt(
        "p", _graph("demo_model", LATENTS["EmptyLatentImage"]), None))
    assert not valid and "demo/train.py" in json.dumps(node_errors)
