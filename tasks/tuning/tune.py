"""Tune one MetaSchedule task: its own search, work dir and JSON database, measured on device
workers through a TVM RPC tracker, with the XGBoost cost model.

The builder and runner are shared by every task tuned in one process: starting the runner's
popen pool costs ~30 s here, paid once instead of once per task.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.build.int8_isa import space_for  # packed int8 GEMMs (tasks.build.int8_pack) get the tensorize space
from tasks.devices.capacity import limited_runner
from tasks.tuning.extract import TuningTask

log = logging.getLogger("tvmflow.tune")
INVALID_SECS = 1e9  # MetaSchedule stores failed candidates with huge run_secs


@dataclass
class TuneResult:
    name: str
    trials_planned: int
    trials_run: int = 0
    valid: int = 0
    best_ms: float | None = None
    seconds: float = 0.0
    db_dir: str = ""
    error: str | None = None
    cached: bool = False
    curve: list | None = None  # [(trials, best_ms, seconds since the search began)] after each measured round

    def to_json(self) -> dict:
        return asdict(self)


def lean_build(mod, target, _params):
    """The default builder minus `import tvm.s_tir.tensor_intrin` (37 s per worker per batch here)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def per_iter_for(servers: int, per_iter: int = 16) -> int:
    """Candidates per round: at least two per device worker so none idles while others measure."""
    return max(per_iter, 2 * max(servers, 1))


def local_builder(target: dict, workers: int, cross_compiler: str | None = None):
    """The candidates' builder: lean_build on CPUs; on CUDA tasks.build.gpu.cuda_build (tensor-core
    candidates need its build config) with a longer timeout (nvcc is slow)."""
    from tvm.s_tir import meta_schedule as ms

    from tasks.build.gpu import cuda_build

    cuda = target.get("kind") == "cuda"
    return ms.builder.LocalBuilder(
        max_workers=workers,
        timeout_sec=120 if cuda else 60,
        f_build=cuda_build if cuda else lean_build,
        f_export=functools.partial(export_with, cross_compiler=cross_compiler),
    )


def rpc_runner(tracker_host: str, tracker_port: int, key: str, servers: int, session_timeout: int = 60):
    """MetaSchedule's RPC runner over the tracker's `key` servers: it measures `servers`
    candidates at once (one per device worker; a CUDA device has one worker per GPU)."""
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(
            tracker_host=tracker_host,
            tracker_port=tracker_port,
            tracker_key=key,
            session_timeout_sec=session_timeout,
        ),
        evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40),
        max_workers=max(servers, 1),
    )


def export_with(mod, cross_compiler: str | None = None) -> str:
    """Export a candidate as a shared library, cross-compiled where the device needs it."""
    import os
    import tempfile

    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler) if cross_compiler else None)
    return path


_SHARED: dict = {}
_SHARED_LOCK = threading.Lock()


def measure_tools(
    tracker_host: str,
    tracker_port: int,
    key: str,
    servers: int,
    cross_compiler: str | None = None,
    session_timeout: int = 60,
    target: dict | None = None,
):
    """(builder, runner) shared across tasks of this process for one tracker/key."""
    kind = (target or {}).get("kind", "llvm")
    ident = (tracker_host, tracker_port, key, servers, cross_compiler, kind)
    with _SHARED_LOCK:
        if ident not in _SHARED:
            builder = local_builder(target or {"kind": kind}, 2, cross_compiler)
            _SHARED[ident] = (builder, rpc_runner(tracker_host, tracker_port, key, servers, session_timeout))
        return _SHARED[ident]


