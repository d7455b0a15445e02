"""A default CPU schedule for kernels no tuning record covers.

TVM's build leaves an untuned CPU kernel as its plain lowering: one thread, scalar loops. With a
small budget most tasks get no trials (ResNet-18 at 160 trials: 9 of 19 tasks, two thirds of the
tuned build's latency), and those serial kernels dominate. DLight has such fallbacks for GPUs only.

This rule gives every unscheduled kernel the obvious schedule, with no measurement: inline what
can be inlined, run the fused spatial loops of each remaining block in parallel, vectorize the
innermost spatial loop of element-wise blocks, and, for reductions (convs, matmuls), move one
spatial loop inside the reduction and vectorize it. Every step is a semantics-preserving schedule
primitive; a step TVM refuses is skipped, so the worst case is the plain lowering.
"""

from __future__ import annotations

VECTOR_LANES = 8  # float32 lanes of AVX2; wider ISAs still gain from the parallel loop
VECTORIZE_REDUCTIONS = True  # move a spatial loop inside a reduction and vectorize it


def cpu_fallback_rule():
    """A DLight ScheduleRule for llvm targets (built lazily: DLight imports TVM)."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import ScheduleRule, try_inline

    class CPUFallback(ScheduleRule):
        def apply(self, func, target, _tunable):
            if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None:
                return None
            for info in try_inline(sch, infos):
                _schedule_block(sch, info)
            return sch

    return CPUFallback()


FAILED = object()


def _try(step, *args):
    """step(*args), or FAILED where TVM refuses the primitive here (the loop stays as it is)."""
    try:
        return step(*args)
    except Exception:  # noqa: BLE001 - any refusal means: leave this block alone
        return FAILED


def _lanes(sch, loop) -> int | None:
    """A vector width that divides the loop's extent (no tail predicate), or None."""
    extent = sch.get(loop).extent
    if not hasattr(extent, "value"):
        return None
    for lanes in (VECTOR_LANES, VECTOR_LANES // 2):
        if extent.value % lanes == 0:
            return lanes
    return None


def _schedule_block(sch, info) -> None:
    """Parallel outer spatial loops; a vectorized innermost spatial loop (inside the reduction
    loops for a reduction block, so each reduction step updates a whole vector of outputs)."""
    block = info.block_rv
    kinds = info.dom_kind()
    loops = sch.get_loops(block)
    if not loops or "O" in kinds or len(kinds) != len(loops):
        return
    spatial = [l for l, k in zip(loops, kinds) if k == "S"]
    reduce = [l for l, k in zip(loops, kinds) if k == "R"]
    if not spatial:
        return
    lanes = None if reduce and not VECTORIZE_REDUCTIONS else _lanes(sch, spatial[-1])
    outer, inner = spatial, None
    if lanes is not None:
        split = _try(sch.split, spatial[-1], [None, lanes])
        if split is not FAILED:
            outer, inner = [*spatial[:-1], split[0]], split[1]
    if _try(sch.reorder, *outer, *reduce, *([inner] if inner is not None else [])) is FAILED:
        return
    fused = _try(sch.fuse, *outer) if len(outer) > 1 else outer[0]
    if fused is FAILED:
        return
    sch.parallel(fused)
    if inner is None:
        return
    if reduce and _try(sch.decompose_reduction, block, reduce[0]) is FAILED:
        return
    _try(sch.vectorize, inner)


def apply_cpu_fallback(mod, target):
    """`mod` with every unscheduled llvm kernel given the default schedule above."""
    from tvm.s_tir import dlight as dl

    if target.kind.name != "llvm":
        return mod
    with target:
        return dl.ApplyDefaultSchedule(cpu_fallback_rule())(mod)
