"""Which x86 int8 dot-product instructions a build really uses, read from its assembly.

`vpdpbusd` (AVX-512 VNNI / AVX-VNNI: u8 x s8 -> s32, four pairs per lane, one instruction) is the
fast path; `vpmaddubsw` + `vpmaddwd` is AVX2's two-step equivalent (int16 pairwise sums, which
saturate unless activations or weights use 7 bits: QuantConfig.reduce_range); `vpmulld` means
widened 32-bit multiplies, i.e. no dot-product instruction at all (slower than fp32 FMAs).
Cross-target assembly works on any host: a `cascadelake` or `znver4` build can be inspected here
even though this CPU cannot run it.

Also registers the tensor intrinsics the int8 GEMMs of tasks.build.int8_pack are tensorized with:
`dot_8x4_avx2` (AVX2: 8 int32 lanes, u8 x s8 over 4-deep reductions, vpmaddubsw + vpmaddwd) and
`dot_16x4_vnni_tvmflow` (AVX-512 VNNI: 16 lanes, vpdpbusd), both with TVM's `dot_16x4_vnni`
description shape. The VNNI one is TVM's own, registered here under another name because
`import tvm.s_tir.tensor_intrin.x86` imports every backend's intrinsics (CUDA included): 93 s
per process on this host, in the tuner, the build and every correctness check.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

DOT_INSTRUCTIONS = ("vpdpbusd", "vpdpbusds", "vpmaddubsw", "vpmaddwd", "vpmulld")
AVX2_DOT_8x4_INTRIN = "dot_8x4_avx2"
VNNI_DOT_16x4_INTRIN = "dot_16x4_vnni_tvmflow"  # = TVM's dot_16x4_vnni (see the module docstring)
PACKED_GEMM_BLOCK = "int8_packed_gemm"  # tasks.build.int8_pack names its GEMM block so; tune.py looks for it
IM2COL_BLOCK = "im2col"  # and its activation gather so (apply_packed_gemm_default schedules it)


@dataclass(frozen=True)
class DotIntrin:
    """The int8 dot-product tensor intrinsic a target gets, and the weight packing it needs:
    u8[4] x s8[lanes, 4] -> s32[lanes], weights packed [O/lanes, K/4, lanes, 4]."""

    name: str
    lanes: int
    saturates: bool  # AVX2's vpmaddubsw adds u8*s8 pairs in int16 with saturation; vpdpbusd does not


AVX2_DOT = DotIntrin(AVX2_DOT_8x4_INTRIN, 8, saturates=True)
VNNI_DOT = DotIntrin(VNNI_DOT_16x4_INTRIN, 16, saturates=False)


def dot_intrin_for(target) -> DotIntrin | None:
    """The target's intrinsic, registered: AVX-512 VNNI (cascadelake, icelake, sapphirerapids,
    znver4) -> 16 lanes of vpdpbusd; other x86 with AVX2 (this znver3; alderlake's 256-bit AVX-VNNI
    too, for now) -> 8 lanes of vpmaddubsw + vpmaddwd; anything else (ARM, GPUs) -> None: int8
    layers keep their plain lowering there. Call it before applying tuned records (their traces
    name the intrinsic)."""
    import tvm
    from tvm.target import codegen

    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    if target.kind.name != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())
    if not triple.startswith(("x86_64", "i686", "i386")):
        return None
    for intrin, feature in ((VNNI_DOT, "avx512vnni"), (AVX2_DOT, "avx2")):
        if codegen.target_has_features(feature, target):
            register(intrin)
            return intrin
    return None


def assembly(executable) -> str:
    """The assembly of a Relax executable's compiled kernels."""
    module = executable.mod
    text = ""
    for sub in [module, *(getattr(module, "imports", None) or [])]:
        try:
            text += sub.inspect_source("asm")
        except Exception:  # noqa: BLE001 - modules without assembly (the VM bytecode)
            continue
    return text


