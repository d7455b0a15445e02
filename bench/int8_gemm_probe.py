"""Probe: MetaSchedule tuning an int8 GEMM (a 3x3x64->256 conv as im2col, 14x14 output) with our
dot_8x4_avx2 tensorize rule (tasks.int8_isa.tensorize_space), against fp32 with MetaSchedule's
default rules, same trials. Prints instruction counts, exactness and latency (this host)."""
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

    from tasks.int8_isa import instruction_counts, tensorize_space
    from tasks.tune import lean_build

    m, n, k = 196, 256, 576
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2})
    r = te.reduce_axis((0, k), "k")
    a8 = te.placeholder((m, k), "uint8", name="A")
    b8 = te.placeholder((n // 8, k // 4, 8, 4), "int8", name="B")
    c8 = te.compute((m, n), lambda i, j: te.sum(
        a8[i, r].astype("int32") * b8[j // 8, r // 4, j % 8, r % 4].astype("int32"), axis=r), name="C")
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
            ("fp32_default_rules", [af, bf, cf], "post-order-apply",
             [x.astype("float32"), w.astype("float32"), np.zeros((m, n), "float32")])):
        func = te.create_prim_func(tensors).with_attr("global_symbol", "main")
        start = time.time()
        db = ms.tune_tir(func, target, tempfile.mkdtemp(), max_trials_global=trials, num_trials_per_iter=16,
                         space=space, builder=ms.builder.LocalBuilder(max_workers=1, timeout_sec=120, f_build=lean_build),
                         runner=ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(number=5, repeat=1)))
        sch = ms.tir_integration.compile_tir(db, func, target)
        lib = tvm.compile(sch.mod, target=target)
        tensors_rt = [tvm.runtime.tensor(v) for v in args]
        lib(*tensors_rt)
        result = tensors_rt[-1].numpy()
        exact = bool(np.array_equal(result.astype("int64"), x.astype("int64") @ w.astype("int64").T))
        timer = lib.mod.time_evaluator(lib.mod.entry_name, tvm.cpu(), number=20, repeat=7)
        ms_ = float(np.median(timer(*tensors_rt).results) * 1000)
        out[label] = {"latency_ms": ms_, "gops": 2 * m * n * k / ms_ / 1e6, "exact": exact,
                      "tuning_seconds": round(time.time() - start, 1),
                      "isa": instruction_counts(lib.mod.inspect_source("asm"))}
        print(label, out[label], flush=True)
    return out


if __name__ == "__main__":
    result = main(int(sys.argv[1]) if len(sys.argv) > 1 else 32)
    path = Path(__file__).resolve().parent / "results" / "int8_gemm_probe.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
