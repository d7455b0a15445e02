"""The import API other packages use: one facade over the format registry.

Formats live in tasks/importers/formats/ (one module each), registered in tasks/importers/registry.py;
shared records in tasks/importers/types.py. This module only re-exports, so callers need one name.
"""

from __future__ import annotations

from tasks.importers.formats.onnx_import import import_onnx
from tasks.importers.formats.torch_import import (
    export_factory,
    import_pt2,
    relax_from_program,
)
from tasks.importers.formats.torchscript_import import import_torchscript
from tasks.importers.registry import (
    SUPPORTED,
    detect_format,
    export_onnx,
    fetch_model_files,
    framework_of,
    import_model,
    reference_runner,
)
from tasks.importers.spec import FACTORY_RE, is_factory, model_name
from tasks.importers.types import (
    ImportedModel,
    InputSpec,
    check_overrides,
    parse_input_spec,
    resolve_inputs,
    unsupported_error,
)

__all__ = [
    "FACTORY_RE",
    "SUPPORTED",
    "ImportedModel",
    "InputSpec",
    "check_overrides",
    "detect_format",
    "export_factory",
    "export_onnx",
    "fetch_model_files",
    "framework_of",
    "import_model",
    "import_onnx",
    "import_pt2",
    "import_torchscript",
    "is_factory",
    "model_name",
    "parse_input_spec",
    "reference_runner",
    "relax_from_program",
    "resolve_inputs",
    "unsupported_error",
]
