"""CPU builds side by side with onnxruntime (issue 14): which graph and kernel levers move the ratio.

One process, one input, per model (median ms, batch 1):
  ORT fp32 / ORT int8 QDQ (per-channel int8 weights, uint8 activations), all threads and 1 thread;
  tvmflow fp32 at 0 trials, lever by lever: no BN folding (the old path), BN folded (NCHW),
    NHWC, NHWC + every conv/dense on the vendor library, and the per-operator pick-best of
    library vs TVM default (tasks.build.candidates.choose; the choices are in the details JSON);
  tvmflow fp32 after joint tuning (tasks.tuning.joint) at each budget > 0, pick-best of tuned /
    default / library per operator;
  tvmflow int8 (tasks.precision quantize, BN folded first) at 0 trials (and tuned at each budget).
Optionally a scale-out table: joint-tuning wall time of one budget with 1, 2, 4, 8 rpc servers.

Rows: cpu_vs_ort.json {"model","precision","threads","trials","tvmflow_ms","ort_ms","tune_s","cpu","cores"},
scaleout.json {"servers","trials","tune_s"}, everything else in cpu_details.json. Usage (see bench/README.md):
  .venv/bin/python bench/cpu_vs_ort.py --models resnet18 --budgets 0 32 --vendors dnnl cblas --out /tmp/cpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tvm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tasks as _tasks  # noqa: E402,F401 - sets OMP_WAIT_POLICY before set_threads loads libgomp
from tasks.importers.timing import median_ms  # noqa: E402

FACTORIES = {
    "resnet18": "tasks.importers.bundled:resnet18",
    "efficientnet_lite0": "tasks.importers.bundled:efficientnet_lite0",
    "mnist_cnn": "tasks.importers.bundled:mnist_cnn",
}


def say(*args):
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def set_threads(n: int) -> None:
    """TVM's pool (and so the BLAS kernels, which run on it) and oneDNN's OpenMP threads (this
    thread's setting: the VM calls the kernels from it) to n; onnxruntime gets its own."""
    import ctypes

    tvm.get_global_func("runtime.config_threadpool")(1, n)
    try:
        ctypes.CDLL("libgomp.so.1").omp_set_num_threads(n)
    except OSError:
        pass  # no OpenMP runtime: no oneDNN kernels either


def side_by_side_ms(fn_a, fn_b, repeat: int = 30, block: int = 10, settle: int = 2) -> tuple[float, float]:
    """Medians of a and b run in alternating blocks (a x block, b x block, ...), the first `settle`
    calls of each block not counted: both see the same load drift on a shared machine, and neither
    is timed while the other's threads still spin (onnxruntime's pool spins after a run; timed
    call-by-call on 2 cores, that cost oneDNN 2x)."""
    times_a, times_b = [], []
    while len(times_a) < repeat:
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            for i in range(block):
                t = time.perf_counter()
                fn()
                if i >= settle:
                    times.append(1000 * (time.perf_counter() - t))
    return float(np.median(times_a)), float(np.median(times_b))


def tvm_call(ex, x: np.ndarray):
    """One call of the model's main on `x` (a closure for side_by_side_ms)."""
    vm = vm_of(ex)
    arg = tvm.runtime.tensor(x)
    return lambda: vm["main"](arg)


# ---------------------------------------------------------------- onnxruntime
def export_onnx(model, x: np.ndarray, out: Path) -> Path:
    """ONNX by torch's TorchScript exporter (needs no onnxscript; the dynamo one does)."""
    import torch

    torch.onnx.export(
        model, (torch.from_numpy(x),), str(out), input_names=["x"], output_names=["y"], opset_version=17, dynamo=False
    )
    return out


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- tvmflow builds
def build(mod, device, db_dir=None, **prep):
    from tasks.build.compile import compile_module
    from tasks.tuning.extract import prepare_for_tuning

    prepared = prepare_for_tuning(mod, device.tvm_target(), **prep)
    return prepared, compile_module(prepared, device, db_dir)


def vm_of(ex):
    from tvm import relax

    return relax.VirtualMachine(ex, tvm.cpu())


def tvm_ms(ex, x: np.ndarray, repeat: int = 20) -> float:
    vm = vm_of(ex)
    arg = tvm.runtime.tensor(x)
    vm.set_input("main", arg)
    timer = vm.time_evaluator("invoke_stateful", tvm.cpu(), number=1, repeat=repeat, min_repeat_ms=0)
    return float(np.median(timer("main").results) * 1000)


def tvm_out(ex, x: np.ndarray) -> np.ndarray:
    out = vm_of(ex)["main"](tvm.runtime.tensor(x))
    return (out if hasattr(out, "numpy") else out[0]).numpy()


# ---------------------------------------------------------------- one model
def run_model(name: str, args, device, workers, details: dict, rows: list, flush=lambda: None) -> None:
    import torch

    from tasks.build.candidates import choices_table
    from tasks.build.cpu_vendor import offload, profile_calls, vendor_choices, winners_of
    from tasks.importers.datasets import Dataset
    from tasks.importers.model_import import export_factory, import_pt2
    from tasks.precision.calibrate import calibrate
    from tasks.precision.qdq import quantize_static_qdq
    from tasks.precision.quantize import QuantConfig, quantize_model, weights_need_7_bits
    from tasks.tuning.extract import convert_layout, extract_tasks, fold_batchnorm, prepare_for_tuning
    from tasks.tuning.joint import tune_jointly

    work = Path(tempfile.mkdtemp(prefix=f"cpu-{name}-"))
    factory = FACTORIES[name]
    module_name, attr = factory.split(":")
    model, example = getattr(__import__(module_name, fromlist=[attr]), attr)()
    rng = np.random.default_rng(0)
    x = rng.standard_normal(tuple(example[0].shape)).astype("float32")
    calib = rng.standard_normal((args.calib, *example[0].shape)).astype("float32")  # [N, *input shape]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    d = details.setdefault(name, {"variants": {}, "choices": {}, "tuning": {}})
    cores = device.target["num-cores"]
    thread_set = sorted({cores if t == "all" else int(t) for t in args.threads}, reverse=True)

    # onnxruntime
    onnx32 = export_onnx(model, x, work / "fp32.onnx")
    onnx8 = quantize_static_qdq(onnx32, Dataset({"x": calib}), work / "int8.onnx")
    ort, sessions = {}, {}
    for prec, path in (("fp32", onnx32), ("int8", onnx8)):
        for t in thread_set:
            sess = sessions[(prec, t)] = ort_session(path, t)
            ort[(prec, t)] = median_ms(lambda: sess.run(None, {"x": x}), repeat=args.repeat)  # noqa: B023
            if prec == "fp32":
                d["ort_fp32_err"] = float(np.abs(sess.run(None, {"x": x})[0] - ref).max())
    say(name, "ort", {f"{p} {t}T": round(v, 3) for (p, t), v in ort.items()})
    d["ort_ms"] = {f"{p}_{t}T": v for (p, t), v in ort.items()}

    imported = import_pt2(export_factory(factory, work / "model.pt2"))
    mod, input_name = imported.mod, imported.inputs[0].name
    set_threads(cores)

    def variant(label, **prep):
        t0 = time.time()
        prepared, ex = build(mod, device, **prep)
        ms_ = tvm_ms(ex, x, args.repeat)
        err = float(np.abs(tvm_out(ex, x) - ref).max())
        d["variants"][label] = {
            "ms": ms_,
            "max_abs_err": err,
            "build_s": round(time.time() - t0, 1),
            "tasks": len(extract_tasks(prepared, device.tvm_target())),
        }
        say(name, label, d["variants"][label])
        flush()  # a call cut short by its time limit still brings back every variant measured
        return prepared, ex, ms_

    # fp32 at 0 trials, lever by lever
    variant("NCHW, BN not folded, default schedules", fold_bn=False, layout="NCHW")
    layouts = {}
    for layout in args.layouts:
        layouts[layout] = variant(f"{layout}, BN folded, default schedules", layout=layout)
    best_layout = min(layouts, key=lambda k: layouts[k][2])
    d["best_layout_at_0"] = best_layout
    _, default_ex, default_ms = layouts[best_layout]
    default_calls = profile_calls(default_ex, x)
    layers = offload(convert_layout(fold_batchnorm(mod), best_layout), device.tvm_target()).candidates
    picks = {}  # budget -> (ms, ex)
    vendor_best = None
    for vendor in args.vendors:
        from tasks.build.cpu_vendor import available

        if not available(vendor):
            d["variants"][f"{best_layout} + {vendor}"] = {"error": "library not available here"}
            continue
        _, vex, vms = variant(f"{best_layout} + {vendor} (every conv/dense)", layout=best_layout, vendor=vendor)
        vcalls = profile_calls(vex, x)
        choices = vendor_choices(default_calls, vcalls, vendor, layers)
        winners = winners_of(choices, vendor)
        _, pex, pms = variant(
            f"{best_layout} + {vendor} pick-best, 0 trials", layout=best_layout, vendor=vendor, vendor_only=winners
        )
        d["choices"][f"0 trials, {vendor}"] = [c.to_json() for c in choices]
        d.setdefault("choices_md", {})[f"0 trials, {vendor}"] = choices_table(choices)
        if vendor_best is None or pms < vendor_best[0]:
            vendor_best = (pms, pex, vendor, vcalls, winners)
    picks[0] = (default_ms, default_ex) if vendor_best is None or default_ms <= vendor_best[0] else vendor_best[:2]

    # fp32 tuned: one joint session per budget (warm cost model carried from budget to budget)
    tune_s = {0: 0.0}
    for budget in [b for b in args.budgets if b > 0]:
        prepared = prepare_for_tuning(mod, device.tvm_target(), layout=best_layout)
        tasks = extract_tasks(prepared, device.tvm_target())
        db = work / f"fp32-{budget}"
        t0 = time.time()
        results = tune_jointly(
            tasks,
            device,
            (workers.host, workers.tracker_port),
            args.servers,
            db,
            cost_model_dir=work / "cost_model",
            trials=budget,
            time_budget_s=args.time_budget,
            log=say,
            use_slots=False,
        )
        tune_s[budget] = round(time.time() - t0, 1)
        from tasks.build.compile import compile_module
        from tasks.tuning.joint import last_summary

        tex = compile_module(prepared, device, db)
        tcalls = profile_calls(tex, x)
        tuned_names = {r.name for r in results if r.valid}
        d["tuning"][str(budget)] = {
            "summary": {k: v for k, v in (last_summary(db) or {}).items() if k != "results"},
            "curves": {r.name: r.curve for r in results if r.curve},
            "tuned_ms": tvm_ms(tex, x, args.repeat),
            "tuned_err": float(np.abs(tvm_out(tex, x) - ref).max()),
        }
        say(name, f"tuned {budget}", d["tuning"][str(budget)]["tuned_ms"], "in", tune_s[budget], "s")
        best = (d["tuning"][str(budget)]["tuned_ms"], tex)
        if vendor_best is not None:
            choices = vendor_choices(tcalls, vendor_best[3], vendor_best[2], layers, tuned_names, default_calls)
            winners = winners_of(choices, vendor_best[2])
            _, pex = build(mod, device, db, layout=best_layout, vendor=vendor_best[2], vendor_only=winners)
            pms = tvm_ms(pex, x, args.repeat)
            d["choices"][f"{budget} trials, {vendor_best[2]}"] = [c.to_json() for c in choices]
            d.setdefault("choices_md", {})[f"{budget} trials, {vendor_best[2]}"] = choices_table(choices)
            d["tuning"][str(budget)]["pick_ms"] = pms
            d["tuning"][str(budget)]["pick_err"] = float(np.abs(tvm_out(pex, x) - ref).max())
            say(name, f"tuned {budget} + pick-best", pms)
            if pms < best[0]:
                best = (pms, pex)
        picks[budget] = best

    # int8: BN folded first, then calibrated and quantized (tasks.precision), built like fp32
    target = device.tvm_target()
    fmod = fold_batchnorm(mod)
    ranges = calibrate(fmod, Dataset({input_name: calib}), "percentile")
    qmod, _ = quantize_model(fmod, ranges, QuantConfig(reduce_range=weights_need_7_bits(target)))
    int8 = {}
    for budget in args.budgets if args.int8_tuned else [0]:
        prepared = prepare_for_tuning(qmod, target, layout="NCHW")
        db = None
        t0 = time.time()
        if budget > 0:
            db = work / f"int8-{budget}"
            tune_jointly(
                extract_tasks(prepared, target),
                device,
                (workers.host, workers.tracker_port),
                args.servers,
                db,
                cost_model_dir=work / "cost_model_int8",
                trials=budget,
                time_budget_s=args.time_budget,
                log=say,
                use_slots=False,
            )
        from tasks.build.compile import compile_module

        qex = compile_module(prepared, device, db)
        int8[budget] = (tvm_ms(qex, x, args.repeat), qex, round(time.time() - t0, 1) if budget else 0.0)
        top1 = int(tvm_out(qex, x).argmax() == ref.argmax())
        d.setdefault("int8", {})[str(budget)] = {"ms": int8[budget][0], "top1_same_as_torch": top1}
        say(name, f"int8 {budget}", int8[budget][0])

    # rows: every thread count, the best build of each budget, each timed alternately with ORT
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    for t in thread_set:
        set_threads(t)
        builds = [("fp32", b, ex, tune_s[b]) for b, (_, ex) in picks.items()]
        builds += [("int8", b, qex, ts) for b, (_, qex, ts) in int8.items()]
        for precision, budget, ex, ts in builds:
            sess = sessions[(precision, t)]
            ort_ms, tvm_ms_ = side_by_side_ms(lambda: sess.run(None, {"x": x}), tvm_call(ex, x), args.repeat)  # noqa: B023
            rows.append(
                {
                    "model": name,
                    "precision": precision,
                    "threads": t,
                    "trials": budget,
                    "tvmflow_ms": round(tvm_ms_, 4),
                    "ort_ms": round(ort_ms, 4),
                    "tune_s": ts,
                    "cpu": cpu,
                    "cores": os.cpu_count(),
                }
            )
        say(name, "rows", rows[-len(builds) :])
        flush()
    set_threads(cores)


def scaleout(args, device, details: dict, flush) -> list:
    """Joint-tuning wall time of one fixed budget (ResNet-18 fp32 tasks) with N rpc servers."""
    from tasks.devices.workers import start_local_workers
    from tasks.importers.model_import import export_factory, import_pt2
    from tasks.tuning.extract import extract_tasks, prepare_for_tuning
    from tasks.tuning.joint import tune_jointly

    work = Path(tempfile.mkdtemp(prefix="scaleout-"))
    mod = import_pt2(export_factory(FACTORIES[args.scaleout_model], work / "m.pt2")).mod
    tasks = extract_tasks(prepare_for_tuning(mod, device.tvm_target()), device.tvm_target())
    rows = []
    for n in args.scaleout:
        workers = start_local_workers(
            f"scale{n}", n, work / f"logs{n}", threads=max(1, device.target["num-cores"] // n)
        )
        try:
            t0 = time.time()
            results = tune_jointly(
                tasks,
                device,
                (workers.host, workers.tracker_port),
                n,
                work / f"db{n}",
                trials=args.scaleout_trials,
                log=say,
                use_slots=False,
                time_budget_s=args.scaleout_time_budget,
            )
            spent = round(time.time() - t0, 1)
        finally:
            workers.stop()
        run = sum(r.trials_run for r in results)
        rows.append({"servers": n, "trials": run, "tune_s": spent})
        say("scaleout", rows[-1])
        details["scaleout"] = rows
        flush()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "efficientnet_lite0"])
    parser.add_argument("--budgets", nargs="+", type=int, default=[0, 200])
    parser.add_argument("--threads", nargs="+", default=["all", "1"])
    parser.add_argument("--layouts", nargs="+", default=["NCHW", "NHWC"])
    parser.add_argument("--vendors", nargs="+", default=["cblas", "dnnl"])
    parser.add_argument("--servers", type=int, default=2, help="rpc servers for the tuning runs")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds per tuning session")
    parser.add_argument("--int8-tuned", action="store_true", help="tune int8 too at each budget")
    parser.add_argument("--scaleout", nargs="*", type=int, default=[])
    parser.add_argument("--scaleout-trials", type=int, default=64)
    parser.add_argument("--scaleout-time-budget", type=float, default=None)
    parser.add_argument("--scaleout-model", default="resnet18")
    parser.add_argument("--calib", type=int, default=4, help="calibration samples (seeded random)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--tag", default="", help="suffix of the details file (cpu_details<tag>.json)")
    args = parser.parse_args(argv)
    if any(b > 0 for b in args.budgets) or args.scaleout:  # before torch: after torch.export it takes minutes
        __import__("tvm.s_tir.tensor_intrin")

    from tasks.devices.profiles import DeviceProfile
    from tasks.devices.workers import start_local_workers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": args.cores}
    device = DeviceProfile("bench-cpu", target, "benchcpu")
    details = {
        "env": {
            "cpu": target["mcpu"],
            "cores": os.cpu_count(),
            "load_avg_at_start": os.getloadavg(),
            "tvm": tvm.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "args": vars(args),
        }
    }
    rows: list = []
    details_path = out / f"cpu_details{args.tag}.json"

    def flush():
        if rows:
            (out / "cpu_vs_ort.json").write_text(json.dumps(rows, indent=1))
        if details.get("scaleout"):
            (out / "scaleout.json").write_text(json.dumps(details["scaleout"], indent=1))
        details_path.write_text(json.dumps(details, indent=1, default=str))

    workers = None
    if any(b > 0 for b in args.budgets):
        workers = start_local_workers(
            device.rpc_key, args.servers, Path(tempfile.mkdtemp()) / "logs", threads=max(1, args.cores // args.servers)
        )
    try:
        for name in args.models:
            try:
                run_model(name, args, device, workers, details, rows, flush)
            except Exception as err:  # noqa: BLE001 - one model's failure must not lose the others' rows
                import traceback

                traceback.print_exc()
                details.setdefault(name, {})["error"] = f"{err.__class__.__name__}: {err}"[:500]
            flush()
    finally:
        if workers is not None:
            workers.stop()
    flush()
    if args.scaleout:  # after the models: the rows matter more if the time runs out
        scaleout(args, device, details, flush)
    flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
