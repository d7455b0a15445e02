"""Nightly retune flow: the same stages as compile (flows/stages.py) for every model of a device,
with retune's decisions (tasks/retune.py): `budget` more trials on top of LATEST's, warm-started
from LATEST's and the shared per-device database (and pushed back to it), built and validated in
the entry's precision, published only when it validated and is no slower than LATEST measured
now on the same device. One model's failure does not stop the others."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows import stages
from tasks import events, progress, retune
from tasks.devices.profiles import DeviceProfile
from tasks.devices.session import DeviceSession
from tasks.devices.validate import gate_thresholds
from tasks.importers.datasets import load_dataset
from tasks.importers.model_import import parse_input_spec
from tasks.precision.stage import PrecisionOptions
from tasks.runlog import run_logger
from tasks.storage import cache
from tasks.storage.store import clean_uri

check_parameters = task(retune.check_parameters, name="check-parameters", cache_policy=NO_CACHE)


def retune_model(
    entry: retune.ModelEntry,
    session: DeviceSession,
    store: str,
    budget: int,
    dask_address: str | None,
    precision: str | None,
    precision_options: dict | None,
    refresh: bool = False,
    gate: dict | None = None,
    batch: int | None = None,
) -> retune.Outcome:
    """Retune, rebuild, validate, compare and maybe publish one model; never raises.

    Plain, not a task: the tuning fan-out may ship its context to Dask, and a task's context
    would carry the session's local worker handles."""
    profile: DeviceProfile = session.profile
    outcome = retune.Outcome(entry.model, profile.name, "failed", "")
    try:
        with cache.run_dir("retune-") as work_dir:
            _retune(
                entry,
                session,
                store,
                budget,
                dask_address,
                precision,
                precision_options,
                refresh,
                work_dir,
                outcome,
                gate,
                batch,
            )
    except Exception as err:  # noqa: BLE001 - one model's failure must not stop the others
        outcome.status, outcome.reason = "failed", retune.failure_reason(err)
        outcome.failure = retune.failure_kind(err)
    run_logger().info(f"{entry.name} on {profile.name}: {outcome.status}: {outcome.reason}")
    if outcome.status == "failed":
        events.emit_retune_failed(
            entry.name, profile.name, outcome.reason, latency_ms=outcome.new_ms, failure=outcome.failure
        )
    return outcome


def _retune(
    entry,
    session: DeviceSession,
    store,
    budget,
    dask_address,
    run_precision,
    precision_options,
    refresh,
    work_dir: Path,
    outcome: retune.Outcome,
    gate: dict | None = None,
    run_batch: int | None = None,
) -> None:
    started = time.monotonic()
    profile = session.profile
    progress.update(stage="fetch", model=entry.name, device=profile.name)
    specs_in = [parse_input_spec(s) for s in entry.inputs]
    source = stages.fetch(entry.model, specs_in)
    latest = retune.latest_build(store, source.name, profile.name, work_dir / "latest")
    outcome.latest_build = latest.build_id if latest else None
    wanted = retune.entry_precision(entry, run_precision, latest)
    prepared = stages.import_model(source, profile, specs_in, wanted, refresh, retune.entry_batch(entry, run_batch))
    outcome.precision = prepared.precision
    same_inputs = retune.comparable(latest, prepared.specs)  # None: LATEST takes other inputs (another batch)
    dataset = load_dataset(entry.data, prepared.specs)
    options = {
        "calibration": entry.calibration or entry.data,  # int8: the entry's data unless told otherwise
        **{k: v for k, v in (precision_options or {}).items() if v is not None},
    }
    prepared = stages.precision(prepared, profile, PrecisionOptions(**options), refresh)
    tuning_plan = stages.plan(prepared, profile, budget)
    latest_same_precision = same_inputs if same_inputs and same_inputs.precision == prepared.precision else None
    outcome.budget = (latest_same_precision.budget if latest_same_precision else 0) + sum(
        t.trials for t in tuning_plan.tuned
    )
    if latest_same_precision and not tuning_plan.tuned and not refresh:
        outcome.status, outcome.reason = (
            "kept",
            f"no extra budget: nothing tuned; LATEST {latest_same_precision.build_id} is current",
        )
        return
    latest_db = latest_same_precision.folder if latest_same_precision else None
    tuning = stages.tune(
        tuning_plan,
        session,
        store,
        work_dir,
        source.name,
        extra_seed=latest_db,
        reuse_paid=False,
        dask_address=dask_address,
        refresh=refresh,
    )
    outcome.trials = tuning.new_trials
    built = stages.pick_and_build(prepared, tuning, session, work_dir, [latest_db] if latest_db else [], refresh)
    if (
        latest_same_precision
        and built.db_dir
        and retune.same_database(built.db_dir, latest_same_precision)
        and not refresh
    ):
        outcome.status, outcome.reason = (
            "kept",
            f"tuning found nothing better; LATEST {latest_same_precision.build_id} is current",
        )
        return
    run, validation, framework_ms = stages.validate(built, prepared, dataset, session, gate)
    outcome.validation = validation.to_json()
    outcome.new_ms = run.median_ms
    names, sample = prepared.input_names, [dataset.sample(0)]
    if same_inputs:  # both measured now, on the same device kind, same input, same repeats
        outcome.latest_ms = session.measure(same_inputs.library, sample, names).median_ms
        outcome.new_ms = session.measure(built.library, sample, names).median_ms
    publish, outcome.reason = retune.decide(validation.passed, validation.reason, outcome.new_ms, outcome.latest_ms)
    if latest and not same_inputs:
        outcome.reason += f" (LATEST {latest.build_id} takes inputs {', '.join(latest.inputs)}: not compared)"
    if not publish:
        if validation.passed and latest and outcome.latest_ms is not None:  # validated but slower than LATEST
            events.emit_regressed(
                source.name,
                profile.name,
                outcome.new_ms,
                outcome.latest_ms,
                build_id=latest.build_id,
                precision=prepared.precision,
                reason=outcome.reason,
            )
        outcome.status = "kept" if latest else "failed"
        if not latest:
            outcome.reason = outcome.reason.replace("; kept LATEST", "; nothing published")
            outcome.failure = "gate"  # validation failed (decide() publishes whatever validated with no LATEST)
        return
    layers = stages.layer_times(built, prepared, dataset, session)  # published: its per-layer time table
    baselines = {
        f"{source.framework} (host)": framework_ms,
        **({f"LATEST {latest.build_id} (device)": outcome.latest_ms} if latest and same_inputs else {}),
    }
    report = stages.make_report(
        prepared,
        session,
        tuning_plan,
        tuning,
        built,
        run,
        validation,
        framework_ms,
        dataset,
        trials_budget=outcome.budget,
        baselines=baselines,
        layer_times=layers,
        retune={
            "previous_build": outcome.latest_build,
            "previous_latency_ms": outcome.latest_ms,
            "previous_precision": latest.precision if latest else None,
            "decision": outcome.reason,
        },
    )
    report.latency_ms = outcome.new_ms
    report.wall_seconds = round(time.monotonic() - started, 1)
    report = stages.publish(store, report, built, work_dir)
    outcome.status, outcome.build_id, outcome.build_uri = "published", report.build_id, report.build_uri
    events.emit_published(
        report.model,
        report.device,
        report.latency_ms,
        build_id=report.build_id,
        precision=report.precision,
        store=clean_uri(store),
        previous_ms=outcome.latest_ms,
        previous_build=outcome.latest_build,
    )


