"""The compute layers of a Relax model (conv2d / dense / matmul with a constant weight), named in
graph order, plus the two tools every precision pass needs: rewriting those layers and tapping
intermediate tensors out of the graph to run it on the host.

Names are `<kind>_<i>` (conv2d_0, conv2d_1, matmul_0, ...), stable for one model, so users can
name layers to keep in float (`--keep-float conv2d_0,matmul_1`) and the report can name the
layer whose error is large.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = {"relax.nn.conv2d": "conv2d", "relax.matmul": "matmul", "relax.linear": "matmul"}


@dataclass
class Layer:
    name: str
    kind: str  # conv2d | matmul
    weight_const: bool  # the weight is a constant (bound params): quantizable / castable
    out_channels: int
    macs: int


def _op_name(call) -> str | None:
    import tvm
    from tvm import relax

    if isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op):
        return KINDS.get(call.op.name)
    return None


def fold(mod):
    """Fold weight transposes (torch Linear's W^T) into constants so layers see constant weights."""
    from tvm import relax

    return relax.transform.FoldConstant()(mod)


def _shape(expr) -> tuple:
    return tuple(int(d) for d in expr.ty.shape)


def describe(call) -> Layer | None:
    """The Layer for one call, or None when it is not a compute layer."""
    import tvm

    kind = _op_name(call)
    if kind is None:
        return None
    weight = call.args[1]
    const = isinstance(weight, tvm.ir.Constant)
    try:
        out_shape = _shape(call)
        w_shape = _shape(weight)
    except (TypeError, ValueError, AttributeError):
        return Layer("", kind, False, 0, 0)
    if kind == "conv2d":
        macs = int(np.prod(out_shape) * np.prod(w_shape[1:]))
        return Layer("", kind, const and len(w_shape) == 4, w_shape[0], macs)
    if call.op.name == "relax.linear":  # linear(x, W[N, K]) keeps its own layout: not rewritten
        return Layer("", kind, False, w_shape[0], int(np.prod(out_shape) * w_shape[-1]))
    return Layer("", kind, const and len(w_shape) == 2, w_shape[-1], int(np.prod(out_shape) * w_shape[0]))


def make_rewriter(handler):
    """A mutator that calls handler(builder, layer, call) for every compute layer of `main`,
    in graph order; the handler returns the replacement expression or None (keep)."""
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.counts: dict[str, int] = {}
            self.layers: list[Layer] = []

        def visit_call_(self, op):  # noqa: N802 - TVM's visitor name
            call = self.visit_expr_post_order(op)
            layer = describe(call)
            if layer is None:
                return call
            layer.name = f"{layer.kind}_{self.counts.get(layer.kind, 0)}"
            self.counts[layer.kind] = self.counts.get(layer.kind, 0) + 1
            self.layers.append(layer)
            new = handler(self.builder_, layer, call)
            return call if new is None else new

    return _Rewriter


def rewrite_layers(mod, handler):
    """(new module, layers) with `handler` applied to each compute layer of `main`."""

    rewriter = make_rewriter(handler)(mod)
    func = rewriter.visit_expr(mod["main"])
    new = mod.clone() if hasattr(mod, "clone") else mod
    new["main"] = func
    return new, rewriter.layers


def list_layers(mod) -> list[Layer]:
    return rewrite_layers(fold(mod), lambda bb, layer, call: None)[1]


def with_taps(mod, tap: str = "output", names: set | None = None):
    """A module whose `main` returns (model outputs..., one tensor per layer): the layer's input
    ("input", for calibration) or its output ("output", for per-layer error). Returns
    (module, tapped layer names). Layers named `q_<name>` by a quantizer are tapped at their
    dequantized output, so fp32 and int8 models tap the same points."""
    from tvm import relax

    taps: list = []
    tapped: list[str] = []

    def handler(bb, layer, call):
        if names is not None and layer.name not in names:
            return None
        if tap == "input":
            taps.append(call.args[0])
            tapped.append(layer.name)
            return None
        var = bb.emit(call, name_hint=f"tap_{layer.name}")
        taps.append(var)
        tapped.append(layer.name)
        return var

    mod = relax.transform.ToNonDataflow()(mod)
    rewriter = make_rewriter(handler)(mod)
    func = rewriter.visit_expr(mod["main"])
    taps = _quantized_taps(func, tapped, taps)
    body = func.body
    outputs = list(body.body.fields) if isinstance(body.body, relax.Tuple) else [body.body]
    new_body = relax.BlockBuilder().normalize(relax.SeqExpr(body.blocks, relax.Tuple(outputs + taps)))
    new_func = relax.Function(func.params, new_body, attrs=func.attrs)
    out = mod.clone() if hasattr(mod, "clone") else mod
    out["main"] = new_func
    return out, tapped, len(outputs)


def _quantized_taps(func, tapped, taps):
    """Swap a layer's tap for the var named `q_<layer>` when the quantizer emitted one."""
    names = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            names[binding.var.name] = binding.var
    return [names.get(f"q_{name}", var) for name, var in zip(tapped, taps)]


def host_runner(mod, target: str | dict = "llvm"):
    """Compile `mod` for the host (untuned kernels) and return run(sample dict) -> [np arrays]."""
    import tvm
    from tvm import relax

    tvm_target = tvm.target.Target(target)
    with tvm_target:
        prepared = relax.get_pipeline("zero")(relax.transform.DecomposeOpsForInference()(mod))
    executable = tvm.compile(prepared, target=tvm_target)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    names = [p.name for p in mod["main"].params]

    def run(sample: dict) -> list:
        result = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(sample[n])) for n in names])
        items = [result] if hasattr(result, "numpy") else [result[i] for i in range(len(result))]
        return [item.numpy() for item in items]

    return run
