"""On-demand compile flow: fetch -> import -> extract -> tune (fan-out) -> pick best -> build
-> validate on the device -> publish. Thin: every step is a function in tasks/."""
from __future__ import annotations

import contextlib
import logging
import time
import uuid
from pathlib import Path

import tvm
from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from tasks import steps

from tasks.storage import cache

from tasks.tuning import shared_db as tuning_store
from tasks.importers.bundled import DEFAULT_DATA, DEFAULT_MODEL
from tasks.importers.datasets import load_dataset
from tasks.devices.profiles import get_device
from tasks.errors import TvmflowError
from tasks.importers.model_import import parse_input_spec
from tasks.precision.policy import check_precision
from tasks.precision.policy import precision_warning as slow_precision_warning
from tasks.precision.stage import PrecisionOptions, precision_gate_failure, precision_task
from tasks.precision.qdq import effective_precision, prequantized_info
from tasks.storage.publish import build_prefix, new_build_id, publish_build, safe_segment, uri_of
from tasks.storage.store import check_store
from tasks.importers.reference import Reference, export_onnx_for_baseline, onnxruntime_latency
from tasks.report import publish_artifacts, write_report_files
from tasks.devices.validate import compare, run_on_device
from tasks.steps import device_workers

from flows.fanout import tune_fanout

