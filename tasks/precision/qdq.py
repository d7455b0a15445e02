"""Pre-quantized QDQ ONNX models (onnxruntime `quantize_static`, QuantFormat.QDQ) on the integer path.

TVM 0.27's ONNX importer keeps QDQ models as fake quantization: every Conv / Gemm / MatMul runs in
float between `relax.dequantize(relax.quantize(x))` on its input and `relax.dequantize(const int8 W)`
on its weight. This pass rewrites each such layer into the integer form tasks/precision/quantize.py emits, so
the int8 packing pass (tasks/build/int8_pack.py) and the int8 schedules apply to both the same way:

    acc = conv2d / matmul(x_q, const W_q int8, out_dtype=int32)     x_q: the model's own int8/uint8 tensor
    y   = float(acc [- zp * sum(W_q[c])]) * (s_x * s_w[c])           named q_<layer> (per-layer error taps)

followed by the model's own float bias add (its int32 bias dequantize folds to a float constant),
activation and the next QuantizeLinear, exactly as the importer made them. Q/DQ pairs elsewhere
(around MaxPool, Reshape, Add) stay: they are a float round-trip onnxruntime also computes.

Activation zero points are exact, never approximated:
- zp = 0: x_q feeds the integer layer as is.
- int8 with zp = -128 (onnxruntime's int8 post-ReLU activations): x_q + 128 is exactly the uint8
  tensor with zp 0 (the u8 operand of AVX-512 VNNI), so no correction term is needed.
- any other zp (e.g. the network input): the layer input is padded with zp explicitly (padding
  in the real domain is 0.0, i.e. q = zp), the conv runs unpadded, and zp * sum(W_q[c]) is
  subtracted in the int32 epilogue; with explicit padding that sum is the same at every output
  position, so the correction is one constant per output channel.

Forms this path cannot run exactly (per-channel activation scales, non-zero weight zero points,
non-8-bit tensors, weight scales along another axis) raise a one-line TvmflowError instead of
silently falling back to slow fake quantization. Layers with only one side quantized (a float
weight, or a float input) stay float: that is also what onnxruntime computes for them.

Residual difference from onnxruntime: it requantizes in one fused integer step (QLinearConv),
this path rescales in float and lets the next QuantizeLinear round, so a value that lies within
float rounding of a .5 quantization boundary can land one quantization step away.
"""

from __future__ import annotations

import json

import numpy as np

from tasks.errors import TvmflowError

ATTR = "tvmflow_prequantized"  # IRModule attribute: the rewrite's plan, survives lowering and caching
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
HOW_TO_FIX = (
    "re-quantize with onnxruntime quantize_static(quant_format=QDQ, per_channel=True, "
    "weight_type=QInt8) and per-tensor activations"
)


def is_qdq(model) -> bool:
    """An ONNX ModelProto with QuantizeLinear / DequantizeLinear nodes (QDQ format)."""
    return any(node.op_type in QDQ_OPS for node in model.graph.node)


def is_qdq_file(path) -> bool:
    """Whether an ONNX file is a QDQ model. Its reference outputs come from onnxruntime with graph
    optimizations off: on CPUs without AVX-512 VNNI onnxruntime's fused u8 x s8 kernels (vpmaddubsw)
    saturate int16 pair sums of full-range int8 weights, and drift from the graph's defined values
    (measured on MNIST: 12 logits off, 99.82 % vs 99.89 % accuracy; exact with reduce_range)."""
    import onnx

    return is_qdq(onnx.load(str(path), load_external_data=False))


def _unsupported(layer: str, what: str) -> TvmflowError:
    return TvmflowError(f"QDQ model: {layer} has {what}, which the integer path does not support; {HOW_TO_FIX}")


def _const(expr) -> np.ndarray | None:
    import tvm

    return expr.value.numpy() if isinstance(expr, tvm.ir.Constant) else None


def _bound(expr, bindings: dict, bb):
    """The expression a Relax var is bound to (the importer binds every op to a var)."""
    from tvm import relax

    while isinstance(expr, relax.Var):
        value = bindings.get(expr)
        if value is None:
            try:
                value = bb.lookup_binding(expr)
            except Exception:  # noqa: BLE001 - not bound in this function (a parameter)
                value = None
        if value is None:
            return expr
        expr = value
    return expr


