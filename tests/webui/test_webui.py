"""Every example workflow opened in the real web UI: ComfyUI's own frontend package served by a headless server,
driven in headless Chromium over the DevTools protocol. Each workflow loads with no missing-node dialog, no other
dialog, no console error and no uncaught exception; every node gets its schema (widgets and sockets as saved); the
prompt the frontend builds from it is the one scripts/workflow_api.py builds (so what the headless tests run is
what the Queue button sends); and a screenshot per workflow is kept as a test artifact
($GL_ARTIFACTS/webui, default test-artifacts/webui/).

Needs Chromium (Debian's `chromium`; $GL_CHROMIUM names another binary). Without it the module is skipped, unless
GL_REQUIRE_WEBUI=1 (set by .ci/run, which installs Chromium), where its absence fails."""
from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
import serverutil
from cdp import Browser, Page, find_chromium

from test_workflows import REPO, WORKFLOWS, wa

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.webui]
ARTIFACTS = Path(os.environ.get("GL_ARTIFACTS", REPO / "test-artifacts")) / "webui"



@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


server = serverutil.module_server("comfy-webui", wa=wa)


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        message = ("no Chromium found (install Debian's `chromium`, or set GL_CHROMIUM to a Chromium/Chrome binary); "
                   "the web UI check needs it")
        if os.environ.get("GL_REQUIRE_WEBUI") == "1":
            pytest.fail(message)
        pytest.skip(message)
    b = Browser(executable)
    yield b
    b.close()


# The server runs with --disable-api-nodes, whose Content-Security-Policy (connect-src 'self') blocks every request
# the page makes off the machine. On loading a workflow the frontend asks the Comfy Registry (api.comfy.org) which
# pack each node type comes from, for core nodes too; those refusals are logged as security errors. They are the
# policy doing its job, not an error of the pack, and are the only entries set aside.
def _refused_registry_lookup(kind: str, text: str) -> bool:
    return (kind == "log.security" and text.startswith("Connecting to 'https://api.comfy.org/")
            and "Content Security Policy" in text)


# a fresh user: the first-run template browser would cover the canvas; the missing-node warning stays on; nodes
# keep their text when a large graph is zoomed out to fit the screenshot
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingNodesWarning": True,
            "LiteGraph.Canvas.MinFontSizeForLOD": 0}


async def _boot(browser, server, ready: str) -> Page:
    for key, value in SETTINGS.items():
        wa.request(server.url, f"/settings/{key}", value, raw=True)
    p = await Page.open(browser)
    await p.navigate(server.url)
    await p.wait_for(f"!!(window.app && window.app.graph && window.LiteGraph && ({ready}))", timeout=180)
    await p.wait_for("document.readyState === 'complete'", timeout=60)
    await asyncio.sleep(2.0)
    return p


def _normalised(errors, server) -> list[tuple[str, str]]:
    """(kind, first line) with the server's address replaced, so two servers' errors compare."""
    host = server.url.split("//", 1)[1]
    return sorted({(kind, text.splitlines()[0].replace(host, "SERVER") if text else "") for kind, text in errors})


@pytest.fixture(scope="module")
def baseline(loop, browser, tmp_path_factory):
    """What the same frontend logs when booted by a plain ComfyUI without the pack (the pack must add nothing)."""
    try:
        with serverutil.serve(tmp_path_factory.mktemp("comfy-plain"), wa=wa, pack=False) as plain:
            p = loop.run_until_complete(_boot(browser, plain, "true"))
            loop.run_until_complete(p.screenshot(ARTIFACTS / "_boot_without_pack.png"))
            errors = _normalised(p.errors, plain)
            loop.run_until_complete(p.close())
    except RuntimeError as exc:
        pytest.fail(str(exc))
    return errors


@pytest.fixture(scope="module")
def page(loop, server, browser, baseline):
    """The frontend, booted once: the app object exists and the pack's node definitions are registered."""
    p = loop.run_until_complete(_boot(browser, server, "window.LiteGraph.registered_node_types['GL_APG']"))
    yield p
    loop.run_until_complete(p.close())


def test_frontend_boots_without_errors(page, loop, server, baseline):
    """The pack adds no console error, exception or failed request to the frontend's boot (a fresh user's boot
    logs a few of its own — probes of optional user files — which the baseline without the pack logs too)."""
    loop.run_until_complete(page.screenshot(ARTIFACTS / "_boot.png"))
    added = [e for e in _normalised(page.errors, server) if e not in baseline]
    assert not added, "\n".join(f"{k}: {t}" for k, t in added)
    registered = loop.run_until_complete(page.evaluate(
        "Object.keys(window.LiteGraph.registered_node_types).filter(t => t.startsWith('GL_')).sort()"))
    assert registered == sorted(_pack_nodes())


