"""The pack in a real headless server (main.py --cpu on a loopback port): it imports cleanly, its nodes and
example workflows are served, and every workflow converts, queues over HTTP and writes its images."""
from __future__ import annotations

import json

import pytest
import serverutil

from test_workflows import REPO, WORKFLOWS, wa

import host as host_module

pytestmark = [pytest.mark.server, pytest.mark.slow]
PACK = host_module.PACK_FOLDER


server = serverutil.module_server("comfy-base", wa=wa)


def test_pack_imports_cleanly(server):
    keys = ("IMPORT FAILED", "Cannot import", "Error while calling comfy_entrypoint")
    bad = [line for line in server.log().splitlines() if PACK in line and any(k in line for k in keys)]
    assert not bad, "\n".join(bad)
    for node in ("GL_APG", "GL_SamplerCFGPP", "GL_TinyTestModel"):
        assert node in server.info
        assert server.info[node]["python_module"] == f"custom_nodes.{PACK}"


def test_in_process_object_info_matches_the_server(server, host):
    """scripts/workflow_api.object_info_in_process (used by the in-process tests) answers like GET /object_info."""
    local = wa.object_info_in_process()
    used = {n["type"] for path in WORKFLOWS for n in json.loads(path.read_text(encoding="utf-8"))["nodes"]}
    for name in sorted(used & set(server.info)):
        assert _without_file_lists(name, local[name]) == _without_file_lists(name, server.info[name]), name


FILE_LISTS = {"GL_LinearAGLoad": "file"}    # combos listing files of the output folder, which differ per process


def _without_file_lists(name, info):
    if name not in FILE_LISTS:
        return info
    info = json.loads(json.dumps(info))
    options = info["input"]["required"][FILE_LISTS[name]][1]      # V3 combo: ["COMBO", {"options": [...], ...}]
    options.pop("options", None)
    options.pop("default", None)
    return info


def test_example_workflows_are_served(server):
    templates = wa.request(server.url, "/workflow_templates")
    assert sorted(templates.get(PACK, [])) == sorted(p.stem for p in WORKFLOWS)
    served = wa.request(server.url, f"/api/workflow_templates/{PACK}/{WORKFLOWS[0].name}")
    assert served == json.loads(WORKFLOWS[0].read_text(encoding="utf-8"))


def _provide_files_over_http(server, ui):
    """GL_LinearAGLoad reads a file a calibration workflow writes: run that workflow first when it is missing
    (as a user runs demo_linear_ag.json before demo_linear_ag_load.json)."""
    for node in ui["nodes"]:
        name = node["widgets_values"][0] if node["type"] == "GL_LinearAGLoad" else None
        if name is None or (server.base / "output" / "linear_ag" / name).is_file():
            continue
        prefix = name.rsplit("_", 2)[0]
        writer = next(p for p in WORKFLOWS for n in json.loads(p.read_text(encoding="utf-8"))["nodes"]
                      if n["type"] == "GL_LinearAGCalibrate" and n["widgets_values"][-1] == prefix)
        writer_ui = json.loads(writer.read_text(encoding="utf-8"))
        wa.queue_and_wait(server.url, wa.ui_to_api(writer_ui, server.info), timeout=240, ui_workflow=writer_ui)
        assert (server.base / "output" / "linear_ag" / name).is_file()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_over_http(server, path, tmp_path):
    ui = json.loads(path.read_text(encoding="utf-8"))
    _provide_files_over_http(server, ui)
    entry = wa.queue_and_wait(server.url, wa.ui_to_api(ui, server.info), timeout=240, ui_workflow=ui)
    assert entry["status"]["status_str"] == "success"
    images = [img for img in wa.output_images(entry) if img["type"] == "output"]     # previews are temp files
    batch = next(n for n in ui["nodes"] if n["type"] == "EmptyLatentImage")["widgets_values"][2]
    saves = sum(1 for n in ui["nodes"] if n["type"] == "SaveImage" and n.get("mode", 0) == 0)
    assert len(images) == batch * saves             # comparison workflows save one batch per sampler
    on_disk = [server.base / "output" / img["subfolder"] / img["filename"] for img in images]
    assert all(img["type"] == "output" and img["subfolder"] == "GuidanceLab" for img in images)
    assert all(path.stat().st_size > 0 for path in on_disk)
    fetched = wa.download(server.url, images[0], tmp_path / "view.png")     # GET /view returns the same file
    assert fetched.read_bytes() == on_disk[0].read_bytes()


def test_server_rejects_an_invalid_prompt(server):
    ui = json.loads((REPO / "workflows" / "apg.json").read_text(encoding="utf-8"))
    prompt = wa.ui_to_api(ui, server.info)
    apg = next(v for v in prompt.values() if v["class_type"] == "GL_APG")
    apg["inputs"]["start_percent"], apg["inputs"]["end_percent"] = 0.8, 0.2
    with pytest.raises(wa.WorkflowError, match="start_percent"):
        wa.queue_and_wait(server.url, prompt, timeout=60)


def test_runtime_error_is_clear_and_server_keeps_serving(server):
    """cfg 7 on the CFG++ sampler (λ ∈ [0, 1]) fails with an error naming the node and the fix; the next prompt
    runs normally."""
    ui = json.loads((REPO / "workflows" / "cfgpp.json").read_text(encoding="utf-8"))
    prompt = wa.ui_to_api(ui, server.info)
    sampler = next(v for v in prompt.values() if v["class_type"] == "SamplerCustom")
    good_cfg, sampler["inputs"]["cfg"] = sampler["inputs"]["cfg"], 7.0
    with pytest.raises(wa.WorkflowError, match=r"GL_SamplerCFGPP.*cfg = 7.*0\.6"):
        wa.queue_and_wait(server.url, prompt, timeout=120)
    sampler["inputs"]["cfg"] = good_cfg
    assert wa.queue_and_wait(server.url, prompt, timeout=120)["status"]["status_str"] == "success"
