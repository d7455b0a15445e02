"""Keras 3 models into Relax: `.keras` archives, legacy full-model `.h5`, and architecture json +
weights h5 (the classic MobileNetV2 alpha=0.5 deployment: `model.to_json()` + `save_weights`).

TVM 0.27 has no Keras frontend, so the model is loaded with KERAS_BACKEND=torch (a Keras model is
then a torch nn.Module), captured with torch.export and imported by the torch frontend. Inputs stay
NHWC as Keras gives them. The reference is Keras itself (`predict_on_batch`, torch backend).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np

from tasks.errors import TvmflowError
from tasks.importers.bundles import (
    ARCH,
    WEIGHTS,
    dir_parts,
    head,
    is_architecture_json,
    zip_names,
)
from tasks.importers.formats.torch_import import relax_from_program
from tasks.importers.types import (
    ImportedModel,
    Importer,
    InputSpec,
    UnknownFormat,
    resolve_checked,
)


def _keras():
    """Keras on the torch backend; the backend is fixed at Keras' first import in a process."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError:
        raise TvmflowError("Keras support needs `keras` and `h5py`: run `bash scripts/setup.sh`") from None
    if keras.backend.backend() != "torch":
        raise TvmflowError(
            f"Keras was already loaded with the {keras.backend.backend()!r} backend; set KERAS_BACKEND=torch"
        )
    return keras


def is_keras_zip(names: list[str]) -> bool:
    return "config.json" in names and "metadata.json" in names


def h5_kind(path: Path) -> str:
    """'model' (full legacy .h5), 'weights-legacy' (Keras 2 save_weights), 'weights' (Keras 3
    .weights.h5), or '' for an HDF5 file that is none of these."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            if "model_config" in handle.attrs:
                return "model"
            if "layer_names" in handle.attrs:
                return "weights-legacy"
            if "vars" in handle or "layers" in handle:
                return "weights"
    except OSError:
        raise TvmflowError(
            f"{Path(path).name} is an HDF5 file that cannot be read (corrupt or truncated); save the model again"
        ) from None
    return ""


def load_model(path: Path):
    """The Keras model of a .keras / full .h5 file or of a json+weights bundle directory.

    Keras picks its reader from the file name, and a fetched file keeps whatever name it had,
    so each file is linked under the name its content calls for."""
    keras = _keras()
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="tvmflow-keras-") as tmp:
        try:
            if path.is_dir():
                model = keras.models.model_from_json((path / ARCH).read_text())
                kind = h5_kind(path / WEIGHTS)
                named = Path(tmp) / ("w.weights.h5" if kind == "weights" else "w.h5")
                os.symlink(path / WEIGHTS, named)
                model.load_weights(str(named))
                return model
            if path.read_bytes()[:2] == b"PK":
                named = Path(tmp) / "model.keras"
            else:
                named = Path(tmp) / "model.h5"
            os.symlink(path.resolve(), named)
            return keras.models.load_model(str(named), compile=False)
        except TvmflowError:
            raise
        except Exception as err:  # noqa: BLE001 - keras raises ValueError/KeyError/TypeError/OSError
            raise TvmflowError(f"Keras could not load {path.name}: {str(err).strip().splitlines()[0][:300]}") from None


def _input_specs(model, overrides, batch=None):
    specs = []
    for tensor in model.inputs:
        shape = tuple(-1 if d is None else int(d) for d in tensor.shape)
        name = re.sub(r"\W", "_", tensor.name.split(":")[0]) or "input"
        specs.append(InputSpec(name, shape, str(tensor.dtype).replace("torch.", "")))
    return resolve_checked(specs, overrides, batch)


def _named_wrapper(model, names: list[str]):
    """An nn.Module whose forward takes the Keras input names, so torch.export names them too."""
    import torch

    args = ", ".join(names)
    call = f"[{args}]" if len(names) > 1 else args
    scope: dict = {}
    exec(f"def forward(self, {args}):\n    return self.model({call}, training=False)\n", scope)  # noqa: S102
    wrapper = type("KerasModel", (torch.nn.Module,), {"forward": scope["forward"]})()
    wrapper.model = model
    return wrapper


def import_keras(path: Path, overrides=None, batch: int | None = None) -> ImportedModel:
    import torch

    model = load_model(path)
    resolved = _input_specs(model, overrides, batch)
    specs = resolved.specs
    example = tuple(torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in specs)
    try:
        with torch.no_grad():
            program = torch.export.export(_named_wrapper(model, [s.name for s in specs]).eval(), example)
    except Exception as err:  # noqa: BLE001
        raise TvmflowError(
            f"torch.export of the Keras model failed: {str(err).strip().splitlines()[0][:300]}"
        ) from None
    return ImportedModel(relax_from_program(program, "Keras (torch)"), specs, "keras", resolved.notes)


def export_onnx(path: Path, out_path: Path, names: list[str]) -> Path:
    """ONNX of the Keras model (through torch.export), so onnxruntime can be timed as a baseline."""
    import torch

    model = load_model(path)
    specs = _input_specs(model, None).specs
    example = tuple(torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in specs)
    program = torch.export.export(_named_wrapper(model, [s.name for s in specs]).eval(), example)
    torch.onnx.export(program, (), str(out_path), dynamo=True, external_data=False, verbose=False)
    return out_path


class KerasRunner:
    """Keras' own predict on the torch backend."""

    def __init__(self, path: Path, input_names: list[str]):
        self._model, self.input_names = load_model(path), input_names

    def run(self, sample: dict[str, np.ndarray]) -> list[np.ndarray]:
        inputs = [np.ascontiguousarray(sample[n]) for n in self.input_names]
        out = self._model.predict_on_batch(inputs if len(inputs) > 1 else inputs[0])
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [np.asarray(o) for o in outs]


def detect(path: Path) -> bool:
    """A .keras zip, a full-model .h5, or a bundle directory with an architecture json."""
    path = Path(path)
    if path.is_dir():
        return "keras-arch" in dir_parts(path)
    names = zip_names(path)
    if names is not None:
        return is_keras_zip(names)
    start = head(path)
    if start.startswith(b"\x89HDF"):
        kind = h5_kind(path)
        if kind.startswith("weights"):
            raise TvmflowError(
                f"{path.name} holds Keras weights only; give the architecture too: --model arch.json+{path.name}"
            )
        if kind != "model":
            raise UnknownFormat(f"{path.name} is an HDF5 file but not a Keras model")
        return True
    if start.lstrip()[:1] == b"{" and is_architecture_json(path.read_text(errors="replace")):
        raise TvmflowError(f"{path.name} is a Keras architecture without weights; give --model {path.name}+weights.h5")
    return False


IMPORTER = Importer(
    format="keras",
    framework="keras",
    description="Keras 3 (.keras, full-model .h5, or arch.json+weights.h5)",
    detect=detect,
    import_=import_keras,
    reference=KerasRunner,
    export_onnx=export_onnx,
)
