"""On-demand compile flow: the shared stages (flows/stages.py), then publish. Thin: it checks the
parameters, runs the stages in order and refuses to publish a build that failed validation."""

from __future__ import annotations

import logging
import time

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows import stages
from tasks import events, pipeline, progress
from tasks.devices.profiles import get_device
from tasks.devices.session import DeviceSession
from tasks.devices.validate import gate_thresholds
from tasks.errors import TvmflowError
from tasks.importers.bundled import DEFAULT_DATA, DEFAULT_MODEL
from tasks.importers.datasets import load_dataset
from tasks.importers.model_import import model_name, parse_input_spec
from tasks.precision.policy import check_precision
from tasks.precision.policy import precision_warning as slow_precision_warning
from tasks.precision.stage import PrecisionOptions
from tasks.records import BuildReport
from tasks.report import publish_artifacts
from tasks.runlog import run_logger
from tasks.storage import cache
from tasks.storage.publish import safe_segment
from tasks.storage.store import check_store, clean_uri

for noisy in ("tvm.s_tir.meta_schedule", "tvm"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


@flow(name="tvmflow-compile", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def compile_flow(
    model: str = DEFAULT_MODEL,
    device: str = "local",
    trials: int | None = None,
    store: str = "./artifacts",
    inputs: list[str] | None = None,
    data: str | None = None,
    tracker: str | None = None,
    precision: str = "fp32",
    measure_untuned: bool = True,
    worker_timeout: float = 60.0,
    dask_address: str | None = None,
    precision_options: dict | None = None,
    refresh: bool = False,
    gate: dict | None = None,
    batch: int | None = None,
    build_only: bool = False,
) -> dict:
    """Compile, tune, validate and publish one model for one device; returns report.json's content.

    `dask_address` (host:port of a Dask scheduler) runs the tuning fan-out on that cluster.
    `precision_options` (tasks.precision.stage.PrecisionOptions fields): calibration URI, method,
    keep_float, allow/deny lists for fp16/bf16/int8. `refresh` ignores every cached stage output.
    `gate`: overrides of the precision's validation thresholds (tasks.devices.validate.GATE_KEYS).
    `batch`: the model's dynamic batch dimension fixed to this (None: 1). `build_only`: no device
    (cross-compile): build untuned, publish unvalidated (never LATEST; fetch --allow-unvalidated)."""
    started = time.monotonic()
    progress.update(stage="check", model=model_name(model), device=device)
    profile = get_device(device)
    if batch is not None and int(batch) < 1:
        raise TvmflowError(f"batch {batch} is not a positive integer; give --batch 1 or more")
    safe_segment(device, "device")
    check_store(store)  # a wrong bucket or key fails now, not after hours of tuning
    warning = check_precision(precision) and slow_precision_warning(profile, precision)
    gate_thresholds(precision, gate)  # a bad gate key fails now, not after tuning
    if warning:
        run_logger().warning(warning)
    specs_in = [parse_input_spec(s) for s in inputs or []]
    trials = profile.default_trials if trials is None else int(trials)
    source = stages.fetch(model, specs_in)
    safe_segment(source.name, "model")
    prepared = stages.import_model(source, profile, specs_in, precision, refresh, None if batch is None else int(batch))
    prepared = stages.precision(prepared, profile, PrecisionOptions(**(precision_options or {})), refresh)
    if build_only:  # no device session, tuning or validation
        with cache.run_dir("compile-") as work_dir:
            built = stages.build(prepared, profile, None, 0, refresh)
            report = stages.build_only_report(prepared, profile, built, data or DEFAULT_DATA.get(model) or "")
            report.precision_warning = warning or None
            report.wall_seconds = round(time.monotonic() - started, 1)
            report = stages.publish(store, report, built, work_dir)
        return _published(report, store)
    dataset = load_dataset(data or DEFAULT_DATA.get(model), prepared.specs)
    tuning_plan = stages.plan(prepared, profile, trials)
    run_logger().info(f"{len(tuning_plan.tasks)} tuning tasks; {trials} trials over {len(tuning_plan.tuned)} of them")
    with (
        cache.run_dir("compile-") as work_dir,
        DeviceSession(profile, tracker, worker_timeout, str(cache.cache_root() / "logs")) as session,
    ):
        session.start()  # a wrong tracker fails before tuning
        tuning = stages.tune(
            tuning_plan, session, store, work_dir, source.name, dask_address=dask_address, refresh=refresh
        )
        built = stages.pick_and_build(prepared, tuning, session, work_dir, refresh=refresh)
        run, validation, framework_ms = stages.validate(built, prepared, dataset, session, gate)
        untuned_ms = stages.untuned_latency(prepared, session, dataset, refresh) if measure_untuned else None
        layers = stages.layer_times(built, prepared, dataset, session) if validation.passed else None
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
            untuned_latency_ms=untuned_ms,
            precision_warning=warning or None,
            baselines=pipeline.baselines(source, dataset.sample(0), framework_ms, work_dir),
            layer_times=layers,
        )
        if not validation.passed:  # nothing published; the report is kept outside the run's folder
            failure = pipeline.gate_failure(report, prepared, dataset)
            publish_artifacts(report)  # and stays with the run: its per-layer error table as an artifact
            raise failure
        report.wall_seconds = round(time.monotonic() - started, 1)
        report = stages.publish(store, report, built, work_dir)
    return _published(report, store)


def _published(report: BuildReport, store: str) -> dict:
    """Prefect artifacts and the `tvmflow.build.published` event of a published build; report.json's content."""
    publish_artifacts(report)
    events.emit_published(
        report.model,
        report.device,
        report.latency_ms,
        build_id=report.build_id,
        precision=report.precision,
        store=clean_uri(store),
        previous_ms=None,  # compile does not measure LATEST; retune's event carries it
        build_only=report.build_only,
    )
    return report.to_json()


if __name__ != "flows.compile":  # loaded by file path (deployment entrypoint flows/compile.py:compile_flow):
    # use the importable module's flow, so Dask workers can unpickle what refers to it;
    # its result goes to <store>/prefect-results of the run's `store` (tasks/storage/results.py)
    from flows.compile import compile_flow  # noqa: E402,F401,F811
    from tasks.storage.results import for_deployment_run  # noqa: E402

    compile_flow = for_deployment_run(compile_flow)
