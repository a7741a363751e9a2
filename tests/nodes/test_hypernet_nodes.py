"""GL_HypernetworkLoader, GL_Personalize, GL_HypernetworkTrain, GL_HypernetworkBasis and GL_DemoSubjectImages as
nodes: what they return,
the files they read and write, their errors."""
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def nodes_mod(host):
    return host.pack("nodes.hypernet")


@pytest.fixture(scope="module")
def hn(host):
    return host.pack("guiders.hypernet")


def test_loader_reads_the_shipped_hypernetwork_and_refuses_unknown_files(nodes_mod, hn):
    assert nodes_mod.HypernetworkLoader.validate_inputs("demo_hypernet.safetensors") is True
    message = nodes_mod.HypernetworkLoader.validate_inputs("nope.safetensors")
    assert "GL_HypernetworkLoader: hypernetwork file 'nope.safetensors' not found" in message
    net = nodes_mod.HypernetworkLoader.execute("demo_hypernet.safetensors").result[0]
    assert isinstance(net, hn.Hypernet) and net.family == "UNet" and net.module.config["rank"] == 4
    assert net.layers == "attention + feed-forward + convolutions (UNet)" and len(net.targets) == 144
    assert all(not p.requires_grad for p in net.module.parameters())
    path, mtime = nodes_mod.HypernetworkLoader.fingerprint_inputs("demo_hypernet.safetensors")
    assert Path(path).name == "demo_hypernet.safetensors" and mtime > 0


def test_demo_subject_images_node(nodes_mod):
    images, text = nodes_mod.DemoSubjectImages.execute(2, "heldout", 3, 5, 48).result
    assert images.shape == (3, 48, 48, 3) and 0 <= float(images.min()) and float(images.max()) <= 1
    from demo import subjects
    subj = subjects.subject(2, split="heldout")
    assert text.startswith(subj["pattern"]) and "heldout subject 2" in text
    want, _c, _l = subjects.images(subj, 5, 3, size=48)
    torch.testing.assert_close(images, want.permute(0, 2, 3, 1))


def test_personalize_node_on_the_demo_model(nodes_mod, demo_model):
    patcher, _clip, _vae = demo_model
    net = nodes_mod.HypernetworkLoader.execute("demo_hypernet.safetensors").result[0]
    images = nodes_mod.DemoSubjectImages.execute(0, "heldout", 3, 0, 32).result[0]
    model, hooks = nodes_mod.Personalize.execute(patcher, images, net, 1.0).result
    import comfy.hooks
    assert isinstance(hooks, comfy.hooks.HookGroup) and len(model.patches) == 144 and not patcher.patches
    with pytest.raises(ValueError, match="GL_Personalize: subject images of 4×4 pixels are too small"):
        nodes_mod.Personalize.execute(patcher, torch.rand(1, 4, 4, 3), net, 1.0)


def test_train_node_saves_to_the_output_folder(nodes_mod, demo_model):
    import folder_paths
    patcher, clip, vae = demo_model
    with torch.inference_mode():
        out = nodes_mod.HypernetworkTrain.execute(
            patcher, clip, vae, "demo subjects", "", 100, "cross-attention k/v (UNet)", 1, 32, 1, 2, 1e-3, 1, 1, 2,
            32, 1e-4, 0, False, 0, 0, "hypernet_test/x", save_to="output")
    net = out.result[0]
    assert net.layers == "cross-attention k/v (UNet)" and net.info["steps"] == 2
    saved = list((Path(folder_paths.get_output_directory()) / "hypernet_test").glob("x_*.safetensors"))
    assert len(saved) == 1
    from safetensors import safe_open
    with safe_open(str(saved[0]), framework="pt") as f:
        assert f.metadata()["format"] == "guidance_lab.hypernetwork/1"


