"""GPU targets: CUDA profiles for any NVIDIA arch, the build options tensor-core schedules need,
DLight defaults for untuned kernels, MetaSchedule tuning measured on a local GPU, and the rule
that a tuned record is kept only where it beats the default schedule.

Why not tasks.build.compile.compile_module: on GPU three things differ (measured on an H200/H100).
1. MetaSchedule's tensor-core candidates mostly fail to build ("tvm_access_ptr element type must
   match") unless storage rewrite is off, and `compile_relax` opens its own PassContext, which
   drops that config for the final build. `compile_gpu` runs the same pipeline under BUILD_CONFIG.
2. `MetaScheduleApplyDatabase` applies a tuned record even where DLight's default is faster;
   `keep_winners` times both per workload and keeps only the records that win.
3. Untuned kernels need a GPU schedule at all (thread bindings): DLight's default rules.
Nothing here imports Prefect: bench/gpu_bench.py runs it on a GPU machine with carried wheels.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

from tasks.tuning.extract import fuse_passes

# What MetaSchedule's CUDA rules read off the target (it refuses to tune without them). 48 KiB is
# the shared memory a block gets without opting in; every arch from sm_70 on has the rest.
CUDA_LIMITS = {"max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
               "thread_warp_size": 32, "registers_per_block": 65536}
BUILD_CONFIG = {"tirx.disable_storage_rewrite": True}
CUDA_NAME = re.compile(r"^cuda-(sm_\d+a?)$")
GPU_KINDS = ("cuda", "nvptx", "rocm", "opencl", "vulkan", "metal", "webgpu")
INVALID_SECS = 1e9  # MetaSchedule stores failed candidates with huge run_secs


def cuda_target(arch: str = "sm_90", host: dict | None = None) -> dict:
    """The target dict of an NVIDIA GPU of compute capability `arch` (sm_80, sm_86, sm_90...)."""
    return {"kind": "cuda", "arch": arch, **CUDA_LIMITS, "host": host or {"kind": "llvm"}}


def is_gpu(target: dict) -> bool:
    return target.get("kind") in GPU_KINDS


def derive_cuda_profile(name: str, fleet: dict):
    """`cuda-sm_86` -> the fleet's `cuda` profile with that arch (None when the name is no such shape)."""
    match = CUDA_NAME.match(name)
    if not match or "cuda" not in fleet:
        return None
    base = fleet["cuda"]
    return dataclasses.replace(base, name=name, rpc_key=name, target={**base.target, "arch": match.group(1)},
                               description=f"NVIDIA GPU {match.group(1)} (derived from the cuda profile)")


def dlight_rules():
    """The default GPU schedules for kernels no tuning record covers (what tvm.compile uses)."""
    from tvm.s_tir import dlight as dl

    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def apply_dlight(mod, target):
    """DLight's ApplyDefaultSchedule, but a rule that matches a kernel and then fails on it
    ("consumers of the cache-write stage that are not properly inlined", seen on
    EfficientNet-Lite0's fused convs) hands the kernel to the next rule instead of failing the
    build; Fallback schedules anything. Mutates and returns `mod`, as DLight does."""
    import tvm

    updated = {}
    for g_var, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs and int(func.attrs.get("tirx.is_scheduled", 0)) == 1):
            continue
        for rule in dlight_rules():
            try:
                space = rule.apply(func, target, False)
            except Exception:  # noqa: BLE001 - this rule cannot schedule this kernel: try the next
                continue
            if space is None:
                continue
            sch = space[0] if isinstance(space, (list, tuple)) else space
            updated[g_var] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            break
    for g_var, func in updated.items():
        mod[g_var] = func
    return mod


def prepare_gpu(mod, target):
    """tasks.tuning.extract.prepare_for_tuning: fused to the fixpoint, so tuned workloads are the build's kernels."""
    from tasks.tuning.extract import prepare_for_tuning

    return prepare_for_tuning(mod, target)


def build_context(cuda_graph: bool = False):
    import tvm

    return tvm.transform.PassContext(opt_level=3, config={**BUILD_CONFIG,
                                                          "relax.backend.use_cuda_graph": bool(cuda_graph)})


def to_mixed_fp16(mod):
    """fp16 compute with fp32 accumulation where it matters; outputs stay fp32 (rel. err ~1e-3)."""
    from tvm import relax

    return relax.transform.ToMixedPrecision(out_dtype="float32")(mod)


