"""Markdown table of a bench/gpu_bench.py result (for bench/README_gpu.md and README.md).

python bench/gpu_table.py bench/results/gpu_measure_*.json
"""

from __future__ import annotations

import json
import sys

COLUMNS = [
    ("tvm_fp32", "TVM fp32"),
    ("tvm_fp16_untuned", "TVM fp16 untuned"),
    ("tvm_fp16_tuned", "TVM fp16 tuned"),
    ("tvm_fp16_tuned_graph", "TVM fp16 tuned + CUDA graph"),
    ("torch_eager_fp16", "torch eager fp16"),
    ("torch_compile_fp16", "torch.compile fp16"),
]


def _ms(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def table(result: dict) -> str:
    rows = result.get("rows", [])
    cols = [(k, t) for k, t in COLUMNS if any(r.get(k) is not None for r in rows)]
    acc = {(a["model"], a["batch"]): a for a in result.get("accuracy", [])}
    lines = [
        f"Device: {result['device']} ({result['arch']}), TVM {result['tvm']}, torch {result['torch']}, "
        f"{result['date']}. Median ms per inference, same input (real photos).",
        "",
        "| model | batch | " + " | ".join(t for _, t in cols) + " | fp16 vs fp32: max rel err / top-1 |",
        "|---|---:|" + "---:|" * len(cols) + "---|",
    ]
    for r in rows:
        a = acc.get((r["model"], r["batch"]), {})
        key = "tvm_fp16_tuned_vs_tvm_fp32" if "tvm_fp16_tuned_vs_tvm_fp32" in a else "tvm_fp16_untuned_vs_tvm_fp32"
        err = a.get(key)
        err_text = f"{err['max_rel_err']:.1e} / {err['top1_agreement']:.2f}" if err else "–"
        lines.append(
            f"| {r['model']} | {r['batch']} | " + " | ".join(_ms(r.get(k)) for k, _ in cols) + f" | {err_text} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(table(json.load(open(path))))
