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
CUDA_LIMITS = {
    "max_shared_memory_per_block": 49152,
    "max_threads_per_block": 1024,
    "thread_warp_size": 32,
    "registers_per_block": 65536,
}
BUILD_CONFIG = {"tirx.disable_storage_rewrite": True}
CUDA_NAME = re.compile(r"^cuda-(sm_\d+a?)$")
GPU_KINDS = ("cuda", "nvptx", "rocm", "opencl", "vulkan", "metal", "webgpu")
INVALID_SECS = 1e9  # MetaSchedule stores failed candidates with huge run_secs
FALLBACK_TAG = "dlfallback"  # in a kernel's name: schedule it with DLight's Fallback rule
EXTERN_PREFIXES = ("cudnn_", "cublas_")  # PrimFunc names of vendor extern calls (cuda_vendor)


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
    return dataclasses.replace(
        base,
        name=name,
        rpc_key=name,
        target={**base.target, "arch": match.group(1)},
        description=f"NVIDIA GPU {match.group(1)} (derived from the cuda profile)",
    )


def dlight_rules():
    """The default GPU schedules for kernels no tuning record covers (what tvm.compile uses)."""
    from tvm.s_tir import dlight as dl

    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def rules_for(name: str) -> list:
    """DLight's rules in order, or only Fallback for a kernel whose name carries FALLBACK_TAG
    (pick-best measured Fallback beating the first matching rule on its operator)."""
    from tvm.s_tir import dlight as dl

    return [dl.gpu.Fallback()] if FALLBACK_TAG in name else dlight_rules()


def first_rule(func, target) -> str | None:
    """The DLight rule that would schedule this kernel (None: none applies)."""
    for rule in dlight_rules():
        try:
            if rule.apply(func, target, False) is not None:
                return type(rule).__name__
        except Exception:  # noqa: BLE001 - see apply_dlight
            continue
    return None


def apply_dlight(mod, target, rules=None):
    """DLight's ApplyDefaultSchedule, but a rule that matches a kernel and then fails on it
    ("consumers of the cache-write stage that are not properly inlined", seen on
    EfficientNet-Lite0's fused convs) hands the kernel to the next rule instead of failing the
    build; Fallback schedules anything. `rules(name)` gives the rules per kernel (rules_for:
    pick-best's rule choice). Mutates and returns `mod`, as DLight does."""
    import tvm

    rules = rules or (lambda _name: dlight_rules())
    updated = {}
    for g_var, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs and int(func.attrs.get("tirx.is_scheduled", 0)) == 1):
            continue
        if g_var.name_hint.startswith(EXTERN_PREFIXES):
            continue
        for rule in rules(g_var.name_hint):
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

    return tvm.transform.PassContext(
        opt_level=3, config={**BUILD_CONFIG, "relax.backend.use_cuda_graph": bool(cuda_graph)}
    )


def clip_to_minmax(mod):
    """clip(x, lo, hi) with scalar bounds (ReLU6, hardtanh) as minimum(maximum(x, lo), hi) with
    tensor constants: ToMixedPrecision fails on clip's float64 PrimValue bounds ("Expected
    TensorType, but got T.float64"), which MobileNetV2 / EfficientNet-Lite0 have."""
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    pattern = is_op("relax.clip")(wildcard(), wildcard(), wildcard())

    def rewrite(expr, _matches):
        x, lo, hi = expr.args
        bounds = [getattr(b, "value", None) for b in (lo, hi)]
        bounds = [getattr(b, "value", b) for b in bounds]  # older releases wrap the FloatImm in a PrimValue
        if not all(isinstance(b, (int, float)) for b in bounds):
            return expr
        dtype = str((getattr(x, "ty", None) or x.struct_info).dtype)
        return relax.op.minimum(
            relax.op.maximum(x, relax.const(float(bounds[0]), dtype)), relax.const(float(bounds[1]), dtype)
        )

    for g_var, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[g_var] = rewrite_call(pattern, rewrite, func)
    return mod


def to_mixed_fp16(mod):
    """fp16 compute with fp32 accumulation where it matters; outputs stay fp32 (rel. err ~1e-3)."""
    from tvm import relax

    return relax.transform.ToMixedPrecision(out_dtype="float32")(clip_to_minmax(mod))


