"""Per-operator pick-best on this host's x86 CPU: oneDNN against TVM's tuned or default kernel.

Why: at 0 trials TVM's default conv schedules run 5-80x slower than oneDNN's JIT kernels
(bench/results/cpu_details.json), while a tuned TIR kernel can win a layer back. So the build
times every conv / dense both ways on the device (this host, the only CPU whose kernels we can
time during a build), keeps the faster per operator and records the race (OperatorChoice, shown
in report.md). Only for fp32 modules (oneDNN kernels here are float) on a device that is this
host; every other device builds as before.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from tasks.build import cpu_vendor
from tasks.build.candidates import OperatorChoice
from tasks.build.compile import compile_module
from tasks.devices.profiles import DeviceProfile

VENDOR = "dnnl"


def preferred_layout(device: DeviceProfile) -> str:
    """NHWC on this host's x86 CPU: measured faster at default schedules (ResNet-18: 2-core VM
    3450 -> 1190 ms, 16-core Xeon 348 -> 144 ms) and what oneDNN's kernels take without a
    reorder; NCHW elsewhere (not measured there)."""
    return "NHWC" if device.runs_on_host() and platform.machine() in ("x86_64", "AMD64") else "NCHW"


def library_here(device: DeviceProfile) -> bool:
    """oneDNN is a candidate: the device is this host's x86 CPU and the kernels load and compute right."""
    return preferred_layout(device) == "NHWC" and cpu_vendor.available(VENDOR)


def sample_inputs(specs) -> list[np.ndarray]:
    """Seeded inputs of the model's shapes (kernel times do not depend on the values)."""
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal(spec.shape).astype(spec.dtype)
        if "float" in spec.dtype
        else np.zeros(spec.shape, spec.dtype)
        for spec in specs
    ]


def tuned_kernels(prepared_mod, device: DeviceProfile, db_dir) -> set[str]:
    """Names of the module's kernels that have a record in the database."""
    if not db_dir:
        return set()
    import tvm

    from tasks.tuning.extract import extract_tasks
    from tasks.tuning.pick_best import has_db, open_db

    if not has_db(db_dir):
        return set()
    db = open_db(db_dir)
    target = device.tvm_target()
    return {t.name for t in extract_tasks(prepared_mod, target) if db.has_workload(tvm.ir.load_json(t.mod_json))}


def compile_cpu(
    prepared_mod, graph, specs, device: DeviceProfile, db_dir: str | Path | None, log=print
) -> tuple[object, list[OperatorChoice], bool]:
    """(executable, per-operator choices, uses the library?). `graph` is the model before
    lowering (BN folded, NHWC: tasks.pipeline.import_prepared keeps it); `prepared_mod` is it
    lowered for tuning, what the database was tuned on."""
    from tasks.tuning.extract import prepare_for_tuning

    target = device.tvm_target()
    cpu_vendor.load_library(VENDOR)  # the race runs both builds in this process (an import cache hit loaded nothing)
    tir = compile_module(prepared_mod, device, db_dir)
    offloaded = cpu_vendor.offload(graph, target, backend=VENDOR)
    if not offloaded.ops:
        return tir, [], False
    library = compile_module(prepare_for_tuning(offloaded.mod, target), device, db_dir)
    inputs = sample_inputs(specs)
    tir_calls = cpu_vendor.profile_calls(tir, inputs)
    library_calls = cpu_vendor.profile_calls(library, inputs)
    tuned = tuned_kernels(prepared_mod, device, db_dir)
    # with tuned kernels the default schedule is a third candidate: timed in a build without the database
    default_calls = cpu_vendor.profile_calls(compile_module(prepared_mod, device, None), inputs) if tuned else None
    choices = cpu_vendor.vendor_choices(
        tir_calls, library_calls, VENDOR, offloaded.candidates, tuned or None, default_calls
    )
    winners = cpu_vendor.winners_of(choices, VENDOR)
    log(f"pick-best: {len(winners)}/{len(choices)} conv/dense layers on oneDNN, the rest TVM kernels")
    if not winners:
        return tir, choices, False
    if winners == {op.op_id for op in offloaded.ops}:
        return library, choices, True
    chosen = prepare_for_tuning(cpu_vendor.offload(graph, target, only=winners, backend=VENDOR).mod, target)
    return compile_module(chosen, device, db_dir), choices, True
