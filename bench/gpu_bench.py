"""GPU benchmark (issue 7): TVM fp32, TVM fp16 mixed (untuned and tuned) against torch eager fp16
and torch.compile fp16, same input, batch 1 and 16, plus fp16-vs-fp32 accuracy.

Runs on the lent GPU machine with only the carried wheels (TVM, tvm-ffi, xgboost, tornado, the
EfficientNet weight packages): no Prefect, no server. It calls the pipeline's task functions
(tasks.importers.model_import, tasks.tuning.extract, tasks.tuning.pick_best, tasks.devices.validate.compare) and tasks.build.gpu.

    python3 bench/gpu_bench.py --phase tune --db /root/gpudb --tune-minutes 8 --out $OUT
    python3 bench/gpu_bench.py --phase measure --db /root/gpudb --out $OUT

`tune` resumes: the database folder (database_workload.json, database_tuning_record.json: the
format the CPU flow publishes, plus tune_state.json with the trials per workload) is copied to
--out after each task, carried back here, and passed with --seed-db to the next call, so several
10-minute device calls add up to one long tune. `measure` keeps a tuned record only where it
beats DLight's default for its kernel (tasks.build.gpu.keep_winners), then times every path in one
process on the same input.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import tvm  # noqa: E402
import tvm.s_tir.tensor_intrin  # noqa: E402,F401 - before torch.export fills sys.modules (12 s vs 100 s)

from tasks.build import gpu  # noqa: E402
from tasks.devices.validate import compare  # noqa: E402
from tasks.importers.model_import import InputSpec, export_factory, import_pt2  # noqa: E402
from tasks.tuning.extract import allocate_trials, extract_tasks  # noqa: E402
from tasks.tuning.pick_best import DB_FILES, has_db, open_db  # noqa: E402

MODELS = {
    "resnet18": "tasks.importers.bundled:resnet18",
    "efficientnet_lite0": "tasks.importers.bundled:efficientnet_lite0",
}
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=("tune", "measure", "all"), default="all")
    p.add_argument("--models", default="resnet18,efficientnet_lite0")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--arch", default=None, help="sm_XX (default: read off the GPU)")
    p.add_argument("--db", default="/root/gpudb", help="tuning database folder on this machine")
    p.add_argument("--seed-db", default=".gpudb", help="carried database to start from when --db is empty")
    p.add_argument("--cache", default="/root/gpucache", help="exported/imported models, kept while the machine is warm")
    p.add_argument("--budget", type=int, default=256, help="trials per model and batch (over its tasks)")
    p.add_argument("--per-task", type=int, default=0, help="give every task that matters this many trials instead")
    p.add_argument("--no-apply-check", action="store_true", help="tune even if the build would ignore the records")
    p.add_argument("--tune-minutes", type=float, default=8.0, help="stop starting tasks after this")
    p.add_argument("--tune-models", default="resnet18,efficientnet_lite0", help="models whose fp16 tasks get tuned")
    p.add_argument("--cuda-graph", action="store_true", help="also time the tuned fp16 build with CUDA graphs")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    p.add_argument("--repeat", type=int, default=30)
    return p.parse_args(argv)


# ---------------------------------------------------------------- inputs and models


def photo_batch(batch: int) -> np.ndarray:
    """The bundled photos and their flips: `batch` real images, the same for every path."""
    from tasks.importers.datasets import _imagenet_photos

    photos = _imagenet_photos()[:, 0]
    views = [photos, photos[..., ::-1], photos[..., ::-1, :], photos[..., ::-1, ::-1]]
    return np.ascontiguousarray(np.concatenate(views)[:batch]).astype("float32")


def relax_module(name: str, batch: int, cache: Path):
    """The model imported into Relax at this batch size (through a .pt2, as the flow does)."""
    dest = cache / f"{name}_b{batch}.pt2"
    if not dest.exists():
        export_factory(MODELS[name], dest, [InputSpec("x", (batch, 3, 224, 224))])
    return import_pt2(dest).mod


def prepared(name: str, batch: int, precision: str, target, cache: Path):
    path = cache / f"{name}_b{batch}_{precision}_fused.json"
    if path.exists():
        return tvm.ir.load_json(path.read_text())
    mod = relax_module(name, batch, cache)
    if precision == "fp16":
        mod = gpu.to_mixed_fp16(mod)
    mod = gpu.prepare_gpu(mod, target)
    path.write_text(tvm.ir.save_json(mod))
    return mod


# ---------------------------------------------------------------- tuning


def seed(db: Path, seed_db: Path) -> None:
    if has_db(db) or not has_db(seed_db):
        return
    db.mkdir(parents=True, exist_ok=True)
    for name in (*DB_FILES, "tune_state.json"):
        if (seed_db / name).exists():
            shutil.copyfile(seed_db / name, db / name)  # carried files arrive read-only
    log(f"seeded {db} from {seed_db} ({len(open_db(db).get_all_tuning_records())} records)")


def save_db(db: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in (*DB_FILES, "tune_state.json"):
        if (db / name).exists():
            shutil.copy(db / name, out / name)


def tune_queue(args, target, cache: Path) -> list:
    """Each (model, batch) gets --budget trials over its tasks by weighted FLOPs; the queue takes
    the heaviest task of each in turn, so a short call still tunes what matters most everywhere."""
    per_module, seen = [], set()
    for name in args.tune_models.split(","):
        for batch in map(int, args.batches.split(",")):
            tasks = extract_tasks(prepared(name, batch, "fp16", target, cache), target)
            allocate_trials(tasks, args.budget, per_iter=32, min_share=0.01)
            if args.per_task:  # breadth first: every task that matters gets the same few trials
                for task in tasks:
                    task.trials = args.per_task if task.trials else 0
            fresh = []
            for task in tasks:
                key = gpu.workload_key(tvm.ir.load_json(task.mod_json))
                if task.trials > 0 and key not in seen:
                    seen.add(key)
                    task.name = f"{name}_b{batch}/{task.name}"
                    fresh.append(task)
            log(f"{name} b{batch}: {len(tasks)} tasks, {len(fresh)} to tune")
            per_module.append(fresh)
    queue = []
    for rank in range(max(map(len, per_module), default=0)):
        queue.extend(tasks[rank] for tasks in per_module if rank < len(tasks))
    return queue


def merged_db(dbs: list, dest: Path) -> Path:
    """Several tuning processes (one per batch size, run side by side) each keep their own
    database; tasks.tuning.pick_best.merge_databases joins them, best record per workload."""
    if len(dbs) == 1:
        return dbs[0]
    from tasks.tuning.pick_best import merge_databases

    dest.mkdir(parents=True, exist_ok=True)
    merge_databases([d for d in dbs if has_db(d)], dest)
    state = {}
    for d in dbs:
        if (d / "tune_state.json").exists():
            state.update(json.loads((d / "tune_state.json").read_text()))
    (dest / "tune_state.json").write_text(json.dumps(state, indent=1))
    return dest


def records_apply(name: str, batch: int, task, target, cache: Path) -> bool:
    """Guard before spending device minutes: the build's MetaScheduleApplyDatabase must find a
    record of a tuned workload among the build's kernels (it silently ignores records whose
    workload matches no kernel, which is what one fusion round too few did)."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    mod = tvm.ir.load_json(task.mod_json)
    db = ms.database.MemoryDatabase()
    db.commit_tuning_record(
        ms.database.TuningRecord(
            tvm.s_tir.Schedule(mod).trace,
            db.commit_workload(mod),
            [1e-6],
            target,
            ms.arg_info.ArgInfo.from_prim_func(mod["main"]),
        )
    )
    with target, db:
        applied = relax.transform.MetaScheduleApplyDatabase()(prepared(name, batch, "fp16", target, cache))
    return any(
        isinstance(f, tvm.tirx.PrimFunc) and f.attrs and "tirx.is_scheduled" in f.attrs
        for _, f in applied.functions_items()
    )