def _is_op(expr, name: str) -> bool:
    import tvm
    from tvm import relax

    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def _activation(layer: str, expr, bindings, bb):
    """(x_q, scale, zero point) when the layer's input is dequantize(8-bit x_q, scalar scale, zp)."""
    deq = _bound(expr, bindings, bb)
    if not _is_op(deq, "relax.dequantize"):
        return None
    x_q = deq.args[0]
    dtype = str(x_q.ty.dtype)
    if dtype not in ("int8", "uint8"):
        raise _unsupported(layer, f"a {dtype} input activation (only 8-bit)")
    scale, zp = _const(deq.args[1]), _const(deq.args[2])
    if scale is None or zp is None:
        raise _unsupported(layer, "an input activation with non-constant quantization parameters")
    if scale.size != 1 or zp.size != 1:
        raise _unsupported(layer, "a per-channel input activation scale")
    return x_q, float(scale.reshape(())), int(zp.reshape(()))


def _weight(layer: str, kind: str, expr, bindings, bb):
    """(int8 weight, per-output-channel scales) when the weight is dequantize(const int8 W, s, 0),
    for matmul possibly through the importer's permute_dims (ONNX Gemm transB=1)."""
    w = _bound(expr, bindings, bb)
    transpose = _is_op(w, "relax.permute_dims")
    if transpose:
        axes = [int(a) for a in w.attrs.axes] if w.attrs.axes is not None else [1, 0]
        if axes != [1, 0]:
            return None
        w = _bound(w.args[0], bindings, bb)
    if not _is_op(w, "relax.dequantize"):
        return None
    w_q, scale, zp = (_const(a) for a in w.args)
    if w_q is None or scale is None or zp is None:
        return None  # a computed weight: stays float
    if w_q.dtype != np.int8:
        raise _unsupported(layer, f"{w_q.dtype} weights (only int8)")
    if np.any(zp != 0):
        raise _unsupported(layer, "a non-zero weight zero point (asymmetric weights)")
    axis = int(w.attrs.axis) % w_q.ndim
    out_axis = 0 if kind == "conv2d" else (0 if transpose else 1)
    if scale.size != 1 and (axis != out_axis or scale.size != w_q.shape[axis]):
        raise _unsupported(layer, f"weight scales along axis {axis}, not the output channels")
    channels = w_q.shape[out_axis]
    scales = (
        np.broadcast_to(scale.reshape(-1).astype("float32"), (channels,))
        if scale.size == 1
        else scale.reshape(-1).astype("float32")
    )
    return np.ascontiguousarray(w_q.T if transpose else w_q), np.ascontiguousarray(scales)


def _integer_input(bb, x_q, zp: int):
    """(8-bit tensor, remaining zero point): int8 with zp -128 becomes uint8 with zp 0, exactly."""
    from tvm import relax

    if zp == -128 and str(x_q.ty.dtype) == "int8":
        shifted = relax.op.add(relax.op.astype(x_q, "int32"), relax.const(128, "int32"))
        return bb.emit(relax.op.astype(shifted, "uint8")), 0
    return x_q, zp


def _conv(bb, call, x, w_q: np.ndarray, zp: int):
    """The int32 conv2d with the float layer's attributes; a non-zero zp pads explicitly with zp."""
    from tvm import relax

    attrs = call.attrs
    padding = [int(v) for v in attrs.padding]
    if zp and any(padding):
        top, left, bottom, right = padding
        x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(zp)))
        padding = [0, 0, 0, 0]
    out_layout = str(attrs.out_layout or attrs.data_layout)
    return relax.op.nn.conv2d(
        x,
        relax.const(w_q),
        strides=[int(v) for v in attrs.strides],
        padding=padding,
        dilation=[int(v) for v in attrs.dilation],
        groups=int(attrs.groups),
        data_layout=str(attrs.data_layout),
        kernel_layout=str(attrs.kernel_layout),
        out_layout=out_layout,
        out_dtype="int32",
    ), out_layout


