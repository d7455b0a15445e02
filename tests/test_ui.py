"""Real-browser check: headless Debian Chromium loads the Prefect UI page of the finished compile
run, and its Artifacts tab shows the tvmflow report. The screenshot goes to docs/ui-artifacts.png
when TVMFLOW_UI_SCREENSHOT=1 (it is committed; tests do not rewrite it by default)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import prefect_env

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--window-size=1400,1000", "--virtual-time-budget=20000"]


def chromium(url: str, *extra: str) -> str:
    assert CHROMIUM, "chromium is not installed: run `bash scripts/setup.sh --system` (apt-get install chromium)"
    profile = tempfile.mkdtemp(prefix="tvmflow-chromium-")
    try:
        proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *extra, url],
                              capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_flow_run_artifacts_tab_shows_the_report(tmp_path):
    srv, run = prefect_env.compile_run()
    assert run["state"]["type"] == "COMPLETED"
    url = f"{srv.url}/runs/flow-run/{run['id']}?tab=Artifacts"
    dom = chromium(url, "--dump-dom")
    assert run["name"] in dom  # the flow run's own page, rendered from the API by the UI
    assert "mnist-cnn-local-report" in dom and "tvmflow build report" in dom
    shot = tmp_path / "ui-artifacts.png"
    chromium(url, f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the report artifact's own page renders the markdown report
    report = next(a for a in srv.artifacts(run["id"]) if a["key"] == "mnist-cnn-local-report")
    page = chromium(f"{srv.url}/artifacts/artifact/{report['id']}", "--dump-dom")
    assert "tvmflow build: mnist_cnn on local" in page and "Tuning tasks" in page
    if os.environ.get("TVMFLOW_UI_SCREENSHOT"):
        docs = Path(__file__).resolve().parent.parent / "docs"
        shutil.copy(shot, docs / "ui-artifacts.png")
        chromium(f"{srv.url}/artifacts/artifact/{report['id']}", f"--screenshot={docs / 'ui-report.png'}")
