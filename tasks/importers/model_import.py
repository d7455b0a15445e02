"""Import a trained model into Relax: ONNX files, torch .pt2 ExportedPrograms,
`package.module:callable` factories that return (nn.Module, example inputs), and the formats of
tasks/importers/formats/ (Keras 3, MXNet Gluon exports, TFLite).

The format is detected from the file's content, not its name.
"""
from __future__ import annotations

import importlib
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tasks.importers import formats
from tasks.errors import TvmflowError

FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
SUPPORTED = formats.SUPPORTED


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple
    dtype: str = "float32"

    def __str__(self) -> str:
        return f"{self.name}:{'x'.join(map(str, self.shape))}:{self.dtype}"


def parse_input_spec(text: str) -> InputSpec:
    """`name:1x3x224x224:float32` (dtype optional)."""
    parts = text.split(":")
    try:
        name, shape = parts[0], tuple(int(d) for d in parts[1].lower().split("x"))
        dtype = parts[2] if len(parts) > 2 else "float32"
        if not name or len(parts) > 3 or any(d <= 0 for d in shape):
            raise ValueError
    except (IndexError, ValueError):
        raise TvmflowError(f"bad --input {text!r}: use name:shape:dtype, e.g. input:1x3x224x224:float32") from None
    return InputSpec(name, shape, dtype)


def is_factory(spec: str) -> bool:
    return bool(FACTORY_RE.match(spec)) and not Path(spec).exists()


def framework_of(fmt: str) -> str:
    """The source framework of a detected format: what runs the validation reference."""
    return formats.FRAMEWORK[fmt]


def detect_format(path: Path) -> str:
    """'onnx', 'pt2', 'keras', 'mxnet' or 'tflite', from the bytes (a multi-file model is a
    bundle directory, see tasks/formats); a one-line error for anything else."""
    other = formats.detect(path)
    if other:
        return other
    head = path.read_bytes()[:8]
    if head.startswith(b"PK"):
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile:
            raise TvmflowError(f"{path.name} looks like a zip archive but is corrupt or truncated; "
                               "export the model again") from None
        if any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names):
            return "pt2"
        raise TvmflowError(f"{path.name} is a zip archive but not a torch.export .pt2 (nor a Keras "
                           f".keras file); supported: {SUPPORTED}")
    import onnx

    try:
        model = onnx.load_model_from_string(path.read_bytes())
    except Exception:  # noqa: BLE001 - protobuf raises several unrelated types
        model = None
    if model is None or not model.graph.node:
        raise TvmflowError(f"{path.name} is not a model this tool can read (corrupt, truncated, or an "
                           f"unsupported format); supported: {SUPPORTED}")
    return "onnx"


