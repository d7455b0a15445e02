"""Probe: MetaSchedule tuning an int8 GEMM (a 3x3x64->256 conv as im2col, 14x14 output) with our
dot_8x4_avx2 tensorize rule (tasks.build.int8_isa.tensorize_space), against fp32 with MetaSchedule's
default rules, same trials. Prints instruction counts, exactness and latency (this host).

`layers`: whole ResNet-18 conv layers (conv + ReLU) through the real path, fp32 against int8
(tasks.precision.quantize -> tasks.tuning.extract.prepare_for_tuning, which packs them with tasks.build.int8_pack),
tuned like the flow with the same trial budget (bench/precision_bench._tune_and_build):
    .venv/bin/python bench/int8_gemm_probe.py layers 64
Results: bench/results/int8_layers.json (the GEMM probe: int8_gemm_probe.json)."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(trials: int = 32) -> dict:
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    from tasks.build.int8_isa import instruction_counts, tensorize_space
    from tasks.tuning.tune import lean_build

    m, n, k = 196, 256, 576
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2})
    r = te.reduce_axis((0, k), "k")
    a8 = te.placeholder((m, k), "uint8", name="A")
    b8 = te.placeholder((n // 8, k // 4, 8, 4), "int8", name="B")
    c8 = te.compute(
        (m, n),
        lambda i, j: te.sum(a8[i, r].astype("int32") * b8[j // 8, r // 4, j % 8, r % 4].astype("int32"), axis=r),
        name="C",
    )
    r2 = te.reduce_axis((0, k), "k")
    af = te.placeholder((m, k), "float32", name="A")
    bf = te.placeholder((n, k), "float32", name="B")
    cf = te.compute((m, n), lambda i, j: te.sum(af[i, r2] * bf[j, r2], axis=r2), name="C")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (m, k)).astype("uint8")
    w = rng.integers(-63, 64, (n, k)).astype("int8")
    packed = w.reshape(n // 8, 8, k // 4, 4).transpose(0, 2, 1, 3).copy()
    out = {"shape": [m, n, k], "trials": trials}
    for label, tensors, space, args in (
        ("int8_avx2_tensorized", [a8, b8, c8], tensorize_space(), [x, packed, np.zeros((m, n), "int32")]),
        (
            "fp32_default_rules",
            [af, bf, cf],
            "post-order-apply",
            [x.astype("float32"), w.astype("float32"), np.zeros((m, n), "float32")],
        ),
    ):
        func = te.create_prim_func(tensors).with_attr("global_symbol", "main")
        start = time.time()
        db = ms.tune_tir(
            func,
            target,
            tempfile.mkdtemp(),
            max_trials_global=trials,
            num_trials_per_iter=16,
            space=space,
            builder=ms.builder.LocalBuilder(max_workers=1, timeout_sec=120, f_build=lean_build),
            runner=ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(number=5, repeat=1)),
        )
        sch = ms.tir_integration.compile_tir(db, func, target)
        lib = tvm.compile(sch.mod, target=target)
        tensors_rt = [tvm.runtime.tensor(v) for v in args]
        lib(*tensors_rt)
        result = tensors_rt[-1].numpy()
        exact = bool(np.array_equal(result.astype("int64"), x.astype("int64") @ w.astype("int64").T))
        timer = lib.mod.time_evaluator(lib.mod.entry_name, tvm.cpu(), number=20, repeat=7)
        ms_ = float(np.median(timer(*tensors_rt).results) * 1000)
        out[label] = {
            "latency_ms": ms_,
            "gops": 2 * m * n * k / ms_ / 1e6,
            "exact": exact,
            "tuning_seconds": round(time.time() - start, 1),
            "isa": instruction_counts(lib.mod.inspect_source("asm")),
        }
        print(label, out[label], flush=True)
    return out


# ResNet-18's heaviest conv shapes, and an EfficientNet-Lite0 depthwise one (left unpacked):
# (C, O, H, W, kernel, stride, padding, groups)
LAYERS = {
    "conv3x3_64_56": (64, 64, 56, 56, 3, 1, 1, 1),
    "conv3x3_256_14": (256, 256, 14, 14, 3, 1, 1, 1),
    "conv1x1_128_256_s2": (128, 256, 28, 28, 1, 2, 0, 1),
    "dw3x3_144_56": (144, 144, 56, 56, 3, 1, 1, 144),
}


def _conv_relu(c, o, h, w, k, stride, pad, groups):
    """fp32 Relax module: relu(conv2d(x, W) + b), seeded weights."""
    from tvm import relax

    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, c, h, w), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(
                relax.op.nn.conv2d(
                    x,
                    relax.const(rng.normal(0, 0.05, (o, c // groups, k, k)).astype("float32")),
                    strides=stride,
                    padding=pad,
                    groups=groups,
                )
            )
            y = bb.emit(
                relax.op.nn.relu(relax.op.add(y, relax.const(rng.normal(0, 0.1, (1, o, 1, 1)).astype("float32"))))
            )
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def layers(trials: int, names: list[str]) -> dict:
    import os

    import tvm

    from bench.precision_bench import _tune_and_build, _tvm_latency, kernel_ms
    from tasks.build.int8_isa import assembly, instruction_counts
    from tasks.precision.layers import host_runner
    from tasks.precision.quantize import QuantConfig, quantize_model, weights_need_7_bits
    from tasks.tuning.extract import prepare_for_tuning

    target = tvm.target.Target(
        {
            "kind": "llvm",
            "mcpu": os.environ.get("PROBE_MCPU", tvm.target.codegen.llvm_get_system_cpu()),
            "num-cores": int(os.environ.get("TVM_NUM_THREADS", "2")),
        }
    )
    out = {"trials": trials, "target": str(target), "load_avg_at_start": os.getloadavg()}
    for name in names:
        c, o, h, w, k, stride, pad, groups = LAYERS[name]
        mod = _conv_relu(c, o, h, w, k, stride, pad, groups)
        oh = (h + 2 * pad - k) // stride + 1
        macs = o * oh * oh * (c // groups) * k * k
        x = np.abs(np.random.default_rng(1).normal(0, 1, (1, c, h, w))).astype("float32")  # post-ReLU input
        qmod, _ = quantize_model(
            mod,
            {"conv2d_0": (0.0, float(x.max()))},
            QuantConfig(keep_float=[], reduce_range=weights_need_7_bits(target)),
        )
        row = {"shape": LAYERS[name], "macs": macs}
        for label, relax_mod in (("fp32", mod), ("int8", qmod)):
            if label not in os.environ.get("PROBE_PRECISIONS", "fp32,int8"):
                continue
            prepared = prepare_for_tuning(relax_mod, target)
            ex, tune_s, db = _tune_and_build(
                prepared, target, trials, Path(tempfile.mkdtemp(prefix=f"{name}-{label}-"))
            )
            latency, vm = _tvm_latency(ex, {"x": x}, ["x"])
            got = vm["main"](tvm.runtime.tensor(x)).numpy()
            want = host_runner(relax_mod)({"x": x})[0]  # default lowering, unpacked
            # int8: the int32 GEMM is exact (tests/build/test_int8_pack.py); the float epilogue may differ
            # in the last bit where a tuned kernel contracts multiply + add into an FMA
            row[label] = {
                "trials": trials,
                "load_avg_1_5_15": os.getloadavg(),
                "latency_ms": latency,
                "gops": 2 * macs / latency / 1e6,
                "tuning_seconds": round(tune_s, 1),
                "max_abs_diff_vs_default_lowering": float(np.max(np.abs(got - want))),
                "isa": instruction_counts(assembly(ex)),
                "tuned_kernels_ms": kernel_ms(db, prepared, target),
                "profile_ms": _profile_ms(ex, x),
            }
            print(name, label, row[label], flush=True)
        out[name] = row
    out["load_avg_at_end"] = os.getloadavg()
    return out


def _profile_ms(ex, x) -> dict:
    """Per-kernel time (ms, best of 3 runs) of one layer build (bench/compile_bench's profiler)."""
    from bench.compile_bench import profile_kernels

    path = Path(tempfile.mkdtemp()) / "layer.so"
    ex.export_library(str(path))
    return {k: round(v / 1000, 3) for k, v in profile_kernels(path, {"x": x}, ["x"]).items() if not k.startswith("vm.")}


if __name__ == "__main__":
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(parents=True, exist_ok=True)
    if len(sys.argv) > 1 and sys.argv[1] == "layers":
        n = int(sys.argv[2]) if len(sys.argv) > 2 else 64
        chosen = sys.argv[3:] or list(LAYERS)
        path = results / "int8_layers.json"
        previous = json.loads(path.read_text()) if path.exists() else {}
        for key, value in layers(n, chosen).items():  # merge per layer: fp32 and int8 may come from two runs
            previous[key] = {**previous[key], **value} if isinstance(value, dict) and key in previous else value
            row = previous[key]
            if isinstance(row, dict) and "fp32" in row and "int8" in row:
                row["int8_speedup"] = row["fp32"]["latency_ms"] / row["int8"]["latency_ms"]
        path.write_text(json.dumps(previous, indent=2, default=float))
    else:
        result = main(int(sys.argv[1]) if len(sys.argv) > 1 else 32)
        (results / "int8_gemm_probe.json").write_text(json.dumps(result, indent=2))
