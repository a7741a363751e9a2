"""Example workflows (workflows/*.json, UI format): they parse, use only known nodes, cover every GL_ node, and
convert (scripts/workflow_api.py) and execute in the real host, in-process, on each tiny architecture."""
from __future__ import annotations

import asyncio
import contextlib
import copy
import importlib.util
import json
import uuid
from pathlib import Path

import host
import pytest

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
# workflows built on GL_TinyTestModel also run on every architecture (the demo-model ones are SD1-style only)
TINY_WORKFLOWS = [p for p in WORKFLOWS if '"GL_TinyTestModel"' in p.read_text(encoding="utf-8")]
ARCHS = ("sd15_eps", "sd15_v", "sd3", "flux")


def _load_workflow_api():
    spec = importlib.util.spec_from_file_location("gl_workflow_api", REPO / "scripts" / "workflow_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wa = _load_workflow_api()


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def object_info(host):
    return wa.object_info_in_process()




@contextlib.contextmanager
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the OpenMP barriers made
    each run ~100x slower (≈ 20 s instead of 0.1 s)."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def execute(prompt: dict) -> dict:
    """Validate and run an API prompt in-process; the history outputs ({node id: ui dict})."""
    import execution
    prompt_id = uuid.uuid4().hex
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    assert valid, f"validation failed: {error} {json.dumps(node_errors)[:2000]}"
    ex = host.new_executor()
    with one_thread():
        ex.execute(prompt, prompt_id, {}, outputs)
    errors = [data for event, data in ex.status_messages if event == "execution_error"]
    assert ex.success and not errors, errors and (errors[0]["exception_message"], "".join(errors[0]["traceback"]))
    assert any(event == "execution_success" for event, _ in ex.status_messages)
    return ex.history_result["outputs"]


def assert_images(ui: dict, outputs: dict) -> None:
    """Every SaveImage wrote batch_size PNGs of the expected size (pixel-space VAE: latent = image / 8)."""
    import folder_paths
    from PIL import Image
    latent = next(n for n in ui["nodes"] if n["type"] == "EmptyLatentImage")
    width, height, batch = latent["widgets_values"][:3]
    saves = [str(n["id"]) for n in ui["nodes"] if n["type"] == "SaveImage" and n.get("mode", 0) == 0]
    assert saves
    for node_id in saves:
        images = outputs[node_id]["images"]
        assert len(images) == batch
        for img in images:
            path = Path(folder_paths.get_output_directory()) / img["subfolder"] / img["filename"]
            with Image.open(path) as im:
                assert im.size == (width // 8, height // 8)
                assert any(lo != hi for lo, hi in im.getextrema()), f"{path} is flat (NaN latents decode to black)"


def provide_files(ui: dict, object_info: dict) -> None:
    """GL_LinearAGLoad reads a file that a calibration workflow writes: when it is missing, run that workflow first,
    as a user runs demo_linear_ag.json once before demo_linear_ag_load.json (the output folder is fresh per session,
    so the first calibration writes <prefix>_00001_.safetensors)."""
    import host as host_module
    cal = host_module.boot().pack("guiders.linear_ag_calibration")
    for node in ui["nodes"]:
        if node["type"] != "GL_LinearAGLoad" or cal.resolve(node["widgets_values"][0]) is not None:
            continue
        name = node["widgets_values"][0]
        prefix = name.rsplit("_", 2)[0]                     # "demo_linear_ag_00001_.safetensors" -> "demo_linear_ag"
        writer = next(p for p in WORKFLOWS for n in _load(p)["nodes"]
                      if n["type"] == "GL_LinearAGCalibrate" and n["widgets_values"][-1] == prefix)
        execute(wa.ui_to_api(_load(writer), object_info))
        assert cal.resolve(name) is not None, f"{writer.name} did not write {name}"


def with_arch(ui: dict, arch: str) -> dict:
    ui = copy.deepcopy(ui)
    for node in ui["nodes"]:
        if node["type"] == "GL_TinyTestModel":
            node["widgets_values"][0] = arch
    return ui


# ---------------------------------------------------------------- static checks

def test_workflows_exist():
    assert {p.name for p in WORKFLOWS} >= {"apg.json", "cfgpp.json", "apg_with_core_nodes.json"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_ui_format_with_known_nodes(path, object_info):
    ui = _load(path)
    assert ui["version"] == 0.4 and {"last_node_id", "last_link_id", "nodes", "links"} <= set(ui)
    ids = {n["id"] for n in ui["nodes"]}
    assert len(ids) == len(ui["nodes"]) and max(ids) <= ui["last_node_id"]
    assert max(link[0] for link in ui["links"]) <= ui["last_link_id"]
    nodes = {n["id"]: n for n in ui["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, type_ in ui["links"]:     # both ends agree, as the editor keeps them
        assert link_id in nodes[src]["outputs"][src_slot]["links"] and nodes[src]["outputs"][src_slot]["type"] == type_
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert nodes[dst]["inputs"][dst_slot]["type"] in (type_, "*")   # "*": a wildcard input (PreviewAny)
    for node in ui["nodes"]:
        assert node["type"] in object_info or node["type"] in wa.FRONTEND_ONLY, node["type"]
        if node["type"] in object_info:   # one value per widget plus the frontend-only control values, in order
            specs = wa.input_specs(object_info[node["type"]])
            expected = sum(1 + wa.widget_extras(*s) for s in specs if wa.is_widget(s[1], s[2]))
            assert len(node.get("widgets_values", [])) == expected, (node["type"], node.get("widgets_values"))
    assert any(n["type"] in ("Note", "MarkdownNote") for n in ui["nodes"]), "add a note explaining the graph"


def test_every_pack_node_is_in_a_workflow(host):
    import nodes
    pack_nodes = {name for name, cls in nodes.NODE_CLASS_MAPPINGS.items()
                  if cls.__module__.startswith(host.module_name)}
    assert {"GL_APG", "GL_SamplerCFGPP", "GL_TinyTestModel", "GL_DemoModelLoader"} <= pack_nodes
    used = {node["type"] for path in WORKFLOWS for node in _load(path)["nodes"]}
    assert not pack_nodes - used, f"no example workflow uses {sorted(pack_nodes - used)}"


# ---------------------------------------------------------------- execution

@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_executes_as_saved(path, object_info):
    ui = _load(path)
    provide_files(ui, object_info)
    assert_images(ui, execute(wa.ui_to_api(ui, object_info)))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", TINY_WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_executes_on_each_architecture(path, arch, object_info):
    ui = with_arch(_load(path), arch)
    provide_files(ui, object_info)
    prompt = wa.ui_to_api(ui, object_info)
    assert {n["inputs"]["architecture"] for n in prompt.values() if n["class_type"] == "GL_TinyTestModel"} == {arch}
    assert_images(ui, execute(prompt))


@pytest.mark.parametrize("arch", ARCHS)
def test_fixed_seeds_reproduce_the_same_images(arch, object_info):
    """GL_TinyTestModel promises 'same seed, same model'; with fixed sampler seeds the PNGs must be identical."""
    import folder_paths
    ui = with_arch(_load(REPO / "workflows" / "apg.json"), arch)
    save_id = next(str(n["id"]) for n in ui["nodes"] if n["type"] == "SaveImage")
    runs = []
    for _ in range(2):
        images = execute(wa.ui_to_api(ui, object_info))[save_id]["images"]
        runs.append([(Path(folder_paths.get_output_directory()) / i["subfolder"] / i["filename"]).read_bytes()
                     for i in images])
    assert runs[0] == runs[1]


def test_bypassed_core_node_in_real_workflow(object_info):
    """Bypassing RescaleCFG (Ctrl+B in the editor) wires CFGZeroStar straight to GL_APG, and it still runs."""
    ui = _load(REPO / "workflows" / "apg_with_core_nodes.json")
    rescale = next(n for n in ui["nodes"] if n["type"] == "RescaleCFG")
    rescale["mode"] = wa.MODE_BYPASSED
    prompt = wa.ui_to_api(ui, object_info)
    apg_id = next(k for k, v in prompt.items() if v["class_type"] == "GL_APG")
    zero = next(v for v in prompt.values() if v["class_type"] == "CFGZeroStar")
    assert str(rescale["id"]) not in prompt and zero["inputs"]["model"] == [apg_id, 0]
    assert_images(ui, execute(prompt))


# ---------------------------------------------------------------- the converter on a hand-written case

def _node(id_, type_, inputs=(), widgets=(), mode=0, outputs=()):
    return {"id": id_, "type": type_, "mode": mode, "pos": [0, 0], "size": [100, 100], "flags": {}, "order": id_,
            "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets),
            "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
            "outputs": [{"name": t.lower(), "type": t, "links": []} for t in outputs]}


HAND_INFO = {   # the shape /object_info has (V1 and V3 style), trimmed to what the converter reads
    "Loader": {"input": {"required": {"ckpt": [["a.safetensors", "b.safetensors"]]}},
               "input_order": {"required": ["ckpt"]}, "output": ["MODEL", "CLIP"]},
    "Patch": {"input": {"required": {"model": ["MODEL"], "strength": ["FLOAT", {"default": 1.0}]},
                        "optional": {"clip": ["CLIP"]}},
              "input_order": {"required": ["model", "strength"], "optional": ["clip"]}, "output": ["CLIP", "MODEL"]},
    "Sampler": {"input": {"required": {
        "model": ["MODEL", {}],
        "seed": ["INT", {"default": 0, "control_after_generate": True}],
        "steps": ["INT", {"default": 20}],
        "mode": ["COMBO", {"options": ["x", "y"], "control_after_generate": True}],
        "noise_seed": ["INT", {"default": 0}],                      # no flag: the frontend keys on the name
        "label": ["STRING", {"forceInput": True}],
        "scale": ["FLOAT", {"default": 1.0}]},
        "optional": {"denoise": ["FLOAT", {"default": 1.0}]}}, "output": ["LATENT"]},
}


def test_ui_to_api_hand_written_case():
    ui = {"last_node_id": 6, "last_link_id": 5, "version": 0.4, "groups": [], "config": {}, "extra": {},
          "nodes": [
              _node(1, "Loader", widgets=["b.safetensors"], outputs=["MODEL", "CLIP"]),
              # bypassed: output 1 (MODEL) must come from its MODEL input, not from slot 1 (CLIP)
              _node(2, "Patch", [("model", "MODEL", 1), ("strength", "FLOAT", None), ("clip", "CLIP", 2)],
                    widgets=[0.5], mode=4, outputs=["CLIP", "MODEL"]),
              _node(3, "Reroute", [("", "*", 3)], outputs=["MODEL"]),
              _node(4, "Sampler", [("model", "MODEL", 4), ("seed", "INT", 5), ("label", "STRING", None)],
                    widgets=[7, "randomize", 30, "y", "increment", "", 99, "fixed", 2.5, 0.75]),
              _node(5, "PrimitiveNode", outputs=["INT"], widgets=[7, "randomize"]),
              _node(6, "MarkdownNote", widgets=["# hello"]),
              _node(7, "Patch", [("model", "MODEL", None), ("strength", "FLOAT", None)], widgets=[2.0], mode=2),
          ],
          "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 1, 2, 2, "CLIP"], [3, 2, 1, 3, 0, "MODEL"],
                    [4, 3, 0, 4, 0, "MODEL"], [5, 5, 0, 4, 1, "INT"]]}
    api = wa.ui_to_api(ui, HAND_INFO)
    assert api == {
        "1": {"class_type": "Loader", "inputs": {"ckpt": "b.safetensors"}, "_meta": {"title": "Loader"}},
        "4": {"class_type": "Sampler", "_meta": {"title": "Sampler"}, "inputs": {
            "model": ["1", 0], "seed": 7, "steps": 30, "mode": "y", "noise_seed": 99, "scale": 2.5,
            "denoise": 0.75}},
    }


def test_ui_to_api_rejects_unknown_node_and_accepts_link_objects():
    ui = {"nodes": [_node(1, "Loader", widgets=["a.safetensors"], outputs=["MODEL", "CLIP"]),
                    _node(2, "Patch", [("model", "MODEL", 1)], widgets=[0.3], outputs=["CLIP", "MODEL"])],
          "links": [{"id": 1, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "MODEL"}]}
    assert wa.ui_to_api(ui, HAND_INFO)["2"]["inputs"] == {"model": ["1", 0], "strength": 0.3}
    ui["nodes"].append(_node(3, "SomeoneElsesNode"))
    with pytest.raises(wa.WorkflowError, match="SomeoneElsesNode"):
        wa.ui_to_api(ui, HAND_INFO)


def test_object_info_in_process_matches_server_shape(object_info):
    for name in ("KSampler", "RescaleCFG", "GL_APG", "GL_SamplerCFGPP"):
        info = object_info[name]
        assert {"input", "input_order", "output", "output_name", "name", "display_name", "category"} <= set(info)
    assert object_info["KSampler"]["input_order"]["required"][:2] == ["model", "seed"]
    assert object_info["GL_APG"]["python_module"].startswith("custom_nodes.")


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
def test_nfe_reports_show_the_adaptive_guidance_saving(arch, object_info):
    """adaptive_guidance.json: the two GL_NFEReport nodes show CFG's 2 NFEs per step and AG's smaller count."""
    ui = with_arch(_load(REPO / "workflows" / "adaptive_guidance.json"), arch)
    outputs = execute(wa.ui_to_api(ui, object_info))
    steps = next(n for n in ui["nodes"] if n["type"] == "KSampler")["widgets_values"][2]
    texts = {}
    for node in ui["nodes"]:
        if node["type"] == "GL_NFEReport":
            model_link = node["inputs"][0]["link"]
            source = next(link[1] for link in ui["links"] if link[0] == model_link)
            texts[next(n["type"] for n in ui["nodes"] if n["id"] == source)] = outputs[str(node["id"])]["text"][0]
    assert texts["GL_NFECounter"].startswith(f"{2 * steps:g} NFEs per image")
    ag_nfe = float(texts["GL_AdaptiveGuidance"].split()[0])
    assert steps < ag_nfe < 2 * steps and "conditional only after schedule step" in texts["GL_AdaptiveGuidance"]


def _reports(ui: dict, outputs: dict) -> dict:
    """{(type of the node feeding the report's model input, its id): report text} of every GL_NFEReport."""
    texts = {}
    for node in ui["nodes"]:
        if node["type"] == "GL_NFEReport":
            source = next(link[1] for link in ui["links"] if link[0] == node["inputs"][0]["link"])
            texts[(next(n["type"] for n in ui["nodes"] if n["id"] == source), source)] = \
                outputs[str(node["id"])]["text"][0]
    return texts


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
def test_nfe_reports_show_the_linear_ag_saving(arch, object_info):
    """linear_ag.json: 8 steps, first_fraction 0.5 -> steps 1 and 3 predicted: 14 NFEs per image against CFG's 16."""
    ui = with_arch(_load(REPO / "workflows" / "linear_ag.json"), arch)
    texts = {kind: text for (kind, _), text in _reports(ui, execute(wa.ui_to_api(ui, object_info))).items()}
    steps = next(n for n in ui["nodes"] if n["type"] == "KSampler")["widgets_values"][2]
    assert steps == 8
    assert texts["GL_NFECounter"].startswith("16 NFEs per image")
    assert texts["GL_LinearAG"].startswith("14 NFEs per image") and "steps 1, 3" in texts["GL_LinearAG"]


def test_demo_linear_ag_calibrates_saves_and_reloads(object_info):
    """demo_linear_ag.json writes a coefficient file, reports fewer NFEs than CFG for both LinearAG rows, and
    demo_linear_ag_load.json loads that very file (same table) and samples with it."""
    import host as host_module
    cal = host_module.boot().pack("guiders.linear_ag_calibration")
    ui = _load(REPO / "workflows" / "demo_linear_ag.json")
    before = set(cal.coefficient_files())
    outputs = execute(wa.ui_to_api(ui, object_info))
    written = sorted(set(cal.coefficient_files()) - before)
    assert len(written) == 1 and written[0].startswith("demo_linear_ag_")
    texts = _reports(ui, outputs)
    cfg_text = next(t for (kind, _), t in texts.items() if kind == "GL_NFECounter")
    assert cfg_text.startswith("40 NFEs per image")
    lag_texts = [t for (kind, _), t in texts.items() if kind == "GL_LinearAG"]
    assert len(lag_texts) == 2 and all(float(t.split()[0]) < 40 for t in lag_texts)
    assert any("default coefficients" in t for t in lag_texts) and any("calibrated" in t for t in lag_texts)
    summary = next(o["text"][0] for o in outputs.values() if "text" in o and "LinearAG coefficients" in o["text"][0])
    assert "20 steps" in summary and written[0] in summary
    load_ui = _load(REPO / "workflows" / "demo_linear_ag_load.json")
    loader = next(n for n in load_ui["nodes"] if n["type"] == "GL_LinearAGLoad")
    loader["widgets_values"][0] = written[0]
    load_outputs = execute(wa.ui_to_api(load_ui, object_info))
    assert_images(load_ui, load_outputs)
    shown = [o["text"][0] for o in load_outputs.values() if "text" in o]
    assert any(text.splitlines()[1:9] == summary.splitlines()[1:9] for text in shown)   # same fitted rows
