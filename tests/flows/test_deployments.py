"""Deployments end to end: a real Prefect server (SQLite) on a free port, `prefect deploy --all`
from deployments/prefect.yaml, a real process worker, and runs of the deployed flows."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import prefect_env
import yaml
from prefect.results import ResultRecord

from tasks.devices.profiles import load_fleet
from tasks.storage.cache import sha256_file

ROOT = prefect_env.ROOT


def _stored_result(run: dict, data: bytes):
    """The value in a persisted result file, read with the metadata (serializer) the run's state holds."""
    return ResultRecord.deserialize_from_result_and_metadata(data, json.dumps(run["state"]["data"])).result


def test_prefect_yaml_matches_the_fleet():
    """prefect.yaml is generated from devices.yaml: a compile and a nightly retune deployment per device."""
    check = subprocess.run(
        [sys.executable, "deployments/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stderr
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    names = {d["name"]: d for d in spec["deployments"]}
    for device, profile in load_fleet().items():
        compile_, retune = names[f"compile-{device}"], names[f"retune-{device}"]
        assert compile_["entrypoint"] == "flows/compile.py:compile_flow"
        assert retune["entrypoint"] == "flows/retune.py:retune_flow"
        assert retune["parameters"]["device"] == device
        assert retune["parameters"]["models"] == list(profile.extra.get("models") or [])
        # nightly only where there is something to retune and a board to run it on
        nightly = bool(profile.extra.get("models")) and (
            profile.local_workers > 0 or bool(profile.extra.get("tracker"))
        )
        assert retune["schedules"][0]["active"] == nightly, device
        assert retune["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
        assert {"budget", "store"} <= set(retune["parameters"])
        assert (
            retune["parameters"]["store"] == compile_["parameters"]["store"] == "{{ prefect.variables.tvmflow_store }}"
        )
        assert {"model", "device", "trials", "store"} <= set(compile_["parameters"])
        assert retune["schedules"][0]["cron"].split()[2:] == ["*", "*", "*"]  # every night
        assert retune["work_pool"]["name"] == compile_["work_pool"]["name"] == prefect_env.POOL
    assert not names["retune-aarch64-linux"]["schedules"][0]["active"]  # no tracker in the fleet file
    assert names["builds"]["entrypoint"] == "flows/retrieve.py:builds_flow"
    assert names["fetch"]["entrypoint"] == "flows/retrieve.py:fetch_flow"


def test_nightly_deployment_gets_scheduled_runs_from_its_cron():
    srv = prefect_env.server()
    dep = srv.deployment("tvmflow-retune", "retune-local")
    cron = dep["schedules"][0]["schedule"]
    assert cron["cron"] == "0 2 * * *" and cron["timezone"] == "UTC"
    assert dep["work_pool_name"] == prefect_env.POOL
    deadline, runs = time.monotonic() + 90, []
    while time.monotonic() < deadline and not runs:
        runs = srv.post(
            "/flow_runs/filter",
            {"deployments": {"id": {"any_": [dep["id"]]}}, "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}},
        )
        time.sleep(1)
    assert runs, "the scheduler created no runs for the nightly deployment"
    for run in runs:
        start = datetime.fromisoformat(run["expected_start_time"])
        assert (start.hour, start.minute, start.utcoffset().total_seconds()) == (2, 0, 0)
        assert run["parameters"]["device"] == "local" and run["parameters"]["budget"] == 64
    assert len({r["expected_start_time"] for r in runs}) == len(runs)  # one per night


def test_compile_deployment_run_publishes_and_reports():
    """The compile deployment, triggered with parameters for a tiny model, completes; its build is
    in the store (hashes match the manifest) and its report is an artifact in the Prefect API."""
    srv, run = prefect_env.compile_run()
    assert run["state"]["type"] == "COMPLETED", (run["state"], (srv.home / "worker.log").read_text()[-4000:])
    assert run["parameters"]["model"] == "tasks.importers.bundled:mnist_cnn"
    base = srv.store / "builds" / "mnist_cnn" / "local"
    build = base / (base / "LATEST").read_text().strip()
    manifest = json.loads((build / "manifest.json").read_text())
    assert manifest["validation"]["passed"] and manifest["device"] == "local"
    for name, entry in manifest["files"].items():
        assert sha256_file(build / name) == entry["sha256"], name
    arts = {a["key"]: a for a in srv.artifacts(run["id"])}
    assert {"mnist-cnn-local-report", "mnist-cnn-local-latency", "mnist-cnn-local-tuning"} <= set(arts)
    report = arts["mnist-cnn-local-report"]
    assert report["type"] == "markdown" and "validation: **passed**" in report["data"]
    assert build.name in report["data"]
    # its flow result is in the store the run named (a local folder here), not the worker's storage
    assert (
        _stored_result(
            run, (srv.store / "prefect-results" / Path(run["state"]["data"]["storage_key"]).name).read_bytes()
        )["build_id"]
        == build.name
    )
    # every measurement went through the device's global concurrency limit, created on first use
    limit = srv.get("/v2/concurrency_limits/device:local")
    assert limit["limit"] == 2 and limit["active_slots"] == 0


def test_bad_parameters_fail_the_run_before_any_tuning():
    srv = prefect_env.server()
    dep = srv.deployment("tvmflow-retune", "retune-local")
    run = srv.post(
        f"/deployments/{dep['id']}/create_flow_run",
        {
            "parameters": {
                "models": ["/nonexistent/model.onnx", "tasks.importers.bundled:mnist_cnn"],
                "budget": 16,
                "store": str(srv.store),
                "tracker": srv.tracker,
            }
        },
    )
    done = srv.wait_run(run["id"], timeout=300)
    assert done["state"]["type"] == "FAILED"
    assert "model '/nonexistent/model.onnx' is missing" in done["state"]["message"]
    tasks = srv.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    assert [t["name"].rsplit("-", 1)[0] for t in tasks] == ["check-parameters"]


def test_compile_deployment_persists_its_result_in_the_runs_s3_store(s3):
    """A compile deployment run whose `store` parameter is an S3 store, on a worker that has the keys
    only in its AWS_* environment: its flow result lands in <store>/prefect-results through the
    store's saved block (not the worker's local storage), Prefect reads it back from there, and no
    key is in the block, the result, the run's logs or its artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.storage.results import results_block_name

    srv, _ = prefect_env.compile_run()  # its import and build are in the step cache by now
    srv.start_worker("s3", s3.env)
    store = s3.store()
    run_id = srv.run_deployment(
        "tvmflow-compile", "compile-local", prefect_env.compile_parameters(srv, store), queue="s3"
    )
    run = srv.wait_run(run_id)
    assert run["state"]["type"] == "COMPLETED", (run["state"], (srv.home / "worker-s3.log").read_text()[-4000:])
    record = run["state"]["data"]  # the persisted result's metadata
    block = srv.get(f"/block_documents/{record['storage_block_id']}")
    assert block["name"] == results_block_name(store)
    assert block["data"]["basepath"] == f"{store}/prefect-results"
    stored = s3.fs().find(f"{store[5:]}/prefect-results")
    assert [p.rsplit("/", 1)[1] for p in stored] == [record["storage_key"].rsplit("/", 1)[-1]], (stored, record)
    with temporary_settings(updates={PREFECT_API_URL: srv.api}), get_client(sync_client=True) as client:
        report = client.read_flow_run(run_id).state.result()
    assert report["model"] == "mnist_cnn" and report["validation"]["passed"]
    assert s3.fs().exists(f"{store[5:]}/builds/mnist_cnn/local/{report['build_id']}/manifest.json")
    logs = srv.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}})
    assert logs  # the run logged, so the check below looks at something
    raw = s3.fs().cat(stored[0])
    assert _stored_result(run, raw) == report
    seen = [
        raw.decode(),
        json.dumps(report, default=str),
        json.dumps(block),
        json.dumps(logs),
        json.dumps(srv.artifacts(run_id)),
        json.dumps(run),
    ]
    for secret in (s3.secret_key, s3.access_key):
        assert not any(secret in text for text in seen), secret


def test_store_default_comes_from_the_prefect_variable():
    """`store` of every deployment is the tvmflow_store Variable's value when deployed, not ./artifacts."""
    srv = prefect_env.server()
    assert srv.get("/variables/name/tvmflow_store")["value"] == str(srv.store)
    for flow_name, name in (
        ("tvmflow-compile", "compile-local"),
        ("tvmflow-retune", "retune-aarch64-linux"),
        ("tvmflow-builds", "builds"),
        ("tvmflow-fetch", "fetch"),
    ):
        assert srv.deployment(flow_name, name)["parameters"]["store"] == str(srv.store), name


def test_builds_deployment_lists_the_published_build():
    srv, run = prefect_env.compile_run()
    assert run["state"]["type"] == "COMPLETED"
    build = (srv.store / "builds" / "mnist_cnn" / "local" / "LATEST").read_text().strip()
    listed = srv.wait_run(srv.run_deployment("tvmflow-builds", "builds", {"model": "mnist_cnn"}, queue="local"))
    assert listed["state"]["type"] == "COMPLETED", listed["state"]
    want, deadline = f"mnist_cnn/local/{build} (LATEST)", time.monotonic() + 60
    while True:  # the run's log lines reach the API in batches, possibly after its final state
        logs = srv.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [listed["id"]]}}, "limit": 200})
        if any(want in entry["message"] for entry in logs) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert any(want in entry["message"] for entry in logs), [e["message"] for e in logs]


