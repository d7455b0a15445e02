"""Mixed precision (fp16, bf16) for Relax models, and which precisions run well on a device.

fp16 uses TVM's ToMixedPrecision (fp16 operands, fp32 accumulation via out_dtype). TVM has no
bf16 pass, so `to_bf16` is ours: conv2d / matmul operands are cast to bfloat16 (weights cast
once, at build time, by constant folding) and the op accumulates in fp32 (out_dtype=float32);
everything else stays fp32. Both take allow/deny lists of op kinds (conv2d, matmul) or layer
names (conv2d_3, matmul_0; see tasks.precision.layers).

ToMixedPrecision decides per op from its own policy table and takes no lists: with an allow or
deny list, to_fp16 uses the same operand-cast rewrite as bf16, with float16.
"""

from __future__ import annotations

from tasks.errors import TvmflowError
from tasks.precision.layers import fold, rewrite_layers

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DTYPE = {"fp16": "float16", "bf16": "bfloat16"}
DEFAULT_ALLOW = ("conv2d", "matmul")

# Why a precision is slow on CPUs without the matching instructions (shown as a CLI warning).
SLOW_WHY = {
    "fp16": "x86 CPUs without AVX512-FP16 (and ARMv8.0 cores) convert every fp16 operand to fp32",
    "bf16": "CPUs without AVX512-BF16/AMX (or ARMv8.6 BF16) emulate bf16 with shifts and conversions",
    "int8": "without VNNI / dot-product instructions int8 gains come only from halved memory traffic",
}


def parse_ops(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _selected(layer, allow, deny) -> bool:
    allow = DEFAULT_ALLOW if allow is None else allow
    deny = deny or ()
    return (layer.kind in allow or layer.name in allow) and layer.kind not in deny and layer.name not in deny


def cast_operands(mod, dtype: str, allow=None, deny=None):
    """(module, [layer names converted]): conv2d/matmul with `dtype` operands, fp32 accumulation."""
    from tvm import relax

    converted: list[str] = []

    def handler(bb, layer, call):
        if not _selected(layer, allow, deny) or call.ty.dtype != "float32":
            return None
        data, weight = (relax.op.astype(a, dtype) for a in call.args[:2])
        converted.append(layer.name)
        if layer.kind == "conv2d":
            a = call.attrs
            return relax.op.nn.conv2d(
                data,
                weight,
                strides=[int(v) for v in a.strides],
                padding=[int(v) for v in a.padding],
                dilation=[int(v) for v in a.dilation],
                groups=int(a.groups),
                data_layout=str(a.data_layout),
                kernel_layout=str(a.kernel_layout),
                out_layout=str(a.out_layout or a.data_layout),
                out_dtype="float32",
            )
        return relax.op.matmul(data, weight, out_dtype="float32")

    new, _ = rewrite_layers(fold(mod), handler)
    return relax.transform.FoldConstant()(new), converted


def to_fp16(mod, allow=None, deny=None):
    """fp16 operands, fp32 accumulation and output."""
    from tvm import relax

    if allow is None and deny is None:
        return relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
    return cast_operands(mod, "float16", allow, deny)[0]


def to_bf16(mod, allow=None, deny=None):
    """bf16 operands, fp32 accumulation and output (our pass; TVM 0.27 has none)."""
    return cast_operands(mod, "bfloat16", allow, deny)[0]


def convert(mod, precision: str, allow=None, deny=None):
    if precision == "fp16":
        return to_fp16(mod, allow, deny)
    if precision == "bf16":
        return to_bf16(mod, allow, deny)
    raise TvmflowError(f"precision {precision!r} is not a mixed precision; use fp16 or bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise TvmflowError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision


def host_precisions(cpuinfo: str | None = None) -> tuple:
    """Precisions at least as fast as fp32 on this x86 host, from its CPU flags: fp16 needs
    AVX512-FP16, bf16 AVX512-BF16 or AMX-BF16, int8 a dot-product instruction (VNNI) or AVX2's
    vpmaddubsw/vpmaddwd pair."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as fh:
                cpuinfo = fh.read()
        except OSError:
            return ("fp32",)
    line = next((l for l in cpuinfo.splitlines() if l.startswith("flags")), "")
    flags = set(line.split(":", 1)[-1].split())
    found = ["fp32"]
    if "avx512_fp16" in flags:
        found.append("fp16")
    if flags & {"avx512_bf16", "amx_bf16"}:
        found.append("bf16")
    if flags & {"avx512_vnni", "avx_vnni", "avx2"}:
        found.append("int8")
    return tuple(found)


def precision_warning(device, precision: str) -> str | None:
    """A warning when `precision` is listed as slower than fp32 on the device (fleet file's
    `precisions`: the ones that run well there)."""
    if precision == "fp32" or precision in device.precisions:
        return None
    return (
        f"{precision} is likely slower than fp32 on device {device.name!r} (runs well: "
        f"{', '.join(device.precisions)}): {SLOW_WHY.get(precision, 'no fast path on this device')}"
    )