def instruction_counts(asm: str) -> dict[str, int]:
    return {name: len(re.findall(rf"\b{name}\b", asm)) for name in DOT_INSTRUCTIONS}


# TensorIntrin.register raises "already been registered" on a second call: two threads building at
# once would both pass the get() check, so the check and the registration happen under one lock.
_REGISTER_LOCK = threading.Lock()


def register(intrin: DotIntrin) -> str:
    """Register one intrinsic once (u8[4] x s8[lanes, 4] -> s32[lanes], TVM's description); thread-safe."""
    with _REGISTER_LOCK:
        return _register_once(intrin)


def _register_once(intrin: DotIntrin) -> str:
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    if TensorIntrin.get(intrin.name, allow_missing=True) is not None:
        return intrin.name
    lanes = intrin.lanes

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def avx2(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((8, 4), "int8", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_u8x32 = T.reinterpret(T.broadcast(a_i32, 8), dtype="uint8x32")
            pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                a_u8x32,
                B.vload([0, 0], dtype="int8x32"),
                dtype="int16x16",
            )
            C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.int16x16(1), dtype="int32x8"
            )

    # LLVM 21 retyped vpdpbusd's operands from <16 x i32> to <64 x i8> (TVM's dot_16x4_vnni still
    # passes i32 vectors: "Intrinsic has incorrect argument type" with this LLVM 22)
    operand = "uint8x64" if _llvm_major() >= 21 else "int32x16"
    weights = "int8x64" if _llvm_major() >= 21 else "int32x16"

    @T.prim_func(s_tir=True)
    def vnni(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(a_i32, 16), dtype=operand),
                T.reinterpret(B.vload([0, 0], dtype="int8x64"), dtype=weights),
                dtype="int32x16",
            )

    TensorIntrin.register(intrin.name, desc, {AVX2_DOT.name: avx2, VNNI_DOT.name: vnni}[intrin.name])
    return intrin.name


def register_all() -> None:
    for intrin in (AVX2_DOT, VNNI_DOT):
        register(intrin)


def _llvm_major() -> int:
    from tvm.target import codegen

    return int(codegen.llvm_version_major())


def register_avx2_intrin() -> str:
    """Register dot_8x4_avx2 (kept for bench/int8_gemm_probe.py and the quantize tests)."""
    return register(AVX2_DOT)


def has_packed_gemm(mod) -> bool:
    """Whether a task's kernel contains tasks.build.int8_pack's GEMM block (fusion keeps block names)."""
    import tvm
    from tvm import s_tir

    for _gvar, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            try:
                s_tir.Schedule(tvm.IRModule({"main": func})).get_sblock(PACKED_GEMM_BLOCK)
                return True
            except s_tir.ScheduleError:
                continue
    return False


def space_for(mod, target):
    """The MetaSchedule space for one task: the tensorize space with the target's intrinsic for a
    packed int8 GEMM, the default space ("post-order-apply") for everything else."""
    intrin = dot_intrin_for(target) if has_packed_gemm(mod) else None
    return tensorize_space(intrin.name) if intrin else "post-order-apply"


def apply_packed_gemm_default(mod, target):
    """`mod` with the int8_pack kernels that no tuning record scheduled given fixed schedules, no
    measurement; run before tasks.build.cpu_fallback, whose generic schedule cannot use the intrinsic
    and gathers badly. At small budgets most of them get no trials (ResNet-18 at 64: 4 tasks).
    - packed GEMM: rows of 4 x 2 lane blocks, parallel rows, the target's intrinsic. 3x3 64->64
      conv at 56x56 (3136x576x64): 2.6 ms, against 1.3-1.7 ms tuned (32 trials). Other blocks
      of such a kernel (a fused epilogue) stay as they are.
    - im2col (a byte gather, no FLOPs, so never allotted trials): parallel (N, OH), unrolled taps.
      Same conv: 0.7 ms (machine loaded), against 4.1 ms with the generic fallback."""
    import tvm
    from tvm.s_tir import dlight as dl

    intrin = dot_intrin_for(target)
    if intrin is None:
        return mod

    class Int8Kernels(dl.base.ScheduleRule):
        def apply(self, func, _target, _tunable):
            if not isinstance(func, tvm.tirx.PrimFunc):
                return None
            try:
                if has_packed_gemm(tvm.IRModule({"main": func})):
                    return _fixed_schedule(func, intrin)
                return _im2col_schedule(func)
            except Exception:  # noqa: BLE001 - a kernel the fixed schedules do not fit: the fallback's turn
                return None

    with tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target:
        return dl.ApplyDefaultSchedule(Int8Kernels())(mod)


