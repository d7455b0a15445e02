"""Real MetaSchedule tuning of one MNIST task over RPC, and a device worker dying mid-search."""

from __future__ import annotations

import signal

import pytest

from tasks.devices.workers import kill_group, start_local_workers
from tasks.tuning.extract import allocate_trials, extract_tasks, prepare_for_tuning
from tasks.tuning.tune import tune_task


@pytest.fixture(scope="module")
def conv_task(mnist_pt2):
    """The heaviest MNIST task (a conv2d), and the local device profile."""
    from tasks.devices.profiles import get_device
    from tasks.importers.model_import import import_pt2

    device = get_device("local")
    target = device.tvm_target()
    tasks = extract_tasks(prepare_for_tuning(import_pt2(mnist_pt2).mod, target), target)
    return tasks[0], device


def _records(work_dir) -> list[str]:
    path = work_dir / "database_tuning_record.json"
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_tune_one_task(tmp_path, conv_task, local_workers, prefect_harness):
    task, device = conv_task
    task.trials = 16
    lines = []
    result = tune_task(
        task,
        device.target,
        tmp_path / "work",
        (local_workers.host, local_workers.tracker_port),
        "local",
        servers=2,
        label="[1/1]",
        report=lines.append,
    )
    assert result.error is None, result.error
    assert result.trials_run == 16 and 0 < result.valid <= 16
    assert result.best_ms is not None and result.best_ms > 0
    assert len(_records(tmp_path / "work")) == 16
    assert lines and "16/16 trials" in lines[-1] and task.name in lines[-1]
    assert result.curve[-1][:2] == (16, result.best_ms) and result.curve[-1][2] > 0  # trials, best ms, seconds
    assert (tmp_path / "work" / "result.json").exists()


def test_task_without_trials_is_reported_untuned(tmp_path, conv_task):
    task, device = conv_task
    allocate_trials([task], 0)
    result = tune_task(task, device.target, tmp_path / "w", ("127.0.0.1", 1), "local")
    assert result.error.startswith("not tuned") and result.trials_run == 0


def test_dead_worker_mid_tuning_loses_no_records(tmp_path, conv_task, prefect_harness):
    """kill -9 one rpc server's process group after the first measured round: the search goes on
    with the other server, and every record measured before the kill is still in the database."""
    task, device = conv_task
    task.trials = 48
    work = tmp_path / "work"
    workers = start_local_workers("dying", 2, tmp_path / "logs")
    before: list[str] = []
    victim = workers.server_pids[0]

    def report(line):
        if not before:  # first measured round is in the database: kill one worker now
            before.extend(_records(work))
            kill_group(victim, signal.SIGKILL)

    try:
        result = tune_task(
            task,
            device.target,
            work,
            (workers.host, workers.tracker_port),
            "dying",
            servers=2,
            label="[1/1]",
            report=report,
        )
        after = _records(work)
        from tasks.devices.workers import free_servers

        alive = free_servers(workers.host, workers.tracker_port, "dying")
    finally:
        workers.stop()
    assert before, "the kill never happened"
    assert 0 < len(before) < len(after)
    assert set(before) <= set(after), "records measured before the kill were lost"
    assert result.trials_run == 48, result
    assert result.valid > len(before) // 2 and result.error is None and result.best_ms > 0
    assert alive >= 1  # the surviving server is still registered and idle
