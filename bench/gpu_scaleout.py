"""GPU scale-out benchmark (issue 17): one fixed trial budget, ResNet-18 fp16 batch 1, tuned with
1, 2, 4 and 8 GPU workers (capped at the GPUs present); wall time of the tuning and latency of the
tuned build for each.

Each count N is one tvmflow joint tuning session (tasks.tuning.joint.tune_jointly, fresh cost
model, same seed) against a fresh tracker with one rpc server per GPU, each pinned with
CUDA_VISIBLE_DEVICES (tasks.devices.workers.start_device_workers): the RPC runner measures N
candidates at once, builds use every host core. Latency: the model built with that session's
database (tasks.build.gpu.compile_prepared), timed on GPU 0 once the workers are stopped.

    python3 bench/gpu_scaleout.py --trials 256 --gpus 1,2,4,8 --out $OUT     # GPU host (gpu_scaleout.sh)
    python3 bench/gpu_scaleout.py --dry-run --trials 16 --gpus 1,2 --out /tmp/so  # CPU smoke: llvm,
        # MNIST CNN fp32, fake GPU indices: checks the script end to end, its figures mean nothing
    python3 bench/gpu_scaleout.py --report OUT1/gpu_scaleout.json OUT2/...  # here: merge the calls'
        # rows into bench/results/gpu_scaleout.json

Writes $OUT/gpu_scaleout.json (gpu_scaleout_dryrun.json with --dry-run) after every count: a list
of rows {"gpus", "trials", "tune_s", "latency_ms", "gpu"}, so a call cut off at its limit keeps
the counts it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

COUNTS = "1,2,4,8"
ROW_KEYS = ("gpus", "trials", "tune_s", "latency_ms", "gpu")
RESULT = ROOT / "bench" / "results" / "gpu_scaleout.json"
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=256, help="the fixed trial budget of every count")
    p.add_argument("--gpus", default=COUNTS, help="GPU worker counts to run, capped at the GPUs present")
    p.add_argument("--arch", default=None, help="sm_XX (default: read off GPU 0)")
    p.add_argument("--work", default="/root/scaleout", help="scratch folder (tuning databases)")
    p.add_argument("--cache", default="/root/gpucache", help="exported/prepared models, as bench/gpu_bench.py")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    p.add_argument("--repeat", type=int, default=30, help="timing repeats of the tuned build")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dry-run", action="store_true", help="CPU smoke run: llvm, MNIST CNN, fake GPU indices")
    p.add_argument("--report", nargs="*", default=None, help="merge these gpu_scaleout.json files into " + str(RESULT))
    return p.parse_args(argv)


def counts(wanted: str, available: int) -> list[int]:
    """The requested counts that fit on `available` GPUs (at least [1] when any GPU is there)."""
    chosen = sorted({int(c) for c in wanted.split(",") if c.strip() and 0 < int(c) <= available})
    return chosen or ([1] if available else [])


def gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        ).stdout
        return out.strip().splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown GPU"


# ---------------------------------------------------------------- workloads


def gpu_workload(args):
    """ResNet-18 fp16 batch 1 as bench/gpu_bench.py prepares it; its tasks; how to build and time it."""
    import numpy as np
    import tvm
    from gpu_bench import prepared, tvm_run

    from tasks.build import gpu
    from tasks.tuning.extract import extract_tasks
    from tasks.tuning.pick_best import has_db, open_db

    if args.arch is None:
        import torch

        args.arch = "sm_{}{}".format(*torch.cuda.get_device_capability())
    target_dict = gpu.cuda_target(args.arch)
    target = tvm.target.Target(target_dict)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    mod = prepared("resnet18", 1, "fp16", target, cache)
    tasks = extract_tasks(mod, target)
    x = np.random.default_rng(0).uniform(-2, 2, size=(1, 3, 224, 224)).astype("float32")

    def latency(db_dir: Path) -> float:
        ex = gpu.compile_prepared(mod, target, open_db(db_dir) if has_db(db_dir) else None)
        return tvm_run(ex, tvm.cuda(0), x, args.repeat)[1]

    device = SimpleNamespace(name="cuda", target=target_dict, cross_compiler=None, extra={})
    return tasks, device, latency, gpu_name()


def cpu_workload(args):
    """The dry run: MNIST CNN fp32 batch 1 on this CPU (1 thread), the same tuning and timing path."""
    import numpy as np
    import tvm
    from gpu_bench import tvm_run
    from tvm.target import codegen

    from tasks.build.compile import compile_module
    from tasks.devices.profiles import get_device
    from tasks.importers.model_import import export_factory, import_pt2
    from tasks.tuning.extract import extract_tasks, prepare_for_tuning

    target_dict = {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": 1}
    profile = dataclasses.replace(get_device("local"), target=target_dict)
    cache = Path(args.work) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    pt2 = cache / "mnist_cnn.pt2"
    if not pt2.exists():
        export_factory("tasks.importers.bundled:mnist_cnn", pt2)
    mod = prepare_for_tuning(import_pt2(pt2).mod, tvm.target.Target(target_dict))
    tasks = extract_tasks(mod, tvm.target.Target(target_dict))
    x = np.zeros((1, 1, 28, 28), dtype="float32")

    def latency(db_dir: Path) -> float:
        return tvm_run(compile_module(mod, profile, db_dir), tvm.cpu(0), x, args.repeat)[1]

    device = SimpleNamespace(name="dry-run", target=target_dict, cross_compiler=None, extra={})
    return tasks, device, latency, f"none (dry run on CPU: {target_dict['mcpu']}, llvm, MNIST CNN fp32)"


# ---------------------------------------------------------------- one count


def run_count(n: int, gpus: list[str], args, tasks, device, latency, name: str) -> dict:
    from tasks.devices.workers import start_device_workers, start_local_workers
    from tasks.tuning.joint import last_summary, tune_jointly

    key = f"scaleout-{n}-{uuid.uuid4().hex[:6]}"  # a fresh key: no server of another count answers
    device.rpc_key = key
    work = Path(args.work) / f"gpus{n}"
    shutil.rmtree(work, ignore_errors=True)
    logs = Path(args.work) / "logs" / f"gpus{n}"
    if args.dry_run:  # CPU servers, but pinned to the fake indices the same way
        workers = start_local_workers(key, log_dir=logs, threads=1, gpus=gpus[:n])
    else:
        workers = start_device_workers(device, gpus=gpus[:n], log_dir=logs)
    try:
        log(f"{n} GPU worker(s) on tracker {workers.tracker} (CUDA_VISIBLE_DEVICES {','.join(workers.gpus)})")
        started = time.monotonic()
        tune_jointly(
            tasks,
            device,
            (workers.host, workers.tracker_port),
            n,
            work,
            trials=args.trials,
            log=log,
            use_slots=False,  # no Prefect API on the bench host; the runner is as wide as in a flow
            seed=args.seed,
        )
        tune_s = time.monotonic() - started
    finally:
        workers.stop()
    summary = last_summary(work) or {}
    ms_ = latency(work)
    log(f"{n} GPU(s): {summary.get('trials_run')} trials in {tune_s:.1f} s, tuned latency {ms_:.4f} ms")
    return {
        "gpus": n,
        "trials": int(summary.get("trials_run", 0)),
        "tune_s": round(tune_s, 1),
        "latency_ms": round(ms_, 4),
        "gpu": name,
    }


# ---------------------------------------------------------------- report


def report(paths: list[str]) -> int:
    """Rows of several calls into bench/results/gpu_scaleout.json, one per GPU count (later wins)."""
    rows: dict[int, dict] = {}
    for path in paths:
        for row in json.loads(Path(path).read_text()):
            if set(row) != set(ROW_KEYS) or "dry run" in str(row["gpu"]):
                raise SystemExit(f"{path}: not a GPU run's row {row}")
            rows[int(row["gpus"])] = {k: row[k] for k in ROW_KEYS}
    merged = [rows[n] for n in sorted(rows)]
    RESULT.write_text(json.dumps(merged, indent=1) + "\n")
    base = rows.get(1)
    for row in merged:
        speedup = f", speed-up {base['tune_s'] / row['tune_s']:.2f}x" if base and row["tune_s"] else ""
        print(f"{row['gpus']} GPU(s): {row['trials']} trials, {row['tune_s']} s, {row['latency_ms']} ms{speedup}")
    print(f"wrote {RESULT}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        return report(args.report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        gpus = [str(i) for i in range(max(map(int, args.gpus.split(","))))]
        tasks, device, latency, name = cpu_workload(args)
    else:
        from tasks.devices.workers import visible_gpus

        gpus = visible_gpus("all")
        tasks, device, latency, name = gpu_workload(args)
    chosen = counts(args.gpus, len(gpus))
    log(f"{name}: {len(gpus)} GPU(s) visible, counts {chosen}, {args.trials} trials each, {len(tasks)} tasks")
    path = out / ("gpu_scaleout_dryrun.json" if args.dry_run else "gpu_scaleout.json")
    rows = []
    for n in chosen:
        rows.append(run_count(n, gpus, args, tasks, device, latency, name))
        path.write_text(json.dumps(rows, indent=1) + "\n")
    log(f"wrote {path}")
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
