"""Load an HTML report in headless Chromium with networking off, and check that it rendered.

Chromium is driven over the DevTools protocol through ``--remote-debugging-pipe`` (JSON
messages on file descriptors 3 and 4): standard library only, no port is opened. The check
records console errors, uncaught exceptions, error log entries (a CSP violation or a failed
load lands there), every request for something other than ``file:``/``data:``/``blob:``, and
JavaScript dialogs (``alert`` is trapped); then it counts the plotly figures that drew
(``.js-plotly-plot`` holding a ``.main-svg``) and the circuitsvis views that rendered
(``.cv-root`` elements with content), compares them with the counts the report declares on
``<body data-figures data-views>``, and takes a full-page screenshot.

Networking is off three ways: the flags below (no background, component or sync traffic, QUIC
off), ``--proxy-server=127.0.0.1:9`` (any http(s) request fails), and the report's own
Content-Security-Policy.

``python -m retrieval_heads.views.browser REPORT.html [--screenshot OUT.png]`` prints the check
as JSON and exits 1 when it fails; ``--sample DIR`` first writes sample results and a report.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["find_chromium", "PageCheck", "check_page", "CHROMIUM_FLAGS", "BrowserError"]

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--metrics-recording-only",
    "--mute-audio",
    "--hide-scrollbars",
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
)
_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome-error:", "devtools:")
_TRAP = """
window.__dialogs = [];
for (const name of ["alert", "confirm", "prompt"]) {
  window[name] = function (message) { window.__dialogs.push(name + ": " + String(message)); };
}
"""
_PROBE = """JSON.stringify({
  ready: document.readyState,
  figures: Array.from(document.querySelectorAll(".js-plotly-plot"))
    .filter(el => el.querySelector(".main-svg")).length,
  plotly_roots: document.querySelectorAll(".plotly-graph-div").length,
  views: Array.from(document.querySelectorAll(".cv-root"))
    .filter(el => el.childElementCount > 0).length,
  view_roots: document.querySelectorAll(".cv-root").length,
  expected_figures: Number(document.body && document.body.dataset.figures),
  expected_views: Number(document.body && document.body.dataset.views),
  scripts: document.scripts.length,
  bare_alert_scripts: Array.from(document.scripts)
    .filter(s => /^\\s*alert\\(/.test(s.textContent)).length,
  dialogs: window.__dialogs || [],
  height: document.documentElement.scrollHeight,
  title: document.title
})"""


class BrowserError(RuntimeError):
    """Chromium could not be started or stopped answering."""


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable: ``$CHROMIUM`` if set, else the first on ``PATH``."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if Path(env).exists() or shutil.which(env) else None
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageCheck:
    """What a headless load of one page showed."""

    url: str
    figures: int = 0
    expected_figures: int | None = None
    views: int = 0
    expected_views: int | None = None
    scripts: int = 0
    bare_alert_scripts: int = 0
    console_errors: list[str] = field(default_factory=list)
    console_warnings: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    screenshot: str | None = None
    load_s: float = 0.0
    title: str = ""

    @property
    def problems(self) -> list[str]:
        out = [f"console error: {e}" for e in self.console_errors]
        out += [f"exception: {e}" for e in self.exceptions]
        out += [f"network request: {u}" for u in self.requests]
        out += [f"dialog: {d}" for d in self.dialogs]
        if self.bare_alert_scripts:
            out.append(f"{self.bare_alert_scripts} injected script element(s)")
        if self.expected_figures is not None and self.figures != self.expected_figures:
            out.append(f"{self.figures} of {self.expected_figures} plotly figures rendered")
        if self.expected_views is not None and self.views != self.expected_views:
            out.append(f"{self.views} of {self.expected_views} circuitsvis views rendered")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "problems": self.problems}


class _DevTools:
    """The DevTools protocol over Chromium's ``--remote-debugging-pipe``."""

    def __init__(self, binary: str, extra_args: tuple[str, ...], user_data_dir: str) -> None:
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # Chromium reads fd 3 and writes fd 4. Move our ends above the low fds first, so the
        # dup2 in the child cannot clobber one with the other.
        child_in = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def wire() -> None:  # runs in the child, before exec
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        args = [
            binary,
            *CHROMIUM_FLAGS,
            *extra_args,
            f"--user-data-dir={user_data_dir}",
            "--remote-debugging-pipe",
            "--window-size=1280,900",
            "about:blank",
        ]
        self.stderr = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self.stderr,
                preexec_fn=wire,
                pass_fds=(3, 4),
            )
        finally:
            os.close(child_in)
            os.close(child_out)
        self.write_fd, self.read_fd = to_chrome_w, from_chrome_r
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        self.pending: dict[int, dict[str, Any]] = {}

    def _read(self, timeout: float) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        while b"\0" not in self.buffer:
            left = end - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium closed the DevTools pipe{self._stderr_tail()}")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def _stderr_tail(self) -> str:
        try:
            self.stderr.seek(0)
            text = self.stderr.read().decode(errors="replace").strip()
        except OSError:
            return ""
        return f"; its stderr ends: {text[-1500:]}" if text else ""

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            written = os.write(self.write_fd, data)
            data = data[written:]
        return self.next_id

    def call(
        self,
        method: str,
        params: dict | None = None,
        session: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        wanted = self.send(method, params, session)
        end = time.monotonic() + timeout
        while wanted not in self.pending:
            message = self._read(max(0.0, end - time.monotonic()))
            if message is None:
                raise BrowserError(f"no answer to {method} within {timeout:.0f} s")
            self._dispatch(message)
        reply = self.pending.pop(wanted)
        if "error" in reply:
            raise BrowserError(f"{method} failed: {reply['error']}")
        return reply.get("result", {})

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "id" in message:
            self.pending[message["id"]] = message
        else:
            self.events.append(message)

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            message = self._read(left)
            if message is None:
                return
            self._dispatch(message)

    def wait_event(self, method: str, timeout: float) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        seen = len(self.events)
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method:
                    return event
            seen = len(self.events)
            left = end - time.monotonic()
            if left <= 0:
                return None
            message = self._read(left)
            if message is None:
                return None
            self._dispatch(message)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send("Browser.close")
                self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired, BrowserError):
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
            for fd in (self.write_fd, self.read_fd):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.stderr.close()


