"""GL_LinearAG, GL_LinearAGCalibrate and GL_LinearAGLoad as nodes: inputs, errors, the file round trip."""
import pytest
import torch


@pytest.fixture(scope="module")
def nodes_mod(host):
    return host.pack("nodes.linear_ag")


@pytest.fixture(scope="module")
def cal(host):
    return host.pack("guiders.linear_ag_calibration")


@pytest.fixture(scope="module")
def tiny(host):
    builder = host.pack("guiders.tiny_models")
    return builder


@pytest.fixture(scope="module")
def demo(host):
    dm = host.pack("guiders.demo_model")
    path = dm.find_checkpoint("demo_model")
    if path is None:
        pytest.skip("demo model weights not present")
    import folder_paths
    return dm.load_demo_model(path, embedding_directory=folder_paths.get_folder_paths("embeddings"))


def _sample(model, builder, steps):
    import comfy.samplers
    g = comfy.samplers.CFGGuider(model)
    g.set_conds(builder.build_conditioning("sd15_eps", 1), builder.build_conditioning("sd15_eps", 2))
    g.set_cfg(5.0)
    sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    with torch.inference_mode():
        return g.sample(torch.randn(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), comfy.samplers.sampler_object("euler"),
                        sig, disable_pbar=True)


def test_linear_ag_node_passes_the_coefficients_and_checks_inputs(nodes_mod, cal, tiny):
    m = tiny.build_model("sd15_eps")
    plain = nodes_mod.LinearAG.execute(m, 0.5, 0.05).result[0]
    assert plain is not m and torch.isfinite(_sample(plain, tiny, 4)).all()
    value = cal.LinearAGCoefficients(torch.tensor([[1.0, 1.0, -1.0]] * 6, dtype=torch.float64),
                                     torch.full((6,), 0.01, dtype=torch.float64), {"steps": "6"})
    calibrated = nodes_mod.LinearAG.execute(m, 0.5, 0.05, coefficients=value).result[0]
    with pytest.raises(ValueError, match="GL_LinearAG: .*6 steps.*4 steps"):   # the table reached the patch
        _sample(calibrated, tiny, 4)
    assert torch.isfinite(_sample(calibrated, tiny, 6)).all()
    with pytest.raises(ValueError, match="GL_LinearAG: the coefficients input got a dict"):
        nodes_mod.LinearAG.execute(m, 0.5, 0.05, coefficients={"a": 1})
    with pytest.raises(ValueError, match="GL_LinearAG: first_fraction"):
        nodes_mod.LinearAG.execute(m, 2.0, 0.05)


def test_calibrate_needs_two_prompts(nodes_mod):
    node = nodes_mod.LinearAGCalibrate
    for text in ("", "only one\n\n   \n"):
        message = node.validate_inputs(prompts=text)
        assert isinstance(message, str) and "GL_LinearAGCalibrate" in message and "at least 2" in message
        with pytest.raises(ValueError, match="GL_LinearAGCalibrate: prompts has [01] non-empty"):
            node.execute(None, None, text, None, None, 0, 4, 5.0, "euler", "simple", "x")
    assert node.validate_inputs(prompts="a red circle\n\n a blue square ") is True
    assert nodes_mod.prompt_lines("a red circle\n\n a blue square ") == ["a red circle", "a blue square"]


def test_calibrate_saves_a_file_that_load_lists_and_reads(nodes_mod, cal, demo):
    import nodes
    model, clip, _vae = demo
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = {"samples": torch.zeros(1, 3, 32, 32)}
    with torch.inference_mode():
        out = nodes_mod.LinearAGCalibrate.execute(model, clip, "a red circle\na blue square", neg, latent, 5, 4,
                                                  5.0, "euler", "normal", "node_test")
    value, summary = out.result
    assert value.n_steps == 4 and torch.isfinite(value.coefficients).all()
    assert value.source.endswith("linear_ag/node_test_00001_.safetensors")
    assert "LinearAG coefficients for 4 steps (euler/normal, cfg 5.0, 2 prompts" in summary
    assert out.ui is not None                                             # shown on the node
    options = next(i for i in nodes_mod.LinearAGLoad.define_schema().inputs if i.id == "file").options
    assert "node_test_00001_.safetensors" in options
    assert nodes_mod.LinearAGLoad.validate_inputs(file="node_test_00001_.safetensors") is True
    loaded, text = nodes_mod.LinearAGLoad.execute("node_test_00001_.safetensors").result
    assert torch.equal(loaded.coefficients, value.coefficients) and text.splitlines()[1:5] == summary.splitlines()[1:5]
    assert loaded.metadata["prompts"] == "2" and loaded.metadata["model_fingerprint"] == cal.model_fingerprint(model)
    assert nodes_mod.LinearAGLoad.fingerprint_inputs(file="node_test_00001_.safetensors") is not None


def test_load_errors_name_the_node_and_the_file(nodes_mod, cal):
    import folder_paths
    from pathlib import Path
    message = nodes_mod.LinearAGLoad.validate_inputs(file="missing.safetensors")
    assert isinstance(message, str) and "GL_LinearAGLoad" in message and "missing.safetensors" in message
    bad = Path(folder_paths.get_input_directory()) / "linear_ag" / "broken.safetensors"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"not a safetensors file")
    assert "broken.safetensors" in cal.coefficient_files()
    with pytest.raises(ValueError, match="GL_LinearAGLoad: cannot use 'broken.safetensors'.*Recalibrate"):
        nodes_mod.LinearAGLoad.execute("broken.safetensors")
    # a valid file outside the folders cannot be reached through the name
    table = cal.LinearAGCoefficients(torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    saved = Path(cal.save_calibration(table, "escape").source)
    outside = saved.parent.parent / "escape.safetensors"
    outside.write_bytes(saved.read_bytes())
    assert cal.load_calibration(saved.name).n_steps == 3
    with pytest.raises(ValueError, match="GL_LinearAGLoad: coefficient file '../escape.safetensors' not found"):
        nodes_mod.LinearAGLoad.execute("../escape.safetensors")
