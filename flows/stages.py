"""The pipeline's stages as Prefect tasks over typed records, shared by compile and retune:

    fetch -> import -> precision -> extract-tasks -> shared-tuning -> tune-* (fan-out) ->
    pick-best -> save-tuning -> build -> validate -> layer-times -> publish

Stages that wait on a device or the store retry transient failures with backoff and time out
(tasks.retry_policy: DEVICE for validate / untuned-latency / layer-times, STORE for fetch / shared-tuning /
save-tuning / publish); a user error or failed gate is never retried.

Each task wraps a plain function of tasks/ (tasks.pipeline, tasks.tuning.shared_db,
tasks.storage.publish); the flows only decide what to run. Caching is tasks.storage.cache's
(content keys; see its docstring for why not Prefect's), so every task runs with NO_CACHE.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import tvm
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.fanout import tune_fanout
from tasks import pipeline, progress, retry_policy
from tasks.devices.session import DeviceSession
from tasks.devices.validate import Validation
from tasks.records import (
    Build,
    BuildReport,
    PreparedModel,
    TaskResult,
    Tuning,
    TuningPlan,
)
from tasks.storage.cache import tvmflow_version
from tasks.storage.publish import build_prefix, new_build_id, publish_build, uri_of
from tasks.tuning import shared_db
from tasks.tuning.pick_best import has_db, merge_databases


def _stage(fn, name: str, **options):
    """`fn` as a Prefect task named `name` that first reports the stage (tasks.progress);
    `options`: more Prefect task options (retries, timeout: tasks.retry_policy)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        progress.update(stage=name)
        return fn(*args, **kwargs)

    return task(run, name=name, cache_policy=NO_CACHE, **options)


fetch = _stage(pipeline.fetch_model, "fetch", **retry_policy.STORE)
import_model = _stage(pipeline.import_stage, "import")
precision = _stage(pipeline.precision_stage, "precision")
plan = _stage(pipeline.plan_tuning, "extract-tasks")
shared_tuning = _stage(shared_db.prepare, "shared-tuning", **retry_policy.STORE)
save_tuning = _stage(shared_db.push_run, "save-tuning", **retry_policy.STORE)
pick_best = _stage(pipeline.pick_best, "pick-best")
build = _stage(pipeline.build, "build")
validate = _stage(pipeline.validate, "validate", **retry_policy.DEVICE)
untuned_latency = _stage(pipeline.untuned_latency, "untuned-latency", **retry_policy.DEVICE)
layer_times = _stage(pipeline.layer_times, "layer-times", **retry_policy.DEVICE)


def tune(
    tuning_plan: TuningPlan,
    session: DeviceSession,
    store: str,
    work_dir: Path,
    model: str,
    extra_seed: Path | None = None,
    reuse_paid: bool = True,
    dask_address: str | None = None,
    refresh: bool = False,
) -> Tuning:
    """Seed from the shared per-device database, tune what is left (fan-out), push what was
    measured back to it. `extra_seed` (retune: LATEST's database) joins the warm start;
    `reuse_paid=False` (retune, --refresh) tunes every task with trials instead of reusing it."""
    started = time.monotonic()
    reuse = shared_tuning(store, session.profile, tuning_plan.tasks, work_dir, reuse_paid and not refresh)
    seed = reuse.seed_db_dir
    if extra_seed is not None and has_db(extra_seed) and reuse.to_tune:
        merged = work_dir / "seed-with-latest"
        merged.mkdir(parents=True, exist_ok=True)
        merge_databases([d for d in (seed, extra_seed) if d], merged)
        seed = str(merged)
    tuned: list[TaskResult] = []
    if reuse.to_tune:  # device workers start here, only when something is left to measure
        tuned = tune_fanout(
            reuse.to_tune, session.address, seed_db_dir=seed, dask_address=dask_address, refresh=refresh
        )
    ordered = reuse.results([r.to_json() for r in tuned], tuning_plan.tasks)
    results = [TaskResult.from_json(r) for r in ordered]
    shard = save_tuning(store, session.profile, reuse, ordered, work_dir, model)
    return Tuning(results, round(time.monotonic() - started, 1), {**reuse.summary(), "shard": shard})