def run_tune(args, target, cache: Path, out: Path) -> list:
    deadline = T0 + 60 * args.tune_minutes
    db = Path(args.db)
    queue = tune_queue(args, target, cache)
    if queue and not args.no_apply_check:
        name, batch = queue[0].name.split("/")[0].rsplit("_b", 1)
        if not records_apply(name, int(batch), queue[0], target, cache):
            raise SystemExit("tuned records would not reach the build (workloads match no kernel): not tuning")
        log("check: the build applies records of the tuned workloads")
    done = []
    for task in queue:
        try:
            got = gpu.tune_on_gpu([task], target, db, deadline, per_iter=32, report=log)
        except Exception as err:  # noqa: BLE001 - one task's failure must not sink the others
            import traceback

            traceback.print_exc()
            got = [
                {"task": task.name, "error": str(err).strip().splitlines()[-1][:300] if str(err).strip() else repr(err)}
            ]
        done.extend(got)
        save_db(db, out)
        if not got and time.monotonic() > deadline - 120:
            break
    return done


# ---------------------------------------------------------------- measuring


def tvm_run(executable, dev, x: np.ndarray, repeat: int):
    from tvm import relax

    vm = relax.VirtualMachine(executable, dev)
    vm.set_input("main", tvm.runtime.tensor(x, dev))
    vm.invoke_stateful("main")
    out = vm.get_outputs("main")
    out = out if hasattr(out, "numpy") else out[0]
    timer = vm.time_evaluator("invoke_stateful", dev, number=10, repeat=repeat)
    return out.numpy(), float(np.median(timer("main").results) * 1000)


def torch_time(fn, x, repeat: int) -> float:
    import torch

    with torch.no_grad():
        for _ in range(10):
            fn(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 10)
    return float(np.median(times))


def accuracy(got: np.ndarray, want: np.ndarray) -> dict:
    v = compare([[got]], [[want]], precision="fp16")
    return {
        "max_rel_err": v.max_rel_err,
        "max_abs_err": v.max_abs_err,
        "top1_agreement": v.top1_agreement,
        "passed": v.passed,
    }


