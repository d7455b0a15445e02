"""Run the model in its source framework: the reference outputs and latency to beat."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tasks.errors import TvmflowError


def wall_times_ms(fn, repeat: int = 20, warmup: int = 3) -> list[float]:
    """Wall time of each of `repeat` calls of fn(), after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def _median_ms(fn, warmup: int = 3, repeat: int = 20) -> float:
    return float(np.median(wall_times_ms(fn, repeat, warmup)))


class Reference:
    """The model as its framework runs it (onnxruntime for ONNX, torch for PyTorch; Keras, MXNet
    and the LiteRT interpreter for the formats of tasks/formats)."""

    def __init__(self, path: Path, framework: str, input_names: list[str]):
        self.framework, self.input_names, self.path = framework, input_names, Path(path)
        self._runner = None
        if framework in ("keras", "mxnet", "tflite"):
            from tasks.importers.formats import reference_runner

            self._runner = reference_runner(framework, self.path, input_names)
        elif framework == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            self._outputs_session = self._session
            from tasks.precision.qdq import is_qdq_file

            if is_qdq_file(self.path):  # outputs: the QDQ graph as ONNX defines it (tasks/precision/qdq.py says why)
                exact = ort.SessionOptions()
                exact.log_severity_level = 3
                exact.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                self._outputs_session = ort.InferenceSession(str(path), exact, providers=["CPUExecutionProvider"])
        elif framework == "torch":
            import torch

            self._module = torch.export.load(str(path)).module()
        else:
            raise TvmflowError(f"no reference runner for framework {framework!r}")

    def run(self, sample: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._runner is not None:
            return self._runner.run(sample)
        if self.framework == "onnx":
            return [np.asarray(o) for o in self._outputs_session.run(None, {n: sample[n] for n in self.input_names})]
        import torch

        with torch.no_grad():
            out = self._module(*[torch.from_numpy(np.ascontiguousarray(sample[n])) for n in self.input_names])
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [o.detach().numpy() for o in outs]

    def latency_ms(self, sample: dict[str, np.ndarray]) -> float:
        if hasattr(self._runner, "latency_ms"):  # timed inside the framework's own process
            return self._runner.latency_ms(sample)
        if self.framework == "onnx":  # the optimized session: what onnxruntime users run
            return _median_ms(lambda: self._session.run(None, {n: sample[n] for n in self.input_names}))
        return _median_ms(lambda: self.run(sample))


def onnxruntime_latency(onnx_path: Path, sample: dict[str, np.ndarray]) -> float:
    return Reference(onnx_path, "onnx", list(sample)).latency_ms(sample)


def export_onnx_for_baseline(pt2_path: Path, out_path: Path) -> Path:
    """ONNX of a torch program (or of a Keras / MXNet model), so onnxruntime can be timed on the same input."""
    import torch

    from tasks.importers.model_import import detect_format, framework_of

    fmt = detect_format(Path(pt2_path))
    if fmt != "pt2":
        from tasks.importers.formats import export_onnx

        return export_onnx(framework_of(fmt), Path(pt2_path), Path(out_path), [])

    program = torch.export.load(str(pt2_path))
    torch.onnx.export(program, (), str(out_path), dynamo=True, external_data=False, verbose=False)
    return out_path
