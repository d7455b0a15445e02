"""Alerts on a real Prefect server: `tvmflow alerts install` creates the fleet's automations; a
failed run of a nightly retune deployment and a `tvmflow.build.regressed` event make them fire
(their `prefect.automation.triggered` events are read back through the API)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import prefect_env

from flows import cli
from flows.alerts import FAILED_NAME, REGRESSED_NAME

ROOT = Path(__file__).resolve().parents[2]
EMIT_REGRESSED = """
from prefect.events.worker import EventsWorker
from tasks import events
sent = events.emit_regressed("mnist_cnn", "local", latency_ms=1.5, previous_ms=1.2, build_id="b2")
EventsWorker.drain_all()
print("sent" if sent is not None else "not sent")
"""


def _triggered(srv, automation_id: str, since: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        page = srv.post(
            "/events/filter",
            {
                "filter": {
                    "event": {"name": ["prefect.automation.triggered"]},
                    "resource": {"id": [f"prefect.automation.{automation_id}"]},
                    "occurred": {"since": since},
                },
                "limit": 10,
            },
        )
        if page["events"]:
            return page["events"][0]
        time.sleep(2)
    raise AssertionError(f"automation {automation_id} never fired")


def test_automations_fire_on_a_failed_nightly_run_and_on_a_regression(capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks import events

    srv = prefect_env.server()
    since = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - 5))
    with temporary_settings(updates={PREFECT_API_URL: srv.api}):
        assert cli.main(["alerts", "install", "--json"]) == 0
        assert cli.main(["alerts", "install", "--json"]) == 0  # idempotent: replaced, not doubled
        installed = {a["name"]: a for a in json.loads(capsys.readouterr().out.strip().splitlines()[-1])}
        assert set(installed) == {FAILED_NAME, REGRESSED_NAME}
        autos = srv.post("/automations/filter", {})
        assert sorted(a["name"] for a in autos if a["name"].startswith("tvmflow")) == sorted(installed)

        # a nightly retune deployment run that fails (a missing model: it fails in seconds)
        dep = srv.deployment("tvmflow-retune", "retune-local")
        run = srv.post(
            f"/deployments/{dep['id']}/create_flow_run",
            {
                "parameters": {
                    "models": ["/nonexistent/model.onnx"],
                    "budget": 1,
                    "store": str(srv.store),
                    "tracker": srv.tracker,
                }
            },
        )
        assert srv.wait_run(run["id"], timeout=300)["state"]["type"] == "FAILED"
        fired = _triggered(srv, installed[FAILED_NAME]["id"], since)
        assert any(r.get("prefect.resource.id") == f"prefect.flow-run.{run['id']}" for r in fired["related"]) or run[
            "id"
        ] in json.dumps(fired), fired

        # a regression event, as the retune flow emits it, from a process of its own: in this one Prefect's
        # events worker stays bound to the first API it served (the harness's, in a full test session)
        emitted = subprocess.run(
            [sys.executable, "-c", EMIT_REGRESSED],
            env={**os.environ, "PREFECT_API_URL": srv.api, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert emitted.returncode == 0 and emitted.stdout.strip() == "sent", emitted.stderr[-2000:]
        fired = _triggered(srv, installed[REGRESSED_NAME]["id"], since)
        seen = srv.post(
            "/events/filter",
            {"filter": {"event": {"name": [events.REGRESSED]}, "occurred": {"since": since}}, "limit": 5},
        )["events"]
        assert seen and seen[0]["payload"]["model"] == "mnist_cnn" and seen[0]["payload"]["previous_ms"] == 1.2
        assert seen[0]["resource"]["tvmflow.device"] == "local"
