"""Model formats beyond ONNX and torch: Keras 3 (.keras, .h5, json + weights), MXNet Gluon exports
(-symbol.json + -NNNN.params, optional extra) and TFLite flatbuffers. One module per format.

Everything is detected from content. Multi-file models travel as one *bundle*: a directory in the
model cache holding the parts, hashed together, so caching and publishing see one model.

URI conventions for multi-file models (`tvmflow compile --model ...`):
- `arch.json+weights.h5`, `net-symbol.json+net-0010.params`: the parts joined by `+`;
- `path/net-symbol.json`: the params are found next to it (`net-NNNN.params`, highest epoch);
- a local directory holding exactly one such pair.
"""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path

from tasks.errors import TvmflowError

SUPPORTED = ("ONNX (.onnx), PyTorch ExportedProgram (.pt2), a package.module:callable factory, "
             "Keras 3 (.keras, full-model .h5, or arch.json+weights.h5), TFLite (.tflite), "
             "MXNet Gluon export (prefix-symbol.json [+ prefix-NNNN.params], optional extra)")
FRAMEWORK = {"onnx": "onnx", "pt2": "torch", "keras": "keras", "mxnet": "mxnet", "tflite": "tflite"}


# ------------------------------------------------------------------ detection
def _role(name: str, data: bytes) -> str:
    """What one part of a multi-file model is, from its bytes."""
    from tasks.importers.formats import keras_import, mxnet_import

    if data.startswith(b"\x89HDF"):
        return "keras-weights"
    if mxnet_import.is_params(data):
        return "mxnet-params"
    text = data[:1 << 22].decode("utf-8", "replace")
    if mxnet_import.is_symbol_json(text):
        return "mxnet-symbol"
    if keras_import.is_architecture_json(text):
        return "keras-arch"
    raise TvmflowError(f"{name} is neither a Keras architecture json / weights h5 nor an MXNet symbol json / "
                       f"params file; supported: {SUPPORTED}")


def _dir_parts(path: Path) -> dict[str, Path]:
    """Role -> file for a directory with one Keras json+h5 pair or one MXNet symbol+params pair."""
    parts: dict[str, list[Path]] = {}
    for child in sorted(path.iterdir()):
        if child.is_file() and child.suffix in (".json", ".h5", ".params"):
            parts.setdefault(_role(child.name, child.read_bytes()), []).append(child)
    if "mxnet-params" in parts:  # several epochs: the latest one
        parts["mxnet-params"] = sorted(parts["mxnet-params"], key=lambda p: _epoch(p.name))[-1:]
    found = {role: files[0] for role, files in parts.items() if len(files) == 1}
    for pair in (("keras-arch", "keras-weights"), ("mxnet-symbol", "mxnet-params")):
        if all(role in found for role in pair) and len(parts) == 2:
            return {role: found[role] for role in pair}
    raise TvmflowError(f"directory {path} must hold one model: arch.json + weights.h5 (Keras) or "
                       f"prefix-symbol.json + prefix-NNNN.params (MXNet); found {sorted(parts) or 'nothing'}")


def detect(path: Path) -> str | None:
    """'keras' | 'mxnet' | 'tflite' for the formats of this package, None for anything else
    (ONNX, .pt2); a one-line error for a recognised but incomplete or unreadable model."""
    from tasks.importers.formats import keras_import, mxnet_import, tflite_import

    path = Path(path)
    if path.is_dir():
        return "keras" if "keras-arch" in _dir_parts(path) else "mxnet"
    head = path.read_bytes()[:64]
    if tflite_import.is_tflite(head):
        tflite_import.load(path)  # a truncated flatbuffer fails here, with a clear error
        return "tflite"
    if head.startswith(b"PK"):
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile:
            return None  # model_import reports the corrupt archive
        return "keras" if keras_import.is_keras_zip(names) else None
    if head.startswith(b"\x89HDF"):
        kind = keras_import.h5_kind(path)
        if kind == "model":
            return "keras"
        if kind.startswith("weights"):
            raise TvmflowError(f"{path.name} holds Keras weights only; give the architecture too: "
                               f"--model arch.json+{path.name}")
        raise TvmflowError(f"{path.name} is an HDF5 file but not a Keras model; supported: {SUPPORTED}")
    if head.lstrip()[:1] == b"{":
        text = path.read_text(errors="replace")
        if mxnet_import.is_symbol_json(text):
            raise TvmflowError(f"{path.name} is an MXNet symbol without its weights; give "
                               f"--model {path.name}+<prefix>-NNNN.params, or keep the params next to a -symbol.json")
        if keras_import.is_architecture_json(text):
            raise TvmflowError(f"{path.name} is a Keras architecture without weights; give --model {path.name}+weights.h5")
    return None


