"""Nightly retune flow: for every model of a device, tune `budget` more trials warm-started from
LATEST's database, rebuild, validate, and publish only when it validated and is no slower than
LATEST measured now on the same device. Thin: the logic is tasks/retune_logic.py."""
from __future__ import annotations

import contextlib

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from tasks import retune_logic, steps
from tasks.errors import TvmflowError

from flows.fanout import tune_fanout


@task(name="check-parameters", cache_policy=NO_CACHE)
def check_parameters(device, models, budget, store):
    return retune_logic.check_parameters(device, models, budget, store)


def retune_model(entry, profile, workers, store, budget, dask_address, precision):
    """Plain, not a task: the tuning subflow may ship its context to Dask, and a task's context
    would carry `workers` (an open ExitStack), which does not pickle."""
    def fanout(plan, seed_db_dir, tracker, servers):
        return tune_fanout(plan, profile, tracker, servers, seed_db_dir=seed_db_dir, dask_address=dask_address)

    return retune_logic.retune_model(entry, profile, workers, store, budget, fanout, precision)


@flow(name="tvmflow-retune", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def retune_flow(device: str = "local", models: list | None = None, budget: int = 64, store: str = "./artifacts",
                tracker: str | None = None, dask_address: str | None = None, precision: str = "fp32",
                worker_timeout: float = 60.0) -> list[dict]:
    """Retune every model (default: the device's `models` in the fleet file) with `budget` more trials each."""
    profile, entries = check_parameters(device, models, budget, store)
    outcomes = []
    with contextlib.ExitStack() as stack:
        started = []

        def workers():  # device workers start only when a model has something to tune
            if not started:
                started.append(stack.enter_context(steps.device_workers(profile, tracker, worker_timeout)))
            return started[0]

        for entry in entries:
            outcomes.append(retune_model(entry, profile, workers, store, int(budget), dask_address, precision))
    key = "".join(c if c.isalnum() else "-" for c in f"retune-{device}").lower()
    create_table_artifact(table=retune_logic.summary_rows(outcomes), key=f"{key}-summary",
                          description=f"nightly retune of {device}: one row per model")
    create_markdown_artifact(markdown=retune_logic.summary_markdown(outcomes, device, int(budget)),
                             key=f"{key}-report", description="nightly retune report")
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise TvmflowError(f"{len(failed)} of {len(outcomes)} models failed: "
                           + "; ".join(f"{o.model}: {o.reason}" for o in failed))
    return [o.to_json() for o in outcomes]


if __name__ != "flows.retune":  # loaded by file path (deployment entrypoint flows/retune.py:retune_flow):
    # use the importable module's flow, so Dask workers can unpickle what refers to it;
    # its result goes to <store>/prefect-results of the run's `store` (tasks/storage/results.py)
    from flows.retune import retune_flow  # noqa: E402,F401,F811
    from tasks.storage.results import for_deployment_run  # noqa: E402

    retune_flow = for_deployment_run(retune_flow)
