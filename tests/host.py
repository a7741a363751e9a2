"""The real ComfyUI host for the tests: imported in-process on CPU, with the pack loaded by its own loader.

ComfyUI root: $GL_COMFYUI_ROOT, else $COMFYUI_PATH, else the copy scripts/setup.sh installs.
"""
from __future__ import annotations

import asyncio
import atexit
import importlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]
PACK_FOLDER = "guidance_lab"
DEFAULT_ROOT = Path(os.environ.get("GL_HOME", Path.home() / ".cache" / "guidance-lab")) / "comfyui-0.3.75"


def comfy_root() -> Path:
    root = os.environ.get("GL_COMFYUI_ROOT") or os.environ.get("COMFYUI_PATH") or str(DEFAULT_ROOT)
    root = Path(root).resolve()
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        raise RuntimeError(f"no ComfyUI at {root}; run scripts/setup.sh or set COMFYUI_PATH")
    return root


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


class Host:
    """What booting the host produced: the pack's module name and the load log."""

    def __init__(self, module_name: str, log_lines: list[str], workdir: Path):
        self.module_name = module_name
        self.log_lines = log_lines
        self.workdir = workdir

    def pack(self, dotted: str):
        """A submodule of the loaded pack, e.g. host.pack('guiders.apg')."""
        return importlib.import_module(f"{self.module_name}.{dotted}")

    def import_errors(self) -> list[str]:
        keys = ("IMPORT FAILED", "Cannot import", "Error while calling comfy_entrypoint")
        return [line for line in self.log_lines if any(k in line for k in keys) and PACK_FOLDER in line]


_HOST: Host | None = None


def boot() -> Host:
    """Import ComfyUI (CPU), load core extras and the pack through nodes.init_extra_nodes; idempotent."""
    global _HOST
    if _HOST is not None:
        return _HOST
    root = comfy_root()
    sys.path.insert(0, str(root))
    import utils.extra_config  # noqa: F401  (as main.py does, before nodes.py puts comfy/ on sys.path)
    from comfy.cli_args import args
    args.cpu = os.environ.get("GL_TEST_DEVICE", "cpu") == "cpu"
    args.disable_api_nodes = True
    import torch
    # tiny models gain nothing from threads, and on a 2-core machine a busy neighbour makes 2 threads stall
    torch.set_num_threads(int(os.environ.get("GL_TEST_THREADS", "1")))
    workdir = Path(tempfile.mkdtemp(prefix="gl-host-"))
    # the scratch input/output/temp folders (images a test saved) go when the interpreter exits: every test run,
    # bench and demo evaluation boots once, and 14 MB a run left in the temp folder add up
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    custom = workdir / "custom_nodes"
    custom.mkdir()
    (custom / PACK_FOLDER).symlink_to(PACK_DIR, target_is_directory=True)
    import folder_paths
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom)], set())
    for sub in ("output", "temp", "input"):
        (workdir / sub).mkdir()
    folder_paths.set_output_directory(str(workdir / "output"))
    folder_paths.set_temp_directory(str(workdir / "temp"))
    folder_paths.set_input_directory(str(workdir / "input"))
    handler = _Collect()
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    try:
        import nodes
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    finally:
        logging.getLogger().removeHandler(handler)
    module_name = str(custom / PACK_FOLDER).replace(".", "_x_")
    if module_name not in sys.modules:
        raise RuntimeError("the pack was not imported by ComfyUI's loader:\n" + "\n".join(handler.lines[-30:]))
    _HOST = Host(module_name, handler.lines, workdir)
    return _HOST


class ServerStub:
    """The minimal stand-in for PromptServer that execution.PromptExecutor needs to run a prompt in-process."""
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


def new_executor():
    """A PromptExecutor without output caching (each run executes every node), as the tests and bench use."""
    import execution
    return execution.PromptExecutor(ServerStub(), cache_type=execution.CacheType.CLASSIC,
                                    cache_args={"lru": 0, "ram": 0})
