"""Run the model in its source framework: the reference outputs and latency to beat.

Which framework runs which format is the registry's business (tasks/importers/registry.py);
this module is the one object the pipeline holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.importers.registry import detect, export_onnx, reference_runner
from tasks.importers.timing import median_ms, wall_times_ms

__all__ = ["Reference", "export_onnx_for_baseline", "median_ms", "onnxruntime_latency", "wall_times_ms"]


class Reference:
    """The model as its framework runs it (onnxruntime for ONNX, torch for .pt2 and TorchScript,
    Keras, MXNet and the LiteRT interpreter for the others)."""

    def __init__(self, path: Path, framework: str, input_names: list[str]):
        self.framework, self.input_names, self.path = framework, input_names, Path(path)
        self._runner = reference_runner(framework, self.path, input_names)

    def run(self, sample: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._runner.run(sample)

    def latency_ms(self, sample: dict[str, np.ndarray]) -> float:
        if hasattr(self._runner, "latency_ms"):  # timed inside the framework's own process
            return self._runner.latency_ms(sample)
        return median_ms(lambda: self.run(sample))


def onnxruntime_latency(onnx_path: Path, sample: dict[str, np.ndarray]) -> float:
    return Reference(onnx_path, "onnx", list(sample)).latency_ms(sample)


def export_onnx_for_baseline(model_path: Path, out_path: Path) -> Path:
    """ONNX of any model (a .pt2, TorchScript, Keras, MXNet), so onnxruntime can be timed on the same input."""
    importer = detect(Path(model_path))
    return export_onnx(importer.framework, Path(model_path), Path(out_path), [])