@flow(name="tvmflow-retune", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def retune_flow(
    device: str = "local",
    models: list | None = None,
    budget: int = 64,
    store: str = "./artifacts",
    tracker: str | None = None,
    dask_address: str | None = None,
    precision: str | None = None,
    worker_timeout: float = 60.0,
    precision_options: dict | None = None,
    refresh: bool = False,
    gate: dict | None = None,
    batch: int | None = None,
) -> list[dict]:
    """Retune every model (default: the device's `models` in the fleet file) with `budget` more trials each.

    `precision` None: each entry's own `precision`, else its LATEST's, else fp32. `gate`: overrides
    of the validation thresholds (tasks.devices.validate.GATE_KEYS). `batch`: the models' dynamic batch
    dimension fixed to this (None: 1; an entry's own `batch` wins), as compile's --batch; a LATEST that
    takes other inputs is not measured against (the rebuilt model is published if it validates)."""
    profile, entries = check_parameters(device, models, budget, store, precision, batch)
    gate_thresholds("fp32", gate)  # a bad gate key fails now (its values apply to every precision)
    with DeviceSession(profile, tracker, worker_timeout, str(cache.cache_root() / "logs")) as session:
        # device workers start on first use: a model with nothing to tune never waits for them
        outcomes = [
            retune_model(
                entry, session, store, int(budget), dask_address, precision, precision_options, refresh, gate, batch
            )
            for entry in entries
        ]
    key = "".join(c if c.isalnum() else "-" for c in f"retune-{device}").lower()
    create_table_artifact(
        table=retune.summary_rows(outcomes),
        key=f"{key}-summary",
        description=f"nightly retune of {device}: one row per model",
    )
    create_markdown_artifact(
        markdown=retune.summary_markdown(outcomes, device, int(budget)),
        key=f"{key}-report",
        description="nightly retune report",
    )
    failed = retune.run_failed(outcomes)  # GateFailed / Unreachable / TvmflowError: the CLI's exit code
    if failed:
        raise failed
    return [o.to_json() for o in outcomes]


if __name__ != "flows.retune":  # loaded by file path (deployment entrypoint flows/retune.py:retune_flow):
    # use the importable module's flow, so Dask workers can unpickle what refers to it;
    # its result goes to <store>/prefect-results of the run's `store` (tasks/storage/results.py)
    from flows.retune import retune_flow  # noqa: E402,F401,F811
    from tasks.storage.results import for_deployment_run  # noqa: E402

    retune_flow = for_deployment_run(retune_flow)