def compile_gpu(prepared_mod, target, database=None, cuda_graph: bool = False):
    """compile_relax's pipeline (fuse -> apply database -> DLight -> lower) under BUILD_CONFIG.

    `prepared_mod` is what prepare_gpu returns; `database` None means
    untuned (DLight only). `cuda_graph` captures the static launch sequence in a CUDA graph.
    """
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    database = database if database is not None else ms.database.MemoryDatabase()

    @tvm.transform.module_pass(opt_level=3)
    def pipeline(mod, _ctx):
        mod = tvm.transform.Sequential(fuse_passes(target))(mod)  # a no-op after prepare_for_tuning
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        mod = apply_dlight(mod, target)
        return tvm.transform.Sequential(_backend_passes(target, "dataflow_lower_passes")
                                        + _backend_passes(target, "finalize_passes"))(mod)

    with target, database, build_context(cuda_graph):
        return relax.build(prepared_mod, target=target, relax_pipeline=pipeline)


def _imports(module) -> list:
    found = module.imports
    return list(found() if callable(found) else found)


def _backend_passes(target, stage: str) -> list:
    """The target's own lowering passes (cuda's finalize adds RewriteCUDAGraph); the backend
    package does not export every stage (cuda lacks dataflow_lower_passes in 0.27), so read
    its pipeline module and fall back to gpu_generic."""
    import importlib

    for kind in (target.kind.name, "gpu_generic"):
        try:
            return list(getattr(importlib.import_module(f"tvm.relax.backend.{kind}.pipeline"), stage)(target))
        except (ImportError, AttributeError):
            continue
    raise ValueError(f"no {stage} for target kind {target.kind.name}")


def generated_source(executable) -> dict[str, str]:
    """Device code inside a built executable, by module kind ("cuda": CUDA C, "opencl": OpenCL C...)."""
    sources, stack = {}, _imports(executable.mod)
    while stack:
        module = stack.pop()
        stack.extend(_imports(module))
        if module.kind in ("llvm", "library", "static_library", "c", "vm_executable", "relax.VMExecutable"):
            continue
        for fmt in ("", "cu", "cl", "metal", "wgsl", "ptx", "ll", "asm"):
            try:
                text = module.inspect_source(fmt)
            except Exception:  # noqa: BLE001 - each module kind knows other formats
                continue
            if text:
                sources[module.kind] = sources.get(module.kind, "") + text
                break
    return sources


# ---------------------------------------------------------------- tuning on a local GPU

def cuda_build(mod, target, _params):
    """MetaSchedule builder: the default build (minus its tensor_intrin import) under BUILD_CONFIG."""
    import tvm
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    with tvm.transform.PassContext(opt_level=3, config=BUILD_CONFIG):
        return tvm_build(mod, target=target)


