"""A headless Chromium driven through the DevTools protocol, for the live inbox's browser test.

Debian's `chromium` (apt-get install chromium) started with a fresh profile and
`--remote-debugging-port=0`; the port it chose is read from the profile's `DevToolsActivePort`,
and the page is driven over its WebSocket (aiohttp's client): `Page.navigate`,
`Runtime.evaluate`. No WebDriver, no Playwright download: only what the distribution ships.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
)


def chromium_binary() -> str | None:
    """The Chromium executable on PATH (Debian: `chromium`), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class BrowserError(RuntimeError):
    """The browser did not start, or a DevTools call failed."""


class HeadlessChromium:
    """One browser with one page; every call blocks until the DevTools answer."""

    def __init__(self, binary: str | None = None, start_timeout_s: float = 30.0) -> None:
        found = binary or chromium_binary()
        if found is None:
            raise BrowserError("no chromium on PATH (apt-get install chromium)")
        self._profile = Path(tempfile.mkdtemp(prefix="fanfare-chromium-"))
        self.proc = subprocess.Popen(
            [found, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        try:
            port = self._port(start_timeout_s)
            self._run(self._connect(port))
        except BaseException:
            self.close()
            raise

    def _port(self, timeout_s: float) -> int:
        marker = self._profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self.proc.returncode}")
            try:
                return int(marker.read_text().splitlines()[0])
            except (OSError, ValueError, IndexError):
                time.sleep(0.05)
        raise BrowserError(f"chromium did not open its DevTools port within {timeout_s} s")

    def _run(self, coro: Any, timeout_s: float = 30.0) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout_s)

    async def _connect(self, port: int) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await self._call("Page.enable", {})
        await self._call("Runtime.enable", {})

    async def _read(self) -> None:
        async for message in self._ws:
            doc = json.loads(message.data)
            waiter = self._pending.pop(doc.get("id", -1), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(doc)

    async def _call(self, method: str, params: dict[str, Any]) -> Any:
        call_id = next(self._ids)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = waiter
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        doc = await waiter
        if "error" in doc:
            raise BrowserError(f"{method}: {doc['error']}")
        return doc.get("result", {})

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """One DevTools command; its result."""
        return self._run(self._call(method, params or {}))

    def navigate(self, url: str) -> None:
        """Open a URL and wait until its document is complete."""
        self.call("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", 30)

    def evaluate(self, expression: str) -> Any:
        """A JavaScript expression's value in the page."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float, every_s: float = 0.01) -> Any:
        """Poll until the expression is truthy; its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout_s} s waiting for {expression}")
            time.sleep(every_s)

    def close(self) -> None:
        """Stop the browser and remove its profile."""

        async def shut() -> None:
            if getattr(self, "_ws", None) is not None:
                await self._ws.close()
            if getattr(self, "_session", None) is not None:
                await self._session.close()

        with contextlib.suppress(Exception):  # the browser may be gone already
            self._run(shut(), 5)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
