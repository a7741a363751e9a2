"""Write UI-format example workflows from a compact description (a maintainer tool for workflows/*.json).

    python scripts/workflow_build.py SPEC.py [SPEC.py ...]

A SPEC file is Python data (read with ast.literal_eval, never executed) of the form

    {"file": "workflows/fkc.json",
     "nodes": [
        {"id": 1, "type": "GL_TinyTestModel", "widgets": {"architecture": "sd15_eps", "seed": 0}},
        {"id": 2, "type": "SamplerCustomAdvanced", "links": {"noise": [3, 0], "guider": [4, 0]}},
        {"id": 9, "type": "MarkdownNote", "text": "## ..."}]}

Input order, widget positions (with the editor's "control_after_generate" extras), input and output types come
from the node schemas of the installed ComfyUI and pack (object_info in-process), so a built file loads in the
editor as if it had been saved there; missing widgets get their schema default. Nodes are laid out left to right
in id order.
"""
from __future__ import annotations

import ast
import json
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))


def _default(type_, opts):
    if "default" in opts:
        return opts["default"]
    if isinstance(type_, list):
        return type_[0] if type_ else None
    if type_ == "COMBO":
        return (opts.get("options") or [None])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(type_)


def build(spec: dict, object_info: dict) -> dict:
    import workflow_api as wa
    nodes, links, link_id = [], [], 0
    by_id = {n["id"]: n for n in spec["nodes"]}
    pending = []
    for order, n in enumerate(spec["nodes"]):
        x = 40 + 360 * (order % 4)
        y = 60 + 320 * (order // 4)
        if n["type"] in ("MarkdownNote", "Note"):
            nodes.append({"id": n["id"], "type": n["type"], "pos": [x, y], "size": [420, 260], "flags": {},
                          "order": order, "mode": 0, "inputs": [], "outputs": [], "properties": {},
                          "widgets_values": [n["text"]], "color": "#432", "bgcolor": "#653"})
            continue
        info = object_info[n["type"]]
        ui_inputs, values = [], []
        for name, type_, opts in wa.input_specs(info):
            widget = wa.is_widget(type_, opts)
            entry = {"name": name, "type": "COMBO" if isinstance(type_, list) else type_, "link": None}
            if name in n.get("links", {}):
                link_id += 1
                src, slot = n["links"][name]
                pending.append((link_id, src, slot, n["id"], len(ui_inputs), entry["type"]))
                entry["link"] = link_id
            if widget:
                entry["widget"] = {"name": name}
                values.append(n.get("widgets", {}).get(name, _default(type_, opts)))
                extras = wa.widget_extras(name, type_, opts)
                if extras:
                    values.append("fixed")
                    if extras == 2:
                        values.append("")
            elif entry["link"] is None and name not in (info.get("input", {}).get("optional") or {}):
                raise ValueError(f"node {n['id']} ({n['type']}): required input {name!r} is not linked")
            ui_inputs.append(entry)
        unknown = set(n.get("widgets", {})) - {e["name"] for e in ui_inputs}
        if unknown:
            raise ValueError(f"node {n['id']} ({n['type']}): unknown widgets {sorted(unknown)}")
        outs = [{"name": oname, "type": otype, "links": [], "slot_index": i}
                for i, (oname, otype) in enumerate(zip(info.get("output_name") or info["output"], info["output"]))]
        nodes.append({"id": n["id"], "type": n["type"], "pos": [x, y], "size": [320, 160], "flags": {},
                      "order": order, "mode": 0, "inputs": ui_inputs, "outputs": outs,
                      "properties": {"Node name for S&R": n["type"]}, "widgets_values": values})
    node_of = {n["id"]: n for n in nodes}
    for lid, src, slot, dst, dst_slot, type_ in pending:
        if src not in by_id:
            raise ValueError(f"link from unknown node {src}")
        out = node_of[src]["outputs"][slot]
        out["links"].append(lid)
        links.append([lid, src, slot, dst, dst_slot, out["type"] if type_ == "*" else type_])
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, spec["file"])), "revision": 0,
            "last_node_id": max(n["id"] for n in nodes), "last_link_id": link_id, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    import host
    import workflow_api as wa
    host.boot()
    info = wa.object_info_in_process()
    for path in argv:
        spec = ast.literal_eval(Path(path).read_text(encoding="utf-8"))
        out = REPO / spec["file"]
        out.write_text(json.dumps(build(spec, info), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