def lower_qdq(mod):
    """(module with integer conv2d / matmul layers, plan dict). The plan is also stored in the
    module's attributes (see prequantized_info), so it survives lowering and the step caches."""
    from tvm import relax

    from tasks.precision.layers import rewrite_layers

    bindings = relax.analysis.get_var2val(mod["main"])
    plan = {"format": "QDQ", "integer_layers": [], "kept_float": []}

    errors: list[TvmflowError] = []
    shifted: dict = {}  # (x_q, zp) -> its uint8 shift, emitted once for all its consumers (ResNet's skip convs)

    def handler(bb, layer, call):
        """Errors are kept and raised after the visit: raised inside it they come back as a
        RuntimeError with TVM's traceback (the mutator runs behind the FFI)."""
        try:
            return None if errors else rewrite(bb, layer, call)
        except TvmflowError as err:
            errors.append(err)
            return None

    def rewrite(bb, layer, call):
        kind = layer.kind
        why = (
            f"{call.op.name} is not rewritten"
            if kind == "matmul" and call.op.name != "relax.matmul"
            else "layout is not NCHW / OIHW"
            if kind == "conv2d" and (str(call.attrs.data_layout), str(call.attrs.kernel_layout)) != ("NCHW", "OIHW")
            else None
        )  # the ONNX importer emits NCHW / OIHW only
        if why:
            plan["kept_float"].append({"name": layer.name, "why": why})
            return None
        act = _activation(layer.name, call.args[0], bindings, bb)
        weight = _weight(layer.name, kind, call.args[1], bindings, bb)
        if act is None or weight is None:
            side = "input" if act is None else "weight"
            plan["kept_float"].append(
                {"name": layer.name, "why": f"its {side} is not quantized (float in onnxruntime too)"}
            )
            return None
        (x_q, s_x, zp), (w_q, s_w) = act, weight
        if (x_q, zp) not in shifted:
            shifted[(x_q, zp)] = _integer_input(bb, x_q, zp)
        x, zp = shifted[(x_q, zp)]
        if kind == "conv2d":
            acc, out_layout = _conv(bb, call, x, w_q, zp)
            shape = [1] * len(call.ty.shape)
            shape[out_layout.index("C")] = -1
            w_sum = w_q.astype("int64").reshape(w_q.shape[0], -1).sum(axis=1)
        else:
            acc, shape = relax.op.matmul(x, relax.const(w_q), out_dtype="int32"), [-1]
            w_sum = w_q.astype("int64").sum(axis=0)
        acc = bb.emit(acc, name_hint=f"acc_{layer.name}")
        if zp:
            correction = (zp * w_sum).astype("int32").reshape(shape)
            acc = bb.emit(relax.op.subtract(acc, relax.const(correction)))
        scale = relax.const((np.float32(s_x) * s_w).astype("float32").reshape(shape))
        out = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"), scale), name_hint=f"q_{layer.name}")
        if str(call.ty.dtype) != "float32":
            out = bb.emit(relax.op.astype(out, str(call.ty.dtype)))
        plan["integer_layers"].append(
            {
                "name": layer.name,
                "kind": kind,
                "act_dtype": str(x.ty.dtype),
                "act_scale": s_x,
                "act_zero_point": act[2],
                "zero_point": "none" if act[2] == 0 else "int8->uint8 shift" if zp == 0 else "pad + sum(W) correction",
            }
        )
        return out

    new, _ = rewrite_layers(mod, handler)
    if errors:
        raise errors[0]
    # the bypassed dequantize ops are dead now; the int32 bias dequantize folds to a float constant
    new = relax.transform.FoldConstant()(relax.transform.DeadCodeElimination(["main"])(new))
    new = new.with_attr(ATTR, json.dumps(plan))
    return new, plan


def prequantized_info(mod) -> dict | None:
    """The QDQ plan stored by lower_qdq, or None for a model that was not pre-quantized."""
    attrs = getattr(mod, "attrs", None)
    if attrs is None or ATTR not in attrs:
        return None
    return {"prequantized": True, **json.loads(str(attrs[ATTR]))}


def effective_precision(requested: str, info: dict | None) -> str:
    """A pre-quantized model compiles as int8 whatever the default says: it is validated with the
    int8 gate against onnxruntime running the same QDQ model. fp16 / bf16 cannot apply to it."""
    if info is None:
        return requested
    if requested in ("fp16", "bf16"):
        raise TvmflowError(
            f"the model is pre-quantized int8 (QDQ); --precision {requested} does not apply: "
            "compile it without --precision (it runs as int8)"
        )
    return "int8"


def quantize_static_qdq(onnx_fp32, dataset, out, activation: str = "uint8", reduce_range: bool = False):
    """A QDQ model as users make them: onnxruntime's quant_pre_process, then quantize_static
    (per-channel int8 weights, `activation` uint8 or int8, calibrated on `dataset`'s samples, fed
    to the ONNX inputs in order). Returns `out`. For tests and benchmarks of this path."""
    from pathlib import Path

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(out)
    pre = out.with_name(out.stem + "-pre.onnx")
    quant_pre_process(str(onnx_fp32), str(pre), skip_symbolic_shape=True)
    names = [i.name for i in onnx.load(str(pre)).graph.input]
    feeds = [{o: arr[i] for o, arr in zip(names, dataset.inputs.values())} for i in range(len(dataset))]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    act = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activation]
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=act,
        weight_type=QuantType.QInt8,
    )
    pre.unlink()
    return out
