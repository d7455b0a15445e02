"""Extract MetaSchedule tuning tasks and spread the trial budget over them by weighted FLOPs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TuningTask:
    """One tunable workload; `mod_json` ships it between processes (tvm.ir.save_json)."""

    name: str
    weight: int
    flops: float
    mod_json: str
    trials: int = 0

    @property
    def weighted_flops(self) -> float:
        return self.weight * self.flops


def fuse_passes(target) -> list:
    """The fusion compile_relax runs before it applies a tuning database."""
    from tvm import relax
    from tvm.relax import pipeline as rp

    try:
        dispatch = rp.library_dispatch_passes(target)
    except (ValueError, AttributeError):
        dispatch = []
    return [
        *dispatch,
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


LAYOUTS = ("NCHW", "NHWC")


def fold_batchnorm(mod):
    """BatchNorm folded into the preceding conv's weights and bias, constants folded.

    Without it every conv task is conv2d_subtract_divide_multiply_add (a divide per output
    element) and ResNet-18 has 24 tasks instead of 19; onnxruntime folds BN the same way.
    A no-op for modules without conv2d + batch_norm (QDQ imports come folded already). Only a
    conv2d feeding batch_norm directly folds (TVM's pattern): a conv with its own bias (conv2d,
    add, batch_norm) keeps its BN, which stays correct, only slower."""
    from tvm import relax

    mod = relax.transform.FoldBatchnormToConv2D()(mod)
    return relax.transform.FoldConstant()(mod)


def convert_layout(mod, layout: str):
    """Convolutions (and the element-wise ops around them) in `layout`; weights transposed once
    at compile time (FoldConstant). NHWC is what oneDNN's and MetaSchedule's CPU kernels like
    best on AVX-512; which layout is faster is measured per device (bench/cpu_vs_ort.py)."""
    from tvm import relax

    from tasks.errors import TvmflowError

    if layout not in LAYOUTS:
        raise TvmflowError(f"layout {layout!r} is not supported: use one of {', '.join(LAYOUTS)}")
    if layout == "NCHW":
        return mod
    from tasks.tuning.graph_rewrites import after_layout_conversion, before_layout_conversion

    mod = before_layout_conversion(mod)
    mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})(mod)
    return after_layout_conversion(relax.transform.FoldConstant()(mod))


def prepare_for_tuning(
    mod,
    target,
    max_rounds: int = 6,
    fold_bn: bool = True,
    layout: str = "NCHW",
    vendor: str | None = None,
    vendor_only: set | None = None,
):
    """Lower and fuse Relax until fusion changes nothing more, then extract from that.

    Graph preparation first (each step keeps outputs equal to the source framework, see
    tests/tuning/test_extract.py): BatchNorm folded into convs (`fold_bn`), the conv layout
    (`layout`, "NCHW" or "NHWC"), and with `vendor="dnnl"` float conv2d / dense layers become
    extern calls to oneDNN (tasks.build.cpu_vendor; `vendor_only`: just those operator ids, the
    per-operator pick-best's winners; `vendor="cblas"`: OpenBLAS), so they are neither tuned nor
    lowered to TIR.

    compile_relax fuses the module it is given once more before applying the database. After a
    single fusion round that second round still changes kernels (same names, other bodies), so
    every tuned record would match nothing and be silently ignored (measured: tuned == untuned).
    At the fixpoint the tuned workloads are exactly the build's kernels.

    Every module passes here before tuning, so this is where 8-bit conv2d / matmul layers (from
    tasks.precision.quantize or a QDQ import) become GEMMs packed for the target's int8 dot-product
    instruction (tasks.build.int8_pack; a no-op for float modules and targets without one).
    """
    import tvm
    from tvm import relax
    from tvm_ffi.structural import structural_equal

    from tasks.build.int8_pack import pack_int8_layers

    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    if fold_bn:
        mod = fold_batchnorm(mod)
    mod = convert_layout(mod, layout)
    if vendor:
        from tasks.build.cpu_vendor import offload

        mod = offload(mod, target, only=vendor_only, backend=vendor).mod
    mod = pack_int8_layers(mod, target)
    mod = relax.transform.DecomposeOpsForInference()(mod)
    with target:
        mod = relax.get_pipeline("zero")(mod)
        for _ in range(max_rounds):
            fused = tvm.transform.Sequential(fuse_passes(target))(mod)
            if structural_equal(fused, mod):
                break
            mod = fused
    return mod


def extract_tasks(mod, target) -> list[TuningTask]:
    """Tasks of a prepared module, heaviest first."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    tasks = []
    for task in ms.relax_integration.extract_tasks(mod, target):
        func_mod = task.dispatched[0]
        try:
            flops = float(estimate_tir_flops(func_mod))
        except Exception:  # noqa: BLE001 - some kernels have no FLOP model
            flops = 0.0
        tasks.append(TuningTask(task.task_name, int(task.weight), flops, tvm.ir.save_json(func_mod)))
    return sorted(tasks, key=lambda t: -t.weighted_flops)


def allocate_trials(
    tasks: list[TuningTask], total: int, per_iter: int = 16, min_share: float = 0.0001
) -> list[TuningTask]:
    """Give each task trials in proportion to its weighted FLOPs, in whole measurement rounds.

    Tasks under `min_share` of the total FLOPs (reshapes, tiny adds) get none: a round of
    measurements costs seconds, and they run in microseconds either way. The cut is low on
    purpose: a task without trials keeps TVM's default lowering (one thread, no tiling), far
    slower per FLOP than a tuned kernel. At the old 0.5 % cut ResNet-18's three 1x1 stride-2
    downsample convs (0.36 % of FLOPs each) never got a trial at any budget and took ~50 ms
    each at default lowering (bench/README.md), more than onnxruntime's whole model. When the
    budget is short, the heaviest tasks still get their round first. Leftover budget goes to
    the heaviest tasks first.
    """
    total_flops = sum(t.weighted_flops for t in tasks)
    for task in tasks:
        task.trials = 0
    if total <= 0 or total_flops <= 0:
        return tasks
    eligible = [t for t in tasks if t.weighted_flops / total_flops >= min_share]
    if total < per_iter:  # less than one round: all of it to the heaviest task, never more
        if eligible:
            eligible[0].trials = total
        return tasks
    rounds = total // per_iter
    eligible = eligible[:rounds]  # never fewer than one round per tuned task
    eligible_flops = sum(t.weighted_flops for t in eligible)
    for task in eligible:
        task.trials = per_iter * max(1, int(rounds * task.weighted_flops / eligible_flops))
    spent = sum(t.trials for t in eligible)
    i = 0
    while spent + per_iter <= total and eligible:
        eligible[i % len(eligible)].trials += per_iter
        spent += per_iter
        i += 1
    while spent > total:  # rounding pushed us over: take from the largest
        largest = max(eligible, key=lambda t: t.trials)
        largest.trials -= per_iter
        spent -= per_iter
    return tasks
