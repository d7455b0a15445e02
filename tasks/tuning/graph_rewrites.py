"""Graph rewrites that let ConvertLayout move a whole conv net to NHWC.

Relax's ConvertLayout knows conv2d and element-wise arithmetic, but not `clip` (ReLU6) or
`nn.pad`: on EfficientNet-Lite0 / MobileNet every ReLU6 and every explicit (TF "same") pad stayed
NCHW with a permute_dims on each side, two full memory passes per layer, and the ReLU6 could no
longer be fused into the vendor conv before it. So, before the conversion, a zero pad that feeds
a conv2d becomes the conv's own padding and clip(x, lo, hi) becomes minimum(maximum(x, lo), hi)
(both layout-aware); after it, the pair is turned back into one clip. Outputs stay equal (tests in
tests/tuning/test_graph_rewrites.py).
"""

from __future__ import annotations

from tvm import relax
from tvm.ir.expr import Constant
from tvm.relax.expr_functor import PyExprMutator, mutator


def _scalar(expr) -> float | None:
    """The value of a scalar: a one-element constant tensor or a prim value (clip's bounds), else None."""
    if isinstance(expr, Constant):
        value = expr.value
        if hasattr(value, "numpy"):
            return float(value.numpy().reshape(())) if value.numpy().size == 1 else None
    value = getattr(expr, "value", None)
    value = getattr(value, "value", value)
    return float(value) if isinstance(value, (int, float)) else None


def _op_name(expr) -> str | None:
    return expr.op.name if isinstance(expr, relax.Call) and hasattr(expr.op, "name") else None


@mutator
class _PadIntoConv(PyExprMutator):
    """conv2d(pad(x, zeros on H/W only), w) -> conv2d(x, w, padding += the pad's)."""

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if _op_name(call) != "relax.nn.conv2d" or not isinstance(call.args[0], relax.Var):
            return call
        pad = self.lookup_binding(call.args[0])
        if _op_name(pad) != "relax.nn.pad":
            return call
        a, p = call.attrs, pad.attrs
        if str(p.pad_mode) != "constant" or float(p.pad_value) != 0.0 or len(p.pad_width) != 8:
            return call
        width = [int(v) for v in p.pad_width]
        h_axis, w_axis = str(a.data_layout).index("H"), str(a.data_layout).index("W")
        if any(width[2 * i] or width[2 * i + 1] for i in range(4) if i not in (h_axis, w_axis)):
            return call
        top, left, bottom, right = (int(v) for v in a.padding)
        padding = [
            top + width[2 * h_axis],
            left + width[2 * w_axis],
            bottom + width[2 * h_axis + 1],
            right + width[2 * w_axis + 1],
        ]
        return relax.op.nn.conv2d(
            pad.args[0],
            call.args[1],
            strides=[int(v) for v in a.strides],
            padding=padding,
            dilation=[int(v) for v in a.dilation],
            groups=int(a.groups),
            data_layout=str(a.data_layout),
            kernel_layout=str(a.kernel_layout),
            out_layout=str(a.out_layout) if a.out_layout else None,
            out_dtype=str(a.out_dtype) if a.out_dtype else None,
        )


@mutator
class _ClipAsMinMax(PyExprMutator):
    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if _op_name(call) != "relax.clip":
            return call
        lo, hi = _scalar(call.args[1]), _scalar(call.args[2])
        if lo is None or hi is None:
            return call
        dtype = call.args[0].ty.dtype
        lower = relax.op.maximum(call.args[0], relax.const(lo, dtype))
        return relax.op.minimum(lower, relax.const(hi, dtype))


@mutator
class _MinMaxAsClip(PyExprMutator):
    """minimum(maximum(x, lo), hi) with scalar constants -> clip(x, lo, hi) (what _ClipAsMinMax made)."""

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if _op_name(call) != "relax.minimum" or _scalar(call.args[1]) is None:
            return call
        inner = self.lookup_binding(call.args[0]) if isinstance(call.args[0], relax.Var) else call.args[0]
        if _op_name(inner) != "relax.maximum" or _scalar(inner.args[1]) is None:
            return call
        return relax.op.clip(inner.args[0], _scalar(inner.args[1]), _scalar(call.args[1]))


def _apply(mutator_cls, mod):
    rewriter = mutator_cls(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return relax.transform.DeadCodeElimination()(rewriter.builder_.get())


def before_layout_conversion(mod):
    """Zero pads folded into the convs they feed; clips as min/max (see the module docstring)."""
    return _apply(_ClipAsMinMax, _apply(_PadIntoConv, mod))


def after_layout_conversion(mod):
    """The min/max pairs back as one clip (so the vendor conv can fuse ReLU6 as a post-op)."""
    return _apply(_MinMaxAsClip, mod)
