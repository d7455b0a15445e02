"""Real-browser check: headless Debian Chromium loads the Prefect UI page of the finished compile
run, its Artifacts tab is clicked, and the tab shows the tvmflow report. Driven over the Chrome
DevTools Protocol (the browser's own remote-debugging websocket), so no chromedriver is needed.
A second, tuned run's tuning-curve artifact page shows the curve itself (an inline PNG).
With TVMFLOW_UI_SCREENSHOT=1 the screenshots are copied to docs/ (they are committed)."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import prefect_env

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--window-size=1400,1000",
    "--remote-allow-origins=*",
]


class Browser:
    """One headless Chromium with a fresh profile, one page, driven through CDP."""

    def __init__(self):
        from websockets.sync.client import connect

        assert CHROMIUM, "chromium is not installed: run `bash scripts/setup.sh --system` (apt-get install chromium)"
        self.profile = tempfile.mkdtemp(prefix="tvmflow-chromium-")
        port = prefect_env.free_port()
        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                *FLAGS,
                f"--user-data-dir={self.profile}",
                "--remote-debugging-address=127.0.0.1",
                f"--remote-debugging-port={port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as resp:
                    pages = [t for t in json.loads(resp.read()) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and self.proc.poll() is None, "chromium did not start"
            time.sleep(0.5)
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ids = itertools.count(1)

    def call(self, method: str, **params):
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=120))
            if reply.get("id") == msg_id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_text(self, *texts: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.js("document.body ? document.body.innerText : ''") or ""
            if all(t in body for t in texts):
                return body
            time.sleep(0.5)
        raise AssertionError(f"page never showed {texts}; it shows: {body[:1500]}")

    def click_text(self, text: str) -> None:
        clicked = self.js(f"""(() => {{
            const el = [...document.querySelectorAll('button, a, [role=tab], li, span')]
                .find(e => e.textContent.trim() === {json.dumps(text)} && e.offsetParent !== null);
            if (!el) return false; el.click(); return true; }})()""")
        assert clicked, f"no visible element with text {text!r}"

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)


def test_flow_run_artifacts_tab_shows_the_report(tmp_path):
    srv, run = prefect_env.compile_run()
    assert run["state"]["type"] == "COMPLETED"
    report = next(a for a in srv.artifacts(run["id"]) if a["key"] == "mnist-cnn-local-report")
    # the progress artifact the stages kept up to date (tasks.progress), finished at 100 %
    progress = [a for a in srv.artifacts(run["id"]) if a["type"] == "progress"]
    assert [(a["key"], a["data"]) for a in progress] == [("mnist-cnn-local-progress", 100.0)], progress
    # the per-layer time table of the validated build is an artifact of the run too
    layers = next(a for a in srv.artifacts(run["id"]) if a["key"] == "mnist-cnn-local-layer-times")
    assert "| 1 | `" in layers["data"] and "this host's CPU" in layers["data"]
    browser = Browser()
    try:
        browser.call("Page.enable")
        browser.goto(f"{srv.url}/runs/flow-run/{run['id']}")
        browser.wait_text(run["name"], "Completed", "Artifacts")  # the run's page, rendered from the API
        browser.click_text("Artifacts")
        # the three artifact cards, with the report's description (cards fill in as the API answers)
        browser.wait_text(
            "mnist-cnn-local-report",
            "mnist-cnn-local-latency",
            "mnist-cnn-local-tuning",
            "tvmflow build report",
            "latency (ms)",
        )
        shot = tmp_path / "ui-artifacts.png"
        browser.screenshot(shot)
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # the report artifact's own page (a click away) renders the markdown report
        browser.goto(f"{srv.url}/artifacts/artifact/{report['id']}")
        page = browser.wait_text("tvmflow build: mnist_cnn on local", "Latency", "Tuning tasks", "passed")
        assert run["name"] in page or "mnist-cnn-local-report" in page
        report_shot = tmp_path / "ui-report.png"
        browser.screenshot(report_shot)
        # the progress artifact (a task run's, so not on the flow run's tab) has its own page
        browser.goto(f"{srv.url}/artifacts/artifact/{progress[0]['id']}")
        browser.wait_text("mnist-cnn-local-progress")
        progress_shot = tmp_path / "ui-progress.png"
        browser.screenshot(progress_shot)
    finally:
        browser.close()
    if os.environ.get("TVMFLOW_UI_SCREENSHOT"):
        docs = Path(__file__).resolve().parent.parent.parent / "docs"
        shutil.copy(shot, docs / "ui-artifacts.png")
        shutil.copy(report_shot, docs / "ui-report.png")
        shutil.copy(progress_shot, docs / "ui-progress.png")


def test_tuning_curve_of_a_finished_run_shows_in_the_ui(tmp_path):
    """A compile deployment run that searched (112 trials over the MNIST CNN's 6 tunable tasks, 16 a round: the heaviest gets two rounds): its
    tuning curve is an artifact whose page shows the picture, and tuning_curve.png is in the build."""
    srv = prefect_env.server()
    store = tmp_path / "store"
    params = {**prefect_env.compile_parameters(srv, str(store)), "trials": 112}
    run = srv.wait_run(srv.run_deployment("tvmflow-compile", "compile-local", params), timeout=1800)
    assert run["state"]["type"] == "COMPLETED", (run["state"], (srv.home / "worker.log").read_text()[-3000:])
    curve = next(a for a in srv.artifacts(run["id"]) if a["key"] == "mnist-cnn-local-tuning-curve")
    inline = curve["data"].split("data:image/png;base64,", 1)[1].split(")", 1)[0]
    assert base64.b64decode(inline)[:8] == b"\x89PNG\r\n\x1a\n"
    [published] = (store / "builds" / "mnist_cnn" / "local").glob("*/tuning_curve.png")
    assert f"{published.parent.name}/tuning_curve.png" in curve["data"]
    report = json.loads((published.parent / "report.json").read_text())
    assert max(len(t["curve"] or []) for t in report["tuning"]) >= 2  # a task searched over several rounds
    browser = Browser()
    try:
        browser.call("Page.enable")
        browser.goto(f"{srv.url}/artifacts/artifact/{curve['id']}")
        browser.wait_text("Tuning curve: mnist_cnn on local", "seconds of search")
        deadline = time.monotonic() + 60
        while not browser.js(
            "[...document.images].some(i => i.src.startsWith('data:image/png') && i.naturalWidth > 500)"
        ):
            assert time.monotonic() < deadline, "the tuning curve picture never rendered"
            time.sleep(0.5)
        shot = tmp_path / "ui-tuning-curve.png"
        browser.screenshot(shot)
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        browser.close()
    if os.environ.get("TVMFLOW_UI_SCREENSHOT"):
        shutil.copy(shot, Path(__file__).resolve().parent.parent.parent / "docs" / "ui-tuning-curve.png")
