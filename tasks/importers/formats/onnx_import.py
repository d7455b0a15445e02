"""ONNX files into Relax through `tvm.relax.frontend.onnx`.

Before import: input shapes are fixed (dynamic batch -> `batch`), shape arithmetic is folded
(tasks.importers.onnx_fold), and every problem (dynamic dims, unsupported operators) is reported
in one error. The reference is onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.errors import TvmflowError
from tasks.importers.bundles import head
from tasks.importers.onnx_fold import fold_shapes, needs_folding
from tasks.importers.timing import median_ms
from tasks.importers.types import (
    ImportedModel,
    Importer,
    InputSpec,
    import_failed,
    problems_error,
    resolve_inputs,
    unsupported_operators_problem,
)


def load(path: Path):
    """The ModelProto, or None for bytes that are not an ONNX graph."""
    import onnx

    if Path(path).is_dir():
        return None
    try:
        model = onnx.load_model_from_string(Path(path).read_bytes())
    except Exception:  # noqa: BLE001 - protobuf raises several unrelated types
        return None
    return model if model.graph.node else None


def detect(path: Path) -> bool:
    """Last in the registry: protobuf parses many byte strings, so everything else is tried first."""
    return not head(path, 4).startswith(b"PK") and load(path) is not None


def declared_inputs(model) -> list[InputSpec]:
    """The graph's inputs as the file declares them (-1 for a dynamic or symbolic dim)."""
    from onnx import helper

    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim)
        specs.append(InputSpec(value.name, dims, dtype))
    return specs


def unsupported_operators(model) -> list[str]:
    """Operator types of the graph TVM's ONNX frontend has no converter for."""
    from tvm.relax.frontend.onnx import onnx_frontend

    convert_map: dict = getattr(onnx_frontend, "_get_convert_map", dict)()  # TVM's own table of converters
    if not convert_map:
        return []
    return sorted({n.op_type for n in model.graph.node if n.op_type not in convert_map})


def import_onnx(path: Path, overrides: list[InputSpec] | None = None, batch: int | None = None) -> ImportedModel:
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    try:
        model = onnx.load(str(path))
    except Exception as err:  # noqa: BLE001
        raise TvmflowError(
            f"{Path(path).name} is not a model this tool can read (corrupt, truncated: {err.__class__.__name__}); "
            "export it again"
        ) from None
    resolved = resolve_inputs(declared_inputs(model), overrides, batch)
    problems = list(resolved.problems)
    unsupported = unsupported_operators(model)
    if unsupported:
        problems.append(unsupported_operators_problem(unsupported))
    if problems:
        raise problems_error(problems)
    specs, notes = resolved.specs, list(resolved.notes)
    if needs_folding(model):
        folded = fold_shapes(model, specs)
        model = folded.model
        notes.append(folded.note)
    try:
        mod = from_onnx(
            model, shape_dict={s.name: list(s.shape) for s in specs}, dtype_dict={s.name: s.dtype for s in specs}
        )
    except Exception as err:  # noqa: BLE001 - the importer raises many types
        raise import_failed("ONNX", err) from None
    from tasks.precision.qdq import is_qdq, lower_qdq

    if is_qdq(model):  # pre-quantized (onnxruntime quantize_static QDQ): integer conv/matmul, not fake quant
        mod = lower_qdq(mod)[0]
    return ImportedModel(mod, specs, "onnx", notes)


class OnnxRunner:
    """onnxruntime on the host. Outputs of a QDQ graph come from the unoptimized session (the graph
    as ONNX defines it, tasks/precision/qdq.py says why); latency from the optimized one."""

    def __init__(self, path: Path, input_names: list[str]):
        import onnxruntime as ort

        from tasks.precision.qdq import is_qdq_file

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.input_names = input_names
        self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._outputs_session = self._session
        if is_qdq_file(Path(path)):
            exact = ort.SessionOptions()
            exact.log_severity_level = 3
            exact.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            self._outputs_session = ort.InferenceSession(str(path), exact, providers=["CPUExecutionProvider"])

    def _feed(self, sample):
        return {n: np.ascontiguousarray(sample[n]) for n in self.input_names}

    def run(self, sample: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(o) for o in self._outputs_session.run(None, self._feed(sample))]

    def latency_ms(self, sample: dict[str, np.ndarray]) -> float:
        feed = self._feed(sample)
        return median_ms(lambda: self._session.run(None, feed))


IMPORTER = Importer(
    format="onnx",
    framework="onnx",
    description="ONNX (.onnx)",
    detect=detect,
    import_=import_onnx,
    reference=OnnxRunner,
    export_onnx=lambda path, out, names: Path(path),
)