def compile_prepared(prepared_mod, target, database=None, cuda_graph: bool = False):
    """compile_relax's pipeline (fuse -> apply database -> DLight -> lower) under BUILD_CONFIG:
    the NCHW, TVM-only build (issue 7; the "TVM DLight default" column). compile_gpu is the full one.

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
        return tvm.transform.Sequential(
            _backend_passes(target, "dataflow_lower_passes") + _backend_passes(target, "finalize_passes")
        )(mod)

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
    sources: dict[str, str] = {}
    stack = _imports(executable.mod)
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
    runner = ms.runner.LocalRunner(
        timeout_sec=30,
        evaluator_config=ms.runner.EvaluatorConfig(number=5, repeat=1, min_repeat_ms=10, enable_cpu_cache_flush=False),
    )
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
                    best[1] += 1  # noqa: B023
                    ms_ = 1000 * sum(secs) / len(secs)
                    best[0] = ms_ if best[0] is None else min(best[0], ms_)  # noqa: B023

        ctx = ms.TuneContext(
            mod=mod,
            target=tvm.target.Target(target),
            space_generator="post-order-apply",
            search_strategy="evolutionary",
            task_name=task.name,
            num_threads=workers,
        )
        work = db_dir / "logs" / key
        work.mkdir(parents=True, exist_ok=True)
        ms.tune_tasks(
            tasks=[ctx],
            task_weights=[1.0],
            work_dir=str(work),
            max_trials_global=trials,
            num_trials_per_iter=per_iter,
            builder=builder,
            runner=runner,
            database=database,
            cost_model=ms.cost_model.XGBModel(num_tuning_cores=workers),
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), _callback(progress)],
        )
        seconds = time.monotonic() - started
        secs_per_trial = max(seconds / trials, 0.5)
        state[key] = {
            "name": task.name,
            "trials": had + trials,
            "best_ms": min(x for x in (best[0], state.get(key, {}).get("best_ms")) if x is not None)
            if best[0] is not None or state.get(key, {}).get("best_ms")
            else None,
        }
        (db_dir / "tune_state.json").write_text(json.dumps(state, indent=1))
        done.append(
            {
                "task": task.name,
                "workload": key,
                "trials": trials,
                "valid": best[1],
                "best_ms": best[0],
                "seconds": round(seconds, 1),
            }
        )
        report(
            f"tune: {task.name} {trials} trials ({best[1]} valid) in {seconds:.0f} s, best "
            f"{best[0] if best[0] is None else round(best[0], 4)} ms"
        )
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
        data = (
            rng.uniform(-1, 1, size=shape).astype(str(info.dtype))
            if "float" in str(info.dtype)
            else np.zeros(shape, dtype=str(info.dtype))
        )
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
                kept_db.commit_tuning_record(
                    ms.database.TuningRecord(record.trace, wl, record.run_secs, record.target, record.args_info)
                )
                decision["kept"] = True
        except Exception as err:  # noqa: BLE001 - a broken record just stays out
            decision["error"] = str(err).strip().splitlines()[-1][:200] if str(err).strip() else repr(err)
        report(
            f"keep: {decision['task'] or key}: default {decision['default_ms']} ms, tuned "
            f"{decision['tuned_ms']} ms -> {'kept' if decision['kept'] else 'dropped'}"
        )
        decisions.append(decision)
    return decisions


# ---------------------------------------------------------------- the full GPU build (issue 13)
# NHWC layout, per-operator pick-best between cuDNN / cuBLAS extern calls and TVM's own kernels
# (DLight's first matching rule, or its Fallback when that wins), CUDA graphs on by default.

LAYOUT = {"NHWC": {"relax.nn.conv2d": ["NHWC", "OHWI"]}, "NCHW": {}}


def to_target(profile_or_target):
    """A tvm Target from a DeviceProfile, a target dict or a Target."""
    import tvm

    target = getattr(profile_or_target, "target", profile_or_target)
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


def prepare_layout(mod, layout: str = "NHWC"):
    """Batch norm folded into the conv weights where it follows one (else decomposed), convolutions in `layout` (NHWC: what tensor cores and cuDNN want),
    constant weights transposed at build time. Precision casts (to_mixed_fp16) come before."""
    import tvm
    from tvm import relax

    seq = [relax.transform.FoldBatchnormToConv2D(), relax.transform.DecomposeOpsForInference()]
    if LAYOUT[layout]:
        seq.append(relax.transform.ConvertLayout(LAYOUT[layout]))
    seq.append(relax.transform.FoldConstant())
    return tvm.transform.Sequential(seq)(mod)


def lower_with_choices(mod, target, choices: dict, algos: dict | None = None):
    """Legalize (each conv2d / matmul as its OperatorChoice says) and fuse. `choices` maps an
    operator key (cuda_vendor.ConvSpec.key) to its OperatorChoice; unknown operators stay default."""
    import tvm
    from tvm import relax

    from tasks.build import cuda_vendor

    def choose(spec):
        choice = choices.get(spec.key)
        if choice is None:
            return None
        if choice.chosen == "default" and choice.chosen_detail == "Fallback":
            return f"tir:conv2d_{FALLBACK_TAG}"
        return choice.chosen

    algos = dict(algos or {})
    for key, choice in choices.items():
        detail = choice.chosen_detail or ""
        if choice.chosen == "cudnn" and key not in algos and detail.startswith("algo ") and detail[5:].isdigit():
            algos[key] = int(detail[5:])
    target = to_target(target)
    with target:
        seq = [
            relax.transform.LegalizeOps(customize_legalize_map=cuda_vendor.vendor_legalize_map(choose, algos)),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
        return tvm.transform.Sequential(seq)(mod)


def build_lowered(lowered, target, database=None, cuda_graph: bool = True):
    """The lowered module to an executable: tuned records, DLight (pick-best's rule per kernel),
    the CUDA backend's passes; `cuda_graph` captures the static launch sequence (the VM runs it
    once uncaptured first, then captures, then replays)."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    target = to_target(target)
    database = database if database is not None else ms.database.MemoryDatabase()

    @tvm.transform.module_pass(opt_level=3)
    def pipeline(mod, _ctx):
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        mod = apply_dlight(mod, target, rules_for)
        return tvm.transform.Sequential(
            _backend_passes(target, "dataflow_lower_passes") + _backend_passes(target, "finalize_passes")
        )(mod)

    with target, database, build_context(cuda_graph):
        return relax.build(lowered, target=target, relax_pipeline=pipeline)


