"""The pipeline's steps as cached plain functions, each with a thin Prefect @task wrapper.

Every step's cache key hashes its inputs' bytes, its config, the TVM version and the target
(tasks.storage.cache), so a second identical run reuses import, tuning and build and says so.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.storage import cache
from tasks.devices.profiles import DeviceProfile
from tasks.errors import TvmflowError
from tasks.tuning.extract import TuningTask, allocate_trials, extract_tasks, prepare_for_tuning
from tasks.importers.fetch import fetch
from tasks.importers.model_import import InputSpec, export_factory, import_model, is_factory

log = logging.getLogger("tvmflow")


def _logger():
    """Prefect's run logger inside a run, the module logger outside one."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - no active Prefect context
        return log


@dataclass
class ModelSource:
    name: str
    path: Path  # local model file, or a multi-file model's bundle directory (tasks/formats)
    sha256: str
    framework: str  # "onnx" | "torch" | "keras" | "mxnet" | "tflite"


def fetch_model(spec: str, inputs: list[InputSpec] | None = None) -> ModelSource:
    """A factory is exported to .pt2 first, so it is hashed by content like any file."""
    from tasks.importers.formats import fetch_model_files
    from tasks.importers.model_import import detect_format, framework_of, model_name

    downloads = cache.cache_root() / "models"
    if is_factory(spec):
        tmp = downloads / "factory" / (spec.replace(":", "_") + ".pt2")
        path = export_factory(spec, tmp, inputs)
        digest = cache.sha256_file(path)
        return ModelSource(model_name(spec), path, digest, "torch")
    fetched = fetch_model_files(spec, downloads)  # one file, or a multi-file model's bundle dir
    fmt = detect_format(fetched.path)
    return ModelSource(model_name(spec), fetched.path, fetched.sha256, framework_of(fmt))


def import_and_prepare(source: ModelSource, device: DeviceProfile, inputs: list[InputSpec] | None = None):
    """(prepared IRModule, input specs, cache key, cache hit?) for this model and target."""
    import tvm

    # "fixpoint-fusion": modules prepared before the fusion fix must not be reused; "qdq-int8": nor QDQ
    # models imported as fake quantization (tasks/precision/qdq.py)
    key = cache.content_key("import", "fixpoint-fusion", "qdq-int8", source.sha256, [str(s) for s in inputs or []],
                            device.target_key())
    hit = cache.lookup("import", key)
    if hit:
        specs = [InputSpec(s["name"], tuple(s["shape"]), s["dtype"]) for s in json.loads((hit / "inputs.json").read_text())]
        return tvm.ir.load_json((hit / "prepared.json").read_text()), specs, key, True
    imported = import_model(source.path, inputs)
    prepared = prepare_for_tuning(imported.mod, device.tvm_target())
    entry = cache.CacheEntry("import", key)
    (entry.path / "prepared.json").write_text(tvm.ir.save_json(prepared))
    (entry.path / "inputs.json").write_text(json.dumps([s.__dict__ for s in imported.inputs]))
    entry.commit()
    return prepared, imported.inputs, key, False


def plan_tuning(prepared_mod, device: DeviceProfile, trials: int, per_iter: int = 16) -> list[TuningTask]:
    return allocate_trials(extract_tasks(prepared_mod, device.tvm_target()), trials, per_iter)


def tune_one(task_: TuningTask, device: DeviceProfile, tracker: tuple[str, int], servers: int,
             label: str = "", per_iter: int = 16, seed_db_dir: str | None = None) -> dict:
    """Tune one task into its own cached database; a device failure is returned, not raised.

    `seed_db_dir` (earlier tuning of this device) warm-starts the search; its content is part
    of the cache key, so a retune with the same seed and budget reuses the earlier search.
    """
    from tasks.tuning.pick_best import DB_FILES, has_db
    from tasks.tuning.tune import tune_task

    workload = hashlib.sha256(task_.mod_json.encode()).hexdigest()
    seed = None
    if seed_db_dir and has_db(seed_db_dir):
        seed = cache.content_key(*[cache.sha256_file(Path(seed_db_dir) / n) for n in DB_FILES])
    parts = ("tune", workload, device.target_key(), task_.trials, per_iter) + ((seed,) if seed else ())
    key = cache.content_key(*parts)
    hit = cache.lookup("tune", key)
    logger = _logger()
    if hit:
        result = json.loads((hit / "result.json").read_text())
        result.update(cached=True, db_dir=str(hit))
        logger.info(f"{label} {task_.name}: cache hit, {result['trials_run']} trials reused")
        return result
    entry = cache.CacheEntry("tune", key)
    result = tune_task(task_, device.target, entry.path, tracker, device.rpc_key, servers,
                       device.cross_compiler, label, logger.info, per_iter, seed_db_dir if seed else None)
    if result.error is None or task_.trials <= 0:
        final = entry.commit()  # failed searches are not cached: a later run retries them
        result.db_dir = str(final)
        (final / "result.json").write_text(json.dumps(result.to_json()))
    else:
        logger.warning(f"{label} {task_.name}: tuning failed: {result.error}")
    return result.to_json()


