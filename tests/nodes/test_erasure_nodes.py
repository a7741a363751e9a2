"""GL_ConceptErase, GL_ConceptEraseTrain and GL_SaveErasureLoRA as nodes: outputs, the file they write, errors."""
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def nodes_mod(host):
    return host.pack("nodes.erasure")


def _erase(nodes_mod, model, clip, **kw):
    args = dict(erase="circle", alternative="square", preserve="", erase_scale=1.0, preserve_scale=1.0, lam=0.5,
                token_mode="last_content", templates="none", custom_templates="", targets="K+V",
                protect_uncond=True, uncond_prompts="", strength=1.0)
    args.update(kw)
    return nodes_mod.ConceptErase.execute(model, clip, **args)


def test_concept_erase_node_returns_a_patched_clone_and_its_edit(nodes_mod, demo_model, host):
    patcher, clip, _vae = demo_model
    out = _erase(nodes_mod, patcher, clip, targets="V only")
    model, edit, hooks = out.result
    er = host.pack("guiders.erasure")
    assert isinstance(edit, er.ErasureEdit) and model is not patcher
    import comfy.hooks
    assert isinstance(hooks, comfy.hooks.HookGroup) and len(hooks.hooks) == 1
    assert set(hooks.hooks[0].weights) == set(edit.deltas)
    assert edit.deltas and all(k.endswith("attn2.to_v.weight") for k in edit.deltas)
    assert set(edit.deltas) <= set(model.patches) and not set(edit.deltas) & set(patcher.patches)


def test_save_node_writes_a_lora_file_into_the_output_folder(nodes_mod, demo_model):
    import folder_paths
    patcher, clip, _vae = demo_model
    _model, edit, _hooks = _erase(nodes_mod, patcher, clip).result
    out = nodes_mod.SaveErasureLoRA.execute(edit, "erasure_test/x", 0, 1.0, "output")
    path = Path(out.result[0])
    assert path.is_file() and path.parent == Path(folder_paths.get_output_directory()) / "erasure_test"
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata()["guidance_lab"] == "concept_erase"
    assert any(k.endswith(".lora_up.weight") for k in keys) and any(k.endswith(".alpha") for k in keys)
    assert all(k.startswith("diffusion_model.") for k in keys)


def test_save_node_refuses_other_inputs(nodes_mod):
    with pytest.raises(ValueError, match="GL_SaveErasureLoRA: the erasure input got a dict"):
        nodes_mod.SaveErasureLoRA.execute({}, "x", 0, 1.0, "output")


def test_train_node_runs_briefly(nodes_mod, demo_model):
    patcher, clip, _vae = demo_model
    latent = {"samples": torch.zeros(1, 4, 32, 32)}
    with torch.inference_mode():
        out = nodes_mod.ConceptEraseTrain.execute(patcher, clip, latent, "circle", "", "", 3, 1e-3, 4, 1, 1.0, 1.0,
                                                  0.5, 1, 3, 5.0, "attn2 k/v", 0)
    model, edit, hooks = out.result
    assert edit.metadata["method"] == "all-but-one (design)" and edit.metadata["alternative"] == [""]
    assert len(edit.metadata["loss_history"]) == 2 and set(edit.deltas) <= set(model.patches)
    assert len(hooks.hooks) == 1 and set(hooks.hooks[0].weights) == set(edit.deltas)
    assert not set(edit.deltas) & set(patcher.patches)
