"""A real headless ComfyUI server (main.py --cpu on a loopback port) with the pack installed, for the tests that
meet the pack where users do: over HTTP (tests/workflows/test_server.py), in the web UI (tests/webui/) and in long
runs (tests/soak/)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import host as host_module
import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(base: Path, *, wa, timeout: float = 240.0, threads: int = 1, pack: bool = True):
    """Start ComfyUI with `base` as its base directory (custom_nodes/ holds a link to this checkout) and yield
    SimpleNamespace(url, info (GET /object_info), base, proc, log()); the server is stopped on exit. With
    pack=False the pack is left out (a plain ComfyUI, the baseline of the web UI check).

    `wa` is scripts/workflow_api.py (loaded by the caller). Raises RuntimeError with the log's tail when the server
    does not come up."""
    root = host_module.comfy_root()
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / host_module.PACK_FOLDER
    if pack and not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    port = free_port()
    log_path = base / "server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", "--disable-api-nodes", "--base-directory", str(base),
           "--database-url", "sqlite:///:memory:"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}    # tiny models; avoids OpenMP stalls on a busy machine
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"

    def read_log() -> str:
        return log_path.read_text(encoding="utf-8", errors="replace")
    try:
        try:
            info = wa.wait_for_server(url, timeout=timeout, alive=lambda: proc.poll() is None)
        except TimeoutError:
            raise RuntimeError(f"server did not come up (exit code {proc.poll()}):\n{read_log()[-4000:]}") from None
        yield SimpleNamespace(url=url, port=port, info=info, base=base, proc=proc, log=read_log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def module_server(prefix: str, *, wa, **options):
    """A module-scoped pytest fixture yielding serve()'s server (base directory under pytest's tmp path); a server
    that does not come up fails the tests that use it, with the log's tail."""
    @pytest.fixture(scope="module")
    def server(tmp_path_factory):
        try:
            with serve(tmp_path_factory.mktemp(prefix), wa=wa, **options) as srv:
                yield srv
        except RuntimeError as exc:
            pytest.fail(str(exc))
    return server
