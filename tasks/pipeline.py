"""The pipeline's stages as plain functions over typed records (tasks/records.py), Prefect-free.

flows/stages.py wraps each in a Prefect task; the benchmarks call them directly. Every output
that is slow to make is cached by content in tasks.storage.cache (stage keys carry tvmflow's
and TVM's versions, the stage's schema version, the target and the inputs' hashes); `refresh`
ignores those caches.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import tvm

from tasks.devices.layer_times import LayerProfile, profile_layers, profiles_here
from tasks.devices.profiles import DeviceProfile
from tasks.devices.session import DeviceAddress, DeviceSession
from tasks.devices.validate import DeviceRun, Validation, compare, onnxruntime_int8_outputs
from tasks.errors import GateFailed
from tasks.importers.class_names import names_for
from tasks.importers.model_import import (
    InputSpec,
    detect_format,
    export_factory,
    fetch_model_files,
    framework_of,
    import_model,
    is_factory,
    model_name,
)
from tasks.importers.reference import (
    Reference,
    export_onnx_for_baseline,
    onnxruntime_latency,
)
from tasks.precision.qdq import effective_precision, prequantized_info
from tasks.precision.stage import (
    PrecisionOptions,
    layer_report,
    lower_precision,
    worst_layer,
)
from tasks.records import (
    Build,
    BuildReport,
    ModelSource,
    PreparedModel,
    TaskResult,
    TuningPlan,
)
from tasks.report import write_report_files
from tasks.runlog import run_logger
from tasks.storage import cache
from tasks.tuning.extract import (
    TuningTask,
    allocate_trials,
    convert_layout,
    extract_tasks,
    fold_batchnorm,
    prepare_for_tuning,
)
from tasks.tuning.pick_best import DB_FILES, has_db, merge_databases


def fetch_model(spec: str, inputs: list[InputSpec] | None = None) -> ModelSource:
    """A factory is exported to .pt2 first, so it is hashed by content like any file."""
    downloads = cache.cache_root() / "models"
    if is_factory(spec):
        tmp = downloads / "factory" / (spec.replace(":", "_") + ".pt2")
        path = export_factory(spec, tmp, inputs)
        return ModelSource(model_name(spec), path, cache.sha256_file(path), "torch")
    fetched = fetch_model_files(spec, downloads)  # one file, or a multi-file model's bundle dir
    fmt = detect_format(fetched.path)
    return ModelSource(model_name(spec), fetched.path, fetched.sha256, framework_of(fmt))


def import_prepared(
    source: ModelSource,
    device: DeviceProfile,
    inputs: list[InputSpec] | None = None,
    refresh: bool = False,
    batch: int | None = None,
):
    """(prepared IRModule, input specs, cache key, cache hit?, importer notes, graph) of the model as
    imported (fp32 or QDQ), its dynamic batch dimension fixed to `batch` (None: 1). `graph`: the
    module before lowering, kept where the build picks per operator between oneDNN and TVM
    (tasks.build.cpu_pick_best: this host's x86 CPU, in NHWC), else None."""
    from tasks.build.cpu_pick_best import library_here, preferred_layout

    key = cache.stage_key("import", device.target_key(), source.sha256, [str(s) for s in inputs or []], batch)
    hit = cache.lookup("import", key, refresh)
    if hit:
        specs = [
            InputSpec(s["name"], tuple(s["shape"]), s["dtype"]) for s in json.loads((hit / "inputs.json").read_text())
        ]
        notes = json.loads((hit / "notes.json").read_text()) if (hit / "notes.json").exists() else []
        graph_file = hit / "graph.json"
        graph = tvm.ir.load_json(graph_file.read_text()) if graph_file.exists() else None
        return tvm.ir.load_json((hit / "prepared.json").read_text()), specs, key, True, notes, graph
    imported = import_model(source.path, inputs, batch=batch)
    graph = convert_layout(fold_batchnorm(imported.mod), preferred_layout(device))
    prepared = prepare_for_tuning(graph, device.tvm_target())
    if not library_here(device):
        graph = None
    with cache.CacheEntry("import", key) as entry:
        (entry.path / "prepared.json").write_text(tvm.ir.save_json(prepared))
        if graph is not None:
            (entry.path / "graph.json").write_text(tvm.ir.save_json(graph))
        (entry.path / "inputs.json").write_text(json.dumps([s.__dict__ for s in imported.inputs]))
        (entry.path / "notes.json").write_text(json.dumps(list(imported.notes)))
        entry.commit()
    return prepared, imported.inputs, key, False, list(imported.notes), graph


def import_stage(
    source: ModelSource,
    device: DeviceProfile,
    inputs: list[InputSpec] | None,
    precision: str,
    refresh: bool = False,
    batch: int | None = None,
) -> PreparedModel:
    """The model imported and lowered as it comes (fp32, or int8 for a QDQ model); `precision`
    is the one asked for: a pre-quantized model turns it into int8 (tasks/precision/qdq.py).
    `batch` fixes a dynamic batch dimension (None: 1)."""
    inputs = list(inputs or [])
    mod, specs, key, hit, notes, graph = import_prepared(source, device, inputs, refresh, batch)
    prepared = PreparedModel(
        source,
        mod,
        specs,
        key,
        precision,
        inputs,
        cache_hits=["import"] if hit else [],
        batch=batch,
        notes=notes,
        graph=graph,
    )
    prequantized = prequantized_info(mod)
    prepared.precision = effective_precision(precision, prequantized)
    if prequantized:
        prepared.precision_info = prequantized
        run_logger().info(
            f"pre-quantized int8 (QDQ) model: {len(prequantized['integer_layers'])} integer layers, "
            f"{len(prequantized['kept_float'])} float; validated with the int8 gate, no calibration"
        )
    return prepared


def precision_stage(
    prepared: PreparedModel, device: DeviceProfile, options: PrecisionOptions | None = None, refresh: bool = False
) -> PreparedModel:
    """fp16 / bf16 / calibrated int8 through tasks.precision.stage; fp32 and QDQ models pass as they are.
    Compile and retune both run it, so a retune of an int8 entry tunes and builds int8 kernels."""
    if prepared.precision == "fp32" or prepared.precision_info is not None:
        return prepared
    lowered = lower_precision(
        prepared.source,
        device,
        prepared.requested_inputs,
        prepared.specs,
        prepared.precision,
        options or PrecisionOptions(),
        refresh,
        batch=prepared.batch,
    )
    return replace(
        prepared,
        mod=lowered.prepared,
        graph=None,  # the fp32 graph no longer describes the module: no oneDNN pick-best
        key=lowered.key,
        precision_info=lowered.info,
        converted=lowered.converted,
        cache_hits=prepared.cache_hits + (["precision"] if lowered.cached else []),
    )


def prepare_model(
    source: ModelSource,
    device: DeviceProfile,
    inputs: list[InputSpec] | None,
    precision: str,
    options: PrecisionOptions | None = None,
    refresh: bool = False,
) -> PreparedModel:
    """import_stage then precision_stage (for callers without Prefect, e.g. the benchmarks)."""
    return precision_stage(import_stage(source, device, inputs, precision, refresh), device, options, refresh)


def plan_tuning(prepared: PreparedModel, device: DeviceProfile, trials: int, per_iter: int = 16) -> TuningPlan:
    tasks = allocate_trials(extract_tasks(prepared.mod, device.tvm_target()), trials, per_iter)
    return TuningPlan(tasks, int(trials))


def db_digest(db_dir: str | Path | None) -> str | None:
    """Content hash of a tuning database folder, None if there is none."""
    return cache.files_digest(db_dir, DB_FILES) if db_dir and has_db(db_dir) else None


def tune_one(
    task_: TuningTask,
    device: DeviceAddress,
    label: str = "",
    per_iter: int = 16,
    seed_db_dir: str | None = None,
    refresh: bool = False,
) -> TaskResult:
    """Tune one task into its own cached database; a device failure is returned, not raised.

    `seed_db_dir` (earlier tuning of this device) warm-starts the search; its content is part
    of the cache key, so a retune with the same seed and budget reuses the earlier search.
    """
    from tasks.tuning.tune import tune_task

    profile = device.profile
    seed = db_digest(seed_db_dir)
    key = cache.stage_key("tune", profile.target_key(), tvm_workload(task_), task_.trials, per_iter, seed)
    hit = cache.lookup("tune", key, refresh)
    logger = run_logger()
    if hit:
        result = TaskResult.from_json(json.loads((hit / "result.json").read_text()))
        result.cached, result.db_dir = True, str(hit)
        logger.info(f"{label} {task_.name}: cache hit, {result.trials_run} trials reused")
        return result
    with cache.CacheEntry("tune", key) as entry:
        tuned = tune_task(
            task_,
            profile.target,
            entry.path,
            device.tracker,
            profile.rpc_key,
            device.servers,
            profile.cross_compiler,
            label,
            logger.info,
            per_iter,
            seed_db_dir if seed else None,
        )
        result = TaskResult.from_json(tuned.to_json())
        if result.error is None or task_.trials <= 0:
            final = entry.commit()  # failed searches are not cached: a later run retries them
            result.db_dir = str(final)
            (final / "result.json").write_text(json.dumps(result.to_json()))
        else:
            logger.warning(f"{label} {task_.name}: tuning failed: {result.error}")
    return result


def tvm_workload(task_: TuningTask) -> str:
    import hashlib

    return hashlib.sha256(task_.mod_json.encode()).hexdigest()


def pick_best(sources: list[str | Path], out_dir: Path, device: DeviceProfile | None = None) -> tuple[Path, int]:
    """Best record per workload; on a device this host can run, only records whose kernel
    computes what the default lowering computes (tasks.tuning.pick_best.record_is_correct)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    count = merge_databases(
        [s for s in sources if s], out_dir, verify_target=device.target if device and device.runs_on_host() else None
    )
    return out_dir, count


def gpu_build_here(device: DeviceProfile) -> bool:
    """A CUDA device profile on a host with a GPU: the build picks per operator between cuDNN /
    cuBLAS and TVM's kernels by timing them (tasks.build.gpu.compile_gpu); elsewhere, today's build."""
    return device.tvm_target().kind.name == "cuda" and bool(tvm.cuda(0).exist)


def build(
    prepared: PreparedModel, device: DeviceProfile, db_dir: Path | None, records: int = 0, refresh: bool = False
) -> Build:
    """The exported library for this module + database + target, cached by their content
    (with the per-operator backend choices of a GPU or x86-host build, choices.json)."""
    from tasks.build.candidates import OperatorChoice
    from tasks.build.compile import build_library, export_library

    digest = db_digest(db_dir) if records else None
    gpu = gpu_build_here(device)
    pick = ["gpu-pick-best"] if gpu else ["cpu-pick-best"] if prepared.graph is not None else []
    parts = [prepared.key, digest or "untuned", device.cross_compiler] + pick
    key = cache.stage_key("build", device.target_key(), *parts)
    hit = cache.lookup("build", key, refresh)
    if hit:
        saved = json.loads((hit / "choices.json").read_text()) if (hit / "choices.json").exists() else []
        return Build(
            hit / "model.so", db_dir, records, cached=True, choices=[OperatorChoice.from_json(c) for c in saved]
        )
    choices: list[OperatorChoice] = []
    with cache.CacheEntry("build", key) as entry:
        if gpu:
            from tasks.build.gpu import compile_gpu

            executable, choices = compile_gpu(
                prepared.mod,
                device,
                db_dir if digest else None,
                use_cuda_graph=True,
                vendor=("cudnn", "cublas"),
                dev=tvm.cuda(0),
                log=run_logger().info,
            )
            export_library(executable, device, entry.path / "model.so")
            (entry.path / "choices.json").write_text(json.dumps([c.to_json() for c in choices]))
        elif prepared.graph is not None:  # this host's x86 CPU: oneDNN or TVM, per operator
            from tasks.build.cpu_pick_best import VENDOR, compile_cpu
            from tasks.build.cpu_vendor import link_options

            executable, choices, uses_library = compile_cpu(
                prepared.mod, prepared.graph, prepared.specs, device, db_dir if digest else None, run_logger().info
            )
            options = link_options(VENDOR) if uses_library else None
            export_library(executable, device, entry.path / "model.so", options=options)
            (entry.path / "choices.json").write_text(json.dumps([c.to_json() for c in choices]))
        else:
            build_library(prepared.mod, device, db_dir if digest else None, entry.path / "model.so")
        final = entry.commit()
    return Build(final / "model.so", db_dir, records, cached=False, choices=list(choices))


def validate(
    build_: Build, prepared: PreparedModel, dataset, session: DeviceSession, thresholds: dict | None = None
) -> tuple[DeviceRun, Validation, float]:
    """(device run, Validation, framework latency): outputs on the device vs the source framework,
    judged by the precision's gate with `thresholds` overrides (--gate)."""
    names = prepared.input_names
    samples = [dataset.sample(i) for i in range(len(dataset))]
    run = session.measure(build_.library, samples, names)
    source = prepared.source
    reference = Reference(source.path, source.framework, names)
    first = run.outputs[0][0] if run.outputs and len(run.outputs[0]) else None
    classes = int(first.shape[-1]) if first is not None and getattr(first, "ndim", 0) >= 1 else 0
    validation = compare(
        run.outputs,
        [reference.run(s) for s in samples],
        prepared.precision,
        dataset.labels,
        thresholds=thresholds,
        class_names=names_for(classes, getattr(dataset, "class_names", None) or None) if classes else None,
        files=list(getattr(dataset, "files", None) or []) or None,
        baseline_outputs=framework_int8_outputs(prepared, samples),
    )
    return run, validation, reference.latency_ms(samples[0])


def layer_times(build_: Build, prepared: PreparedModel, dataset, session: DeviceSession) -> LayerProfile | None:
    """The per-layer time table of a validated build (tasks.devices.layer_times) on the first sample,
    measured in this process while holding a slot of the device; None where the device is not this
    host's CPU. A profile that cannot run is logged, not fatal: the build validated, the table is extra."""
    from tasks.devices.capacity import on_device

    profile, address = session.profile, session.start()
    if not profiles_here(profile.target, address.tracker[0]):
        run_logger().info(
            f"per-layer times not measured: device {profile.name!r} is not this host's CPU "
            "(TVM 0.27's VM profiling hook cannot run over RPC)"
        )
        return None
    try:
        with on_device(profile.rpc_key, address.slots):
            return profile_layers(
                build_.library, dataset.sample(0), prepared.input_names, f"this host's CPU (device {profile.name!r})"
            )
    except Exception as err:  # noqa: BLE001 - see above
        run_logger().warning(f"per-layer times unavailable: {str(err).splitlines()[0][:200] if str(err) else err!r}")
        return None


def framework_int8_outputs(prepared: PreparedModel, samples: list[dict]) -> list | None:
    """For an ONNX model that tvmflow quantized: onnxruntime's own int8 (QDQ) of it, calibrated on the
    same samples, run on the validation samples. The gate passes a build at least as faithful as it.
    None where there is no such reference (other frameworks, pre-quantized models, no calibration URI)."""
    import tempfile

    calibration = (prepared.precision_info or {}).get("calibration") or {}
    source = prepared.source
    if prepared.precision != "int8" or source.framework != "onnx" or not calibration.get("uri"):
        return None
    from tasks.precision.calibrate import load_calibration

    try:
        with tempfile.TemporaryDirectory(prefix="tvmflow-ort-int8-") as work:
            return onnxruntime_int8_outputs(
                source.path,
                load_calibration(calibration["uri"], prepared.specs),
                samples,
                prepared.input_names,
                work,
            )
    except Exception as err:  # noqa: BLE001 - a reference that cannot run is reported, not fatal
        run_logger().warning(f"onnxruntime int8 baseline unavailable: {str(err).splitlines()[0][:200]}")
        return None


def untuned_latency(prepared: PreparedModel, session: DeviceSession, dataset, refresh: bool = False) -> float:
    """Median latency of the build without tuning records (cached: it is slow to build and time)."""
    device = session.profile
    untuned = build(prepared, device, None, refresh=refresh)
    key = cache.stage_key("untuned-latency", device.target_key(), prepared.key)
    value, _ = cache.cached_json(
        "untuned-latency",
        key,
        lambda: session.measure(untuned.library, [dataset.sample(0)], prepared.input_names, repeat=3).median_ms,
        refresh,
    )
    return float(value)


def baselines(source: ModelSource, sample0: dict, framework_ms: float, work_dir: Path) -> dict:
    """Latency of the source framework (and onnxruntime) on this host, for the report."""
    out = {f"{source.framework} (host)": framework_ms}
    try:
        onnx_path = (
            source.path
            if source.framework == "onnx"
            else export_onnx_for_baseline(source.path, work_dir / "baseline.onnx")
        )
        if source.framework != "onnx":
            out["onnxruntime (host)"] = onnxruntime_latency(onnx_path, sample0)
    except Exception as err:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
        run_logger().warning(f"onnxruntime baseline unavailable: {str(err).splitlines()[0][:200]}")
    return out


def gate_failure(report: BuildReport, prepared: PreparedModel, dataset) -> GateFailed:
    """Validation failed: keep the report where the user can read it (outside the run's scratch
    folder) and return the one-line error. For a converted precision the report gets the
    per-layer error against fp32 and the error names the layer to try keeping in float."""
    import uuid

    folder = cache.cache_root() / "failed-runs" / f"{report.model}-{uuid.uuid4().hex[:8]}"
    if prepared.converted is None:
        kept = write_report_files(report, folder)
        return GateFailed(
            f"validation failed ({report.validation.reason}); nothing published; report in {kept['report.md']}"
        )
    rows = layer_report(prepared.source, prepared.requested_inputs, prepared.converted, dataset)
    worst = worst_layer(rows)
    report.per_layer_error = rows
    write_report_files(report, folder)
    worst_row = next((r for r in rows if r["layer"] == worst), None)
    hint = (
        f"; largest per-layer error jump at {worst} (SNR {worst_row['snr_db']:.1f} dB): try --keep-float {worst}"
        if worst_row
        else ""
    )
    return GateFailed(
        f"{report.precision} validation failed ({report.validation.reason}); nothing "
        f"published{hint}; per-layer report in {folder / 'report.md'}"
    )


def report_files(report: BuildReport, build_: Build, folder: Path) -> dict[str, Path]:
    """The files a build publishes: library, tuning database (if any), report.json / report.md."""
    files = {"model.so": build_.library}
    db = build_.db_dir
    if db is not None and has_db(db):
        files.update({n: Path(db) / n for n in DB_FILES})
    files.update(write_report_files(report, folder))
    return files
