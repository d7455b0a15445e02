"""One module per model format, each exposing an `IMPORTER` (tasks.importers.types.Importer).

They are registered in tasks/importers/registry.py, the one place that lists them. Multi-file models
(Keras json+h5, MXNet symbol+params) are fetched as bundles by tasks/importers/bundles.py.
"""

from __future__ import annotations

from tasks.importers.bundles import fetch_model_files, is_multi_file

__all__ = ["fetch_model_files", "is_multi_file"]
