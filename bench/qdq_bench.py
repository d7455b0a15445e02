"""Pre-quantized QDQ models (onnxruntime quantize_static) through TVM's integer path (tasks/precision/qdq.py).

- mnist:    the MNIST CNN quantized by onnxruntime (calibrated on digits [0:500]); top-1 accuracy
            on digits [500:5000] of onnxruntime (default session, and graph optimizations off = the
            QDQ graph as ONNX defines it) against TVM's integer path (host build, untuned).
- resnet18: does ResNet-18's QDQ model (calibrated on the bundled photos) import onto the integer
            path: integer / float layer counts, and outputs against onnxruntime on the photos.

Results: bench/results/qdq.json. Usage: .venv/bin/python bench/qdq_bench.py mnist resnet18
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "qdq.json"


def _qdq_model(factory: str, calibration: str, work: Path):
    """(fp32 ONNX, QDQ ONNX, input specs) of a bundled factory, quantized by onnxruntime."""
    from tasks.importers.datasets import load_dataset
    from tasks.importers.model_import import export_factory, import_pt2
    from tasks.importers.reference import export_onnx_for_baseline
    from tasks.precision.qdq import quantize_static_qdq

    pt2 = export_factory(factory, work / "model.pt2")
    specs = import_pt2(pt2).inputs
    fp32 = export_onnx_for_baseline(pt2, work / "fp32.onnx")
    return fp32, quantize_static_qdq(fp32, load_dataset(calibration, specs), work / "qdq.onnx"), specs


def _compare(qdq: Path, specs, data_uri: str) -> dict:
    import onnxruntime as ort

    from tasks.importers.datasets import load_dataset
    from tasks.importers.model_import import import_onnx
    from tasks.precision.layers import host_runner
    from tasks.precision.qdq import prequantized_info

    start = time.time()
    imported = import_onnx(qdq)
    info = prequantized_info(imported.mod)
    import_s = time.time() - start
    run = host_runner(imported.mod)
    spec_opts = ort.SessionOptions()
    spec_opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sessions = {
        "ort": ort.InferenceSession(str(qdq), providers=["CPUExecutionProvider"]),
        "ort_spec": ort.InferenceSession(str(qdq), spec_opts, providers=["CPUExecutionProvider"]),
    }
    name = imported.inputs[0].name
    data = load_dataset(data_uri, imported.inputs)
    outs = {"tvm": [], "ort": [], "ort_spec": []}
    for i in range(len(data)):
        sample = data.sample(i)
        outs["tvm"].append(run(sample)[0])
        for key, sess in sessions.items():
            outs[key].append(sess.run(None, {sess.get_inputs()[0].name: sample[name]})[0])
    outs = {k: np.concatenate(v) for k, v in outs.items()}
    top1 = {k: v.argmax(-1) for k, v in outs.items()}
    row = {
        "data": data_uri,
        "samples": len(data),
        "import_seconds": round(import_s, 1),
        "integer_layers": len(info["integer_layers"]),
        "kept_float": info["kept_float"],
        "zero_point_handling": sorted({l["zero_point"] for l in info["integer_layers"]}),
    }
    for ref in ("ort", "ort_spec"):
        row[f"tvm_vs_{ref}"] = {
            "top1_agreement": float(np.mean(top1["tvm"] == top1[ref])),
            "max_abs_diff": float(np.abs(outs["tvm"] - outs[ref]).max()),
        }
    if data.labels is not None:
        row["accuracy"] = {k: float(np.mean(v == data.labels)) for k, v in top1.items()}
    return row


def mnist() -> dict:
    work = Path(tempfile.mkdtemp(prefix="qdq-mnist-"))
    _, qdq, specs = _qdq_model("tasks.importers.bundled:mnist_cnn", "bundled:mnist:500:0", work)
    return {
        "calibration": "bundled:mnist:500:0 (onnxruntime quantize_static: QDQ, per-channel int8 weights, uint8 activations)",
        **_compare(qdq, specs, "bundled:mnist:4500:500"),
    }


def resnet18() -> dict:
    work = Path(tempfile.mkdtemp(prefix="qdq-resnet18-"))
    _, qdq, specs = _qdq_model("tasks.importers.bundled:resnet18", "bundled:imagenet-photos", work)
    return {"calibration": "bundled:imagenet-photos", **_compare(qdq, specs, "bundled:imagenet-photos")}


def main(argv) -> int:
    for part in argv or ["mnist", "resnet18"]:
        row = {"mnist": mnist, "resnet18": resnet18}[part]()
        print(part, json.dumps(row), flush=True)
        data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        data[part] = row
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
