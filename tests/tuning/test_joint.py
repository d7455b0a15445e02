"""One MetaSchedule session over all tasks (tasks.tuning.joint): real tracker and rpc servers,
the MNIST CNN's tasks, a shared cost model saved and reloaded."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.tuning.cost_model import load_model, model_path
from tasks.tuning.extract import extract_tasks, prepare_for_tuning
from tasks.tuning.joint import last_summary, per_iter_for, tunable, tune_jointly


@pytest.fixture(scope="module")
def mnist_tasks(mnist_pt2):
    from tasks.devices.profiles import get_device
    from tasks.importers.model_import import import_pt2

    device = get_device("local")
    target = device.tvm_target()
    return extract_tasks(prepare_for_tuning(import_pt2(mnist_pt2).mod, target), target), device


@pytest.fixture(scope="module")
def session(mnist_tasks, local_workers, tmp_path_factory):
    """One joint session of 32 trials; its work dir, cost-model dir, log lines and results."""
    tasks, device = mnist_tasks
    work, models = tmp_path_factory.mktemp("joint"), tmp_path_factory.mktemp("cost-model")
    lines: list[str] = []
    results = tune_jointly(
        tasks,
        device,
        (local_workers.host, local_workers.tracker_port),
        2,
        work,
        cost_model_dir=models,
        trials=32,
        log=lines.append,
        use_slots=False,
    )
    return work, models, lines, results, tasks, device


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_one_session_tunes_several_tasks_and_logs_progress(session):
    work, models, lines, results, tasks, _ = session
    assert [r.name for r in results] == [t.name for t in tasks]
    ran = [r for r in results if r.trials_run]
    assert sum(r.trials_run for r in results) >= 32
    assert len(ran) >= 2, "the gradient scheduler gave every trial to one task"
    assert all(r.best_ms and r.best_ms > 0 for r in ran)
    assert any(line.startswith("[task 1/") and "best" in line for line in lines), lines
    summary = last_summary(work)
    assert summary["trials_run"] == sum(r.trials_run for r in results) and summary["per_iter"] == 16
    untuned = {t.name for t in tasks} - {t.name for t in tunable(tasks)}
    assert all(r.trials_run == 0 for r in results if r.name in untuned)


def test_saved_cost_model_ranks_candidates_better_than_a_fresh_one(session):
    """The model saved by the session, loaded back as a second session would, ranks the heaviest
    task's measured candidates by speed; a fresh model's first round is random."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm_ffi.structural import structural_equal

    from tasks.tuning.pick_best import open_db

    work, models, _, _, tasks, device = session
    assert model_path(models).exists()
    warm, loaded = load_model(models)
    fresh, fresh_loaded = load_model(None)
    assert loaded and not fresh_loaded
    db = open_db(work)
    mod = tvm.ir.load_json(tasks[0].mod_json)
    records = [
        r
        for r in db.get_all_tuning_records()
        if structural_equal(r.workload.mod, mod) and r.run_secs and float(r.run_secs[0]) < 1e9
    ]
    assert len(records) >= 8, "too few measured candidates of the heaviest task"
    context = ms.TuneContext(mod=mod, target=tvm.target.Target(device.target), task_name=tasks[0].name)
    candidates = [r.as_measure_candidate() for r in records]
    speed = [-float(np.mean([float(s) for s in r.run_secs])) for r in records]
    warm_rho = _spearman(warm.predict(context, candidates), speed)
    fresh_rho = np.mean([_spearman(fresh.predict(context, candidates), speed) for _ in range(5)])
    assert warm_rho > 0.3 and warm_rho > fresh_rho + 0.2, (warm_rho, fresh_rho)


def test_time_budget_stops_the_session(mnist_tasks, local_workers, tmp_path):
    tasks, device = mnist_tasks
    lines: list[str] = []
    results = tune_jointly(
        tasks,
        device,
        (local_workers.host, local_workers.tracker_port),
        2,
        tmp_path,
        trials=320,
        time_budget_s=1,
        log=lines.append,
        use_slots=False,
    )
    summary = last_summary(tmp_path)
    assert summary["stopped_by"] == "time budget", summary
    assert 0 < sum(r.trials_run for r in results) < 320


def test_rounds_keep_every_device_worker_busy():
    assert per_iter_for(1) == 16 and per_iter_for(8) == 16 and per_iter_for(16) == 32


def test_no_trials_tunes_nothing(mnist_tasks, tmp_path):
    tasks, device = mnist_tasks
    results = tune_jointly(tasks, device, ("127.0.0.1", 1), 1, tmp_path, trials=0, use_slots=False)
    assert all(r.trials_run == 0 and r.error for r in results)
