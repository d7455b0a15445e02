"""Nightly retune: parameter checks, the publish decision, a retune of an unchanged fleet with no
extra budget (no tuning, nothing new published), and an incremental retune whose tuning fan-out
runs on a local Dask cluster with worker processes, all through the deployed retune flow."""

from __future__ import annotations

import json

import prefect_env
import pytest

from tasks import retune as retune_logic
from tasks.errors import TvmflowError


def test_check_parameters_names_every_problem_up_front(tmp_path):
    with pytest.raises(TvmflowError, match="unknown device 'rk9999'; known devices: .*local"):
        retune_logic.check_parameters("rk9999", ["tasks.importers.bundled:mnist_cnn"], 16, str(tmp_path))
    with pytest.raises(TvmflowError) as err:
        retune_logic.check_parameters(
            "local", ["tasks.importers.bundled:no_such_model", str(tmp_path / "gone.onnx")], -1, str(tmp_path)
        )
    message = str(err.value)
    assert "no callable 'no_such_model'" in message and "gone.onnx' is missing: no such file" in message
    assert "budget -1 is negative" in message
    profile, entries = retune_logic.check_parameters("local", None, 0, str(tmp_path))  # the fleet's models
    assert profile.name == "local" and [e.name for e in entries] == ["efficientnet_lite0", "mnist_cnn"]
    assert entries[1].data == "bundled:mnist:64"


def test_decide_publishes_only_validated_and_no_slower_builds():
    assert retune_logic.decide(True, "", 1.0, None)[0]
    assert retune_logic.decide(True, "", 1.02, 1.0)[0]  # within measurement noise
    keep, why = retune_logic.decide(True, "", 1.5, 1.0)
    assert not keep and "slower than LATEST: 1.500 ms vs 1.000 ms" in why
    keep, why = retune_logic.decide(False, "max relative error 1e-01 > 1e-03", 0.5, 1.0)
    assert not keep and why.startswith("validation failed (max relative error")


def _retune(srv, timeout: float = 600, **params) -> tuple[dict, list[dict]]:
    dep = srv.deployment("tvmflow-retune", "retune-local")
    params = {"models": [prefect_env.MNIST], "store": str(srv.store), "tracker": srv.tracker, **params}
    run = srv.wait_run(srv.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})["id"], timeout)
    arts = {a["key"]: a for a in srv.artifacts(run["id"])}
    return run, json.loads(arts["retune-local-summary"]["data"])


def _latest(srv) -> str:
    return (srv.store / "builds" / "mnist_cnn" / "local" / "LATEST").read_text().strip()


def _task_names(srv, run_id: str) -> list[str]:
    return [t["name"] for t in srv.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})]


def test_unchanged_fleet_with_no_extra_budget_tunes_nothing_and_publishes_nothing():
    srv, compiled = prefect_env.compile_run()
    assert compiled["state"]["type"] == "COMPLETED"
    before, builds = _latest(srv), sorted((srv.store / "builds" / "mnist_cnn" / "local").iterdir())
    run, rows = _retune(srv, budget=0)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert rows == [
        {
            "model": "tasks.importers.bundled:mnist_cnn",
            "device": "local",
            "status": "kept",
            "new_ms": "–",
            "latest_ms": "–",
            "trials": 0,
            "budget": 0,
            "build": before,
            "reason": f"no extra budget: nothing tuned; LATEST {before} is current",
        }
    ]
    assert _latest(srv) == before and sorted((srv.store / "builds" / "mnist_cnn" / "local").iterdir()) == builds
    assert not [n for n in _task_names(srv, run["id"]) if n.startswith("tune-")]  # no tuning task ran


def test_incremental_retune_tunes_on_a_dask_cluster(monkeypatch, tvmflow_cache):
    """16 more trials, warm-started from LATEST, tuned on Dask worker processes; the new build is
    published only if it validated and is no slower than LATEST measured in the same run."""
    from distributed import Client, LocalCluster

    srv, _ = prefect_env.compile_run()
    before = _latest(srv)
    monkeypatch.setenv("PREFECT_API_URL", srv.api)  # the Dask workers report to the same server
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        # generous: a fresh Dask worker imports TVM's tensor intrinsics (~1 CPU-minute) before tuning
        run, rows = _retune(srv, budget=16, dask_address=cluster.scheduler_address, timeout=1200)
        ran_on_dask = client.run_on_scheduler(
            lambda dask_scheduler: sum(1 for t in dask_scheduler.transition_log if t[2] == "memory")
        )
    assert run["state"]["type"] == "COMPLETED", (run["state"], (srv.home / "worker.log").read_text()[-4000:])
    assert ran_on_dask >= 1
    assert [n for n in _task_names(srv, run["id"]) if n.startswith("tune-")]  # tuned in this run, on Dask
    [row] = rows
    assert row["trials"] == 16 and row["budget"] == 16 and row["new_ms"] != "–" and row["latest_ms"] != "–"
    if row["status"] == "published":
        assert _latest(srv) == row["build"] != before
        manifest = json.loads(
            (srv.store / "builds" / "mnist_cnn" / "local" / row["build"] / "manifest.json").read_text()
        )
        assert manifest["retune"]["previous_build"] == before and manifest["trials_budget"] == 16
        assert manifest["validation"]["passed"]
    else:
        assert row["status"] == "kept" and "slower than LATEST" in row["reason"] and _latest(srv) == before


