"""Fold the shape arithmetic of an ONNX graph once its input shapes are fixed.

torch.onnx.export writes padding and reshapes as Shape/Slice/Concat/ConstantOfShape subgraphs that
are constant for a fixed input shape; TVM's ONNX importer refuses them ("Dynamic pads are not
supported yet"). onnxruntime's offline basic optimization (constant folding plus semantics-preserving
fusions, all standard ONNX ops) folds them; the folded graph is checked against the unfolded one.
"""

from __future__ import annotations

import collections
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from tasks.errors import TvmflowError

# ops whose presence means the graph computes shapes at run time
SHAPE_OPS = {"Shape", "Size", "ConstantOfShape", "Range", "NonZero"}
# what may be left of the folded graph before the outputs disagree by more than float noise
CHECK_RTOL = 1e-4


@dataclass
class Folded:
    model: object  # onnx.ModelProto
    note: str


def needs_folding(model) -> bool:
    return any(node.op_type in SHAPE_OPS for node in model.graph.node)


def with_static_inputs(model, specs):
    """A copy of the model whose graph inputs carry the given static shapes."""
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    shapes = {s.name: s.shape for s in specs}
    for value in fixed.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, shapes[value.name]):
                dim.Clear()
                dim.dim_value = int(size)
    return fixed


def _session(model_bytes: bytes, optimized_path: str | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    if optimized_path:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = optimized_path
    else:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def _sample(specs) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for s in specs:
        if s.dtype.startswith(("int", "uint")):
            out[s.name] = rng.integers(0, 4, size=s.shape).astype(s.dtype)
        else:
            out[s.name] = rng.standard_normal(s.shape).astype(s.dtype)
    return out


def fold_shapes(model, specs) -> Folded:
    """The model with its constant shape subgraphs folded for these input shapes, checked on one
    seeded sample against the unfolded model; a one-line error if onnxruntime cannot fold it."""
    import onnx

    fixed = with_static_inputs(model, specs)
    data = fixed.SerializeToString()
    with tempfile.TemporaryDirectory(prefix="tvmflow-fold-") as tmp:
        out = os.path.join(tmp, "folded.onnx")
        try:
            _session(data, out)
            folded = onnx.load(out)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise TvmflowError(
                f"cannot fold the model's shape computations with onnxruntime "
                f"({str(err).strip().splitlines()[0][:200]}); export it with static shapes"
            ) from None
    sample = _sample(specs)
    want = _session(data).run(None, sample)
    got = _session(folded.SerializeToString()).run(None, sample)
    worst = 0.0
    for g, w in zip(got, want):
        g, w = np.asarray(g, "float64"), np.asarray(w, "float64")
        scale = max(float(np.max(np.abs(w))) if w.size else 0.0, 1e-12)
        worst = max(worst, float(np.max(np.abs(g - w))) / scale if w.size else 0.0)
    if len(got) != len(want) or not worst <= CHECK_RTOL:
        raise TvmflowError(
            f"folding the model's shape computations changed its outputs (rel err {worst:.1e}); "
            "export the model with static shapes instead"
        )
    before = collections.Counter(n.op_type for n in model.graph.node)
    after = collections.Counter(n.op_type for n in folded.graph.node)
    gone = {op: before[op] - after.get(op, 0) for op in before if before[op] > after.get(op, 0)}
    listed = ", ".join(f"{op} {n}" for op, n in sorted(gone.items(), key=lambda kv: -kv[1]))
    note = (
        f"folded the shape computations for the fixed input shapes with onnxruntime: "
        f"{len(model.graph.node)} -> {len(folded.graph.node)} nodes ({listed or 'none removed'}); "
        f"outputs match the unfolded model (max rel err {worst:.1e})"
    )
    return Folded(folded, note)
