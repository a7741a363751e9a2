"""A minimal Chrome DevTools Protocol client: Debian's headless Chromium, driven over its DevTools websocket with
aiohttp (a ComfyUI dependency), kept off the network by its flags. Enough to open a page, evaluate JavaScript,
collect console errors and uncaught exceptions, and take screenshots."""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

# flags that keep Chromium quiet on a closed network (no background fetches, no component or sync updates)
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-extensions", "--disable-default-apps", "--mute-audio",
         "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider",
         "--window-size=1920,1200", "--remote-debugging-port=0", "--remote-allow-origins=*")


def find_chromium() -> str | None:
    """$GL_CHROMIUM, else the first chromium/chrome on PATH."""
    for name in (os.environ.get("GL_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


class Browser:
    """A headless Chromium process with a fresh profile; `ws_url` is its browser-level DevTools endpoint."""

    def __init__(self, executable: str, timeout: float = 60.0):
        self.profile = tempfile.mkdtemp(prefix="gl-chromium-")
        self.log_path = Path(self.profile) / "chromium.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_path.read_text(errors="replace")
            if m := re.search(r"DevTools listening on (ws://\S+)", text):
                self.ws_url = m.group(1)
                self.http = "http://" + self.ws_url.split("/")[2]
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"Chromium did not start (exit code {self.proc.poll()}):\n{text[-3000:]}")
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One tab over a websocket session. Console errors, uncaught exceptions and failed loads land in
    `self.errors` as (kind, text) pairs."""

    def __init__(self, ws, session: aiohttp.ClientSession):
        self.ws = ws
        self._session = session
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._events: list[dict] = []
        self.errors: list[tuple[str, str]] = []
        self.console: list[tuple[str, str]] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, browser: Browser) -> "Page":
        session = aiohttp.ClientSession()
        async with session.put(f"{browser.http}/json/new?about:blank") as resp:
            target = await resp.json(content_type=None)
        ws = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        page = cls(ws, session)
        page.target_id = target["id"]
        page.browser_http = browser.http
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        return page

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.consoleAPICalled":
                text = " ".join(_arg_text(a) for a in params.get("args", []))
                self.console.append((params.get("type"), text))
                if params.get("type") in ("error", "assert"):
                    self.errors.append(("console.error", text))
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                text = details.get("exception", {}).get("description") or details.get("text", "")
                self.errors.append(("exception", text))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                self.errors.append((f"log.{entry.get('source')}", f"{entry.get('text')} {entry.get('url', '')}"))
            self._events.append(data)

    async def send(self, method: str, params: dict | None = None, timeout: float = 60.0) -> dict:
        msg_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        reply = await asyncio.wait_for(future, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def evaluate(self, expression: str, timeout: float = 60.0):
        """The value of a JavaScript expression (promises awaited); a thrown error becomes a RuntimeError."""
        result = await self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                      "returnByValue": True}, timeout=timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description") or details.get("text"))
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0, interval: float = 0.2):
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = await self.evaluate(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for: {expression}")
            await asyncio.sleep(interval)

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})

    async def screenshot(self, path: Path) -> Path:
        data = await self.send("Page.captureScreenshot", {"format": "png"})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    async def close(self) -> None:
        self._reader.cancel()
        await self.ws.close()
        try:
            async with self._session.get(f"{self.browser_http}/json/close/{self.target_id}") as resp:
                await resp.read()
        finally:
            await self._session.close()


def _arg_text(arg: dict) -> str:
    if "value" in arg:
        return str(arg["value"])
    return arg.get("description") or arg.get("type", "")
