"""A headless Chromium driven over the DevTools protocol, for the UI tests (no Selenium, no
Playwright download: Debian's ``chromium`` and a websocket).

:class:`Browser` starts ``chromium --headless=new`` on a free loopback port with a throwaway
profile, talks to its page over the protocol's websocket, and stops it. Every wait is on a
condition evaluated in the page (:meth:`Browser.wait`), never a fixed sleep.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

#: How long a page may take to show what a test waits for (MLflow's UI loads ~3 MB of JS).
PAGE_WAIT = 90.0


def chromium_path() -> str | None:
    """Debian's ``chromium`` (``.ci/run`` installs it), or another Chromium on PATH."""
    return next(
        (path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))),
        None,
    )


class Browser:
    """One headless Chromium page: navigate, evaluate, wait on conditions, click, screenshot."""

    def __init__(self, executable: str, width: int = 2200, height: int = 1100) -> None:
        import websocket

        self.profile = tempfile.mkdtemp(prefix="research-chromium-")
        # Port 0: Chromium picks a free one and writes it in the profile (no race with another
        # process picking the same); /dev/shm may be small in a container.
        self.process = subprocess.Popen(
            [
                executable, "--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions",
                "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
                f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            page = self._page()
            self.socket = websocket.create_connection(
                page["webSocketDebuggerUrl"], timeout=PAGE_WAIT, suppress_origin=True
            )
        except BaseException:
            self._stop()
            raise
        self.ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Runtime.enable")

    def _page(self) -> dict[str, Any]:
        """The first page target, once Chromium has written its port and the protocol's HTTP
        endpoint answers."""
        deadline = time.monotonic() + 30
        active = Path(self.profile) / "DevToolsActivePort"
        while True:
            try:
                port = int(active.read_text().split()[0])
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2) as r:
                    return next(t for t in json.loads(r.read()) if t["type"] == "page")
            except (OSError, StopIteration, ValueError, IndexError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("chromium did not open its DevTools port") from None
                time.sleep(0.1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One protocol command; its result (events in between are dropped)."""
        number = next(self.ids)
        self.socket.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == number:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        """A JavaScript expression's value in the page (promises awaited)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, what: str, timeout: float = PAGE_WAIT) -> Any:
        """Polls ``expression`` until it is truthy; its value. TimeoutError names ``what``,
        with the page's address and the start of its text."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText.slice(0, 600) : ''")
                where = self.evaluate("location.href")
                raise TimeoutError(f"{what}: not after {timeout:.0f} s at {where}\n{text}")
            time.sleep(0.2)

    def open(self, url: str) -> None:
        """Loads ``url`` as a new document (through about:blank: two addresses that differ only
        after ``#`` would otherwise share one page, and the last one's content)."""
        self.call("Page.navigate", url="about:blank")
        self.wait("location.href === 'about:blank'", "about:blank")
        self.call("Page.navigate", url=url)
        self.wait("location.href !== 'about:blank'", f"navigating to {url}")

    def reload(self) -> None:
        """Reloads the page and waits for the new document (a marker left in the old one is
        gone), so that nothing is read from the page being replaced."""
        self.evaluate("window.__researchOldPage = true")
        self.call("Page.reload")
        self.wait("!window.__researchOldPage && document.readyState === 'complete'", "the reload")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''")

    def click_text(self, text: str, selector: str = "a, button, label, span") -> bool:
        """Clicks the first element of ``selector`` whose visible text is ``text``, once there
        is one (TimeoutError if none comes); True."""
        script = (
            f"(() => {{ const e = Array.from(document.querySelectorAll({json.dumps(selector)}))"
            f".find(e => e.innerText && e.innerText.trim() === {json.dumps(text)});"
            " if (!e) return false; e.click(); return true; })()"
        )
        return bool(self.wait(script, f"an element ({selector}) reading {text!r} to click"))

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            self._stop()

    def _stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
