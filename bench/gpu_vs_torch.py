"""GPU benchmark (issue 13): tvmflow's GPU build (NHWC, per-operator pick-best between cuDNN /
cuBLAS and TVM's kernels, CUDA graphs) against TVM's stock DLight build, torch eager and
torch.compile (default, reduce-overhead, max-autotune when asked) on ResNet-18, ResNet-50,
MobileNetV2 and EfficientNet-Lite0, batch 1 and 16, fp16 (and fp32).

Phases (one device call runs them in this order, see bench/gpu_vs_torch.sh):
    --phase torch-warm  compile every torch.compile mode once into the shared inductor cache
                        (one process per model, started in the background: the compiles
                        overlap TVM's CPU work; the timed compile later is a cache hit)
    --phase tvm         build the contrib library, pick best per operator on the GPU, build all
                        models on every core, time them, error against torch eager
    --phase torch       time torch eager and each torch.compile mode (its compile seconds too)
    --phase report      (here, no GPU) merge the phases' JSON into bench/results/gpu_vs_torch.json,
                        gpu_vs_torch_detail.json and the README table
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

T0 = time.monotonic()
MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_lite0")
TORCH_MODES = ("default", "reduce-overhead")


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=("torch-warm", "tvm", "torch", "report"), required=True)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batches", default="1,16")
    p.add_argument("--precisions", default="fp16,fp32")
    p.add_argument("--dlight-precisions", default="fp16", help="cells that also get the stock DLight build")
    p.add_argument("--max-autotune", action="store_true", help="also torch.compile mode max-autotune")
    p.add_argument("--no-warm", action="store_true", help="tvm: no torch.compile warm-ups to wait for")
    p.add_argument("--work", default="/root/gvt", help="scratch folder on the GPU machine")
    p.add_argument("--contrib", default="", help="a prebuilt contrib library to use if building fails")
    p.add_argument("--deadline", type=float, default=540, help="seconds after start: skip what would not fit")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--inputs", nargs="*", default=[], help="report: the phases' JSON files")
    return p.parse_args(argv)


def cells(args):
    """(model, batch, precision), most important first: fp16 before fp32, then batch, then model."""
    return [
        (m, b, p)
        for p in args.precisions.split(",")
        for b in map(int, args.batches.split(","))
        for m in args.models.split(",")
    ]


def input_batch(batch: int):
    import numpy as np

    return np.random.default_rng(batch).uniform(-2, 2, size=(batch, 3, 224, 224)).astype("float32")


def torch_model(name: str, precision: str):

    from gpu_models import model

    module, _ = model(name)
    module = module.cuda().eval()
    return module.half() if precision == "fp16" else module.float()


def torch_time(fn, x, repeat: int) -> float:
    import numpy as np
    import torch

    with torch.no_grad():
        for _ in range(5):
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


def setup_torch():
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True  # torch's best eager setting: cuDNN picks its algorithm per shape


def modes(args):
    return TORCH_MODES + (("max-autotune",) if args.max_autotune else ())


# ---------------------------------------------------------------- torch


def run_torch(args, warm_only: bool) -> dict:
    import torch

    setup_torch()
    rows = []
    out = Path(args.out)
    for name, batch, precision in cells(args):
        if time.monotonic() - T0 > args.deadline:
            log(f"deadline: skipping torch {name} b{batch} {precision}")
            continue
        module = torch_model(name, precision)
        x = torch.from_numpy(input_batch(batch)).cuda()
        x = x.half() if precision == "fp16" else x
        row = {"model": name, "batch": batch, "precision": precision}
        if not warm_only:
            row["eager_ms"] = torch_time(module, x, args.repeat)
        for mode in modes(args):
            torch._dynamo.reset()
            started = time.monotonic()
            try:
                compiled = torch.compile(module, mode=mode, dynamic=False)
                with torch.no_grad():
                    for _ in range(3):
                        compiled(x)
                torch.cuda.synchronize()
                row[f"compile_{mode}_s"] = round(time.monotonic() - started, 1)
                if not warm_only:
                    row[f"{mode}_ms"] = torch_time(compiled, x, args.repeat)
            except Exception as err:  # noqa: BLE001 - one failed mode must not sink the table
                row[f"{mode}_error"] = str(err).strip().splitlines()[-1][:300] if str(err).strip() else repr(err)
            log(
                f"torch {name} b{batch} {precision} {mode}: {row.get(f'{mode}_ms')} ms "
                f"(compile {row.get(f'compile_{mode}_s')} s)"
            )
        rows.append(row)
        if not warm_only:
            (out / "gvt_torch.json").write_text(json.dumps(_meta() | {"rows": rows}, indent=1))
    if warm_only:
        (Path(args.work) / f"warm_{args.models}.done").write_text("ok")
    return {"rows": rows}


def _meta() -> dict:
    import torch

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------- tvm


def relax_of(name: str, batch: int, precision: str):
    """The model in Relax at this batch: batch norm folded into the convs, then fp16 if asked."""
    import torch
    import tvm
    from gpu_models import model
    from tvm import relax

    from tasks.build import gpu
    from tasks.importers.model_import import relax_from_program

    module, _ = model(name)
    with torch.no_grad():
        program = torch.export.export(module.float().eval(), (torch.zeros(batch, 3, 224, 224),))
    mod = relax_from_program(program, "PyTorch")
    mod = tvm.transform.Sequential([relax.transform.FoldBatchnormToConv2D(), relax.transform.FoldConstant()])(mod)
    return gpu.to_mixed_fp16(mod) if precision == "fp16" else mod


def prepare_cell(cell, folder: str):
    """In a worker process: the cell's Relax module (NCHW) and its NHWC form, saved as JSON files;
    returns their paths, the conv/matmul specs and the seconds it took."""
    started = time.monotonic()
    import tvm
    import tvm.s_tir.tensor_intrin  # noqa: F401

    from tasks.build import cuda_vendor, gpu

    mod = relax_of(*cell)
    layout = gpu.prepare_layout(mod)
    Path(folder).mkdir(parents=True, exist_ok=True)
    paths = []
    for tag, m in (("nchw", mod), ("nhwc", layout)):
        path = Path(folder) / ("{}_b{}_{}_".format(*cell) + tag + ".json")
        path.write_text(tvm.ir.save_json(m))
        paths.append(str(path))
    return paths, cuda_vendor.collect_specs(layout), round(time.monotonic() - started, 1)


def errors(got, want) -> dict:
    import numpy as np

    got, want = np.asarray(got, dtype="float64"), np.asarray(want, dtype="float64")
    scale = max(float(np.abs(want).max()), 1e-6)
    return {
        "max_abs_err": float(np.abs(got - want).max()),
        "max_rel_err": float(np.abs(got - want).max() / scale),
        "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
    }


def wait_for_warm(args, limit: float) -> None:
    """The background torch.compile warm-ups must be done before anything is timed."""
    want = [Path(args.work) / f"warm_{m}.done" for m in args.models.split(",")]
    started = time.monotonic()
    while not all(w.exists() for w in want) and time.monotonic() - started < limit:
        time.sleep(2)
    log(f"torch warm-ups: {sum(w.exists() for w in want)}/{len(want)} done (waited {time.monotonic() - started:.0f} s)")


def run_tvm(args) -> dict:
    import numpy as np
    import torch
    import tvm
    import tvm.s_tir.tensor_intrin  # noqa: F401 - before torch.export fills sys.modules (12 s vs 100 s)
    from tvm import relax

    from tasks.build import cuda_vendor, gpu
    from tasks.build.candidates import choices_summary, choices_table

    out, work = Path(args.out), Path(args.work)
    arch = "sm_{}{}".format(*torch.cuda.get_device_capability())
    target = tvm.target.Target(gpu.cuda_target(arch))
    dev = tvm.cuda(0)
    result = _meta() | {"arch": arch, "tvm": tvm.__version__, "rows": [], "choices": {}}
    dump = lambda: (out / "gvt_tvm.json").write_text(json.dumps(result, indent=1))  # noqa: E731

    # 1. the vendor library, built here from the wheel's sources
    started = time.monotonic()
    vendors = []
    try:
        lib = cuda_vendor.build_contrib(work / "contrib", log=log)
        vendors = cuda_vendor.load_contrib(lib)
        result["contrib"] = {
            "built_here": True,
            "seconds": round(time.monotonic() - started, 1),
            "manifest": json.loads((work / "contrib" / cuda_vendor.MANIFEST_NAME).read_text()),
        }
        (out / cuda_vendor.LIBRARY_NAME).write_bytes(lib.read_bytes())
    except Exception as err:  # noqa: BLE001 - fall back to a carried build, else TVM kernels only
        result["contrib_error"] = str(err)[-2000:]
        log(f"contrib build failed: {str(err)[-600:]}")
        if args.contrib and Path(args.contrib).exists():
            vendors = cuda_vendor.load_contrib(args.contrib)
            result["contrib"] = {"built_here": False, "manifest": cuda_vendor.runtime_manifest([args.contrib])}
    log(f"vendors available: {vendors}")
    dump()

    # 2. every cell imported and put in NHWC, side by side (one process per cell); the NCHW
    #    module is kept for the stock DLight column
    prepared, specs, timings = {}, {}, {}
    started = time.monotonic()
    with ProcessPoolExecutor(max_workers=min(8, len(cells(args))), mp_context=mp.get_context("spawn")) as pool:
        futures = {cell: pool.submit(prepare_cell, cell, str(work / "prep")) for cell in cells(args)}
        for cell, future in futures.items():
            try:
                paths, found, seconds = future.result()
            except Exception as err:  # noqa: BLE001 - a model that does not import drops out of the table
                log(f"{cell}: prepare failed: {str(err).strip()[-400:]}")
                continue
            prepared[cell] = tuple(tvm.ir.load_json(Path(p).read_text()) for p in paths)
            specs[cell], timings[cell] = found, {"prepare_s": seconds}
            log(f"{cell}: prepared, {len(found)} conv/matmul operators ({seconds} s)")
    log(f"prepared {len(prepared)} cells in {time.monotonic() - started:.0f} s")

    # 3. pick best per operator, all cells' operators in one pass (one builder pool)
    union = {}
    for found in specs.values():
        union.update(found)
    started = time.monotonic()
    choices, _algos = gpu.measure_operators(union, target, dev, tuple(vendors), log=log)
    pick_s = time.monotonic() - started
    log(f"pick-best: {len(union)} operators in {pick_s:.0f} s")

    # 4. all models built side by side: tvmflow (vendor + CUDA graph) and stock DLight
    inputs, labels = [], []
    for cell in [c for c in cells(args) if c in prepared]:
        mine = {k: choices[k] for k in specs[cell] if k in choices}
        inputs.append(gpu.model_build_input(prepared[cell][1], "tvmflow", mine, cuda_graph=True))
        labels.append((cell, "tvmflow"))
        if cell[2] in args.dlight_precisions.split(","):
            inputs.append(gpu.model_build_input(prepared[cell][0], "dlight"))
            labels.append((cell, "dlight"))
    started = time.monotonic()
    built = gpu.build_models(inputs, target, timeout=max(60, int(args.deadline - (time.monotonic() - T0) - 90)))
    log(f"built {len(inputs)} models in {time.monotonic() - started:.0f} s")
    if not args.no_warm:
        wait_for_warm(args, limit=max(0.0, args.deadline - (time.monotonic() - T0) - 120))

    # 5. time them; error against torch eager on the same input
    setup_torch()
    share = {cell: len(specs[cell]) / max(sum(len(s) for s in specs.values()), 1) for cell in specs}
    for cell in [c for c in cells(args) if c in prepared]:
        name, batch, precision = cell
        x = input_batch(batch)
        row = {"model": name, "batch": batch, "precision": precision}
        module = torch_model(name, precision)
        with torch.no_grad():
            xt = torch.from_numpy(x).cuda()
            ref = module(xt.half() if precision == "fp16" else xt).float().cpu().numpy()
        del module
        for (c, kind), (path, error, seconds) in zip(labels, built):
            if c != cell:
                continue
            row[f"{kind}_build_s"] = seconds
            if path is None:
                row[f"{kind}_error"] = error
                continue
            try:
                vm = relax.VirtualMachine(tvm.runtime.load_module(path), dev)
                vm.set_input("main", tvm.runtime.tensor(x, dev))
                vm.invoke_stateful("main")  # first run: warm-up, then the CUDA graph is captured
                vm.invoke_stateful("main")
                got = vm.get_outputs("main")
                got = (got if hasattr(got, "numpy") else got[0]).numpy()
                timer = vm.time_evaluator("invoke_stateful", dev, number=20, repeat=args.repeat)
                row[f"{kind}_ms"] = float(np.median(timer("main").results) * 1000)
                row[f"{kind}_vs_torch_eager"] = errors(got, ref)
            except Exception as err:  # noqa: BLE001
                row[f"{kind}_error"] = str(err).strip().splitlines()[-1][:300] if str(err).strip() else repr(err)
            log(
                f"{name} b{batch} {precision} {kind}: {row.get(f'{kind}_ms')} ms "
                f"{row.get(f'{kind}_vs_torch_eager', row.get(f'{kind}_error'))}"
            )
        row["compile_s"] = round(timings[cell]["prepare_s"] + pick_s * share[cell] + row.get("tvmflow_build_s", 0), 1)
        mine = [choices[k] for k in specs[cell] if k in choices]
        result["choices"][f"{name}_b{batch}_{precision}"] = {
            "summary": choices_summary(mine),
            "operators": [c.to_json() for c in mine],
            "table": choices_table(mine),
        }
        result["rows"].append(row)
        dump()
    result["pick_s"] = round(pick_s, 1)
    dump()
    return result


# ---------------------------------------------------------------- report (no GPU)


def report(args) -> None:
    """Merge gvt_tvm.json and gvt_torch.json into the result files and print the README table."""
    tvm_part, torch_part = {}, {}
    for path in args.inputs:
        data = json.loads(Path(path).read_text())
        (tvm_part if "choices" in data else torch_part).update(data)
    by_cell = {(r["model"], r["batch"], r["precision"]): dict(r) for r in tvm_part.get("rows", [])}
    for r in torch_part.get("rows", []):
        by_cell.setdefault((r["model"], r["batch"], r["precision"]), {}).update(
            {("torch_" + k if k not in ("model", "batch", "precision") else k): v for k, v in r.items()}
        )
    gpu_name = tvm_part.get("gpu") or torch_part.get("gpu")
    rows, detail = [], []
    for (model, batch, precision), r in sorted(
        by_cell.items(), key=lambda kv: (kv[0][2], kv[0][1], MODELS.index(kv[0][0]))
    ):
        compiled = {m: r.get(f"torch_{m}_ms") for m in ("default", "reduce-overhead", "max-autotune")}
        compiled = {m: v for m, v in compiled.items() if v is not None}
        best_mode = min(compiled, key=compiled.get) if compiled else None
        rows.append(
            {
                "model": model,
                "batch": batch,
                "precision": precision,
                "tvmflow_ms": _round(r.get("tvmflow_ms")),
                "best_torch_ms": _round(compiled.get(best_mode)),
                "best_torch_mode": best_mode,
                "compile_s": r.get("compile_s"),
                "gpu": gpu_name,
            }
        )
        detail.append(
            {
                "model": model,
                "batch": batch,
                "precision": precision,
                **r,
                "ratio": (r["tvmflow_ms"] / compiled[best_mode]) if r.get("tvmflow_ms") and best_mode else None,
            }
        )
    results = ROOT / "bench" / "results"
    (results / "gpu_vs_torch.json").write_text(json.dumps(rows, indent=1) + "\n")
    (results / "gpu_vs_torch_detail.json").write_text(
        json.dumps(
            {
                "meta": {k: v for k, v in tvm_part.items() if k not in ("rows", "choices")}
                | {"torch": torch_part.get("torch")},
                "rows": detail,
                "choices": tvm_part.get("choices", {}),
            },
            indent=1,
        )
        + "\n"
    )
    print(table(detail))


def _round(value, digits: int = 4):
    return None if value is None else round(float(value), digits)


def table(detail: list) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "| model | batch | prec | tvmflow | TVM DLight | torch eager | compile default | reduce-overhead | "
        "max-autotune | tvmflow / best compile | max rel err vs eager | compile s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in detail:
        err = (r.get("tvmflow_vs_torch_eager") or {}).get("max_rel_err")
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['precision']} | {fmt(r.get('tvmflow_ms'))} | "
            f"{fmt(r.get('dlight_ms'))} | {fmt(r.get('torch_eager_ms'))} | {fmt(r.get('torch_default_ms'))} | "
            f"{fmt(r.get('torch_reduce-overhead_ms'))} | {fmt(r.get('torch_max-autotune_ms'))} | "
            f"{'–' if r.get('ratio') is None else format(r['ratio'], '.2f') + 'x'} | "
            f"{'–' if err is None else f'{err:.1e}'} | {r.get('compile_s', '–')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.phase == "report":
        report(args)
    elif args.phase == "tvm":
        run_tvm(args)
    else:
        run_torch(args, warm_only=args.phase == "torch-warm")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