def test_a_retune_run_while_another_holds_the_device_is_cancelled(tmp_path):
    """retune-<device> has concurrency limit 1 with CANCEL_NEW: a second run that starts while the
    first still runs (here: waiting for a free board on a tracker with none) is cancelled."""
    from tasks.devices.workers import start_local_workers

    srv = prefect_env.server()
    dep = srv.deployment("tvmflow-retune", "retune-local")
    limit = dep.get("global_concurrency_limit") or {}
    assert (dep.get("concurrency_limit") or limit.get("limit")) == 1, dep
    assert dep["concurrency_options"]["collision_strategy"] == "CANCEL_NEW", dep
    empty = start_local_workers("local", 0, tmp_path / "empty-tracker")  # a tracker, no board registered
    params = {
        "models": [prefect_env.MNIST],
        "budget": 1,
        "store": str(srv.store),
        "tracker": empty.tracker,
        "worker_timeout": 240.0,
    }
    first = srv.run_deployment("tvmflow-retune", "retune-local", params)
    try:
        deadline = time.monotonic() + 300
        while srv.get(f"/flow_runs/{first}")["state"]["type"] != "RUNNING":
            assert time.monotonic() < deadline, srv.get(f"/flow_runs/{first}")["state"]
            time.sleep(1)
        second = srv.wait_run(srv.run_deployment("tvmflow-retune", "retune-local", params), timeout=300)
        assert second["state"]["type"] == "CANCELLED", second["state"]
        assert srv.get(f"/flow_runs/{first}")["state"]["type"] == "RUNNING"  # the first one goes on
    finally:  # cancel the first: the slot must be free for the other tests' retune runs
        srv.post(f"/flow_runs/{first}/set_state", {"state": {"type": "CANCELLING"}, "force": True})
        srv.wait_run(first, timeout=300)
        empty.stop()
