"""TFLite flatbuffers (`.tflite`) into Relax through `tvm.relax.frontend.tflite`.

fp16-weight models (FLOAT16 buffers + DEQUANTIZE, what the TFLite converter's float16
quantization writes) import as fp32 compute: the frontend folds each DEQUANTIZE into a
float16 constant cast to float32. Inputs keep TFLite's layout (NHWC for images).
The reference is the LiteRT interpreter (`ai-edge-litert`), i.e. what the device app ran.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.errors import TvmflowError
from tasks.importers.bundles import head
from tasks.importers.types import (
    ImportedModel,
    Importer,
    InputSpec,
    ResolvedInputs,
    import_failed,
    resolve_checked,
)

MAGIC = b"TFL3"


def is_tflite(head: bytes) -> bool:
    return head[4:8] == MAGIC


def load(path: Path):
    try:
        import tflite
    except ImportError:
        raise TvmflowError("TFLite support needs the `tflite` package: run `bash scripts/setup.sh`") from None
    data = Path(path).read_bytes()
    try:
        model = tflite.Model.GetRootAsModel(data, 0)
        subgraph = model.Subgraphs(0)
        _ = [subgraph.Tensors(i).ShapeAsNumpy() for i in subgraph.InputsAsNumpy()]
        for i in range(model.BuffersLength()):  # weights live at the end: a cut file loses them
            buf = model.Buffers(i)
            if buf.DataLength() and len(buf.DataAsNumpy()) != buf.DataLength():
                raise ValueError("buffer out of range")
    except Exception as err:  # noqa: BLE001 - flatbuffers raises IndexError/struct.error on bad bytes
        raise TvmflowError(
            f"{Path(path).name} is not a readable TFLite model ({err.__class__.__name__}); "
            "it may be corrupt or truncated: convert it again"
        ) from None
    return model, subgraph


def _type_name(code: int) -> str:
    from tflite.TensorType import TensorType

    names = {v: k.lower() for k, v in vars(TensorType).items() if not k.startswith("_")}
    return {
        "float32": "float32",
        "float16": "float16",
        "int8": "int8",
        "uint8": "uint8",
        "int32": "int32",
        "int64": "int64",
        "bool": "bool",
    }.get(names.get(code, ""), "float32")


def input_specs(path: Path, overrides=None, batch: int | None = None) -> ResolvedInputs:
    """The subgraph's inputs (name, static shape, dtype); --input may fix dynamic dims."""
    _, subgraph = load(path)
    specs = []
    for index in subgraph.InputsAsNumpy():
        tensor = subgraph.Tensors(int(index))
        sig = tensor.ShapeSignatureAsNumpy() if tensor.ShapeSignatureLength() else tensor.ShapeAsNumpy()
        dims = tuple(int(d) for d in sig) if not isinstance(sig, int) else ()
        specs.append(InputSpec(tensor.Name().decode(), dims, _type_name(tensor.Type())))
    return resolve_checked(specs, overrides, batch)


def import_tflite(path: Path, overrides=None, batch: int | None = None) -> ImportedModel:
    from tvm.relax.frontend.tflite import from_tflite

    model, _ = load(path)
    resolved = input_specs(path, overrides, batch)
    specs = resolved.specs
    try:
        mod = from_tflite(
            model, shape_dict={s.name: s.shape for s in specs}, dtype_dict={s.name: s.dtype for s in specs}
        )
    except Exception as err:  # noqa: BLE001 - the importer raises many types
        raise _tflite_unsupported(err) or import_failed("TFLite", err) from None
    # the weights are inline constants already; the "params" attribute only duplicates them
    mod["main"] = mod["main"].without_attr("params")
    return ImportedModel(mod, specs, "tflite", resolved.notes)


def _tflite_unsupported(err: Exception) -> TvmflowError | None:
    import re

    match = re.search(r"not supported in frontend TFLite: ([\w, ]+)", str(err)) or re.search(
        r"operators are not supported[^:]*: ([\w, ]+)", str(err)
    )
    if match:
        return TvmflowError(
            f"unsupported TFLite operator(s): {match.group(1).strip()}; replace them in the model before converting"
        )
    return None


class TFLiteRunner:
    """The LiteRT interpreter (ai-edge-litert) on the host: the model as the device app ran it."""

    def __init__(self, path: Path, input_names: list[str]):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise TvmflowError("the TFLite reference needs `ai-edge-litert`: run `bash scripts/setup.sh`") from None
        self._interp = Interpreter(model_path=str(path), num_threads=2)
        self._interp.allocate_tensors()
        self._in = {d["name"]: d["index"] for d in self._interp.get_input_details()}
        self._out = [d["index"] for d in self._interp.get_output_details()]
        self.input_names = input_names

    def run(self, sample: dict[str, np.ndarray]) -> list[np.ndarray]:
        for name in self.input_names:
            self._interp.set_tensor(self._in[name], np.ascontiguousarray(sample[name]))
        self._interp.invoke()
        return [np.array(self._interp.get_tensor(i)) for i in self._out]


def detect(path: Path) -> bool:
    """The flatbuffer identifier; a truncated model fails here with a clear error."""
    if not is_tflite(head(path)):
        return False
    load(path)
    return True


IMPORTER = Importer(
    format="tflite",
    framework="tflite",
    description="TFLite (.tflite)",
    detect=detect,
    import_=import_tflite,
    reference=TFLiteRunner,
)