def operator_candidates(spec, target, vendors=(), algo: int | None = None) -> list[tuple[str, str, object]]:
    """(backend, detail, PrimFunc module) for each way to run one operator: the vendor extern when
    its library is loaded and the operator fits, TVM's kernel under DLight's first matching rule
    and under Fallback when that differs."""
    import tvm
    from tvm import te, topi

    from tasks.build import cuda_vendor

    target = to_target(target)
    out = []
    vendor = "cudnn" if isinstance(spec, cuda_vendor.ConvSpec) else "cublas"
    if vendor in vendors and spec.vendor_ok is None:
        out.append(
            (
                vendor,
                f"algo {algo}" if vendor == "cudnn" else "",
                cuda_vendor.vendor_prim_func(spec, cuda_vendor.IMPLICIT_PRECOMP_GEMM if algo is None else algo),
            )
        )
    if isinstance(spec, cuda_vendor.ConvSpec):
        x, w = te.placeholder(spec.data, spec.dtype, "x"), te.placeholder(spec.weight, spec.dtype, "w")
        y = topi.nn.conv(
            x,
            w,
            list(spec.strides),
            list(spec.padding),
            list(spec.dilation),
            spec.groups,
            spec.data_layout,
            spec.kernel_layout,
            spec.out_dtype,
        )
    else:
        x, w = te.placeholder(spec.lhs, spec.dtype, "a"), te.placeholder(spec.rhs, spec.dtype, "b")
        k = te.reduce_axis((0, spec.lhs[1]), "k")
        y = te.compute(
            (spec.lhs[0], spec.rhs[1]),
            lambda i, j: te.sum(x[i, k].astype(spec.out_dtype) * w[k, j].astype(spec.out_dtype), axis=k),
            name="matmul",
        )
    base = tvm.IRModule({"main": te.create_prim_func([x, w, y]).with_attr("global_symbol", "main")})
    first = None
    with target:
        for rule_name in ("first", "Fallback"):
            mod = tvm.ir.load_json(tvm.ir.save_json(base))
            rules = dlight_rules() if rule_name == "first" else rules_for(FALLBACK_TAG)
            name = first_rule(mod["main"], target) if rule_name == "first" else "Fallback"
            if rule_name == "Fallback" and first == "Fallback":
                break
            first = first or name
            mod = apply_dlight(mod, target, lambda _n, r=rules: r)
            out.append(("default", name or "none", mod))
    return out