def _remote_text(obj: dict[str, Any]) -> str:
    if "value" in obj:
        return str(obj["value"])
    return str(obj.get("description") or obj.get("unserializableValue") or obj.get("type"))


def _collect(check: PageCheck, events: list[dict[str, Any]]) -> None:
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(_remote_text(a) for a in params.get("args", []))
            if params.get("type") in ("error", "assert"):
                check.console_errors.append(text)
            elif params.get("type") == "warning":
                check.console_warnings.append(text)
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exc = details.get("exception", {})
            check.exceptions.append(exc.get("description") or details.get("text", "exception"))
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            text = f"{entry.get('source')}: {entry.get('text')} {entry.get('url') or ''}".strip()
            if entry.get("level") == "error":
                check.console_errors.append(text)
            elif entry.get("level") == "warning":
                check.console_warnings.append(text)
        elif method == "Network.requestWillBeSent":
            url = params.get("request", {}).get("url", "")
            if not url.startswith(_LOCAL_SCHEMES):
                check.requests.append(url)
        elif method == "Page.javascriptDialogOpening":
            check.dialogs.append(f"{params.get('type')}: {params.get('message')}")


def check_page(
    path: str | Path,
    *,
    screenshot: str | Path | None = None,
    timeout: float = 60.0,
    chromium: str | None = None,
    extra_args: tuple[str, ...] = (),
    max_screenshot_height: int = 16000,
) -> PageCheck:
    """Load ``path`` in headless Chromium (networking off) and report what happened.

    Waits for the load event, then until the rendered figures and views reach the counts on
    ``<body data-figures data-views>`` (or ``timeout``), and a further half second for late
    errors. ``screenshot``: write a full-page PNG there (at most ``max_screenshot_height`` px).
    Raises :class:`BrowserError` when no Chromium is found or it fails to start.
    """
    binary = chromium or find_chromium()
    if binary is None:
        raise BrowserError("no Chromium found (install it: apt-get install chromium)")
    path = Path(path).resolve()
    url = path.as_uri()
    check = PageCheck(url=url)
    profile = tempfile.mkdtemp(prefix="rh-chromium-")
    tools = _DevTools(binary, tuple(extra_args), profile)
    try:
        deadline = time.monotonic() + timeout
        target_id = None
        while target_id is None:
            pages = [
                t
                for t in tools.call("Target.getTargets").get("targetInfos", [])
                if t.get("type") == "page"
            ]
            if pages:
                target_id = pages[0]["targetId"]
            elif time.monotonic() > deadline:
                raise BrowserError("Chromium opened no page")
            else:
                tools.pump(0.1)
        session = tools.call("Target.attachToTarget", {"targetId": target_id, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            tools.call(f"{domain}.enable", session=session)
        tools.call("Page.addScriptToEvaluateOnNewDocument", {"source": _TRAP}, session=session)
        start = time.monotonic()
        tools.call("Page.navigate", {"url": url}, session=session)
        if tools.wait_event("Page.loadEventFired", max(1.0, deadline - time.monotonic())) is None:
            raise BrowserError(f"{url} did not finish loading within {timeout:.0f} s")
        state: dict[str, Any] = {}
        while True:
            result = tools.call(
                "Runtime.evaluate", {"expression": _PROBE, "returnByValue": True}, session=session
            )
            state = json.loads(result["result"]["value"])
            done = state["figures"] >= (state["expected_figures"] or 0) and state["views"] >= (
                state["expected_views"] or 0
            )
            if done or time.monotonic() > deadline:
                break
            tools.pump(0.2)
        check.load_s = time.monotonic() - start
        tools.pump(0.5)
        result = tools.call(
            "Runtime.evaluate", {"expression": _PROBE, "returnByValue": True}, session=session
        )
        state = json.loads(result["result"]["value"])
        check.figures, check.views = state["figures"], state["views"]
        check.expected_figures = state["expected_figures"]
        check.expected_views = state["expected_views"]
        check.scripts, check.bare_alert_scripts = state["scripts"], state["bare_alert_scripts"]
        check.dialogs.extend(state["dialogs"])
        check.title = state["title"]
        if screenshot is not None:
            height = int(min(max(900, state["height"]), max_screenshot_height))
            tools.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False},
                session=session,
            )
            tools.pump(0.8)  # let responsive figures settle
            shot = tools.call(
                "Page.captureScreenshot",
                {"format": "png", "captureBeyondViewport": False},
                session=session,
                timeout=60,
            )
            out = Path(screenshot)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(base64.b64decode(shot["data"]))
            check.screenshot = str(out)
        tools.pump(0.1)
        _collect(check, tools.events)
    finally:
        tools.close()
        shutil.rmtree(profile, ignore_errors=True)
    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m retrieval_heads.views.browser", description=__doc__
    )
    parser.add_argument("report", type=Path, nargs="?", help="the HTML file to check")
    parser.add_argument("--screenshot", type=Path, help="write a full-page PNG here")
    parser.add_argument("--sample", type=Path, help="write sample results and a report here first")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    report = args.report
    if args.sample is not None:
        from retrieval_heads.views import _sample
        from retrieval_heads.views.report import build_report

        d = _sample.write_detection(args.sample / "detect")
        a = _sample.write_ablation(args.sample / "ablate")
        report = build_report([d, a], args.sample / "report.html")
    if report is None:
        parser.error("give a report, or --sample DIR")
    check = check_page(report, screenshot=args.screenshot, timeout=args.timeout)
    print(json.dumps(check.to_dict(), indent=1))
    return 0 if check.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
