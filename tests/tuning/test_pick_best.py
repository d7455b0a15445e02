"""Merging per-task tuning databases keeps the best record of every workload."""

from __future__ import annotations

import pytest

from tasks.tuning.pick_best import DB_FILES, has_db, merge_databases, open_db


@pytest.fixture(scope="module")
def workloads(mnist_pt2):
    """Two real MNIST workloads, each with a real schedule trace from its design space."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tasks.devices.profiles import get_device
    from tasks.importers.model_import import import_pt2
    from tasks.tuning.extract import extract_tasks, prepare_for_tuning

    target = get_device("local").tvm_target()
    tasks = extract_tasks(prepare_for_tuning(import_pt2(mnist_pt2).mod, target), target)[:2]
    out = []
    for task in tasks:
        mod = tvm.ir.load_json(task.mod_json)
        ctx = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply", task_name=task.name)
        trace = ctx.generate_design_space()[0].trace
        args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
        out.append((task.name, mod, trace, args, target))
    return out


def _write_db(folder, workloads, secs_per_workload):
    from tvm.s_tir import meta_schedule as ms

    db = open_db(folder)
    for (_name, mod, trace, args, target), secs in zip(workloads, secs_per_workload):
        for s in secs:
            db.commit_tuning_record(ms.database.TuningRecord(trace, db.commit_workload(mod), [s], target, args))
    return folder


def _best_secs(folder, workloads):
    db = open_db(folder)
    best = {}
    for name, mod, *_ in workloads:
        records = db.get_top_k(db.commit_workload(mod), 10)
        best[name] = [float(r.run_secs[0]) for r in records]
    return best


def test_merge_keeps_best_per_workload(tmp_path, workloads):
    (first, _, *_), (second, _, *_) = workloads
    a = _write_db(tmp_path / "a", workloads, [[3e-3, 2e-3], [5e-3]])
    b = _write_db(tmp_path / "b", workloads, [[1e-3], [9e-3, 7e-3]])
    count = merge_databases([a, b, tmp_path / "missing"], tmp_path / "merged")
    assert count == 2
    assert has_db(tmp_path / "merged")
    best = _best_secs(tmp_path / "merged", workloads)
    assert best[first] == [pytest.approx(1e-3)]
    assert best[second] == [pytest.approx(5e-3)]


def test_merge_overwrites_an_old_output(tmp_path, workloads):
    a = _write_db(tmp_path / "a", workloads[:1], [[4e-3]])
    out = tmp_path / "merged"
    _write_db(out, workloads, [[1e-4], [1e-4]])  # stale content from an earlier run
    assert merge_databases([a], out) == 1
    assert _best_secs(out, workloads[:1]) == {workloads[0][0]: [pytest.approx(4e-3)]}


def test_merge_of_nothing_is_an_empty_db(tmp_path):
    assert merge_databases([tmp_path / "none"], tmp_path / "merged") == 0
    assert all((tmp_path / "merged" / name).exists() for name in DB_FILES)


def test_a_record_that_computes_wrong_results_is_dropped(tmp_path):
    """A real MetaSchedule record (EfficientNet-Lite0, conv+BN+clip fused with the next pad) whose
    kernel leaves the pad border unwritten: the merge keeps only records that match the default kernel."""
    from pathlib import Path

    from tasks.devices.profiles import get_device
    from tasks.tuning.pick_best import merge_databases, open_db, record_is_correct

    data = Path(__file__).parent / "data"
    target = get_device("local").target
    wrong = open_db(data / "wrong_pad_record").get_all_tuning_records()[0]
    good = open_db(data / "good_record").get_all_tuning_records()[0]
    assert not record_is_correct(wrong.workload.mod, wrong.trace, target)
    assert record_is_correct(good.workload.mod, good.trace, target)
    sources = [data / "wrong_pad_record", data / "good_record"]
    assert merge_databases(sources, tmp_path / "unchecked") == 2
    assert merge_databases(sources, tmp_path / "checked", verify_target=target) == 1