def _progress_callback(result: TuneResult, label: str, report):
    """A MeasureCallback that logs trials and best latency after every measured round."""
    from tvm.ir.utils import derived_object

    began = time.monotonic()
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            errors = []
            for built, ran in zip(builder_results, runner_results):
                result.trials_run += 1
                secs = [float(s) for s in (ran.run_secs or [])]
                if built.error_msg or ran.error_msg or not secs or min(secs) >= INVALID_SECS:
                    errors.append((built.error_msg or ran.error_msg or "no timing").strip().splitlines()[0])
                    continue
                result.valid += 1
                ms_ = 1000 * sum(secs) / len(secs)
                result.best_ms = ms_ if result.best_ms is None else min(result.best_ms, ms_)
            result.curve.append((result.trials_run, result.best_ms, round(time.monotonic() - began, 2)))
            if errors and result.valid == 0:
                result.error = errors[0][:300]
            best = f"{result.best_ms:.4f} ms" if result.best_ms is not None else "none valid yet"
            report(
                f"{label} {result.name}: {result.trials_run}/{result.trials_planned} trials, "
                f"best {best}" + (f", {len(errors)} failed this round" if errors else "")
            )

    return Progress()


def tune_task(
    task: TuningTask,
    target: dict,
    work_dir: str | Path,
    tracker: tuple[str, int],
    key: str,
    servers: int = 1,
    cross_compiler: str | None = None,
    label: str = "",
    report=None,
    per_iter: int = 16,
    seed_db_dir: str | None = None,
) -> TuneResult:
    """Search schedules for one task; never raises for device-side failures (they go in `error`)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    report = report or log.info
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    result = TuneResult(task.name, task.trials, db_dir=str(work_dir), curve=[])
    if task.trials <= 0:
        result.error = "not tuned: no trials allotted (too few FLOPs to matter)"
        return result
    started = time.monotonic()
    try:
        builder, runner = measure_tools(*tracker, key, servers, cross_compiler, target=target)
        runner = limited_runner(runner, key, servers)  # measurements hold the device's global slots
        database = ms.database.JSONDatabase(
            path_workload=str(work_dir / "database_workload.json"),
            path_tuning_record=str(work_dir / "database_tuning_record.json"),
        )
        if seed_db_dir:
            seed_database(database, seed_db_dir)
        mod = tvm.ir.load_json(task.mod_json)
        ctx = ms.TuneContext(
            mod=mod,
            target=tvm.target.Target(target),
            space_generator=space_for(mod, target),
            search_strategy="evolutionary",
            task_name=task.name,
            num_threads=2,
            rand_state=1,
        )
        ms.tune_tasks(
            tasks=[ctx],
            task_weights=[1.0],
            work_dir=str(work_dir),
            max_trials_global=task.trials,
            num_trials_per_iter=min(per_iter_for(servers, per_iter), task.trials),
            builder=builder,
            runner=runner,
            database=database,
            cost_model=ms.cost_model.XGBModel(num_tuning_cores=2),
            measure_callbacks=[
                *ms.measure_callback.MeasureCallback.create("default"),
                _progress_callback(result, label, report),
            ],
        )
        if result.valid:
            result.error = None
        elif not result.error:
            result.error = f"no valid candidate in {result.trials_run} trials"
    except Exception as err:  # noqa: BLE001 - one task's failure must not sink the others
        result.error = (
            f"{err.__class__.__name__}: {str(err).strip().splitlines()[-1][:300] if str(err).strip() else ''}"
        )
    result.seconds = round(time.monotonic() - started, 2)
    (work_dir / "result.json").write_text(json.dumps(result.to_json()))
    return result


def seed_database(database, seed_db_dir: str) -> None:
    """Copy earlier records into this task's database so the search warm-starts from them."""
    from tvm.s_tir import meta_schedule as ms

    seed = ms.database.JSONDatabase(
        path_workload=str(Path(seed_db_dir) / "database_workload.json"),
        path_tuning_record=str(Path(seed_db_dir) / "database_tuning_record.json"),
    )
    for record in seed.get_all_tuning_records():
        workload = database.commit_workload(record.workload.mod)
        database.commit_tuning_record(
            ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target, record.args_info)
        )