# ------------------------------------------------------------------ fetching multi-file models
def is_multi_file(spec: str) -> bool:
    """A directory, a -symbol.json, or parts joined by `+` (one of them a .json: a file name with
    a `+` in it is still one file)."""
    local = Path(spec)
    joined = "+" in spec and not local.exists() and any(p.endswith(".json") for p in spec.split("+"))
    return local.is_dir() or spec.endswith("-symbol.json") or joined


def _epoch(name: str) -> int:
    match = re.search(r"-(\d+)\.params$", name)
    return int(match.group(1)) if match else -1


def _part_uris(spec: str) -> list[str]:
    if Path(spec).is_dir():
        return [str(p) for p in _dir_parts(Path(spec)).values()]
    if "+" in spec and not spec.endswith("-symbol.json"):
        return [p for p in spec.split("+") if p]
    import fsspec

    prefix = spec[: -len("-symbol.json")]
    try:
        fs, root = fsspec.core.url_to_fs(prefix + "-*.params")
        found = sorted(fs.glob(root), key=_epoch)
    except Exception as err:  # noqa: BLE001 - remote listing can fail in many ways
        raise TvmflowError(f"cannot list the params next to {spec} ({err}); give symbol.json+params explicitly") from None
    if not found:
        raise TvmflowError(f"no {Path(prefix).name}-NNNN.params next to {spec}; put it there or give "
                           f"--model {spec}+path/to/{Path(prefix).name}-0000.params")
    params = found[-1]
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol not in ("file", "local") and "://" in spec:
        params = f"{protocol}://{params}"
    return [spec, params]


def fetch_model_files(spec: str, dest_dir: Path):
    """Fetch a model: one file as tasks.importers.fetch does, or the parts of a multi-file model into one
    bundle directory whose sha256 covers every part (so a changed weights file is a new model)."""
    from tasks.importers.fetch import Fetched, fetch, read_bytes

    if not is_multi_file(spec):
        return fetch(spec, dest_dir)
    uris = _part_uris(spec)
    parts = {}
    for uri in uris:
        data = read_bytes(uri)
        if not data:
            raise TvmflowError(f"{uri} is empty; give a model file with content")
        role = _role(uri.rsplit("/", 1)[-1], data)
        if role in parts:
            raise TvmflowError(f"{spec}: two parts are both a {role}; give one of each")
        parts[role] = data
    if set(parts) not in ({"keras-arch", "keras-weights"}, {"mxnet-symbol", "mxnet-params"}):
        raise TvmflowError(f"{spec}: a multi-file model is arch.json+weights.h5 (Keras) or "
                           f"prefix-symbol.json+prefix-NNNN.params (MXNet); got {sorted(parts)}")
    digest = hashlib.sha256(json.dumps(
        {role: hashlib.sha256(data).hexdigest() for role, data in sorted(parts.items())}).encode()).hexdigest()
    bundle = Path(dest_dir) / digest[:16] / "bundle"
    if not bundle.exists():
        tmp = bundle.with_name("bundle.part")
        tmp.mkdir(parents=True, exist_ok=True)
        from tasks.importers.formats import keras_import, mxnet_import

        (keras_import if "keras-arch" in parts else mxnet_import).write_bundle(parts, tmp)
        tmp.rename(bundle)
    return Fetched(uri=spec, path=bundle, sha256=digest, size=sum(len(d) for d in parts.values()))


# ------------------------------------------------------------------ import, reference, baseline
def import_model(fmt: str, path: Path, overrides=None):
    from tasks.importers.formats import keras_import, mxnet_import, tflite_import

    importer = {"keras": keras_import.import_keras, "mxnet": mxnet_import.import_mxnet,
                "tflite": tflite_import.import_tflite}[fmt]
    return importer(Path(path), overrides)


def reference_runner(framework: str, path: Path, input_names: list[str]):
    """An object with run(sample) -> outputs (and maybe latency_ms(sample)) in the source framework."""
    from tasks.importers.formats import keras_import, mxnet_import, tflite_import

    runner = {"keras": keras_import.KerasRunner, "mxnet": mxnet_import.MXNetRunner,
              "tflite": tflite_import.TFLiteRunner}.get(framework)
    if runner is None:
        raise TvmflowError(f"no reference runner for framework {framework!r}")
    return runner(Path(path), input_names)


def export_onnx(framework: str, path: Path, out_path: Path, input_names: list[str]) -> Path:
    """ONNX of the model for the onnxruntime baseline, where one can be made without new packages."""
    from tasks.importers.formats import keras_import, mxnet_import

    if framework == "keras":
        return keras_import.export_onnx(path, out_path, input_names)
    if framework == "mxnet":
        return mxnet_import.converted_onnx(path)
    raise TvmflowError(f"no ONNX export for {framework} models (onnxruntime baseline skipped)")