def time_artifact(path: str, dev, number: int = 20, repeat: int = 5) -> float:
    """Median ms of an exported one-kernel library's `main` on `dev`, random inputs."""
    import numpy as np
    import tvm

    lib = tvm.runtime.load_module(path)
    rng = np.random.default_rng(0)
    args = []
    for arg in _prim_args(path):
        shape, dtype = arg
        data = rng.uniform(-1, 1, size=shape).astype(dtype) if "float" in dtype else np.zeros(shape, dtype=dtype)
        args.append(tvm.runtime.tensor(data, dev))
    lib["main"](*args)
    dev.sync()
    timer = lib.time_evaluator("main", dev, number=number, repeat=repeat)
    return float(np.median(timer(*args).results) * 1000)


_ARGS: dict[str, list] = {}


def _prim_args(path: str) -> list:
    return _ARGS[path]


def export_so(rt_mod) -> str:
    """MetaSchedule builder export: a loadable .so (the default tar needs a linker at load time)."""
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="tvmflow_cand_"), "cand.so")
    rt_mod.export_library(path)
    return path


def build_in_parallel(
    mods: list, target, workers: int = 0, timeout: int = 300, f_build=None
) -> list[tuple[str | None, str | None]]:
    """(artifact path, error) per module, built by MetaSchedule's LocalBuilder on every core
    (f_build: cuda_build for PrimFunc modules, build_timing_worker for timing graphs)."""
    from tvm.s_tir import meta_schedule as ms

    target = to_target(target)
    workers = workers or int(os.environ.get("TVMFLOW_GPU_BUILD_WORKERS", 0)) or os.cpu_count() or 2
    builder = ms.builder.LocalBuilder(
        max_workers=min(workers, max(len(mods), 1)),
        timeout_sec=timeout,
        f_build=f_build or cuda_build,
        f_export=export_so,
    )
    results = builder.build([ms.builder.BuilderInput(m, target) for m in mods]) if mods else []
    return [(r.artifact_path, r.error_msg.strip().splitlines()[-1][:300] if r.error_msg else None) for r in results]


GRAPH_REPEAT = 10  # kernel calls per timing graph: one graph launch's overhead spread over them


def graph_timing_module(prim_mod, target, repeat: int = GRAPH_REPEAT):
    """A Relax module whose `main` runs the candidate kernel `repeat` times on constant random
    inputs, built with CUDA graphs: timing it measures the kernel's GPU time as the final CUDA-
    graph build runs it, without the per-call host work (cuDNN's descriptor setup and workspace
    query cost ~50 us per call on the host: timing the bare call measured that, not the GPU)."""
    import numpy as np
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    func = prim_mod["main"]
    infos = ms.arg_info.ArgInfo.from_prim_func(func)
    rng = np.random.default_rng(0)
    first = infos[0]
    x = relax.Var("x", relax.TensorType([int(d) for d in first.shape], str(first.dtype)))
    consts = [relax.const(rng.uniform(-1, 1, size=[int(d) for d in a.shape]).astype(str(a.dtype))) for a in infos[:-1]]
    out = infos[-1]
    bb = relax.BlockBuilder()
    gv = bb.add_func(func.without_attr("global_symbol") if hasattr(func, "without_attr") else func, "kernel")
    # inputs are constants (so the region is captured); the function still takes one parameter and
    # hands it back: a zero-parameter main failed at run time in the VM's capture path
    # ("reg < frame->register_file.size()", seen on the H200)
    with bb.function("main", [x]):
        with bb.dataflow():
            # the first `repeat` results stay internal (statically planned, so captured in the
            # graph); only one more call's result leaves the function
            outs = [
                bb.emit(relax.call_tir(gv, consts, relax.TensorType([int(d) for d in out.shape], str(out.dtype))))
                for _ in range(repeat + 1)
            ]
            result = bb.emit_output(relax.Tuple([outs[-1], x]))
        bb.emit_func_output(result)
    return bb.get()


def build_timing_worker(mod, target, _params):
    """LocalBuilder f_build for graph_timing_module modules (kernels already scheduled)."""
    import tvm
    from tvm import relax

    target = to_target(target)

    @tvm.transform.module_pass(opt_level=3)
    def pipeline(m, _ctx):
        return tvm.transform.Sequential(
            _backend_passes(target, "dataflow_lower_passes") + _backend_passes(target, "finalize_passes")
        )(m)

    with target, build_context(True):
        return relax.build(mod, target=target, relax_pipeline=pipeline)


