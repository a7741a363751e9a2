"""UI-format ComfyUI workflows -> API format, and a tiny client for a headless server (stdlib only).

    python scripts/workflow_api.py run --server http://127.0.0.1:8188 --out demo_output workflows/*.json
    python scripts/workflow_api.py convert --server http://127.0.0.1:8188 workflows/apg.json > apg_api.json  # one file
    python scripts/workflow_api.py wait --server http://127.0.0.1:8188 --timeout 180 [--pid SERVER_PID]

The editor saves *UI format* (nodes, links, positional widget values); POST /prompt only accepts *API format*
({id: {class_type, inputs}}). ComfyUI 0.3.75 has no server-side converter (the frontend's graph-to-prompt
does it), so `ui_to_api` redoes it from the input order that /object_info reports. Not covered: subgraphs,
group nodes, widgets added by frontend extensions.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}   # editor-side nodes, never sent
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}
MODE_MUTED, MODE_BYPASSED = 2, 4
_PRIMITIVE = object()   # a link whose value is already in the target's widgets_values (PrimitiveNode)


class WorkflowError(ValueError):
    """A workflow that cannot be converted, or a prompt the server rejected or failed."""


# ---------------------------------------------------------------- conversion

def input_specs(info: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of a node class's inputs: required then optional, in declared order."""
    specs = []
    inputs, order = info.get("input", {}), info.get("input_order") or {}
    for section in ("required", "optional"):
        declared = inputs.get(section) or {}
        for name in order.get(section) or list(declared):
            spec = declared.get(name) or ["*"]
            specs.append((name, spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}))
    return specs


def is_widget(type_, opts: dict) -> bool:
    return isinstance(type_, list) or (type_ in WIDGET_TYPES and not opts.get("forceInput"))


def widget_extras(name: str, type_, opts: dict) -> int:
    """Frontend-only widget values that follow this widget's value ("control_after_generate" and friends)."""
    if type_ == "INT":
        return 1 if opts.get("control_after_generate", name in SEED_NAMES) else 0
    if (isinstance(type_, list) or type_ == "COMBO") and opts.get("control_after_generate"):
        return 2                                           # control mode + control filter list
    return 0


def _widget_values(node: dict, specs) -> dict:
    values = node.get("widgets_values") or []
    widgets = [(name, type_, opts) for name, type_, opts in specs if is_widget(type_, opts)]
    if isinstance(values, dict):                           # some nodes save {name: value}
        return {name: values[name] for name, _, _ in widgets if name in values}
    out, i = {}, 0
    for name, type_, opts in widgets:
        if i >= len(values):
            break
        if values[i] is not None:
            out[name] = values[i]
        i += 1 + widget_extras(name, type_, opts)
    return out


def _links(ui: dict) -> dict:
    """link id -> (origin id, origin slot, target id, target slot, type); list and object link forms."""
    out = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                    link.get("type")]
        out[link[0]] = tuple(link[1:6])
    return out


def ui_to_api(ui_workflow: dict, object_info: dict) -> dict:
    """The API-format prompt of a UI-format workflow, given the server's /object_info."""
    nodes = {node["id"]: node for node in ui_workflow.get("nodes", [])}
    links = _links(ui_workflow)
    for node in nodes.values():
        if node["type"] not in object_info and node["type"] not in FRONTEND_ONLY:
            raise WorkflowError(f"node {node['id']} has type {node['type']!r}, which the server does not know "
                                "(missing custom node pack, or a subgraph/group node this converter cannot expand)")

    def source(link_id, want_type, seen=()):
        """[origin id, slot] of a link after skipping reroutes and bypassed nodes; None if it leads nowhere."""
        if link_id is None or link_id in seen or link_id not in links:
            return None
        origin_id, origin_slot, _, _, link_type = links[link_id]
        origin, seen = nodes.get(origin_id), (*seen, link_id)
        if origin is None:
            return None
        inputs = origin.get("inputs") or []
        if origin["type"] not in object_info:              # Reroute passes through; PrimitiveNode holds a value
            linked = [inp for inp in inputs if inp.get("link") is not None]
            return source(linked[0]["link"], want_type or link_type, seen) if linked else _PRIMITIVE
        if origin.get("mode") == MODE_MUTED:
            return None
        if origin.get("mode") == MODE_BYPASSED:            # as the frontend: same slot first, then any, same type
            want = want_type or link_type
            for idx in [origin_slot, *range(len(inputs))]:
                if idx < len(inputs) and inputs[idx].get("type") == want and inputs[idx].get("link") is not None:
                    return source(inputs[idx]["link"], want, seen)
            return None
        return [str(origin_id), origin_slot]

    api = {}
    for node_id, node in nodes.items():
        info = object_info.get(node["type"])
        if info is None or node.get("mode") in (MODE_MUTED, MODE_BYPASSED):
            continue
        specs = input_specs(info)
        values = _widget_values(node, specs)
        linked = {inp["name"]: inp for inp in node.get("inputs") or [] if inp.get("link") is not None}
        inputs = {}
        for name in [name for name, _, _ in specs] + [n for n in linked if n not in {s[0] for s in specs}]:
            if name in linked:
                src = source(linked[name]["link"], linked[name].get("type"))
                if src is None:
                    continue
                if src is not _PRIMITIVE:
                    inputs[name] = src
                    continue
            if name in values:
                inputs[name] = values[name]
        title = node.get("title") or info.get("display_name") or node["type"]
        api[str(node_id)] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": title}}
    return api