def workload_key(mod) -> str:
    from tvm_ffi.structural import structural_hash

    return f"{structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def _state(db_dir: Path) -> dict:
    path = db_dir / "tune_state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def tune_on_gpu(tasks, target: dict, db_dir, deadline: float, per_iter: int = 32, report=print) -> list[dict]:
    """Tune `tasks` (TuningTask with .trials set) one after another into one JSON database.

    Resumable: tune_state.json beside the database counts the trials each workload already had,
    so a later call (another 10-minute device run, the database carried along) continues where
    this one stopped. A task starts only if its trials fit before `deadline` (time.monotonic()),
    estimated from the seconds per trial seen so far.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tasks.tuning.pick_best import open_db

    db_dir = Path(db_dir)
    database = open_db(db_dir)
    state = _state(db_dir)
    workers = int(os.environ.get("TVMFLOW_GPU_BUILD_WORKERS", 0)) or os.cpu_count() or 2
    builder = ms.builder.LocalBuilder(max_workers=workers, timeout_sec=120, f_build=cuda_build)
    runner = ms.runner.LocalRunner(timeout_sec=30, evaluator_config=ms.runner.EvaluatorConfig(
        number=5, repeat=1, min_repeat_ms=10, enable_cpu_cache_flush=False))
    secs_per_trial, done = 3.0, []
    for task in tasks:
        mod = tvm.ir.load_json(task.mod_json)
        key = workload_key(mod)
        had = state.get(key, {}).get("trials", 0)
        want = task.trials - had
        if want <= 0:
            continue
        affordable = int((deadline - time.monotonic() - 20) / secs_per_trial) // per_iter * per_iter
        trials = min(want, affordable)
        if trials < per_iter:
            report(f"tune: out of time before {task.name} ({want} trials left)")
            break
        started = time.monotonic()
        best = [None, 0]

        def progress(_sched, _tid, _cands, built, ran):
            for b, r in zip(built, ran):
                secs = [float(s) for s in (r.run_secs or [])]
                if not (b.error_msg or r.error_msg) and secs and min(secs) < INVALID_SECS:
                    best[1] += 1
                    ms_ = 1000 * sum(secs) / len(secs)
                    best[0] = ms_ if best[0] is None else min(best[0], ms_)
        ctx = ms.TuneContext(mod=mod, target=tvm.target.Target(target), space_generator="post-order-apply",
                             search_strategy="evolutionary", task_name=task.name, num_threads=workers)
        work = db_dir / "logs" / key
        work.mkdir(parents=True, exist_ok=True)
        ms.tune_tasks(tasks=[ctx], task_weights=[1.0], work_dir=str(work), max_trials_global=trials,
                      num_trials_per_iter=per_iter, builder=builder, runner=runner, database=database,
                      cost_model=ms.cost_model.XGBModel(num_tuning_cores=workers),
                      measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                                         _callback(progress)])
        seconds = time.monotonic() - started
        secs_per_trial = max(seconds / trials, 0.5)
        state[key] = {"name": task.name, "trials": had + trials,
                      "best_ms": min(x for x in (best[0], state.get(key, {}).get("best_ms")) if x is not None)
                      if best[0] is not None or state.get(key, {}).get("best_ms") else None}
        (db_dir / "tune_state.json").write_text(json.dumps(state, indent=1))
        done.append({"task": task.name, "workload": key, "trials": trials, "valid": best[1],
                     "best_ms": best[0], "seconds": round(seconds, 1)})
        report(f"tune: {task.name} {trials} trials ({best[1]} valid) in {seconds:.0f} s, best "
               f"{best[0] if best[0] is None else round(best[0], 4)} ms")
    return done


def _callback(fn):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            fn(task_scheduler, task_id, measure_candidates, builder_results, runner_results)

    return Progress()


# ---------------------------------------------------------------- keep a record only if it wins

def time_prim_module(mod, target, dev, number: int = 20, repeat: int = 5) -> float:
    """Median ms of one TIR kernel module on `dev`, random inputs, built under BUILD_CONFIG."""
    import numpy as np
    import tvm
    from tvm.s_tir import meta_schedule as ms

    with build_context():
        lib = tvm.compile(mod, target)
    func = mod["main"]
    rng = np.random.default_rng(0)
    args = []
    for info in ms.arg_info.ArgInfo.from_prim_func(func):
        shape = [int(d) for d in info.shape]
        data = rng.uniform(-1, 1, size=shape).astype(str(info.dtype)) if "float" in str(info.dtype) \
            else np.zeros(shape, dtype=str(info.dtype))
        args.append(tvm.runtime.tensor(data, dev))
    timer = lib.mod.time_evaluator("main", dev, number=number, repeat=repeat)
    return float(np.median(timer(*args).results) * 1000)


def keep_winners(db_dir, target, dev, out_dir, margin: float = 0.0, report=print) -> list[dict]:
    """Time each workload's best record against DLight's default; write the winners to `out_dir`.

    Returns one decision per workload: default and tuned ms, and whether the record was kept.
    A record that fails to build or run is dropped (the default schedule stays).
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tasks.tuning.pick_best import DB_FILES, open_db

    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    source = open_db(db_dir)
    out_dir = Path(out_dir)
    for name in DB_FILES:
        (out_dir / name).unlink(missing_ok=True)
    kept_db = open_db(out_dir)
    names = {k: v.get("name") for k, v in _state(Path(db_dir)).items()}
    best: dict = {}
    for record in source.get_all_tuning_records():
        secs = [float(s) for s in (record.run_secs or [])]
        if not secs or min(secs) >= INVALID_SECS:
            continue
        key = workload_key(record.workload.mod)
        if key not in best or sum(secs) / len(secs) < best[key][0]:
            best[key] = (sum(secs) / len(secs), record)
    decisions = []
    for key, (_, record) in best.items():
        workload = record.workload.mod
        decision = {"workload": key, "task": names.get(key), "default_ms": None, "tuned_ms": None, "kept": False}
        try:
            with target:
                default_mod = apply_dlight(tvm.ir.load_json(tvm.ir.save_json(workload)), target)
            decision["default_ms"] = time_prim_module(default_mod, target, dev)
            sch = tvm.s_tir.Schedule(tvm.ir.load_json(tvm.ir.save_json(workload)))
            record.trace.apply_to_schedule(sch, remove_postproc=False)
            decision["tuned_ms"] = time_prim_module(sch.mod, target, dev)
            if decision["tuned_ms"] < decision["default_ms"] * (1 - margin):
                wl = kept_db.commit_workload(workload)
                kept_db.commit_tuning_record(ms.database.TuningRecord(
                    record.trace, wl, record.run_secs, record.target, record.args_info))
                decision["kept"] = True
        except Exception as err:  # noqa: BLE001 - a broken record just stays out
            decision["error"] = str(err).strip().splitlines()[-1][:200] if str(err).strip() else repr(err)
        report(f"keep: {decision['task'] or key}: default {decision['default_ms']} ms, tuned "
               f"{decision['tuned_ms']} ms -> {'kept' if decision['kept'] else 'dropped'}")
        decisions.append(decision)
    return decisions