MNIST_MODEL, MNIST_DATA = "tasks.importers.bundled:mnist_cnn", "bundled:mnist:64"


def test_entry_precision_comes_from_the_entry_the_run_or_latest():
    entry = retune_logic.parse_models([{"model": MNIST_MODEL, "precision": "int8"}, MNIST_MODEL])
    assert retune_logic.entry_precision(entry[0], None, None) == "int8"
    assert retune_logic.entry_precision(entry[1], "fp16", None) == "fp16"
    assert retune_logic.entry_precision(entry[1], None, None) == "fp32"
    with pytest.raises(TvmflowError, match="int4"):
        retune_logic.check_parameters("local", [{"model": MNIST_MODEL, "precision": "int4"}], 16, ".")


def _buffer_dtypes(db_folder) -> set[str]:
    """The 8-bit dtypes named in the workloads (kernels) of a tuning database."""
    from tasks.tuning.pick_best import open_db

    texts = [record.workload.mod.script() for record in open_db(db_folder).get_all_tuning_records()]
    return {d for d in ("int8", "uint8") if any(f'"{d}"' in t or f"T.{d}" in t for t in texts)}


@pytest.fixture(scope="module")
def int8_retune(tmp_path_factory, local_workers, prefect_harness):
    """An int8 retune of the MNIST CNN into an empty store (no LATEST yet), 16 trials."""
    from flows.retune import retune_flow

    root = tmp_path_factory.mktemp("int8-retune")
    patch = pytest.MonkeyPatch()
    patch.setenv("TVMFLOW_CACHE", str(root / "cache"))
    try:
        outcomes = retune_flow(
            device="local",
            models=[{"model": MNIST_MODEL, "data": MNIST_DATA}],
            budget=16,
            store=str(root / "store"),
            tracker=local_workers.tracker,
            precision="int8",
        )
    finally:
        patch.undo()
    return root / "store", outcomes


def test_int8_retune_publishes_a_validated_int8_build(int8_retune):
    store, [outcome] = int8_retune
    assert outcome["status"] == "published", outcome
    assert outcome["precision"] == "int8" and 0 < outcome["trials"] <= 16
    folder = store / "builds" / "mnist_cnn" / "local" / outcome["build_id"]
    assert (folder.parent / "LATEST").read_text() == outcome["build_id"]
    report = json.loads((folder / "report.json").read_text())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert report["precision"] == manifest["precision"] == "int8"
    assert report["validation"]["passed"] and report["validation"]["precision"] == "int8"
    assert "MNIST" in report["precision_info"]["calibration"]["source"]  # calibrated on the entry's data
    assert report["precision_info"]["calibration"]["samples"] == 64
    # the kernels it built and tuned compute in int8: the published and the pushed databases say so
    assert {"int8", "uint8"} & _buffer_dtypes(folder)
    [shard] = list((store / "tuning").glob("*/local/shards/*"))
    assert {"int8", "uint8"} & _buffer_dtypes(shard)
    meta = json.loads((shard / "meta.json").read_text())
    assert meta["model"] == "mnist_cnn" and sum(w["trials"] for w in meta["workloads"].values()) == 16


def test_compile_after_a_retune_reuses_its_shared_records(int8_retune, local_workers, prefect_harness):
    """The on-demand compile of the same model, device and precision right after the retune, with an
    empty local cache: every task the retune tuned comes from the shared database, 0 new trials."""
    from flows.compile import compile_flow

    store, _ = int8_retune
    report = compile_flow(
        model=MNIST_MODEL,
        data=MNIST_DATA,
        trials=16,
        store=str(store),
        tracker=local_workers.tracker,
        precision="int8",
        measure_untuned=False,
        precision_options={"calibration": MNIST_DATA},
    )
    assert report["precision"] == "int8" and report["validation"]["passed"]
    assert report["trials"] == 0 and report["tuning_reuse"]["reused"] >= 1
    assert report["tuning_reuse"]["fresh"] == report["tuning_reuse"]["warm_started"] == 0
    assert report["tuning_reuse"]["shard"] is None  # nothing new to push
