"""Benchmark one model: compile it with a trial budget, then time TVM (tuned and untuned),
onnxruntime and torch on the same input, in one process, and write a JSON result.

    python bench/compile_bench.py --model tasks.importers.bundled:efficientnet_lite0 --trials 300 \
        --out bench/results/efficientnet_lite0-300.json

It calls the pipeline's plain step functions (tasks.pipeline), not the Prefect flow, so no Prefect
server is needed; tuning still goes through a real RPC tracker and rpc servers
(tasks.devices.workers). Each run uses a fresh TVMFLOW_CACHE unless --cache is given, so nothing is a
cache hit by accident.

Thread counts: the TVM runtime sizes its thread pool from TVM_NUM_THREADS, and without it
uses hardware_concurrency()/2 on x86 (it assumes hyper-threading): 1 thread on this 2-core
VM. The rpc servers inherit this process's environment, so each worker set here is started
with TVM_NUM_THREADS set explicitly (tuning and the 2-thread timing at the target's num-cores).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default="tasks.importers.bundled:efficientnet_lite0", help="model URI or package.module:factory"
    )
    p.add_argument("--trials", type=int, default=300, help="total MetaSchedule trial budget")
    p.add_argument("--out", help="JSON result path (default bench/results/<model>-<trials>.json)")
    p.add_argument("--data", help="dataset URI (default: the model's bundled data, else seeded random)")
    p.add_argument("--device", default="local", help="device profile; only local workers are started here")
    p.add_argument("--threads", default="1,2", help="thread counts to time every framework with")
    p.add_argument("--repeat", type=int, default=30, help="timed runs for tuned TVM / onnxruntime / torch")
    p.add_argument(
        "--untuned-repeat", type=int, default=3, help="timed runs of the untuned build (~2 s each); 0 skips it"
    )
    p.add_argument("--cache", help="TVMFLOW_CACHE to use (default: a fresh temporary folder)")
    p.add_argument(
        "--note",
        default="machine shared with other engineers running tests: timings are noisy",
        help="free text stored in the result",
    )
    return p.parse_args(argv)


def time_ms(fn, repeat: int, warmup: int = 3) -> dict:
    """Median and p90 wall time of fn() in ms."""
    from tasks.importers.reference import wall_times_ms

    return stats(wall_times_ms(fn, repeat, warmup))


def stats(latencies_ms) -> dict:
    values = [float(v) for v in latencies_ms]
    return {
        "median_ms": round(float(np.median(values)), 3),
        "p90_ms": round(float(np.percentile(values, 90)), 3),
        "runs": len(values),
    }


def machine_info(target: dict) -> dict:
    import onnxruntime
    import torch
    import tvm

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    flags = next(
        (
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ),
        [],
    )
    return {
        "cpu_model": cpu,
        "mcpu": target.get("mcpu"),
        "cores": os.cpu_count(),
        "isa": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags],
        "load_avg_at_start": os.getloadavg(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "versions": {
            "tvm": tvm.__version__,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
        },
    }


def torch_module(spec: str, source):
    """The eager nn.Module: the factory's own module, else the exported program's."""
    import importlib

    import torch

    from tasks.importers.model_import import is_factory

    if is_factory(spec):
        module_name, func_name = spec.split(":")
        return getattr(importlib.import_module(module_name), func_name)()[0].eval()
    if source.framework == "torch":
        return torch.export.load(str(source.path)).module()
    return None


def time_torch(module, sample: dict, names: list[str], threads: list[int], repeat: int):
    import torch

    args = [torch.from_numpy(np.ascontiguousarray(sample[n])) for n in names]
    out, before = {}, torch.get_num_threads()
    with torch.inference_mode():
        for n in threads:
            torch.set_num_threads(n)
            out[str(n)] = time_ms(lambda: module(*args), repeat)
    torch.set_num_threads(before)
    return out


def torch_outputs(module, samples: list[dict], names: list[str]) -> list[list[np.ndarray]]:
    import torch

    results = []
    with torch.inference_mode():
        for sample in samples:
            got = module(*[torch.from_numpy(np.ascontiguousarray(sample[n])) for n in names])
            got = got if isinstance(got, (tuple, list)) else [got]
            results.append([g.detach().numpy() for g in got])
    return results


def time_onnxruntime(onnx_path: Path, sample: dict, threads: list[int], repeat: int):
    import onnxruntime as ort

    out = {}
    for n in threads:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = n
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        feed = {
            i.name: np.ascontiguousarray(sample[i.name]) if i.name in sample else next(iter(sample.values()))
            for i in session.get_inputs()
        }
        out[str(n)] = time_ms(lambda: session.run(None, feed), repeat)  # noqa: B023
    return out


def start_workers(key: str, servers: int, threads: int, log_dir: Path):
    """A tracker + rpc servers whose TVM runtime uses `threads` threads."""
    from tasks.devices.workers import start_local_workers

    return start_local_workers(key, servers, log_dir / f"workers-{threads}t", threads=threads)


def task_hashes(plan) -> dict:
    """structural hash (global_symbol stripped) -> task name, to map built kernels to tasks."""
    import tvm
    from tvm_ffi import structural_hash

    out = {}
    for task in plan:
        mod = tvm.ir.load_json(task.mod_json)
        for _, func in mod.functions.items():
            out[structural_hash(func.without_attr("global_symbol"))] = task.name
    return out


def kernel_to_task(prepared, plan) -> dict:
    """Kernel (PrimFunc) name in the prepared module -> the tuning task it belongs to."""
    import tvm
    from tvm_ffi import structural_hash

    hashes = task_hashes(plan)
    out = {}
    for gv, func in prepared.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            out[gv.name_hint] = hashes.get(structural_hash(func.without_attr("global_symbol")))
    return out


def profile_kernels(lib_path: Path, sample: dict, names: list[str]) -> dict:
    """Per-kernel wall time (us, summed over its calls) of one run in this process.

    TVM 0.27's Relax VM has no profiler, so a VM instrument stamps the time before and after
    every call. The thread pool size comes from TVM_NUM_THREADS, which main() sets first.
    """
    import tvm
    from tvm import relax
    from tvm.runtime.vm import VMInstrumentReturnKind

    dev = tvm.cpu(0)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), dev)
    args = [tvm.runtime.tensor(np.ascontiguousarray(sample[n]), dev) for n in names]
    per_run: dict[str, float] = {}
    stamp: dict[str, float] = {}

    def instrument(func, symbol, before, ret, *call_args):
        if before:
            stamp[symbol] = time.perf_counter()
        else:
            per_run[symbol] = per_run.get(symbol, 0.0) + (time.perf_counter() - stamp[symbol]) * 1e6
        return VMInstrumentReturnKind.NO_OP

    vm["main"](*args)  # warm up before instrumenting
    vm.set_instrument(tvm.runtime.convert(instrument) if hasattr(tvm.runtime, "convert") else instrument)
    best: dict[str, float] = {}
    for _ in range(3):  # keep each kernel's fastest of 3 runs: the machine is shared
        per_run.clear()
        vm["main"](*args)
        best = dict(per_run) if not best else {k: min(v, best.get(k, v)) for k, v in per_run.items()}
    return best


def breakdown(profile_us: dict, kernel_tasks: dict, plan, results: list[dict]) -> dict:
    """Where the time goes: per task (tuned or not), summed over its kernels."""
    by_task: dict[str, dict] = {}
    info = {t.name: t for t in plan}
    res = {r["name"]: r for r in results}
    other = 0.0
    for kernel, us in profile_us.items():
        task = kernel_tasks.get(kernel)
        if task is None:
            other += us
            continue
        row = by_task.setdefault(task, {"task": task, "kernels": 0, "us": 0.0})
        row["kernels"] += 1
        row["us"] += us
    rows = []
    for name, row in by_task.items():
        t = info[name]
        r = res.get(name, {})
        rows.append(
            {
                **row,
                "us": round(row["us"], 1),
                "weight": t.weight,
                "gflops": round(t.flops * t.weight / 1e9, 4),
                "trials": r.get("trials_run", 0),
                "tuned": bool(r.get("valid")),
                "tuner_best_us": round(r["best_ms"] * 1000 * t.weight, 1) if r.get("best_ms") else None,
            }
        )
    rows.sort(key=lambda r: -r["us"])
    total = sum(r["us"] for r in rows) + other
    untuned = sum(r["us"] for r in rows if not r["tuned"])
    return {
        "total_us": round(total, 1),
        "untuned_tasks_us": round(untuned, 1),
        "tuned_tasks_us": round(total - untuned - other, 1),
        "non_kernel_us": round(other, 1),
        "untuned_share": round(untuned / total, 3) if total else None,
        "tasks": rows,
    }


def main(argv=None) -> dict:
    import signal

    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the tracker and rpc servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args(argv)
    threads = [int(t) for t in args.threads.split(",") if t]
    cache_dir = Path(args.cache or tempfile.mkdtemp(prefix="tvmflow-bench-"))
    os.environ["TVMFLOW_CACHE"] = str(cache_dir)
    os.environ["TVM_NUM_THREADS"] = str(max(threads))  # this process's own TVM runtime (profiling)
    if "PREFECT_API_URL" not in os.environ:
        # Measurements hold Prefect global-concurrency slots (tasks.devices.capacity): without a server,
        # Prefect starts an ephemeral one. Give it its own SQLite (the shared one locks under
        # load), no analytics, and time to start on a busy 2-core machine.
        os.environ.setdefault("PREFECT_HOME", str(cache_dir / "prefect"))
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")

    import logging

    import tvm

    from tasks import pipeline
    from tasks.devices.profiles import get_device
    from tasks.devices.session import DeviceAddress
    from tasks.devices.validate import compare, run_on_device
    from tasks.importers.bundled import DEFAULT_DATA
    from tasks.importers.datasets import load_dataset
    from tasks.importers.reference import export_onnx_for_baseline

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("tvm.s_tir.meta_schedule", "tvm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    progress = logging.getLogger("tvmflow")  # tuning progress (task i/N, trials, best so far)
    progress.setLevel(logging.INFO)
    if not any(getattr(h, "_bench", False) for h in progress.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler._bench = True
        progress.addHandler(handler)
        progress.propagate = False

    def say(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    device = get_device(args.device)
    target_cores = int(device.target.get("num-cores", max(threads)))
    started = dt.datetime.now(dt.UTC)
    result = {
        "model": args.model,
        "trials_budget": args.trials,
        "device": device.name,
        "target": device.target,
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_info(device.target),
        "shared_machine": True,
        "note": args.note,
        "cache": str(cache_dir),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    out_path = Path(
        args.out
        or ROOT / "bench" / "results" / f"{args.model.split(':')[-1].split('/')[-1].split('.')[0]}-{args.trials}.json"
    )
    log_dir = cache_dir / "logs"

    t0 = time.monotonic()
    source = pipeline.fetch_model(args.model)
    prepared = pipeline.prepare_model(source, device, None, "fp32")
    names = prepared.input_names
    dataset = load_dataset(args.data or DEFAULT_DATA.get(args.model), prepared.specs)
    samples = [dataset.sample(i) for i in range(len(dataset))]
    sample0 = samples[0]
    result["import_seconds"] = round(time.monotonic() - t0, 1)
    result["data"] = dataset.source

    plan = pipeline.plan_tuning(prepared, device, args.trials).tasks
    result["tasks"] = len(plan)
    result["tasks_with_trials"] = sum(1 for t in plan if t.trials)
    say(f"{len(plan)} tasks, {args.trials} trials over {result['tasks_with_trials']} of them")

    workers = start_workers(device.rpc_key, 2, target_cores, log_dir)
    try:
        tracker = (workers.host, workers.tracker_port)
        t0 = time.monotonic()
        results = [
            pipeline.tune_one(task, DeviceAddress(device, tracker, 2), f"[{i + 1}/{len(plan)}]").to_json()
            for i, task in enumerate(plan)
        ]
        result["tuning_seconds"] = round(time.monotonic() - t0, 1)
        result["trials_run"] = sum(r["trials_run"] for r in results)
        # a re-run on the same --cache reuses the tuning: keep the searches' own times, and say so
        result["tuning_cache_hits"] = sum(1 for r in results if r.get("cached"))
        result["tuning_seconds_of_searches"] = round(sum(r.get("seconds") or 0 for r in results), 1)
        result["tuning"] = [
            {k: r.get(k) for k in ("name", "trials_planned", "trials_run", "valid", "best_ms", "seconds", "error")}
            for r in results
        ]
        t0 = time.monotonic()
        db_dir, records = pipeline.pick_best([r["db_dir"] for r in results], cache_dir / "merged-db", device)
        lib = pipeline.build(prepared, device, db_dir, records).library
        result["build_seconds"] = round(time.monotonic() - t0, 1)
        result["records"] = records
        result["library_mb"] = round(lib.stat().st_size / 2**20, 1)
        say(f"tuned: {result['trials_run']} trials in {result['tuning_seconds']} s; built {lib}")

        kind = device.target.get("kind", "llvm")
        tvm_tuned = {}
        run = run_on_device(lib, tracker, device.rpc_key, samples, names, kind, repeat=args.repeat)
        tvm_tuned[str(target_cores)] = stats(run.latencies_ms)
        tuned_outputs = run.outputs
        say(f"TVM tuned ({target_cores} threads): {tvm_tuned[str(target_cores)]}")

        untuned = None
        if args.untuned_repeat > 0:
            t0 = time.monotonic()
            untuned_lib = pipeline.build(prepared, device, None).library
            urun = run_on_device(
                untuned_lib, tracker, device.rpc_key, [sample0], names, kind, repeat=args.untuned_repeat
            )
            untuned = {
                **stats(urun.latencies_ms),
                "threads": target_cores,
                "build_and_run_seconds": round(time.monotonic() - t0, 1),
            }
            untuned_outputs = urun.outputs
            say(f"TVM untuned: {untuned}")
    finally:
        workers.stop()

    for n in threads:  # other thread counts: a worker set whose runtime uses n threads
        if str(n) in tvm_tuned:
            continue
        extra = start_workers(device.rpc_key, 1, n, log_dir)
        try:
            run = run_on_device(
                lib, (extra.host, extra.tracker_port), device.rpc_key, [sample0], names, kind, repeat=args.repeat
            )
            tvm_tuned[str(n)] = stats(run.latencies_ms)
            say(f"TVM tuned ({n} threads): {tvm_tuned[str(n)]}")
        finally:
            extra.stop()
    result["tvm_tuned"] = tvm_tuned
    result["tvm_untuned"] = untuned

    module = torch_module(args.model, source)
    reference_outputs = torch_outputs(module, samples, names) if module is not None else None
    if reference_outputs is not None:
        result["agreement"] = {"reference": "torch eager", "tuned": compare(tuned_outputs, reference_outputs).to_json()}
        if untuned is not None:
            result["agreement"]["untuned"] = compare(untuned_outputs, reference_outputs[:1]).to_json()
        result["torch"] = time_torch(module, sample0, names, threads, args.repeat)
        say(f"torch: {result['torch']}")
    onnx_path = (
        source.path
        if source.framework == "onnx"
        else export_onnx_for_baseline(source.path, cache_dir / "baseline.onnx")
    )
    result["onnxruntime"] = time_onnxruntime(onnx_path, sample0, threads, args.repeat)
    say(f"onnxruntime: {result['onnxruntime']}")

    try:  # where the time goes: per-task kernel time of the tuned build, in this process
        profile = profile_kernels(lib, sample0, names)
        result["breakdown"] = {
            "threads": max(threads),
            **breakdown(profile, kernel_to_task(prepared, plan), plan, results),
        }
    except Exception as err:  # noqa: BLE001 - a profiler problem must not lose the timings
        result["breakdown"] = {"error": f"{err.__class__.__name__}: {str(err).splitlines()[0][:300]}"}

    result["wall_seconds"] = round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1)
    result["tvm_version"] = tvm.__version__
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    say(f"wrote {out_path}")
    from make_table import render  # noqa: E402 - bench/ is on sys.path when run as a script

    print(render([result]))
    return result


if __name__ == "__main__":
    main()