def _im2col_schedule(func):
    """int8_pack's 6-D im2col alone in its kernel (it is opaque to fusion), else None."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    block = sch.get_sblock(IM2COL_BLOCK)  # raises where there is none
    loops = sch.get_loops(block)
    if len(loops) != 6 or len(sch.get_child_blocks(sch.get_sblock("root"))) != 1:
        return None
    n, oh, _ow, _c, kh, kw = loops
    sch.parallel(sch.fuse(n, oh))
    sch.unroll(kh)
    sch.unroll(kw)
    return sch


def _fixed_schedule(func, intrin: DotIntrin):
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    block = sch.get_sblock(PACKED_GEMM_BLOCK)
    i, j, k = sch.get_loops(block)
    j_blocks, j_lanes = sch.split(j, [None, intrin.lanes])
    k_outer, k_inner = sch.split(k, [None, 4])
    rows = next(r for r in (4, 2, 1) if int(sch.get(i).extent) % r == 0)
    cols = next(c for c in (2, 1) if int(sch.get(j_blocks).extent) % c == 0)
    i_outer, i_inner = sch.split(i, [None, rows])
    j_outer, j_inner = sch.split(j_blocks, [None, cols])
    sch.reorder(i_outer, j_outer, k_outer, i_inner, j_inner, j_lanes, k_inner)
    sch.parallel(i_outer)
    init = sch.decompose_reduction(block, k_outer)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(j_lanes, intrin.name)
    return sch


def tensorize_space(intrin: str | None = None):
    """A MetaSchedule space whose multi-level tiling tensorizes int8 reductions with `intrin`
    (default dot_8x4_avx2), then RewriteTensorize swaps in the instruction sequence. Works on
    workloads whose weights are packed [O/8, I/4, 8, 4] (see bench/int8_gemm_probe.py).
    AutoInline (as in the default CPU rules) folds a fused epilogue (layout change, rescale, bias,
    activation, next layer's quantize) into one loop nest instead of one buffer per elementwise op."""
    from tvm.s_tir import meta_schedule as ms

    intrin = intrin or register_avx2_intrin()
    rules = [
        ms.schedule_rule.AutoInline(
            into_producer=False,
            into_consumer=True,
            inline_const_tensor=True,
            disallow_if_then_else=True,
            require_injective=True,
            require_ordered=True,
        ),
        ms.schedule_rule.MultiLevelTilingWithIntrin(
            intrin,
            structure="SSRSRS",
            tile_binds=None,
            max_innermost_factor=64,
            vector_load_lens=None,
            reuse_read=None,
            reuse_write=ms.schedule_rule.ReuseType(req="may", levels=[1, 2], scope="global"),
        ),
        ms.schedule_rule.ParallelizeVectorizeUnroll(
            max_jobs_per_core=16, max_vectorize_extent=-1, unroll_max_steps=[0, 16, 64, 512], unroll_explicit=True
        ),
    ]
    postprocs = [
        ms.postproc.DisallowDynamicLoop(),
        ms.postproc.RewriteParallelVectorizeUnroll(),
        ms.postproc.RewriteReductionBlock(),
        ms.postproc.RewriteTensorize(vectorize_init_loop=True),
    ]
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=postprocs, mutator_probs={})
