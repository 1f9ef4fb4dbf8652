"""A minimal W3C WebDriver client over chromedriver's HTTP API (no selenium needed), for the review page test."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROME_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def chromedriver_binary() -> str | None:
    return shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Browser:
    def __init__(self, base: str, session: str) -> None:
        self.base = base
        self.session = session

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = f"{self.base}/session/{self.session}{path}"
        data = json.dumps(body if body is not None else {}).encode() if method == "POST" else None
        req = urllib.request.Request(
            url, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"webdriver {method} {path}: {e.read().decode()[:500]}") from None

    def get(self, url: str) -> None:
        self.call("POST", "/url", {"url": url})

    def js(self, script: str, *args: Any) -> Any:
        return self.call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css: str) -> str:
        el = self.call("POST", "/element", {"using": "css selector", "value": css})
        if not isinstance(el, dict) or not (ELEMENT_KEY in el or "ELEMENT" in el):
            raise RuntimeError(f"webdriver: no element for {css!r}: {el!r}")
        return str(el.get(ELEMENT_KEY, el.get("ELEMENT")))

    def click(self, css: str) -> None:
        """A real pointer click, after centring the element (the page header is sticky)."""
        el = self.find(css)
        self.js("arguments[0].scrollIntoView({block: 'center'});", {ELEMENT_KEY: el})
        self.call("POST", f"/element/{el}/click")

    def cdp(self, cmd: str, params: dict[str, Any]) -> Any:
        return self.call("POST", "/goog/cdp/execute", {"cmd": cmd, "params": params})

    def console(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.call("POST", "/se/log", {"type": "browser"})
        return out


@contextlib.contextmanager
def browser(profile_dir: Path) -> Iterator[Browser]:
    chrome, driver = chromium_binary(), chromedriver_binary()
    assert chrome and driver
    port = _free_port()
    proc = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{base}/status", timeout=2) as r:
                    if json.loads(r.read())["value"]["ready"]:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.time() > deadline:
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.1)
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": chrome,
                        "args": [*CHROME_FLAGS, f"--user-data-dir={profile_dir}"],
                    },
                    "goog:loggingPrefs": {"browser": "ALL"},
                }
            }
        }
        req = urllib.request.Request(
            f"{base}/session", data=json.dumps(caps).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                session = json.loads(r.read())["value"]["sessionId"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"cannot start a chromium session: {e.read().decode()[:500]}") from None
        b = Browser(base, session)
        try:
            yield b
        finally:
            with contextlib.suppress(Exception):
                b.call("DELETE", "")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