def export_factory(spec: str, dest: Path, input_override: list[InputSpec] | None = None) -> Path:
    """Call the factory, torch.export its module, and save it as a .pt2 file."""
    import torch

    module_name, func_name = spec.split(":")
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as err:
        raise TvmflowError(f"cannot load model factory {spec!r} ({err}); give package.module:callable") from None
    module, example = factory()
    if input_override:
        example = tuple(torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in input_override)
    try:
        program = torch.export.export(module, tuple(example))
    except Exception as err:  # noqa: BLE001
        raise TvmflowError(f"torch.export failed for {spec}: {str(err).splitlines()[0]}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, dest)
    return dest


@dataclass
class ImportedModel:
    mod: object  # tvm.IRModule, weights bound as constants
    inputs: list[InputSpec]
    framework: str  # "onnx" | "torch" | "keras" | "mxnet" | "tflite"


def check_overrides(specs: list[InputSpec], overrides: list[InputSpec] | None) -> list[InputSpec]:
    """Apply --input to a model's own input specs (-1 = dynamic dim): names must exist, shapes fit,
    and every dim ends up static."""
    given = {s.name: s for s in overrides or []}
    unknown = sorted(set(given) - {s.name for s in specs})
    if unknown:
        raise TvmflowError(f"--input names {unknown} are not inputs of the model; its inputs are {[s.name for s in specs]}")
    out = []
    for spec in specs:
        new = given.get(spec.name)
        if new and (len(new.shape) != len(spec.shape) or any(d not in (-1, g) for d, g in zip(spec.shape, new.shape))):
            raise TvmflowError(f"--input {new} does not fit input {spec.name!r} of shape "
                               f"{tuple('?' if d < 0 else d for d in spec.shape)}; fix the shape")
        spec = new or spec
        if any(d <= 0 for d in spec.shape):
            raise TvmflowError(f"input {spec.name!r} has a dynamic shape {spec.shape}; give a static one "
                               f"with --input {spec.name}:1x...:{spec.dtype}")
        out.append(spec)
    return out


def _onnx_inputs(model, overrides: dict[str, InputSpec]) -> list[InputSpec]:
    from onnx import helper

    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        given = overrides.pop(value.name, None)
        if given:
            if len(given.shape) != len(dims) or any(d not in (-1, g) for d, g in zip(dims, given.shape)):
                raise TvmflowError(f"--input {given} does not fit input {value.name!r} of shape "
                                   f"{tuple('?' if d < 0 else d for d in dims)}; fix the shape")
            specs.append(given)
        elif any(d <= 0 for d in dims):
            raise TvmflowError(f"input {value.name!r} has a dynamic shape {dims}; give a static one "
                               f"with --input {value.name}:1x...:{dtype}")
        else:
            specs.append(InputSpec(value.name, dims, dtype))
    if overrides:
        raise TvmflowError(f"--input names {sorted(overrides)} are not inputs of the model; "
                           f"its inputs are {[s.name for s in specs]}")
    return specs


def _unsupported(err: Exception) -> TvmflowError | None:
    text = str(err)
    match = (re.search(r"operators are not supported for frontend ONNX: ([\w, ]+)", text)
             or re.search(r"Unsupported function types? \[([^\]]+)\]", text))
    if match:
        return TvmflowError(f"unsupported operator(s): {match.group(1).strip()}; replace them in the "
                            "model or keep that part out of the exported graph")
    return None


def import_onnx(path: Path, overrides: list[InputSpec] | None = None) -> ImportedModel:
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    model = onnx.load(str(path))
    specs = _onnx_inputs(model, {s.name: s for s in overrides or []})
    try:
        mod = from_onnx(model, shape_dict={s.name: list(s.shape) for s in specs},
                        dtype_dict={s.name: s.dtype for s in specs})
    except Exception as err:  # noqa: BLE001 - the importer raises many types
        raise _unsupported(err) or TvmflowError(
            f"ONNX import failed: {str(err).strip().splitlines()[-1][:300]}") from None
    from tasks.precision.qdq import is_qdq, lower_qdq

    if is_qdq(model):  # pre-quantized (onnxruntime quantize_static QDQ): integer conv/matmul, not fake quant
        mod = lower_qdq(mod)[0]
    return ImportedModel(mod, specs, "onnx")


def import_pt2(path: Path, overrides: list[InputSpec] | None = None) -> ImportedModel:
    import torch

    try:
        program = torch.export.load(str(path))
    except Exception as err:  # noqa: BLE001
        raise TvmflowError(f"cannot load {path.name} as a torch.export program ({str(err).splitlines()[0]}); "
                           "the file may be corrupt or truncated: export it again") from None
    specs = []
    for node in program.graph.find_nodes(op="placeholder"):
        if node.name in program.graph_signature.user_inputs:
            meta = node.meta["val"]
            specs.append(InputSpec(node.name, tuple(int(d) for d in meta.shape), str(meta.dtype).replace("torch.", "")))
    for given in overrides or []:
        match = [s for s in specs if s.name == given.name]
        if not match:
            raise TvmflowError(f"--input {given.name!r} is not an input of the model; its inputs are {[s.name for s in specs]}")
        if match[0].shape != given.shape or match[0].dtype != given.dtype:
            raise TvmflowError(f"--input {given} does not match the exported program's static input {match[0]}; "
                               "export the model with that shape")
    return ImportedModel(relax_from_program(program, "PyTorch"), specs, "torch")


def relax_from_program(program, source: str):
    """Relax from a torch ExportedProgram; an unsupported operator is named in the error."""
    from tvm.relax.frontend.torch import from_exported_program

    try:
        return from_exported_program(program, unwrap_unit_return_tuple=True)
    except Exception as err:  # noqa: BLE001 - the importer raises many types
        raise _unsupported(err) or TvmflowError(
            f"{source} import failed: {str(err).strip().splitlines()[-1][:300]}") from None


def import_model(path: Path, overrides: list[InputSpec] | None = None) -> ImportedModel:
    fmt = detect_format(path)
    if fmt in ("keras", "mxnet", "tflite"):
        return formats.import_model(fmt, path, overrides)
    return import_onnx(path, overrides) if fmt == "onnx" else import_pt2(path, overrides)


def model_name(spec: str) -> str:
    """A readable model name: the factory's callable, or the (first) file's stem."""
    if is_factory(spec):
        return spec.split(":")[1]
    if "+" in spec and not Path(spec).exists():
        spec = spec.split("+")[0]
    stem = re.sub(r"-symbol$", "", Path(spec.rstrip("/").split("/")[-1]).stem)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or "model"