for noisy in ("tvm.s_tir.meta_schedule", "tvm"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


@task(name="validate", cache_policy=NO_CACHE)
def validate_on_device(lib, source, specs, dataset, tracker, device, precision, servers=1):
    return steps.validate_build(lib, source, specs, dataset, tracker, device, precision, servers)


@task(name="publish", cache_policy=NO_CACHE)
def publish(store, model, device_name, files, meta, build_id):
    return publish_build(store, model, device_name, files, meta, build_id)


def _baselines(source, samples0, framework_ms, work_dir) -> dict:
    out = {f"{source.framework} (host)": framework_ms}
    try:
        onnx_path = source.path if source.framework == "onnx" else export_onnx_for_baseline(
            source.path, work_dir / "baseline.onnx")
        if source.framework != "onnx":
            out["onnxruntime (host)"] = onnxruntime_latency(onnx_path, samples0)
    except Exception as err:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
        steps._logger().warning(f"onnxruntime baseline unavailable: {str(err).splitlines()[0][:200]}")
    return out


@flow(name="tvmflow-compile", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def compile_flow(model: str = DEFAULT_MODEL, device: str = "local", trials: int | None = None,
                 store: str = "./artifacts", inputs: list[str] | None = None, data: str | None = None,
                 tracker: str | None = None, precision: str = "fp32", measure_untuned: bool = True,
                 worker_timeout: float = 60.0, dask_address: str | None = None,
                 precision_options: dict | None = None) -> dict:
    """Compile, tune, validate and publish one model for one device.

    `dask_address` (host:port of a Dask scheduler) runs the tuning fan-out on that cluster.
    `precision_options` (tasks.precision.stage.PrecisionOptions fields): calibration URI, method,
    keep_float, allow/deny lists for fp16/bf16/int8."""
    started = time.monotonic()
    logger = steps._logger()
    profile = get_device(device)
    safe_segment(device, "device")
    check_store(store)  # a wrong bucket or key fails now, not after hours of tuning
    precision_warning = check_precision(precision) and slow_precision_warning(profile, precision)
    if precision_warning:
        logger.warning(precision_warning)
    specs_in = [parse_input_spec(s) for s in inputs or []]
    trials = profile.default_trials if trials is None else int(trials)
    source = steps.fetch_model_task(model, specs_in)
    safe_segment(source.name, "model")
    prepared, specs, prep_key, import_hit = steps.import_task(source, profile, specs_in)
    prequantized = prequantized_info(prepared)  # a QDQ ONNX model: already int8 (tasks/precision/qdq.py)
    precision = effective_precision(precision, prequantized)
    if prequantized:
        logger.info(f"pre-quantized int8 (QDQ) model: {len(prequantized['integer_layers'])} integer layers, "
                    f"{len(prequantized['kept_float'])} float; validated with the int8 gate, no calibration")
    dataset = load_dataset(data or DEFAULT_DATA.get(model), specs)
    lowered = None
    if precision != "fp32" and not prequantized:  # fp16 / bf16 / calibrated int8 (tasks/precision/stage.py)
        lowered = precision_task(source, profile, specs_in, specs, precision, PrecisionOptions(**(precision_options or {})))
        prepared, prep_key = lowered.prepared, lowered.key
    plan = steps.plan_task(prepared, profile, trials)
    logger.info(f"{len(plan)} tuning tasks; {trials} trials over {sum(1 for t in plan if t.trials)} of them")
    work_dir = cache.cache_root() / "runs" / uuid.uuid4().hex[:12]
    work_dir.mkdir(parents=True)
    try:
        with device_workers(profile, tracker, worker_timeout) as (address, servers):
            tune_start = time.monotonic()
            reuse = tuning_store.prepare_task(store, profile, plan, work_dir)  # shared per-device db
            results = reuse.results(tune_fanout(reuse.to_tune, profile, address, servers, seed_db_dir=reuse.seed_db_dir,
                                                dask_address=dask_address), plan)
            tuning_seconds = time.monotonic() - tune_start
            db_dir, records = steps.merge_task(results, work_dir / "database", profile)
            shard = tuning_store.push_run_task(store, profile, reuse, results, work_dir, source.name)
            lib, build_hit = steps.build_task(prepared, prep_key, profile, db_dir)
            run, validation, framework_ms = validate_on_device(lib, source, specs, dataset, address, profile,
                                                               precision, servers)
            untuned_ms = None
            if measure_untuned:
                untuned_lib, _ = steps.build_step(prepared, prep_key, profile, None)
                untuned_ms = steps.cached_value("untuned-latency", cache.content_key(
                    "untuned", prep_key, profile.target_key()), lambda: steps.measure(
                    untuned_lib, address, profile, servers, [dataset.sample(0)], [s.name for s in specs],
                    repeat=3).median_ms)
        hits = ["import"] if import_hit else []
        tuned_hits = sum(1 for r in results if r.get("cached") or r.get("reused"))  # cache or shared db
        if tuned_hits:
            hits.append(f"tune ({tuned_hits}/{len(results)} tasks)")
        if build_hit:
            hits.append("build")
        report = {
            "model": source.name, "model_sha256": source.sha256, "device": device, "target": profile.target,
            "tvm_version": tvm.__version__, "precision": precision, "framework": source.framework,
            "inputs": [str(s) for s in specs], "data": dataset.source, "tasks": len(plan),
            "trials": sum(r["trials_run"] for r in results if not r.get("cached")),
            "trials_total": sum(r["trials_run"] for r in results), "tuning": results,
            "untuned_tasks": [r["name"] for r in results if r["error"]], "records": records,
            "latency_ms": run.median_ms, "latency_p90_ms": run.p90_ms, "untuned_latency_ms": untuned_ms,
            "reference": {"framework": source.framework, "latency_ms": framework_ms},
            "baselines": _baselines(source, dataset.sample(0), framework_ms, work_dir),
            "validation": validation.to_json(), "cache_hits": hits,
            "tuning_seconds": round(tuning_seconds, 1),
            "tuning_reuse": {**reuse.summary(), "shard": shard},
            "precision_info": lowered.info if lowered else prequantized, "precision_warning": precision_warning,
        }
        if not validation.passed and lowered is not None:  # per-layer error: which layer to keep in float
            raise precision_gate_failure(report, source, specs_in, lowered, dataset)
        if not validation.passed:  # the run's work_dir is removed below: keep the report elsewhere
            kept = write_report_files(report, cache.cache_root() / "failed-runs" / work_dir.name)
            raise TvmflowError(f"validation failed ({validation.reason}); nothing published; "
                               f"report in {kept['report.md']}")
        files = {"model.so": lib, "database_workload.json": db_dir / "database_workload.json",
                 "database_tuning_record.json": db_dir / "database_tuning_record.json"}
        report["wall_seconds"] = round(time.monotonic() - started, 1)
        meta = {k: report[k] for k in ("model_sha256", "target", "tvm_version", "precision", "trials",
                                       "tasks", "latency_ms", "validation", "framework", "inputs")}
        meta["timings"] = {"tuning_seconds": report["tuning_seconds"], "wall_seconds": report["wall_seconds"]}
        build_id = new_build_id()
        report.update(build_id=build_id, build_uri=uri_of(store, build_prefix(store, source.name, device, build_id)))
        files.update(write_report_files(report, work_dir / "report"))
        published = publish(store, source.name, device, files, meta, build_id)
        report.update(published)
        publish_artifacts(report)
        return report
    finally:
        steps.clean_dir(work_dir)


if __name__ != "flows.compile":  # loaded by file path (deployment entrypoint flows/compile.py:compile_flow):
    # use the importable module's flow, so Dask workers can unpickle what refers to it;
    # its result goes to <store>/prefect-results of the run's `store` (tasks/storage/results.py)
    from flows.compile import compile_flow  # noqa: E402,F401,F811
    from tasks.storage.results import for_deployment_run  # noqa: E402

    compile_flow = for_deployment_run(compile_flow)