def run_measure(args, target, cache: Path, out: Path, dump) -> dict:
    import torch

    from tasks.importers.bundled import efficientnet_lite0, resnet18  # noqa: F401 - factories below

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = tvm.cuda(0)
    db = merged_db([Path(d) for d in args.db.split(",")], cache / "merged_db")
    kept_dir = out / "kept_db"
    decisions = gpu.keep_winners(db, target, dev, kept_dir, report=log) if has_db(db) else []
    tuned_db = open_db(kept_dir) if decisions else None
    rows, acc = [], []
    for name in args.models.split(","):
        module, _ = __import__("tasks.importers.bundled", fromlist=[name]).__dict__[name]()
        for batch in map(int, args.batches.split(",")):
            x = photo_batch(batch)
            res = {"model": name, "batch": batch}
            outs = {}
            for label, precision, database, graph in (
                ("tvm_fp32", "fp32", None, False),
                ("tvm_fp16_untuned", "fp16", None, False),
                ("tvm_fp16_tuned", "fp16", tuned_db, False),
                ("tvm_fp16_tuned_graph", "fp16", tuned_db, True),
            ):
                if (database is None and "_tuned" in label) or (graph and not args.cuda_graph):
                    continue
                started = time.monotonic()
                try:
                    ex = gpu.compile_prepared(prepared(name, batch, precision, target, cache), target, database, graph)
                    outs[label], res[label] = tvm_run(ex, dev, x, args.repeat)
                except Exception as err:  # noqa: BLE001 - one failed path must not sink the table
                    res[label] = None
                    res[label + "_error"] = str(err).strip().splitlines()[-1][:300]
                log(f"{name} b{batch} {label}: {res[label]} ms (compile+run {time.monotonic() - started:.0f} s)")
            m32 = module.float().cuda().eval()
            xt = torch.from_numpy(x).cuda()
            with torch.no_grad():
                ref32 = m32(xt).float().cpu().numpy()
                m16 = module.half().cuda().eval()
                x16 = xt.half()
                res["torch_eager_fp16"] = torch_time(m16, x16, args.repeat)
                torch.backends.cudnn.benchmark = True
                res["torch_eager_fp16_cudnn_benchmark"] = torch_time(m16, x16, args.repeat)
                torch.backends.cudnn.benchmark = False
                ref16 = m16(x16).float().cpu().numpy()
                started = time.monotonic()
                try:
                    compiled = torch.compile(m16, dynamic=False)
                    res["torch_compile_fp16"] = torch_time(compiled, x16, args.repeat)
                except Exception as err:  # noqa: BLE001
                    res["torch_compile_fp16"] = None
                    res["torch_compile_fp16_error"] = str(err).strip().splitlines()[-1][:300]
                res["torch_compile_seconds"] = round(time.monotonic() - started, 1)
                module.float()
            log(
                f"{name} b{batch} torch eager fp16 {res['torch_eager_fp16']:.3f} ms, torch.compile fp16 "
                f"{res['torch_compile_fp16']} ms"
            )
            rows.append(res)
            dump(rows=rows, accuracy=acc, keep_decisions=decisions)
            entry = {"model": name, "batch": batch, "torch_fp16_vs_torch_fp32": accuracy(ref16, ref32)}
            if "tvm_fp32" in outs:
                entry["tvm_fp32_vs_torch_fp32"] = accuracy(outs["tvm_fp32"], ref32)
            for label in ("tvm_fp16_untuned", "tvm_fp16_tuned"):
                if label in outs and "tvm_fp32" in outs:
                    entry[f"{label}_vs_tvm_fp32"] = accuracy(outs[label], outs["tvm_fp32"])
            acc.append(entry)
    return {"rows": rows, "accuracy": acc, "keep_decisions": decisions}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.phase != "measure":
        Path(args.db).mkdir(parents=True, exist_ok=True)
        seed(Path(args.db), ROOT / args.seed_db if not Path(args.seed_db).is_absolute() else Path(args.seed_db))
    import torch

    arch = args.arch or "sm_{}{}".format(*torch.cuda.get_device_capability())
    target = tvm.target.Target(gpu.cuda_target(arch))
    result = {
        "device": torch.cuda.get_device_name(),
        "arch": arch,
        "tvm": tvm.__version__,
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "phase": args.phase,
        "models": args.models,
        "batches": args.batches,
    }
    log(f"{result['device']} {arch}, tvm {tvm.__version__}, torch {torch.__version__}")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    path = out / f"gpu_{args.phase}_{stamp}.json"

    def dump(**parts):  # after every step: a run cut off at the call's limit still leaves its figures
        result.update(parts, seconds=round(time.monotonic() - T0, 1))
        path.write_text(json.dumps(result, indent=1))

    if args.phase in ("tune", "all"):
        dump(tuning=run_tune(args, target, cache, out))
        save_db(Path(args.db), out)
    if args.phase in ("measure", "all"):
        dump(**run_measure(args, target, cache, out, dump))
    dump()
    log(f"wrote {path}")
    for row in result.get("rows", []):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
