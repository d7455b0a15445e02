"""TorchScript `.pt`/`.pth` files (torch.jit.save of a traced or scripted module), as the TVM
tutorials hand them over.

TVM 0.27 has no TorchScript frontend and torch.export cannot re-export a ScriptModule, so the
module goes through torch's TorchScript ONNX exporter (`torch.onnx.export(..., dynamo=False)`)
and the ONNX importer (shape folding included). The reference is the TorchScript module itself.
A traced module remembers its example inputs' shapes; a scripted one needs --input.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from tasks.errors import TvmflowError
from tasks.importers.bundles import head, zip_names
from tasks.importers.formats.onnx_import import import_onnx
from tasks.importers.timing import median_ms
from tasks.importers.types import (
    ImportedModel,
    Importer,
    InputSpec,
    problems_error,
    resolve_inputs,
)

OPSET = 17
LEGACY_PICKLE = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # torch.save before the zip format
SAVE_INSTEAD = (
    "save the model itself: torch.jit.save(torch.jit.trace(model, example), 'model.pt') or "
    "torch.export.save(torch.export.export(model, (example,)), 'model.pt2')"
)


def detect(path: Path) -> bool:
    """A torch.jit archive holds code/ and constants.pkl; a torch.save checkpoint (state dict or pickled
    module) holds only data.pkl: that is an error saying what to save instead."""
    names = zip_names(path)
    if names is None:
        if head(path, len(LEGACY_PICKLE)) == LEGACY_PICKLE:
            raise TvmflowError(
                f"{Path(path).name} is a torch.save checkpoint (weights or a pickled module), not "
                f"a model graph; {SAVE_INSTEAD}"
            )
        return False
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        return True
    if any(n.endswith("/data.pkl") for n in names):
        raise TvmflowError(
            f"{Path(path).name} is a torch.save checkpoint (a state dict or a pickled module), not a "
            f"model graph; {SAVE_INSTEAD}"
        )
    return False


def load(path: Path):
    try:
        return torch.jit.load(str(path), map_location="cpu", _restore_shapes=True).eval()
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError and others
        raise TvmflowError(
            f"cannot load {Path(path).name} as TorchScript ({str(err).strip().splitlines()[0][:200]}); "
            "save it again with torch.jit.save"
        ) from None


def declared_inputs(module) -> list[InputSpec]:
    """forward's tensor arguments; shapes where tracing recorded them, else () (unknown)."""
    names = [a.name for a in module.forward.schema.arguments[1:]]
    values = list(module.forward.graph.inputs())[1:]
    specs = []
    for name, value in zip(names, values):
        kind = value.type()
        sizes = kind.sizes() if hasattr(kind, "sizes") else None
        dtype = kind.dtype() if hasattr(kind, "dtype") else None
        shape = tuple(int(d) if d is not None else -1 for d in sizes) if sizes else ()
        specs.append(InputSpec(name, shape, str(dtype).replace("torch.", "") if dtype is not None else "float32"))
    return specs


def _specs(module, overrides, batch):
    """Static specs: traced shapes (a dynamic first dim is the batch), --input for the rest."""
    given = {s.name: s for s in overrides or []}
    problems, known = [], []
    for spec in declared_inputs(module):
        if spec.shape:
            known.append(spec)
        elif spec.name in given:  # rank from --input, every dim open
            known.append(InputSpec(spec.name, (-1,) * len(given[spec.name].shape), given[spec.name].dtype))
        else:
            problems.append(
                f"TorchScript input {spec.name!r} has no recorded shape (a scripted module): give it "
                f"with --input {spec.name}:1x3x224x224:float32"
            )
    resolved = resolve_inputs(known, overrides, batch)
    problems += resolved.problems
    if problems:
        raise problems_error(problems)
    return resolved.specs, resolved.notes


def to_onnx(module, specs: list[InputSpec], out_path: Path) -> Path:
    example = tuple(torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in specs)
    try:
        torch.onnx.export(
            module,
            example,
            str(out_path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[s.name for s in specs],
            do_constant_folding=True,
        )
    except Exception as err:  # noqa: BLE001
        raise TvmflowError(
            f"torch.onnx.export of the TorchScript module failed: {str(err).strip().splitlines()[0][:300]}"
        ) from None
    return Path(out_path)


def import_torchscript(path: Path, overrides: list[InputSpec] | None = None, batch: int | None = None) -> ImportedModel:
    module = load(path)
    specs, notes = _specs(module, overrides, batch)
    with tempfile.TemporaryDirectory(prefix="tvmflow-ts-") as tmp:
        onnx_path = to_onnx(module, specs, Path(tmp) / "model.onnx")
        imported = import_onnx(onnx_path, specs)
    notes = (
        notes + [f"TorchScript converted with torch.onnx.export (TorchScript exporter, opset {OPSET})"] + imported.notes
    )
    return ImportedModel(imported.mod, specs, "torchscript", notes)


class TorchScriptRunner:
    """The TorchScript module in torch: what the user's C++/Python app ran."""

    def __init__(self, path: Path, input_names: list[str]):
        self._module, self.input_names = load(path), input_names

    def run(self, sample: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = self._module(*[torch.from_numpy(np.ascontiguousarray(sample[n])) for n in self.input_names])
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [o.detach().numpy() for o in outs]

    def latency_ms(self, sample: dict[str, np.ndarray]) -> float:
        return median_ms(lambda: self.run(sample))


def export_onnx(path: Path, out_path: Path, input_names: list[str]) -> Path:
    module = load(path)
    return to_onnx(module, _specs(module, None, None)[0], out_path)


IMPORTER = Importer(
    format="torchscript",
    framework="torchscript",
    description="TorchScript (.pt/.pth from torch.jit.save)",
    detect=detect,
    import_=import_torchscript,
    reference=TorchScriptRunner,
    export_onnx=export_onnx,
)