def time_graph_artifact(path: str, dev, repeat: int = GRAPH_REPEAT, runs: int = 5) -> float:
    """Median ms of one kernel call inside a timing graph (graph_timing_module, exported)."""
    import numpy as np
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(path), dev)
    shape, dtype = _GRAPH_INPUT[path]
    x = tvm.runtime.tensor(np.random.default_rng(0).uniform(-1, 1, size=shape).astype(dtype), dev)
    vm.set_input("main", x)
    vm.invoke_stateful("main")  # warm-up (workspaces, module load), then the CUDA graph is captured
    vm.invoke_stateful("main")
    dev.sync()
    timer = vm.time_evaluator("invoke_stateful", dev, number=20, repeat=runs)
    return float(np.median(timer("main").results) * 1000) / repeat


_GRAPH_INPUT: dict[str, tuple] = {}


def measure_operators(specs: dict, target, dev, vendors=(), workers: int = 0, log=print) -> tuple[dict, dict]:
    """Pick best per operator: time every candidate of every spec on `dev`, choose with
    tasks.build.candidates.choose. Returns {key: OperatorChoice}; a candidate's detail names the
    cuDNN algorithm or the DLight rule (the other rule's time in brackets)."""
    from tvm.s_tir import meta_schedule as ms

    from tasks.build import cuda_vendor
    from tasks.build.candidates import Candidate, choose

    algos = {}
    items: list[tuple] = []  # (key, backend, detail, mod)
    for key, spec in specs.items():
        algo = None
        if "cudnn" in vendors and isinstance(spec, cuda_vendor.ConvSpec) and spec.vendor_ok is None:
            try:
                algo = algos[key] = cuda_vendor.find_cudnn_algo(spec)
            except Exception as err:  # noqa: BLE001 - keep the always-applicable algorithm
                log(f"cudnn algo search failed for {key}: {str(err).strip().splitlines()[-1][:200]}")
        items.extend((key, b, d, m) for b, d, m in operator_candidates(spec, target, vendors, algo))
    started = time.monotonic()
    graphs = [graph_timing_module(m, target) for *_, m in items]
    built = build_in_parallel(graphs, target, workers, f_build=build_timing_worker)
    log(f"pick-best: built {len(items)} candidates of {len(specs)} operators in {time.monotonic() - started:.0f} s")
    times: dict[str, list] = {}
    for (key, backend, detail, mod), (path, error) in zip(items, built):
        ms_ = None
        if path:
            try:
                first = ms.arg_info.ArgInfo.from_prim_func(mod["main"])[0]
                _GRAPH_INPUT[path] = ([int(d) for d in first.shape], str(first.dtype))
                ms_ = time_graph_artifact(path, dev)
            except Exception as err:  # noqa: BLE001 - a candidate that does not run loses
                error = str(err).strip().splitlines()[-1][:300] if str(err).strip() else repr(err)
        times.setdefault(key, []).append((backend, detail, ms_, error))
    choices = {}
    for key, found in times.items():
        cands, default = [], [f for f in found if f[0] == "default" and f[2] is not None]
        for backend, detail, ms_, error in found:
            if backend == "default":
                continue
            cands.append(Candidate(backend, ms_, error, detail))
        if default:
            best = min(default, key=lambda f: f[2])
            others = ", ".join(f"{f[1]} {f[2]:.4f}" for f in default if f is not best)
            cands.append(Candidate("default", best[2], None, best[1] + (f" ({others})" if others else "")))
        else:
            errs = [f[3] for f in found if f[0] == "default"]
            cands.append(Candidate("default", None, errs[0] if errs else "no candidate", None))
        choice = choose(key, cands)
        chosen = next(c for c in cands if c.backend == choice.chosen)
        choice.chosen_detail = (chosen.detail or "").split(" (")[0] or None
        choices[key] = choice
    return choices, algos


