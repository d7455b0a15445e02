"""The tuning fan-out, with its task runner picked per run.

Default: the flow's own runner (a thread pool of one: measurements share the device workers). With
`dask_address`, the tune tasks run on that Dask cluster through prefect-dask's DaskTaskRunner;
builds of candidates happen on the Dask workers, measurements still go through the RPC tracker
and the device's global concurrency limit. Databases travel as text (tasks.tuning.portable).
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from tasks import progress
from tasks.devices.session import DeviceAddress
from tasks.pipeline import tune_one
from tasks.records import TaskResult
from tasks.tuning.extract import TuningTask
from tasks.tuning.portable import pack_db, unpack_db


@task(name="tune-task", cache_policy=NO_CACHE, task_run_name="tune-{task_.name}")
def tune_portable(
    task_: TuningTask, device: DeviceAddress, label: str, seed: dict | None = None, refresh: bool = False
) -> dict:
    """tasks.pipeline.tune_one with the seed database and the result database shipped as text."""
    result = tune_one(task_, device, label, seed_db_dir=unpack_db(seed, "seed-db"), refresh=refresh)
    return {**result.to_json(), "db_files": pack_db(result.db_dir)}


def _runner(dask_address: str | None):
    if not dask_address:
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    address = dask_address if "://" in dask_address else f"tcp://{dask_address}"
    return DaskTaskRunner(address=address)


def _collect(futures, plan: list[TuningTask]) -> list[TaskResult]:
    results = []
    budget = sum(t.trials for t in plan)
    for future in futures:
        data = future.result()
        data["db_dir"] = unpack_db(data.pop("db_files", None), "tuned-db") or ""
        results.append(TaskResult.from_json(data))
        best = [r.best_ms for r in results if r.best_ms is not None]
        progress.update(
            stage="tune",
            task=len(results),
            of=len(plan),
            name=results[-1].name,
            trials=sum(t.trials for t in plan[: len(results)]),
            budget=budget,
            task_best_ms=results[-1].best_ms,
            best_ms=min(best) if best else None,
        )
    return results


def tune_fanout(
    plan: list[TuningTask],
    device: DeviceAddress,
    seed_db_dir: str | None = None,
    dask_address: str | None = None,
    refresh: bool = False,
) -> list[TaskResult]:
    """Tune every task of `plan` (warm-started from `seed_db_dir`); one TaskResult per task.

    Tasks run in the calling flow run (no subflow: a subflow's parameters are stored by the API,
    and a plan of big task modules plus a seed database passes its 512 KB limit). Without Dask they
    use the flow's own task runner; with Dask, a DaskTaskRunner opened here for the fan-out.
    """
    if not plan:
        return []
    progress.update(stage="tune", task=0, of=len(plan), trials=0, budget=sum(t.trials for t in plan))
    seed = pack_db(seed_db_dir)
    calls = [
        {"task_": t, "device": device, "label": f"[{i + 1}/{len(plan)}]", "seed": seed, "refresh": refresh}
        for i, t in enumerate(plan)
    ]
    if not dask_address:
        return _collect([tune_portable.submit(**c) for c in calls], plan)
    with _runner(dask_address) as runner:
        return _collect([runner.submit(tune_portable, c) for c in calls], plan)
