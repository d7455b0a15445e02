"""tvmflow's CPU build against onnxruntime, each timed in its own process (issue 14 rows).

Why a process per measurement: on a 2-core VM the two runtimes' thread pools fight when they share
a process (onnxruntime's threads spin after a run; TVM's pool is pinned; oneDNN's OpenMP threads
sleep and wake): timed together, either side could be made to look 2-3x slower. Here the parent
builds everything once (the ONNX fp32 and QDQ int8 models; tvmflow's fp32 library as the pipeline's
build stage makes it on this host: NHWC, BN folded, every conv/dense raced oneDNN vs TVM; its int8
library from tasks.precision), then each (engine, precision, threads) is timed by a fresh child that
loads only that one runtime. Rows: `cpu_vs_ort.json` {"model", "precision", "threads", "trials",
"tvmflow_ms", "ort_ms", "tune_s", "cpu", "cores"} (0 trials: no tuning in this script).

  .venv/bin/python bench/cpu_rows.py --models efficientnet_lite0 resnet18 --out /tmp/rows
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FACTORIES = {
    "resnet18": "tasks.importers.bundled:resnet18",
    "efficientnet_lite0": "tasks.importers.bundled:efficientnet_lite0",
    "mnist_cnn": "tasks.importers.bundled:mnist_cnn",
}


def measure(engine: str, path: str, x_path: str, threads: int, repeat: int) -> float:
    """In a child: median ms of one runtime on the saved input, with `threads` threads."""
    from tasks.importers.timing import median_ms

    x = np.load(x_path)
    if engine == "ort":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return median_ms(lambda: sess.run(None, {name: x}), warmup=5, repeat=repeat)
    os.environ["OMP_NUM_THREADS"] = os.environ["TVM_NUM_THREADS"] = str(threads)  # before either pool starts
    import tvm
    from tvm import relax

    import tasks  # noqa: F401 - OMP_WAIT_POLICY before libgomp loads

    vm = relax.VirtualMachine(tvm.runtime.load_module(path), tvm.cpu())
    arg = tvm.runtime.tensor(x)
    return median_ms(lambda: vm["main"](arg), warmup=5, repeat=repeat)


def child(engine: str, path: Path, x_path: Path, threads: int, repeat: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", engine, str(path), str(x_path), str(threads), str(repeat)],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def build_all(name: str, work: Path, calib_n: int) -> dict:
    """ONNX fp32 + QDQ int8, tvmflow fp32 + int8 libraries, the input; paths by (engine, precision)."""
    import torch

    from tasks.build.compile import compile_module, export_library
    from tasks.build.cpu_pick_best import VENDOR, compile_cpu, library_here, preferred_layout
    from tasks.build.cpu_vendor import link_options
    from tasks.devices.profiles import get_device
    from tasks.importers.datasets import Dataset
    from tasks.importers.model_import import export_factory, import_pt2
    from tasks.precision.calibrate import calibrate
    from tasks.precision.qdq import quantize_static_qdq
    from tasks.precision.quantize import QuantConfig, quantize_model, weights_need_7_bits
    from tasks.tuning.extract import convert_layout, fold_batchnorm, prepare_for_tuning

    device = get_device("local")
    target = device.tvm_target()
    module_name, attr = FACTORIES[name].split(":")
    model, example = getattr(__import__(module_name, fromlist=[attr]), attr)()
    rng = np.random.default_rng(0)
    x = rng.standard_normal(tuple(example[0].shape)).astype("float32")
    calib = rng.standard_normal((calib_n, *example[0].shape)).astype("float32")
    np.save(work / "x.npy", x)
    onnx32 = work / "fp32.onnx"
    torch.onnx.export(model, (torch.from_numpy(x),), str(onnx32), input_names=["x"], opset_version=17, dynamo=False)
    paths = {
        ("ort", "fp32"): onnx32,
        ("ort", "int8"): quantize_static_qdq(onnx32, Dataset({"x": calib}), work / "q.onnx"),
    }

    imported = import_pt2(export_factory(FACTORIES[name], work / "model.pt2"))
    graph = convert_layout(fold_batchnorm(imported.mod), preferred_layout(device))
    assert library_here(device), "oneDNN kernels are not built here: scripts/build-cpu-contrib.sh"
    ex, choices, uses = compile_cpu(prepare_for_tuning(graph, target), graph, imported.inputs, device, None)
    paths[("tvmflow", "fp32")] = export_library(
        ex, device, work / "fp32.so", options=link_options(VENDOR) if uses else None
    )
    on_library = sum(c.chosen == VENDOR for c in choices)

    folded = fold_batchnorm(imported.mod)
    ranges = calibrate(folded, Dataset({imported.inputs[0].name: calib}), "percentile")
    qmod, _ = quantize_model(folded, ranges, QuantConfig(reduce_range=weights_need_7_bits(target)))
    paths[("tvmflow", "int8")] = export_library(
        compile_module(prepare_for_tuning(qmod, target), device, None), device, work / "int8.so"
    )

    import tvm
    from tvm import relax

    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    err = float(np.abs((out if hasattr(out, "numpy") else out[0]).numpy() - ref).max())
    return {"paths": paths, "x": work / "x.npy", "max_abs_err": err, "on_library": f"{on_library}/{len(choices)}"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--measure":
        engine, path, x_path, threads, repeat = argv[1:]
        print(measure(engine, path, x_path, int(threads), int(repeat)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet18"])
    parser.add_argument("--threads", nargs="+", type=int, default=[os.cpu_count() or 1, 1])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--calib", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)

    import tvm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    rows, details = (
        [],
        {"load_avg_at_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
    )
    for name in args.models:
        work = Path(tempfile.mkdtemp(prefix=f"rows-{name}-"))
        built = build_all(name, work, args.calib)
        details[name] = {"conv_dense_on_onednn": built["on_library"], "fp32_max_abs_err_vs_torch": built["max_abs_err"]}
        print(f"[{time.strftime('%H:%M:%S')}] {name}: built; conv/dense on oneDNN {built['on_library']}", flush=True)
        for precision in ("fp32", "int8"):
            for threads in args.threads:
                ort_ms = child("ort", built["paths"][("ort", precision)], built["x"], threads, args.repeat)
                tvm_ms = child("tvmflow", built["paths"][("tvmflow", precision)], built["x"], threads, args.repeat)
                row = {"model": name, "precision": precision, "threads": threads, "trials": 0,
                       "tvmflow_ms": round(tvm_ms, 4), "ort_ms": round(ort_ms, 4), "tune_s": 0.0,
                       "cpu": cpu, "cores": os.cpu_count()}  # fmt: skip
                rows.append(row)
                print(f"[{time.strftime('%H:%M:%S')}] {row}", flush=True)
                (out / "cpu_vs_ort.json").write_text(json.dumps(rows, indent=1))
    details["load_avg_at_end"] = os.getloadavg()
    (out / "cpu_rows_details.json").write_text(json.dumps(details, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
