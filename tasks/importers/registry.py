"""Every model format tvmflow reads, registered in ONE place.

Adding a format: write tasks/importers/formats/<name>_import.py with an `IMPORTER`
(tasks.importers.types.Importer: detect, import_, reference, export_onnx) and add it to IMPORTERS.
Detection reads the bytes, never the file name; the first importer whose detect() says yes wins.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tasks.errors import TvmflowError
from tasks.importers import bundles
from tasks.importers.fetch import Fetched
from tasks.importers.formats import (
    keras_import,
    mxnet_import,
    onnx_import,
    tflite_import,
    torch_import,
    torchscript_import,
)
from tasks.importers.types import ImportedModel, Importer, InputSpec, UnknownFormat

log = logging.getLogger("tvmflow")

# order matters: ONNX last (protobuf parses many byte strings)
IMPORTERS: tuple[Importer, ...] = (
    keras_import.IMPORTER,
    mxnet_import.IMPORTER,
    tflite_import.IMPORTER,
    torch_import.IMPORTER,
    torchscript_import.IMPORTER,
    onnx_import.IMPORTER,
)
BY_FORMAT = {imp.format: imp for imp in IMPORTERS}
BY_FRAMEWORK = {imp.framework: imp for imp in IMPORTERS}
FRAMEWORK = {imp.format: imp.framework for imp in IMPORTERS}
SUPPORTED = ", ".join(
    [
        IMPORTERS[-1].description,
        *(i.description for i in IMPORTERS[:-1]),
        "a package.module:callable factory returning (nn.Module, example inputs)",
    ]
)


def _with_list(err: UnknownFormat) -> TvmflowError:
    return TvmflowError(f"{err}; supported: {SUPPORTED}")


def detect(path: Path) -> Importer:
    """The importer for this model file or bundle directory; a one-line error listing every format."""
    path = Path(path)
    try:
        for importer in IMPORTERS:
            if importer.detect(path):
                return importer
    except UnknownFormat as err:
        raise _with_list(err) from None
    if bundles.head(path, 2) == b"PK":
        if bundles.zip_names(path) is None:
            raise TvmflowError(
                f"{path.name} looks like a zip archive but is corrupt or truncated; export the model again"
            )
        raise TvmflowError(
            f"{path.name} is a zip archive but not a torch.export .pt2 (nor a Keras .keras file, "
            f"nor TorchScript); supported: {SUPPORTED}"
        )
    raise TvmflowError(
        f"{path.name} is not a model this tool can read (corrupt, truncated, or an "
        f"unsupported format); supported: {SUPPORTED}"
    )


def detect_format(path: Path) -> str:
    """'onnx', 'pt2', 'torchscript', 'keras', 'mxnet' or 'tflite', from the bytes."""
    return detect(path).format


def framework_of(fmt: str) -> str:
    """The source framework of a detected format: what runs the validation reference."""
    return FRAMEWORK[fmt]


def import_model(path: Path, overrides: list[InputSpec] | None = None, batch: int | None = None) -> ImportedModel:
    """Relax of the model, with static input shapes: --input (`overrides`) and `batch` (for a dynamic
    batch dim, default 1) fix them; `notes` says what was changed on the way (batch, folding)."""
    imported = detect(path).import_(Path(path), overrides, batch)
    for note in imported.notes:  # once per import: the batch chosen, what was folded
        log.warning(note)
    return imported


def importer_for_framework(framework: str) -> Importer:
    if framework not in BY_FRAMEWORK:
        raise TvmflowError(f"no reference runner for framework {framework!r}; known: {sorted(BY_FRAMEWORK)}")
    return BY_FRAMEWORK[framework]


def reference_runner(framework: str, path: Path, input_names: list[str]):
    """An object with run(sample) -> outputs (and maybe latency_ms(sample)) in the source framework."""
    return importer_for_framework(framework).reference(Path(path), input_names)


def export_onnx(framework: str, path: Path, out_path: Path, input_names: list[str]) -> Path:
    """ONNX of the model for the onnxruntime baseline, where one can be made without new packages."""
    importer = importer_for_framework(framework)
    if importer.export_onnx is None:
        raise TvmflowError(f"no ONNX export for {framework} models (onnxruntime baseline skipped)")
    return importer.export_onnx(Path(path), Path(out_path), input_names)


def fetch_model_files(spec: str, dest_dir: Path) -> Fetched:
    """One model file, or a multi-file model's parts as one bundle directory (tasks.importers.bundles)."""
    try:
        return bundles.fetch_model_files(spec, dest_dir)
    except UnknownFormat as err:
        raise _with_list(err) from None
