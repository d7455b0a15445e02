"""MXNet 1.9.1 Gluon exports (`prefix-symbol.json` + `prefix-NNNN.params`): an optional extra.

MXNet cannot live in the main environment (it needs numpy<2 and numpy alias shims, and it changes
thread settings), so `bash scripts/setup-mxnet.sh` makes a small converter environment,
`.venv-mxnet` (pins in requirements-mxnet.txt; override its python with TVMFLOW_MXNET_PYTHON).
mxnet_tool.py runs there: it converts the model to ONNX (the interchange; then the ONNX importer
takes over) and serves the MXNet reference outputs. Without it, nothing else changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import weakref
from pathlib import Path

import numpy as np

from tasks.errors import TvmflowError
from tasks.importers.bundles import (
    PARAMS,
    SYMBOL,
    dir_parts,
    head,
    is_symbol_json,
)
from tasks.importers.formats.onnx_import import import_onnx
from tasks.importers.types import ImportedModel, Importer

ROOT = Path(__file__).resolve().parents[3]
TOOL = Path(__file__).with_name("mxnet_tool.py")
SETUP_HINT = "run `bash scripts/setup-mxnet.sh` (it creates .venv-mxnet with MXNet 1.9.1; the main env stays as it is)"


def converter_python() -> Path:
    """The converter environment's python; a clear error when the extra is not installed."""
    python = Path(os.environ.get("TVMFLOW_MXNET_PYTHON") or ROOT / ".venv-mxnet" / "bin" / "python")
    if not python.exists():
        raise TvmflowError(f"MXNet models need the optional converter environment ({python} is missing): {SETUP_HINT}")
    return python


def _files(path: Path) -> tuple[Path, Path]:
    if (path / SYMBOL).exists():
        return path / SYMBOL, path / PARAMS
    parts = dir_parts(path)
    return parts["mxnet-symbol"], parts["mxnet-params"]


def _env() -> dict:
    env = dict(os.environ, PYTHONNOUSERSITE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    env.pop("PYTHONPATH", None)  # nothing of the main env leaks in
    return env


def convert(path: Path, overrides=None) -> Path:
    """ONNX of the bundle for these input shapes, converted once and kept next to the bundle."""
    symbol, params = _files(Path(path))
    args = [a for s in overrides or [] for a in ("--input", str(s))]
    key = hashlib.sha256(" ".join(args).encode()).hexdigest()[:12]
    out = Path(path) / "converted" / f"{key}.onnx"
    if out.exists():
        return out
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".part.onnx")
    proc = subprocess.run(
        [str(converter_python()), str(TOOL), "convert", str(symbol), str(params), str(tmp), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    reply = json.loads(lines[-1]) if lines else {}
    if proc.returncode != 0:
        detail = reply.get("error") or (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise TvmflowError(f"MXNet to ONNX conversion failed: {detail}")
    os.replace(tmp, out)
    (out.parent / "latest").write_text(out.name)
    return out


def converted_onnx(path: Path) -> Path:
    latest = Path(path) / "converted" / "latest"
    if not latest.exists():
        raise TvmflowError("the MXNet model has not been converted to ONNX yet")
    return latest.parent / latest.read_text().strip()


def import_mxnet(path: Path, overrides=None, batch: int | None = None) -> ImportedModel:
    onnx_path = convert(path, overrides)
    imported = import_onnx(onnx_path, None, batch)
    return ImportedModel(imported.mod, imported.inputs, "mxnet", imported.notes)


class MXNetRunner:
    """MXNet itself, in one long-lived converter-env process (MXNet takes seconds to import)."""

    def __init__(self, path: Path, input_names: list[str]):
        symbol, params = _files(Path(path))
        self.input_names = input_names
        self._tmp = tempfile.TemporaryDirectory(prefix="tvmflow-mxnet-")
        self._stderr = Path(self._tmp.name) / "stderr.log"
        with open(self._stderr, "w") as log:  # a file, not a pipe: MXNet's warnings never block it
            self._proc = subprocess.Popen(
                [str(converter_python()), str(TOOL), "serve", str(symbol), str(params)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=_env(),
            )
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop, self._proc, self._tmp)  # also runs at exit
        hello = self._reply()
        if not hello.get("ready"):
            raise TvmflowError(f"the MXNet reference did not start: {hello.get('error', 'no reply')}")

    def _reply(self) -> dict:
        stdout = self._proc.stdout
        assert stdout is not None  # started with stdout=PIPE
        line = stdout.readline()
        while line and not line.startswith("{"):
            line = stdout.readline()
        if not line:
            err = self._stderr.read_text().strip().splitlines() if self._stderr.exists() else []
            raise TvmflowError(f"the MXNet reference process exited: {(err or ['no output'])[-1][:300]}")
        return json.loads(line)

    def _call(self, sample: dict[str, np.ndarray], repeat: int = 0) -> tuple[list[np.ndarray], float | None]:
        with self._lock:
            src, dst = Path(self._tmp.name) / "in.npz", Path(self._tmp.name) / "out.npz"
            arrays = {n: np.ascontiguousarray(sample[n]) for n in self.input_names}
            np.savez(src, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
            stdin = self._proc.stdin
            assert stdin is not None  # started with stdin=PIPE
            stdin.write(json.dumps({"in": str(src), "out": str(dst), "repeat": repeat}) + "\n")
            stdin.flush()
            reply = self._reply()
            if not reply.get("ok"):
                raise TvmflowError(f"MXNet reference run failed: {reply.get('error')}")
            with np.load(dst) as out:
                return [out[f"arr_{i}"] for i in range(len(out.files))], reply.get("ms")

    def run(self, sample: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._call(sample)[0]

    def latency_ms(self, sample: dict[str, np.ndarray]) -> float:
        """Timed inside the MXNet process, without the pipe and file hand-over."""
        ms = self._call(sample, repeat=20)[1]
        if ms is None:
            raise TvmflowError("the MXNet reference returned no timing")
        return float(ms)

    def close(self) -> None:
        self._finalizer()


def _stop(proc: subprocess.Popen, tmp) -> None:
    if proc.poll() is None and proc.stdin is not None:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    tmp.cleanup()


def detect(path: Path) -> bool:
    """A bundle directory with a symbol json; a lone symbol json is an error naming the params to add."""
    path = Path(path)
    if path.is_dir():
        return "mxnet-symbol" in dir_parts(path)
    if head(path).lstrip()[:1] == b"{" and is_symbol_json(path.read_text(errors="replace")):
        raise TvmflowError(
            f"{path.name} is an MXNet symbol without its weights; give "
            f"--model {path.name}+<prefix>-NNNN.params, or keep the params next to a -symbol.json"
        )
    return False


IMPORTER = Importer(
    format="mxnet",
    framework="mxnet",
    description="MXNet Gluon export (prefix-symbol.json [+ prefix-NNNN.params], optional extra)",
    detect=detect,
    import_=import_mxnet,
    reference=MXNetRunner,
    export_onnx=lambda path, out, names: converted_onnx(path),
)


if __name__ == "__main__":  # pragma: no cover - `python -m tasks.importers.formats.mxnet_import` prints where it looks
    print(converter_python())
    sys.exit(0)
