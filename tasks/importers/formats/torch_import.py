"""PyTorch: torch.export `.pt2` ExportedPrograms and `package.module:callable` factories (exported
to `.pt2` first), imported with `tvm.relax.frontend.torch`. The reference is the program's module."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch

from tasks.errors import TvmflowError
from tasks.importers.bundles import zip_names
from tasks.importers.timing import median_ms
from tasks.importers.types import ImportedModel, Importer, InputSpec, import_failed


def detect(path: Path) -> bool:
    names = zip_names(path) or []
    return any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names)


def export_factory(spec: str, dest: Path, input_override: list[InputSpec] | None = None) -> Path:
    """Call the factory, torch.export its module, and save it as a .pt2 file."""
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


def relax_from_program(program, source: str):
    """Relax from a torch ExportedProgram; an unsupported operator is named in the error."""
    from tvm.relax.frontend.torch import from_exported_program

    try:
        return from_exported_program(program, unwrap_unit_return_tuple=True)
    except Exception as err:  # noqa: BLE001 - the importer raises many types
        raise import_failed(source, err) from None


def program_inputs(program) -> list[InputSpec]:
    specs = []
    for node in program.graph.find_nodes(op="placeholder"):
        if node.name in program.graph_signature.user_inputs:
            meta = node.meta["val"]
            specs.append(InputSpec(node.name, tuple(int(d) for d in meta.shape), str(meta.dtype).replace("torch.", "")))
    return specs


def load_program(path: Path):
    try:
        return torch.export.load(str(path))
    except Exception as err:  # noqa: BLE001
        raise TvmflowError(
            f"cannot load {Path(path).name} as a torch.export program ({str(err).splitlines()[0]}); "
            "the file may be corrupt or truncated: export it again"
        ) from None


def import_pt2(path: Path, overrides: list[InputSpec] | None = None, batch: int | None = None) -> ImportedModel:
    """A .pt2 has static shapes: --input may only restate them (batch does not apply)."""
    program = load_program(path)
    specs = program_inputs(program)
    for given in overrides or []:
        match = [s for s in specs if s.name == given.name]
        if not match:
            raise TvmflowError(
                f"--input {given.name!r} is not an input of the model; its inputs are {[s.name for s in specs]}"
            )
        if match[0].shape != given.shape or match[0].dtype != given.dtype:
            raise TvmflowError(
                f"--input {given} does not match the exported program's static input {match[0]}; "
                "export the model with that shape"
            )
    notes = [f"--batch {batch} ignored: a .pt2 program has static shapes"] if batch not in (None, 1) else []
    return ImportedModel(relax_from_program(program, "PyTorch"), specs, "torch", notes)


class TorchRunner:
    """The ExportedProgram's module in eager torch."""

    def __init__(self, path: Path, input_names: list[str]):
        self._module, self.input_names = load_program(path).module(), input_names

    def run(self, sample: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = self._module(*[torch.from_numpy(np.ascontiguousarray(sample[n])) for n in self.input_names])
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [o.detach().numpy() for o in outs]

    def latency_ms(self, sample: dict[str, np.ndarray]) -> float:
        return median_ms(lambda: self.run(sample))


def export_onnx(path: Path, out_path: Path, input_names: list[str]) -> Path:
    """ONNX of the program (dynamo exporter), so onnxruntime can be timed on the same input."""
    torch.onnx.export(load_program(path), (), str(out_path), dynamo=True, external_data=False, verbose=False)
    return Path(out_path)


IMPORTER = Importer(
    format="pt2",
    framework="torch",
    description="PyTorch ExportedProgram (.pt2)",
    detect=detect,
    import_=import_pt2,
    reference=TorchRunner,
    export_onnx=export_onnx,
)
