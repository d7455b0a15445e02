"""Which x86 int8 dot-product instructions a build really uses, read from its assembly.

`vpdpbusd` (AVX-512 VNNI / AVX-VNNI: u8 x s8 -> s32, four pairs per lane, one instruction) is the
fast path; `vpmaddubsw` + `vpmaddwd` is AVX2's two-step equivalent (int16 pairwise sums, which
saturate unless activations or weights use 7 bits: QuantConfig.reduce_range); `vpmulld` means
widened 32-bit multiplies, i.e. no dot-product instruction at all (slower than fp32 FMAs).
Cross-target assembly works on any host: a `cascadelake` or `znver4` build can be inspected here
even though this CPU cannot run it.

Also registers `dot_8x4_avx2`, a tensor intrinsic for AVX2 (8 int32 lanes, u8 x s8 over 4-deep
reductions) shaped like TVM's own `dot_16x4_vnni` (16 lanes, AVX-512), so schedules written for
one can use the other.
"""
from __future__ import annotations

import re

DOT_INSTRUCTIONS = ("vpdpbusd", "vpdpbusds", "vpmaddubsw", "vpmaddwd", "vpmulld")
AVX2_DOT_8x4_INTRIN = "dot_8x4_avx2"


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


def register_avx2_intrin() -> str:
    """Register dot_8x4_avx2 once (u8[4] x s8[8, 4] -> s32[8], via vpmaddubsw + vpmaddwd)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    try:
        TensorIntrin.get(AVX2_DOT_8x4_INTRIN)
        return AVX2_DOT_8x4_INTRIN
    except Exception:  # noqa: BLE001 - not registered yet
        pass

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((8, 4), "int8", offset_factor=1),
             C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            for i in T.serial(0, 8):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((8, 4), "int8", offset_factor=1),
             C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_u8x32 = T.reinterpret(T.broadcast(a_i32, 8), dtype="uint8x32")
            pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), a_u8x32, B.vload([0, 0], dtype="int8x32"),
                dtype="int16x16")
            C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.int16x16(1), dtype="int32x8")

    TensorIntrin.register(AVX2_DOT_8x4_INTRIN, desc, impl)
    return AVX2_DOT_8x4_INTRIN


def tensorize_space(intrin: str | None = None):
    """A MetaSchedule space whose multi-level tiling tensorizes int8 reductions with `intrin`
    (default dot_8x4_avx2), then RewriteTensorize swaps in the instruction sequence. Works on
    workloads whose weights are packed [O/8, I/4, 8, 4] (see bench/int8_gemm_probe.py)."""
    from tvm.s_tir import meta_schedule as ms

    intrin = intrin or register_avx2_intrin()
    rules = [
        ms.schedule_rule.MultiLevelTilingWithIntrin(
            intrin, structure="SSRSRS", tile_binds=None, max_innermost_factor=64, vector_load_lens=None,
            reuse_read=None, reuse_write=ms.schedule_rule.ReuseType(req="may", levels=[1, 2], scope="global")),
        ms.schedule_rule.ParallelizeVectorizeUnroll(max_jobs_per_core=16, max_vectorize_extent=64,
                                                    unroll_max_steps=[0, 16, 64, 512], unroll_explicit=True),
    ]
    postprocs = [ms.postproc.DisallowDynamicLoop(), ms.postproc.RewriteParallelVectorizeUnroll(),
                 ms.postproc.RewriteReductionBlock(), ms.postproc.RewriteTensorize(vectorize_init_loop=True)]
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=postprocs, mutator_probs={})