# ---------------------------------------------------------------- in-process /object_info

def object_info_in_process() -> dict:
    """/object_info without a server: server.py's node_info (0.3.75) over nodes.NODE_CLASS_MAPPINGS.

    Call it inside a process that has imported ComfyUI and loaded its nodes (nodes.init_extra_nodes).
    """
    import folder_paths
    import nodes
    from comfy_api.internal import _ComfyNodeInternal

    def node_info(name, cls):
        if issubclass(cls, _ComfyNodeInternal):
            return cls.GET_NODE_INFO_V1()
        input_types = cls.INPUT_TYPES()
        info = {"input": input_types, "input_order": {key: list(value) for key, value in input_types.items()},
                "output": cls.RETURN_TYPES,
                "output_is_list": getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES)),
                "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES), "name": name,
                "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
                "description": getattr(cls, "DESCRIPTION", ""),
                "python_module": getattr(cls, "RELATIVE_PYTHON_MODULE", "nodes"),
                "category": getattr(cls, "CATEGORY", "sd"), "output_node": getattr(cls, "OUTPUT_NODE", False) is True}
        for attr, key in (("OUTPUT_TOOLTIPS", "output_tooltips"), ("API_NODE", "api_node")):
            if hasattr(cls, attr):
                info[key] = getattr(cls, attr)
        for attr in ("DEPRECATED", "EXPERIMENTAL"):
            if getattr(cls, attr, False):
                info[attr.lower()] = True
        return info

    out = {}
    with folder_paths.cache_helper:
        for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
            try:
                out[name] = node_info(name, cls)
            except Exception:                                # the server logs and skips such a node, too
                logging.exception("object_info: node %s skipped", name)
    return json.loads(json.dumps(out, default=str))          # the JSON round trip the HTTP answer takes


# ---------------------------------------------------------------- HTTP client

def request(base_url: str, path: str, payload=None, timeout: float = 30.0, raw: bool = False):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(base_url.rstrip("/") + path, data=data,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as err:
        raise WorkflowError(f"{req.get_method()} {path}: HTTP {err.code}: {err.read().decode(errors='replace')}")
    return body if raw else json.loads(body)


def object_info(base_url: str) -> dict:
    return request(base_url, "/object_info")


def wait_for_server(base_url: str, timeout: float = 120.0, alive=lambda: True) -> dict:
    """Poll /object_info until the server answers; `alive()` returning False (dead process) stops early."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return object_info(base_url)
        except (OSError, WorkflowError):
            if not alive() or time.monotonic() > deadline:
                raise TimeoutError(f"no ComfyUI server answered at {base_url}")
            time.sleep(0.5)


def queue_and_wait(base_url: str, api_prompt: dict, timeout: float = 300.0, *, ui_workflow: dict | None = None) -> dict:
    """POST /prompt, poll GET /history/{id}; the history entry of a successful run, else WorkflowError."""
    payload = {"prompt": api_prompt, "client_id": uuid.uuid4().hex}
    if ui_workflow is not None:                            # embedded in the PNGs, so they reopen in the editor
        payload["extra_data"] = {"extra_pnginfo": {"workflow": ui_workflow}}
    prompt_id = request(base_url, "/prompt", payload)["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = request(base_url, f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            if entry["status"].get("status_str") != "success":
                errors = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
                raise WorkflowError(f"prompt {prompt_id} failed: {json.dumps(errors or entry['status'])[:2000]}")
            return entry
        time.sleep(0.2)
    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")


def output_images(entry: dict) -> list[dict]:
    """{filename, subfolder, type} of every image a history entry's output nodes reported."""
    return [img for out in entry.get("outputs", {}).values() for img in out.get("images", [])]


def download(base_url: str, image: dict, dest: Path) -> Path:
    query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
    dest.write_bytes(request(base_url, f"/view?{query}", raw=True))
    return dest


# ---------------------------------------------------------------- CLI

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("run", "convert", "wait"):
        p = sub.add_parser(name)
        p.add_argument("--server", default="http://127.0.0.1:8188")
        if name == "wait":
            p.add_argument("--timeout", type=float, default=180.0)
            p.add_argument("--pid", type=int, help="give up early when this (server) process has exited")
            continue
        p.add_argument("workflows", nargs="+", type=Path)
        if name == "run":
            p.add_argument("--out", type=Path, required=True, help="folder for the images")
            p.add_argument("--timeout", type=float, default=300.0, help="seconds per workflow")
    args = parser.parse_args(argv)
    if args.cmd == "wait":
        try:
            wait_for_server(args.server, args.timeout, alive=lambda: args.pid is None or _alive(args.pid))
        except TimeoutError as err:
            print(err, file=sys.stderr)
            return 1
        print(f"server up at {args.server}")
        return 0
    info = object_info(args.server)
    failed = 0
    for path in args.workflows:
        ui = json.loads(path.read_text(encoding="utf-8"))
        if args.cmd == "convert":
            print(json.dumps(ui_to_api(ui, info), indent=2))
            continue
        try:
            entry = queue_and_wait(args.server, ui_to_api(ui, info), args.timeout, ui_workflow=ui)
        except (WorkflowError, TimeoutError) as err:
            print(f"FAILED {path}: {err}", file=sys.stderr)
            failed += 1
            continue
        folder = args.out / path.stem
        folder.mkdir(parents=True, exist_ok=True)
        images = output_images(entry)
        for img in images:
            download(args.server, img, folder / Path(img["filename"]).name)
        print(f"ok {path}: {len(images)} image(s) in {folder}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