def test_basis_node_builds_saves_and_feeds_personalize(nodes_mod, hn, demo_model):
    import folder_paths
    patcher, clip, vae = demo_model
    net = nodes_mod.HypernetworkLoader.execute("demo_hypernet.safetensors").result[0]
    with torch.inference_mode():
        out = nodes_mod.HypernetworkBasis.execute(
            patcher, clip, vae, net, "demo subjects", "", 6, 2, 2, 2, 5e-3, 2, 32, 0.02, 0, "hypernet_test/basis",
            save_to="output")
    basis = out.result[0]
    assert basis.module.config["decoder"] == "basis" and basis.module.config["basis_size"] == 2
    text = out.ui.as_dict()["text"][0]
    assert "basis of 2 prototypes" in text and "saved basis_" in text
    saved = list((Path(folder_paths.get_output_directory()) / "hypernet_test").glob("basis_*.safetensors"))
    assert len(saved) == 1 and hn.load(saved[0]).module.config["basis_size"] == 2
    images = nodes_mod.DemoSubjectImages.execute(1, "heldout", 2, 0, 32).result[0]
    personalized = nodes_mod.Personalize.execute(patcher, images, basis, 1.0).result[0]
    assert personalized is not patcher
    schema = nodes_mod.HypernetworkBasis.define_schema()
    assert all(i.tooltip for i in schema.inputs) and schema.inputs[-1].optional
    assert nodes_mod.HypernetworkBasis.validate_inputs("x", "output", "elsewhere").startswith(
        "GL_HypernetworkBasis: source 'elsewhere' is not one of the options")


def test_clip_vision_inputs_are_optional_and_come_last(nodes_mod):
    """Saved workflows depend on the existing inputs' names and order; clip_vision is an optional link at the end."""
    personalize = nodes_mod.Personalize.define_schema().inputs
    assert [i.id for i in personalize] == ["model", "images", "hypernetwork", "strength", "clip_vision"]
    train = nodes_mod.HypernetworkTrain.define_schema().inputs
    assert [i.id for i in train] == [
        "model", "clip", "vae", "source", "folder", "subjects", "layers", "rank", "width", "depth", "steps",
        "learning_rate", "subjects_per_step", "ref_images", "target_images", "resolution", "output_reg",
        "encoder_pretrain_steps", "freeze_encoder", "seed", "checkpoint_every", "filename_prefix", "save_to",
        "resume", "clip_vision"]
    for schema_input in (personalize[-1], train[-1]):
        assert schema_input.optional and schema_input.get_io_type() == "CLIP_VISION" and schema_input.tooltip


def test_train_and_personalize_nodes_with_clip_vision(nodes_mod, host, demo_model):
    import folder_paths
    patcher, clip, vae = demo_model
    tiny = host.pack("nodes.tiny_model")
    with torch.inference_mode():
        vision = tiny.TinyCLIPVision.execute(96, 0).result[0]
        out = nodes_mod.HypernetworkTrain.execute(
            patcher, clip, vae, "demo subjects", "", 100, "cross-attention k/v (UNet)", 1, 32, 1, 2, 1e-3, 1, 1, 2,
            32, 1e-4, 0, False, 0, 0, "hypernet_test/cv", save_to="output", clip_vision=vision)
    net = out.result[0]
    assert net.module.reads_features and net.info["steps"] == 2
    saved = list((Path(folder_paths.get_output_directory()) / "hypernet_test").glob("cv_*.safetensors"))
    assert len(saved) == 1
    back = host.pack("guiders.hypernet").load(saved[0])
    assert back.module.config == net.module.config and back.module.config["encoder"] == "clip_vision"
    images = nodes_mod.DemoSubjectImages.execute(0, "heldout", 3, 0, 32).result[0]
    model, _hooks = nodes_mod.Personalize.execute(patcher, images, back, 1.0, vision).result
    assert len(model.patches) == len(back.targets) and not patcher.patches
    with pytest.raises(ValueError, match="GL_Personalize: the hypernetwork .* reads CLIP vision features"):
        nodes_mod.Personalize.execute(patcher, images, back, 1.0)