def pick_and_build(
    prepared: PreparedModel,
    tuning: Tuning,
    session: DeviceSession,
    work_dir: Path,
    extra_sources: list[Path] | None = None,
    refresh: bool = False,
) -> Build:
    """Best record per workload (this run's, reused and `extra_sources`), then the library."""
    sources = [*(extra_sources or []), *(r.db_dir for r in tuning.results if r.db_dir)]
    db_dir, records = pick_best(sources, work_dir / "database", session.profile)
    return build(prepared, session.profile, db_dir, records, refresh)


def make_report(
    prepared: PreparedModel,
    session: DeviceSession,
    tuning_plan: TuningPlan,
    tuning: Tuning,
    built: Build,
    run,
    validation,
    framework_ms: float,
    dataset,
    **extra,
) -> BuildReport:
    """The BuildReport of one validated (or failed) build; `extra` sets the optional fields."""
    source, profile = prepared.source, session.profile
    hits = list(prepared.cache_hits)
    tuned_hits = sum(1 for r in tuning.results if r.cached or r.reused)  # stage cache or shared db
    if tuned_hits:
        hits.append(f"tune ({tuned_hits}/{len(tuning.results)} tasks)")
    if built.cached:
        hits.append("build")
    return BuildReport(
        **_identity(prepared, profile, dataset.source),
        tasks=len(tuning_plan.tasks),
        trials=tuning.new_trials,
        trials_total=sum(r.trials_run for r in tuning.results),
        tuning=tuning.results,
        untuned_tasks=tuning.untuned,
        records=built.records,
        latency_ms=run.median_ms,
        latency_p90_ms=run.p90_ms,
        validation=validation,
        reference={"framework": source.framework, "latency_ms": framework_ms},
        cache_hits=hits,
        tuning_seconds=tuning.seconds,
        tuning_reuse=tuning.reuse,
        precision_info=prepared.precision_info,
        operator_choices=list(built.choices),
        import_notes=list(prepared.notes),
        **extra,
    )


BUILD_ONLY_REASON = "build-only: no reachable worker"


def _identity(prepared: PreparedModel, profile, data: str) -> dict:
    """The fields that say what a report is about (model, device, versions, precision, inputs, data):
    the same for a validated build and a build-only one."""
    source = prepared.source
    return {
        "model": source.name,
        "model_sha256": source.sha256,
        "device": profile.name,
        "target": profile.target,
        "tvm_version": tvm.__version__,
        "tvmflow_version": tvmflow_version(),
        "precision": prepared.precision,
        "framework": source.framework,
        "inputs": [str(s) for s in prepared.specs],
        "data": data,
    }


def build_only_report(prepared: PreparedModel, profile, built: Build, data: str) -> BuildReport:
    """The BuildReport of a build made without a device: untuned, unvalidated, no latency."""
    return BuildReport(
        **_identity(prepared, profile, data),
        tasks=0,
        trials=0,
        tuning=[],
        untuned_tasks=[],
        records=0,
        latency_ms=None,
        latency_p90_ms=None,
        validation=Validation.not_run(prepared.precision, BUILD_ONLY_REASON),
        cache_hits=list(prepared.cache_hits) + (["build"] if built.cached else []),
        precision_info=prepared.precision_info,
        operator_choices=list(built.choices),
        import_notes=list(prepared.notes),
        build_only=True,
    )


@task(name="publish", cache_policy=NO_CACHE, **retry_policy.STORE)
def publish(store: str, report: BuildReport, built: Build, work_dir: Path) -> BuildReport:
    """Upload library, tuning database and report; manifest and LATEST last (tasks.storage.publish)."""
    progress.update(stage="publish")
    build_id = new_build_id()
    report.build_id = build_id
    report.build_uri = uri_of(store, build_prefix(store, report.model, report.device, build_id))
    files = pipeline.report_files(report, built, work_dir / "report")
    published = publish_build(store, report.model, report.device, files, report.manifest_meta(), build_id)
    report.build_uri, report.manifest_uri = published["build_uri"], published["manifest_uri"]
    progress.update(stage="publish", done=True)
    return report
