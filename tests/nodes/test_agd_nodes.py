"""GL_AGDCollect, GL_AGDTrain, GL_AGDLoader and GL_AGDApply as nodes: what they return, the files they read and
write, the model calls of the result, their errors."""
from pathlib import Path

import pytest
import torch

from hostutil import encode, run


@pytest.fixture(scope="module")
def nodes_mod(host):
    return host.pack("nodes.agd")


@pytest.fixture(scope="module")
def ag(host):
    return host.pack("guiders.agd")


def test_collect_train_and_apply_nodes(nodes_mod, ag, host, demo_model):
    import folder_paths
    patcher, clip, _vae = demo_model
    latent = {"samples": torch.zeros(1, 3, 16, 16)}
    with torch.inference_mode():
        out = nodes_mod.AGDCollect.execute(patcher, clip, latent, "a red circle\n\na blue square\n", "", 1, 2.0,
                                           6.0, 3, "euler", "normal", 0, "fp16", "agd_node_test")
    data = out.result[0]
    assert len(data) == 2 * 3 and data.meta["prompts"] == ["a red circle", "a blue square"]
    assert "6 recorded evaluations from 2 trajectories of 2 prompt(s)" in out.ui.as_dict()["text"][0]
    assert (Path(folder_paths.get_output_directory()) / "agd_data" / "agd_node_test" / "shard_00000.safetensors"
            ).is_file()
    with torch.inference_mode():
        out = nodes_mod.AGDTrain.execute(patcher, data, 8, 8, True, True, 2, 4, 1e-3, 0.1, 0, 0, "agd_test/x",
                                         save_to="output")
    adapter = out.result[0]
    text = out.ui.as_dict()["text"][0]
    assert adapter.info["steps"] == 2 and "held-out loss" in text and "saved x_" in text
    saved = list((Path(folder_paths.get_output_directory()) / "agd_test").glob("x_*.safetensors"))
    assert len(saved) == 1 and ag.load(saved[0]).sites == adapter.sites
    with torch.inference_mode():
        out = nodes_mod.AGDTrain.execute(patcher, data, 8, 8, True, True, 2, 4, 1e-3, 0.1, 0, 0, "",
                                         objective="relative", omega_gain=True, precision="bf16")
    hist = out.result[0].info["loss_history"]
    assert out.result[0].info["objective"] == "relative" and "saved" not in out.ui.as_dict()["text"][0]
    assert out.result[0].info["precision"] == "bf16" and adapter.info["precision"] == "fp32"
    assert out.result[0].config["omega_gain"] is True and "omega_gain" not in adapter.config
    assert f"(relative {hist[0][2]:.3f} → {hist[-1][2]:.3f})" in out.ui.as_dict()["text"][0]
    model = nodes_mod.AGDApply.execute(patcher, adapter, 4.0, 1.0).result[0]
    run(model, encode(clip, "a red circle"), encode(clip, ""), 1.0, batch=2, steps=5)
    report = host.pack("guiders.nfe").last_report(model)
    assert report.nfe_per_image == 5 and report.images == 2              # one model call per image per step
    assert not patcher.model_options.get("transformer_options", {}).get("patches")      # input model untouched


def test_node_errors(nodes_mod, ag, demo_model, tmp_path):
    msg = nodes_mod.AGDCollect.validate_inputs(8.0, 2.0)
    assert msg == "GL_AGDCollect: omega_min (8.0) is above omega_max (2.0); swap them"
    assert nodes_mod.AGDCollect.validate_inputs(None, 2.0) is True
    assert "GL_AGDLoader: adapter file 'nope.safetensors' not found" in nodes_mod.AGDLoader.validate_inputs(
        "nope.safetensors")
    other = Path(__file__).resolve().parents[2] / "demo" / "weights" / "demo_hypernet.safetensors"
    with pytest.raises(ag.AGDError, match="GL_AGDLoader: 'demo_hypernet.safetensors' is not a Guidance Lab AGD"):
        ag.load(other)
    patcher, clip, _vae = demo_model
    with pytest.raises(ValueError, match="GL_AGDTrain: connect GL_AGDCollect's data output"):
        nodes_mod.AGDTrain.execute(patcher, None, 8, 8, True, True, 2, 4, 1e-3, 0.1, 0, 0, "")
    with pytest.raises(ValueError, match="GL_AGDCollect: no prompts"):
        nodes_mod.AGDCollect.execute(patcher, clip, {"samples": torch.zeros(1, 3, 16, 16)}, " \n", "", 1, 1.0,
                                     12.0, 3, "euler", "normal", 0, "fp16", "agd_none")


def test_loader_reads_the_shipped_adapter(nodes_mod, ag, demo_model):
    assert nodes_mod.AGDLoader.validate_inputs("demo_agd.safetensors") is True
    adapter = nodes_mod.AGDLoader.execute("demo_agd.safetensors").result[0]
    assert isinstance(adapter, ag.AGDAdapter) and adapter.family == "UNet" and len(adapter.sites) == 11
    assert all(not p.requires_grad for p in adapter.modules.parameters())
    patcher, _clip, _vae = demo_model
    base = sum(v.numel() for k, v in patcher.model_state_dict().items() if k.startswith("diffusion_model."))
    assert adapter.parameters() <= 0.05 * base                       # the parameter budget
    hist = adapter.info["loss_history"]
    assert adapter.info["objective"] == "relative"                   # how demo/train_agd.py trains it
    assert hist[-1][1] < hist[0][1] and adapter.info["omega_min"] == 1.0 and adapter.info["omega_max"] == 12.0
    ag.check_model(patcher, adapter)                                  # made for the shipped demo model
