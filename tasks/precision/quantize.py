"""Real int8 compute in Relax (TVM 0.27 has no quantizer; its QDQ import is fake quantization).

Each quantized layer becomes
    x_q   = clip(round(x / s_x))            uint8 when calibration saw x >= 0 (post-ReLU), else int8
    acc   = conv2d / matmul(x_q, W_q, out_dtype=int32)     W_q: int8, symmetric, per output channel
    y     = float(acc) * (s_x * s_w[c])     -> named q_<layer>, followed by the model's own bias/act
FuseOps puts `y`, the bias, the activation and the next layer's quantize into the int32 kernel's
epilogue, so the tensor between two quantized layers is written once, already requantized to
8 bits (a float-scale requantize, as onnxruntime's QLinearConv does).

`reduce_range` keeps weights in 7 bits: u8 x s8 pairs then never saturate AVX2's vpmaddubsw
(the int16 pairwise add in the AVX2 / AVX-512-without-VNNI dot product).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from tasks.errors import TvmflowError
from tasks.precision.layers import fold, list_layers, rewrite_layers


@dataclass
class QuantConfig:
    method: str = "percentile"  # activation calibration: max | percentile | kl
    percentile: float = 99.99
    keep_float: list | None = None  # layer names; None = first conv and last dense/matmul
    reduce_range: bool = False  # 7-bit weights (AVX2 vpmaddubsw never saturates): weights_need_7_bits

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class QuantPlan:
    quantized: list = field(default_factory=list)  # [{name, kind, act_dtype, act_scale}]
    kept_float: list = field(default_factory=list)  # [{name, why}]

    def to_json(self) -> dict:
        return asdict(self)


def default_keep_float(layers) -> list[str]:
    """The first conv and the last dense/matmul: the usual accuracy-critical layers."""
    convs = [l.name for l in layers if l.kind == "conv2d"]
    dense = [l.name for l in layers if l.kind == "matmul"]
    return ([convs[0]] if convs else []) + ([dense[-1]] if dense else [])


def parse_keep_float(text: str | None, layers) -> list[str] | None:
    """`--keep-float a,b` -> names (checked against the model); 'none' = quantize every layer."""
    if text is None or text == "default":
        return None
    if text.strip().lower() in ("none", ""):
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = {l.name for l in layers}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise TvmflowError(
            f"--keep-float names {unknown} are not layers of the model; its layers are {', '.join(sorted(known))}"
        )
    return names


def weights_need_7_bits(target) -> bool:
    """The default for `reduce_range` on a device: True where the target's int8 dot product is
    AVX2's vpmaddubsw (int16 pair sums saturate with 8-bit weights, so tasks.build.int8_pack would leave
    those layers on plain, slower-than-fp32 loops), False with VNNI or without any dot product.
    The same choice onnxruntime recommends for x86 without VNNI."""
    from tasks.build.int8_isa import dot_intrin_for

    intrin = dot_intrin_for(target)
    return bool(intrin and intrin.saturates)


def weight_scales(weight: np.ndarray, axis: int, qmax: int) -> np.ndarray:
    """Symmetric per-channel scales along `axis` (the output channels)."""
    reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
    absmax = np.max(np.abs(weight), axis=reduce_axes)
    return np.where(absmax > 0, absmax / qmax, 1.0).astype("float64")


def _quantize_weight(weight: np.ndarray, axis: int, qmax: int):
    scales = weight_scales(weight, axis, qmax)
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.clip(np.round(weight / scales.reshape(shape)), -qmax, qmax).astype("int8")
    return q, scales


def activation_qparams(lo: float, hi: float) -> tuple[str, float, int, int]:
    """(dtype, scale, qmin, qmax) for a per-tensor activation range, zero point 0."""
    if lo >= 0:
        return "uint8", max(hi, 1e-8) / 255.0, 0, 255
    return "int8", max(abs(lo), abs(hi), 1e-8) / 127.0, -127, 127


def quantize_activation(bb, x, dtype: str, scale: float, qmin: int, qmax: int):
    from tvm import relax

    scaled = relax.op.round(relax.op.multiply(x, relax.const(1.0 / scale, "float32")))
    return bb.emit(relax.op.astype(relax.op.clip(scaled, qmin, qmax), dtype))


def quantize_model(mod, ranges: dict, config: QuantConfig | None = None):
    """(int8 module, QuantPlan). `ranges` maps layer name -> (lo, hi) of its input activation."""
    from tvm import relax

    config = config or QuantConfig()
    mod = fold(mod)
    layers = list_layers(mod)
    if not layers:
        raise TvmflowError("the model has no conv2d/dense/matmul layers to quantize; use --precision fp32")
    keep = set(default_keep_float(layers) if config.keep_float is None else config.keep_float)
    plan = QuantPlan()
    wmax = 63 if config.reduce_range else 127

    def handler(bb, layer, call):
        why = (
            "kept in float (--keep-float)"
            if layer.name in keep
            else "weight is not a constant"
            if not layer.weight_const
            else "no calibration range"
            if layer.name not in ranges
            else None
        )
        if why:
            plan.kept_float.append({"name": layer.name, "why": why})
            return None
        lo, hi = ranges[layer.name]
        dtype, s_x, qmin, qmax = activation_qparams(float(lo), float(hi))
        weight = call.args[1].value.numpy()
        axis = str(call.attrs.kernel_layout).index("O") if layer.kind == "conv2d" else weight.ndim - 1
        w_q, s_w = _quantize_weight(weight, axis, wmax)
        x_q = quantize_activation(bb, call.args[0], dtype, s_x, qmin, qmax)
        if layer.kind == "conv2d":
            attrs = call.attrs
            out_layout = str(attrs.out_layout or attrs.data_layout)
            acc = relax.op.nn.conv2d(
                x_q,
                relax.const(w_q),
                strides=[int(v) for v in attrs.strides],
                padding=[int(v) for v in attrs.padding],
                dilation=[int(v) for v in attrs.dilation],
                groups=int(attrs.groups),
                data_layout=str(attrs.data_layout),
                kernel_layout=str(attrs.kernel_layout),
                out_layout=out_layout,
                out_dtype="int32",
            )
            scale_shape = [1] * len(call.ty.shape)
            scale_shape[out_layout.index("C")] = -1
        else:
            acc = relax.op.matmul(x_q, relax.const(w_q), out_dtype="int32")
            scale_shape = [-1]
        acc = bb.emit(acc, name_hint=f"acc_{layer.name}")
        scale = relax.const((s_x * s_w).astype("float32").reshape(scale_shape))
        out = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"), scale), name_hint=f"q_{layer.name}")
        if call.ty.dtype != "float32":
            out = bb.emit(relax.op.astype(out, call.ty.dtype))
        plan.quantized.append(
            {
                "name": layer.name,
                "kind": layer.kind,
                "act_dtype": dtype,
                "act_scale": s_x,
                "act_range": [float(lo), float(hi)],
            }
        )
        return out

    new, _ = rewrite_layers(mod, handler)
    return new, plan


def per_layer_error(fp32_mod, int8_mod, samples: list[dict], target="llvm", names: set | None = None) -> list[dict]:
    """Each layer's output in the int8 model against the same layer in the fp32 model, over the
    samples: relative max error, SNR in dB and cosine similarity. Errors accumulate downstream,
    so the first layer with a large jump is usually the one to keep in float."""
    from tasks.precision.layers import host_runner, with_taps

    ref_mod, ref_names, ref_n = with_taps(fold(fp32_mod), "output", names)
    q_mod, q_names, q_n = with_taps(int8_mod, "output", names)
    ref_run, q_run = host_runner(ref_mod, target), host_runner(q_mod, target)
    stats = {n: {"err2": 0.0, "ref2": 0.0, "dot": 0.0, "q2": 0.0, "max_abs": 0.0, "ref_max": 0.0} for n in ref_names}
    for sample in samples:
        ref_out = dict(zip(ref_names, ref_run(sample)[ref_n:]))
        q_out = dict(zip(q_names, q_run(sample)[q_n:]))
        for name in ref_names:
            r, q = ref_out[name].astype("float64").ravel(), q_out[name].astype("float64").ravel()
            s = stats[name]
            s["err2"] += float(np.sum((r - q) ** 2))
            s["ref2"] += float(np.sum(r * r))
            s["q2"] += float(np.sum(q * q))
            s["dot"] += float(np.sum(r * q))
            s["max_abs"] = max(s["max_abs"], float(np.max(np.abs(r - q))))
            s["ref_max"] = max(s["ref_max"], float(np.max(np.abs(r))))
    rows = []
    for name in ref_names:
        s = stats[name]
        rows.append(
            {
                "layer": name,
                "rel_max_err": s["max_abs"] / max(s["ref_max"], 1e-12),
                "snr_db": float(10 * np.log10(max(s["ref2"], 1e-30) / max(s["err2"], 1e-30))),
                "cosine": s["dot"] / max(np.sqrt(s["ref2"] * s["q2"]), 1e-30),
            }
        )
    return rows
