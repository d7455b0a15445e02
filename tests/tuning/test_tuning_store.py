"""The shared per-device tuning database on S3 (SeaweedFS): shards, merge on read, reuse decisions,
and a second compile of MNIST on a fresh machine that runs zero new trials."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest

from tasks.devices.profiles import get_device
from tasks.tuning import shared_db as tuning_store
from tasks.tuning.pick_best import open_db


@pytest.fixture(scope="module")
def mnist_tasks(mnist_pt2):
    """Three real MNIST tuning tasks, each with a real (minimal) schedule trace.

    (A design-space trace would need TuneContext, whose tensor-intrinsic import costs minutes
    on a loaded 2-core box; the store does not care which trace a record holds.)"""
    import tvm
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    from tasks.importers.model_import import import_pt2
    from tasks.tuning.extract import extract_tasks, prepare_for_tuning

    target = get_device("local").tvm_target()
    tasks = extract_tasks(prepare_for_tuning(import_pt2(mnist_pt2).mod, target), target)[:3]
    out = []
    for task in tasks:
        mod = tvm.ir.load_json(task.mod_json)
        sch = Schedule(mod)
        sch.get_sblock("root")  # one instruction: MetaSchedule ignores records with an empty trace
        out.append((task, mod, sch.trace, ms.arg_info.ArgInfo.from_prim_func(mod["main"]), target))
    return out


def _db(folder, entries):
    """A tuning database with one record per (mnist_tasks entry, seconds)."""
    from tvm.s_tir import meta_schedule as ms

    db = open_db(folder)
    for (_task, mod, trace, args, target), secs in entries:
        db.commit_tuning_record(ms.database.TuningRecord(trace, db.commit_workload(mod), [secs], target, args))
    return folder


def _index(entries, trials):
    return {
        tuning_store.workload_key(task.mod_json): {"trials": trials, "task": task.name} for (task, *_), _ in entries
    }


def test_concurrent_shards_from_two_threads_both_survive(s3, tmp_path, mnist_tasks):
    store, device = s3.store(), get_device("local")
    errors = []

    def push(i):
        try:
            entries = [(mnist_tasks[i], 1e-3 * (i + 1))]
            tuning_store.push_shard(
                store, device, [_db(tmp_path / f"run{i}", entries)], _index(entries, 32), tmp_path / f"work{i}"
            )
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=push, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    shared = tuning_store.load_shared(store, device, tmp_path / "merged")
    assert shared.shards == 2
    keys = {tuning_store.workload_key(t.mod_json) for t, *_ in mnist_tasks[:2]}
    assert set(shared.trials) == keys and set(shared.trials.values()) == {32}
    assert len(open_db(shared.db_dir).get_all_tuning_records()) == 2


def test_reuse_warm_start_or_fresh_by_recorded_trials(s3, tmp_path, mnist_tasks):
    store, device = s3.store(), get_device("local")
    first, second, third = mnist_tasks
    tuning_store.push_shard(
        store,
        device,
        [_db(tmp_path / "a", [(first, 1e-3), (second, 2e-3)])],
        {**_index([(first, 0)], 64), **_index([(second, 0)], 16)},
        tmp_path / "w",
    )
    shared = tuning_store.load_shared(store, device, tmp_path / "merged")
    plan = [
        replace(first[0], trials=32),
        replace(second[0], trials=32),
        replace(third[0], trials=16),
        replace(third[0], name="no_trials", trials=0),
    ]
    reuse = tuning_store.plan_reuse(plan, shared, tmp_path / "plan")
    assert reuse.decisions == {
        first[0].name: "reused",
        second[0].name: "warm",
        third[0].name: "fresh",
        "no_trials": "untuned",
    }
    assert [t.name for t in reuse.to_tune] == [second[0].name, third[0].name]  # only what needs searching
    assert reuse.reused["no_trials"]["trials_run"] == 0 and reuse.reused["no_trials"]["error"]
    assert reuse.summary()["reused"] == 1 and reuse.summary()["warm_started"] == 1
    done = reuse.reused[first[0].name]
    assert done["trials_run"] == 0 and done["best_ms"] == pytest.approx(1.0)
    seed = open_db(reuse.seed_db_dir).get_all_tuning_records()
    assert len(seed) == 1 and float(seed[0].run_secs[0]) == pytest.approx(2e-3)
    # the next run's shard counts the earlier trials: 16 seeded + 32 new
    tuned = [
        {
            "name": second[0].name,
            "trials_planned": 32,
            "trials_run": 32,
            "valid": 30,
            "error": None,
            "db_dir": str(_db(tmp_path / "b", [(second, 1.5e-3)])),
        }
    ]
    assert tuning_store.run_index(reuse, tuned)[reuse.keys[second[0].name]]["trials"] == 48


def test_records_of_another_target_are_ignored(s3, tmp_path, mnist_tasks):
    store, device = s3.store(), get_device("local")
    other = replace(device, target={**device.target, "mcpu": "cortex-a72"})
    entries = [(mnist_tasks[0], 1e-3)]
    tuning_store.push_shard(store, other, [_db(tmp_path / "a", entries)], _index(entries, 64), tmp_path / "w")
    shared = tuning_store.load_shared(store, device, tmp_path / "merged")
    assert shared.shards == 0 and shared.skipped == 1 and shared.db_dir is None


def test_compaction_keeps_every_record(s3, tmp_path, mnist_tasks):
    store, device = s3.store(), get_device("local")
    for i, entry in enumerate(mnist_tasks):
        tuning_store.push_shard(
            store,
            device,
            [_db(tmp_path / f"r{i}", [(entry, 1e-3)])],
            _index([(entry, 0)], 16 * (i + 1)),
            tmp_path / "w",
        )
    assert tuning_store.compact(store, device, tmp_path / "c") == 3
    fs = s3.fs()
    metas = fs.glob(f"{tuning_store.tuning_prefix(store, 'local')}/shards/*/meta.json")
    assert len(metas) == 1 and json.loads(fs.cat(metas[0]))["compacted"] == 3
    shared = tuning_store.load_shared(store, device, tmp_path / "merged")
    assert sorted(shared.trials.values()) == [16, 32, 48]
    assert len(open_db(shared.db_dir).get_all_tuning_records()) == 3


def test_unsafe_device_names_are_refused(s3):
    from tasks.errors import TvmflowError

    for name in ("../x", "a/b", ".."):
        with pytest.raises(TvmflowError, match="not allowed"):
            tuning_store.tuning_prefix(s3.store(), name)


def test_second_compile_on_a_fresh_machine_runs_zero_trials(s3, prefect_harness, tmp_path, monkeypatch):
    """MNIST against S3 twice with the same budget; the second run has an empty local cache
    (another machine), so all it can reuse is the shared database in the store."""
    from prefect.client.orchestration import get_client

    from flows.compile import compile_flow

    store = s3.store()
    kwargs = dict(
        model="tasks.importers.bundled:mnist_cnn",
        data="bundled:mnist:8",
        device="local",
        trials=32,
        store=store,
        measure_untuned=False,
    )
    first = compile_flow(**kwargs)
    tuned = [r for r in first["tuning"] if r["trials_run"]]
    assert first["trials"] >= 16 and tuned and first["tuning_reuse"]["shard"]
    monkeypatch.setenv("TVMFLOW_CACHE", str(tmp_path / "other-machine-cache"))
    second = compile_flow(**kwargs)
    assert second["trials"] == 0
    assert second["tuning_reuse"]["reused"] == len(tuned) and second["tuning_reuse"]["fresh"] == 0
    assert second["tuning_reuse"]["shard"] is None  # nothing new to add
    # nothing local is reused (fresh cache); the tune hits all come from the shared database
    assert second["validation"]["passed"]
    assert second["cache_hits"] == [f"tune ({len(tuned)}/{len(second['tuning'])} tasks)"]
    # no credentials anywhere in what was published or reported
    fs = s3.fs()
    for path in fs.find(store[5:]):
        blob = fs.cat(path)
        assert s3.secret_key.encode() not in blob and s3.access_key.encode() not in blob, path
    assert s3.secret_key not in json.dumps(second, default=str)

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts()

    import asyncio

    texts = json.dumps([a.data for a in asyncio.run(artifacts())], default=str)
    assert "shared tuning database" in texts and s3.secret_key not in texts and s3.access_key not in texts