def _pack_nodes() -> list[str]:
    ids = []
    for path in sorted((REPO / "nodes").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        ids += [line.split('node_id="', 1)[1].split('"', 1)[0] for line in text.splitlines() if 'node_id="GL_' in line]
    return ids


LOAD_JS = """
(async () => {
  const wf = %s;
  await window.app.loadGraphData(wf, true, true, %s);
  await new Promise(r => setTimeout(r, 400));
  const visible = el => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
  const dialogs = [...document.querySelectorAll('.p-dialog, [role=dialog]')].filter(visible)
      .map(d => d.innerText.slice(0, 400));
  const nodes = window.app.graph.nodes ?? window.app.graph._nodes;
  const registered = window.LiteGraph.registered_node_types;
  return {
    dialogs,
    count: nodes.length,
    missing: nodes.filter(n => !(n.type in registered)).map(n => n.type),
    errors: nodes.filter(n => n.has_errors).map(n => n.type),
    widgets: Object.fromEntries(nodes.map(n => [String(n.id), (n.widgets ?? []).map(w => w.name)])),
    inputs: Object.fromEntries(nodes.map(n => [String(n.id), (n.inputs ?? []).map(i => [i.name, i.link ?? null])])),
    prompt: (await window.app.graphToPrompt()).output,
  };
})()
"""
# zoom to the whole graph for the screenshot (after the checks above, so a dialog would still have been seen)
FIT_JS = """
(async () => {
  try { await window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); } catch (e) { return false; }
  await new Promise(r => setTimeout(r, 300));
  return true;
})()
"""
CLOSE_DIALOGS_JS = """
(async () => {
  const buttons = document.querySelectorAll('.p-dialog .p-dialog-close-button, .p-dialog [aria-label=Close]');
  for (const b of buttons) b.click();
  await new Promise(r => setTimeout(r, 300));
  return document.querySelectorAll('.p-dialog').length;
})()
"""


def _load(page, loop, ui: dict, name: str) -> dict:
    page.errors.clear()
    return loop.run_until_complete(page.evaluate(LOAD_JS % (json.dumps(ui), json.dumps(name)), timeout=120))


def test_the_check_sees_a_missing_node(page, loop):
    """The check can fail: a workflow with a node type nobody registers raises the frontend's missing-node dialog,
    and the test's probes report both."""
    ui = json.loads((REPO / "workflows" / "apg.json").read_text(encoding="utf-8"))
    node = next(n for n in ui["nodes"] if n["type"] == "GL_APG")
    node["type"] = "GL_NoSuchNode"
    result = _load(page, loop, ui, "missing_node_probe.json")
    loop.run_until_complete(page.screenshot(ARTIFACTS / "_missing_node_probe.png"))
    assert result["missing"] == ["GL_NoSuchNode"]
    assert any("GL_NoSuchNode" in text for text in result["dialogs"]), result["dialogs"]
    assert loop.run_until_complete(page.evaluate(CLOSE_DIALOGS_JS)) == 0


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_opens_in_the_web_ui(page, loop, server, path):
    ui = json.loads(path.read_text(encoding="utf-8"))
    result = _load(page, loop, ui, path.name)
    loop.run_until_complete(page.evaluate(FIT_JS))
    loop.run_until_complete(page.screenshot(ARTIFACTS / f"{path.stem}.png"))

    assert not result["missing"], f"{path.name}: nodes the web UI does not know: {result['missing']}"
    assert not result["dialogs"], f"{path.name}: the web UI opened a dialog:\n" + "\n---\n".join(result["dialogs"])
    errors = [(k, t) for k, t in page.errors if not _refused_registry_lookup(k, t)]
    assert not errors, f"{path.name}:\n" + "\n".join(f"{k}: {t}" for k, t in errors)
    assert result["count"] == len(ui["nodes"])
    assert not result["errors"], f"{path.name}: nodes flagged with errors: {result['errors']}"

    # the frontend's own conversion (what the Queue button sends) equals the one the headless tests run, over the
    # inputs the server reads (frontend-only display widgets, such as PreviewAny's `preview`, are sent too and
    # ignored by the server)
    def declared(prompt):
        out = {}
        for key, node in prompt.items():
            spec = server.info[node["class_type"]]["input"]
            names = {n for part in ("required", "optional") for n in spec.get(part, {})}
            out[key] = (node["class_type"], {k: v for k, v in node["inputs"].items() if k in names})
        return out
    assert declared(result["prompt"]) == declared(wa.ui_to_api(ui, server.info))


def test_queue_button_runs_a_workflow(page, loop, server):
    """What the Run button does (app.queuePrompt) reaches the server and the prompt runs to its saved images."""
    ui = json.loads((REPO / "workflows" / "apg.json").read_text(encoding="utf-8"))
    before = set(wa.request(server.url, "/history"))
    _load(page, loop, ui, "apg.json")
    loop.run_until_complete(page.evaluate("window.app.queuePrompt(0, 1)"))
    deadline = time.monotonic() + 180
    while not (new := set(wa.request(server.url, "/history")) - before):
        assert time.monotonic() < deadline, "the queued prompt did not finish"
        time.sleep(0.5)
    entry = wa.request(server.url, "/history")[new.pop()]
    assert entry["status"]["status_str"] == "success"
    assert [img for img in wa.output_images(entry) if img["type"] == "output"]
    errors = [(k, t) for k, t in page.errors if not _refused_registry_lookup(k, t)]
    assert not errors, "\n".join(f"{k}: {t}" for k, t in errors)