def merge_step(results: list[dict], out_dir: Path, device: DeviceProfile | None = None) -> tuple[Path, int]:
    """Best record per workload; on a device this host can run, only records whose kernel
    computes what the default lowering computes (tasks.tuning.pick_best.record_is_correct)."""
    from tasks.tuning.pick_best import merge_databases

    out_dir.mkdir(parents=True, exist_ok=True)
    count = merge_databases([r["db_dir"] for r in results if r.get("db_dir")], out_dir,
                            verify_target=device.target if device and device.runs_on_host() else None)
    return out_dir, count


def build_step(prepared_mod, prepare_key: str, device: DeviceProfile, db_dir: Path | None) -> tuple[Path, bool]:
    """The exported library for this module + database + target, cached by their content."""
    from tasks.build.compile import build_library
    from tasks.tuning.pick_best import DB_FILES, has_db

    db_hash = "untuned"
    if db_dir and has_db(db_dir):
        db_hash = cache.content_key(*[cache.sha256_file(Path(db_dir) / n) for n in DB_FILES])
    key = cache.content_key("build", prepare_key, db_hash, device.target_key(), device.cross_compiler)
    hit = cache.lookup("build", key)
    if hit:
        return hit / "model.so", True
    entry = cache.CacheEntry("build", key)
    try:
        build_library(prepared_mod, device, db_dir if db_hash != "untuned" else None, entry.path / "model.so")
    except BaseException:
        entry.discard()
        raise
    return entry.commit() / "model.so", False


@contextlib.contextmanager
def device_workers(device: DeviceProfile, tracker: str | None, worker_timeout: float):
    """Yield (tracker address, server count): local ones started here, or an existing tracker."""
    from tasks.devices.workers import parse_tracker, start_local_workers, wait_for_servers

    tracker = tracker or os.environ.get("TVMFLOW_TRACKER")  # e.g. set by `tvmflow serve` for its worker
    if tracker:
        host, port = parse_tracker(tracker)
        count = wait_for_servers(host, port, device.rpc_key, 1, worker_timeout)
        yield (host, port), count
        return
    if device.local_workers <= 0:
        raise TvmflowError(f"device {device.name!r} has no local workers: pass --tracker host:port of a tracker "
                           f"where its rpc servers (key {device.rpc_key!r}) are registered")
    workers = start_local_workers(device.rpc_key, device.local_workers, cache.cache_root() / "logs",
                                  threads=device.target.get("num-cores"))
    try:
        yield (workers.host, workers.tracker_port), device.local_workers
    finally:
        workers.stop()


def device_slots(device: DeviceProfile, servers: int) -> int:
    """Devices of this kind: the fleet file's `count` if set, else the servers found on the tracker."""
    return int(device.extra.get("count") or servers or 1)


def measure(lib, tracker, device: DeviceProfile, servers: int, samples: list[dict], names: list[str], **kw):
    """run_on_device inside the device's global concurrency slot."""
    from tasks.devices.capacity import on_device
    from tasks.devices.validate import run_on_device

    with on_device(device.rpc_key, device_slots(device, servers)):
        return run_on_device(lib, tracker, device.rpc_key, samples, names, device.target.get("kind", "llvm"), **kw)


def validate_build(lib, source: ModelSource, specs, dataset, tracker, device: DeviceProfile, precision: str,
                   servers: int = 1):
    """(device run, Validation, framework latency): outputs on the device vs the source framework."""
    from tasks.importers.reference import Reference
    from tasks.devices.validate import compare

    names = [s.name for s in specs]
    samples = [dataset.sample(i) for i in range(len(dataset))]
    run = measure(lib, tracker, device, servers, samples, names)
    reference = Reference(source.path, source.framework, names)
    validation = compare(run.outputs, [reference.run(s) for s in samples], precision, dataset.labels)
    return run, validation, reference.latency_ms(samples[0])


def cached_value(step: str, key: str, compute):
    """A small JSON value (e.g. a slow untuned latency) cached under `key`."""
    hit = cache.lookup(step, key)
    if hit:
        return json.loads((hit / "value.json").read_text())
    value = compute()
    entry = cache.CacheEntry(step, key)
    (entry.path / "value.json").write_text(json.dumps(value))
    entry.commit()
    return value


def clean_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# Prefect task wrappers: caching is ours (content keys above), so Prefect's is off.
fetch_model_task = task(fetch_model, name="fetch", cache_policy=NO_CACHE)
import_task = task(import_and_prepare, name="import", cache_policy=NO_CACHE)
plan_task = task(plan_tuning, name="extract-tasks", cache_policy=NO_CACHE)
tune_task_ = task(tune_one, name="tune-task", cache_policy=NO_CACHE, task_run_name="tune-{task_.name}")
merge_task = task(merge_step, name="pick-best", cache_policy=NO_CACHE)
build_task = task(build_step, name="build", cache_policy=NO_CACHE)

__all__ = ["TvmflowError"]