def compile_gpu(
    mod,
    profile,
    db_dir=None,
    use_cuda_graph: bool = True,
    vendor=("cudnn", "cublas"),
    dev=None,
    decide=None,
    layout: str = "NHWC",
    contrib=None,
    log=print,
):
    """The GPU build stage: `mod` (float32 or already mixed fp16 Relax) -> (executable, choices).

    Per operator (conv2d / matmul) the candidates are the vendor library (cuDNN / cuBLAS extern,
    when `contrib` or an already loaded contrib library provides it), TVM's kernel under DLight's
    default rule, and under Fallback; each is timed on `dev` and the fastest kept
    (tasks.build.candidates.choose). Without a device (CI, a build host with no GPU) nothing is
    timed: `decide` gives the choices instead: a dict {operator key: OperatorChoice} recorded
    earlier, or one backend name for every operator that fits it, or None (TVM's default
    everywhere). Tuned records in `db_dir` apply to the kernels they match. CUDA graphs are on
    unless use_cuda_graph=False.
    """
    from tasks.build import cuda_vendor
    from tasks.build.candidates import Candidate, OperatorChoice

    target = to_target(profile)
    vendors = tuple(vendor or ())
    if contrib:
        cuda_vendor.load_contrib(contrib)
    prepared = prepare_layout(mod, layout)
    specs = cuda_vendor.collect_specs(prepared)
    algos: dict = {}
    if decide is None and dev is not None:
        usable = tuple(v for v in vendors if v in cuda_vendor.available_vendors())
        choices, algos = measure_operators(specs, target, dev, usable, log=log)
    elif isinstance(decide, dict):
        choices = {k: v if isinstance(v, OperatorChoice) else OperatorChoice.from_json(v) for k, v in decide.items()}
    else:
        choices = {}
        for key, spec in specs.items():
            backend = (
                decide
                if decide in vendors
                and spec.vendor_ok is None
                and (decide == "cudnn") == isinstance(spec, cuda_vendor.ConvSpec)
                else "default"
            )
            choices[key] = OperatorChoice(key, [Candidate(backend)], backend)
    database = None
    if db_dir:
        from tasks.tuning.pick_best import has_db, open_db

        database = open_db(db_dir) if has_db(db_dir) else None
    executable = build_lowered(lower_with_choices(prepared, target, choices, algos), target, database, use_cuda_graph)
    return executable, [choices[k] for k in specs if k in choices]


# ---------------------------------------------------------------- whole-model builds on every core

BUILD_ATTR = "tvmflow_gpu_build"  # IRModule attr: how a worker builds it (JSON, see model_build_input)
_LAST_BUILD: dict = {}


def model_build_input(prepared, kind: str, choices: dict | None = None, cuda_graph: bool = True):
    """A MetaSchedule BuilderInput that builds a whole model in a builder worker.

    kind "tvmflow": `prepared` is what prepare_layout returns, lowered with `choices`
    ({key: OperatorChoice}) and built by build_lowered. kind "dlight": the stock NCHW build
    (prepare_gpu + compile_prepared, DLight defaults, no vendor kernels, no CUDA graph).
    """
    spec = {
        "kind": kind,
        "cuda_graph": bool(cuda_graph),
        "choices": {k: c.to_json() for k, c in (choices or {}).items()},
    }
    return prepared.with_attr(BUILD_ATTR, json.dumps(spec))


def build_model_worker(mod, target, _params):
    """LocalBuilder f_build for model_build_input modules (runs in a builder worker process)."""
    from tasks.build.candidates import OperatorChoice

    started = time.monotonic()
    spec = json.loads(str(mod.attrs[BUILD_ATTR]))
    mod = mod.without_attr(BUILD_ATTR) if hasattr(mod, "without_attr") else mod
    if spec["kind"] == "dlight":
        built = compile_prepared(prepare_gpu(mod, target), target, None, False)
    else:
        choices = {k: OperatorChoice.from_json(v) for k, v in spec["choices"].items()}
        built = build_lowered(lower_with_choices(mod, target, choices), target, None, spec["cuda_graph"])
    _LAST_BUILD["seconds"] = time.monotonic() - started
    return built


def export_model(executable) -> str:
    """LocalBuilder f_export for whole models: the .so plus a .json with the build's seconds."""
    path = export_so(executable)
    Path(path + ".json").write_text(json.dumps({"build_s": round(_LAST_BUILD.get("seconds", 0.0), 2)}))
    return path


def build_models(
    inputs: list, target, workers: int = 0, timeout: int = 580
) -> list[tuple[str | None, str | None, float]]:
    """(library path, error, build seconds) per model_build_input module, built side by side."""
    from tvm.s_tir import meta_schedule as ms

    target = to_target(target)
    workers = workers or int(os.environ.get("TVMFLOW_GPU_BUILD_WORKERS", 0)) or os.cpu_count() or 2
    builder = ms.builder.LocalBuilder(
        max_workers=min(workers, max(len(inputs), 1)),
        timeout_sec=timeout,
        f_build=build_model_worker,
        f_export=export_model,
    )
    out = []
    for result in builder.build([ms.builder.BuilderInput(m, target) for m in inputs]) if inputs else []:
        path = result.artifact_path
        seconds = json.loads(Path(path + ".json").read_text())["build_s"] if path else 0.0
        error = result.error_msg.strip().splitlines()[-1][:300] if result.error_msg else None
        out.append((path, error, seconds))
    return out
