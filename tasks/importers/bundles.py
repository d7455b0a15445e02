"""Multi-file models (Keras arch.json + weights.h5, MXNet -symbol.json + -NNNN.params) travel as one
*bundle*: a directory in the model cache holding the parts, hashed together, so caching and
publishing see one model. Also the byte sniffers every format's detect() uses.

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
from tasks.importers.fetch import Fetched, fetch, read_bytes
from tasks.importers.types import UnknownFormat

ARCH, WEIGHTS = "model.json", "weights.h5"  # Keras names inside a bundle
SYMBOL, PARAMS = "model-symbol.json", "model-0000.params"  # MXNet names inside a bundle
PARAMS_MAGIC = (0x112).to_bytes(8, "little")  # kMXAPINDArrayListMagic: the MXNet .params header
MULTI_FILE_HELP = "a multi-file model is arch.json+weights.h5 (Keras) or prefix-symbol.json+prefix-NNNN.params (MXNet)"


# ------------------------------------------------------------------ sniffing
def head(path: Path, size: int = 64) -> bytes:
    """The first bytes of a file; b'' for a directory."""
    path = Path(path)
    if path.is_dir():
        return b""
    with open(path, "rb") as handle:
        return handle.read(size)


def zip_names(path: Path) -> list[str] | None:
    """The member names of a zip file; None for anything that is not a readable zip."""
    if not head(path, 4).startswith(b"PK"):
        return None
    try:
        return zipfile.ZipFile(path).namelist()
    except zipfile.BadZipFile:
        return None


def is_params(data: bytes) -> bool:
    return data[:8] == PARAMS_MAGIC


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def is_symbol_json(text: str) -> bool:
    data = _json(text)
    return isinstance(data, dict) and "nodes" in data and "arg_nodes" in data and "heads" in data


def is_architecture_json(text: str) -> bool:
    data = _json(text)
    return isinstance(data, dict) and "class_name" in data and "config" in data


def role(name: str, data: bytes) -> str:
    """What one part of a multi-file model is, from its bytes."""
    if data.startswith(b"\x89HDF"):
        return "keras-weights"
    if is_params(data):
        return "mxnet-params"
    text = data[: 1 << 22].decode("utf-8", "replace")
    if is_symbol_json(text):
        return "mxnet-symbol"
    if is_architecture_json(text):
        return "keras-arch"
    raise UnknownFormat(
        f"{name} is neither a Keras architecture json / weights h5 nor an MXNet symbol json / params file"
    )


def epoch(name: str) -> int:
    match = re.search(r"-(\d+)\.params$", name)
    return int(match.group(1)) if match else -1


def dir_parts(path: Path) -> dict[str, Path]:
    """Role -> file for a directory with one Keras json+h5 pair or one MXNet symbol+params pair."""
    parts: dict[str, list[Path]] = {}
    for child in sorted(Path(path).iterdir()):
        if child.is_file() and child.suffix in (".json", ".h5", ".params"):
            parts.setdefault(role(child.name, child.read_bytes()), []).append(child)
    if "mxnet-params" in parts:  # several epochs: the latest one
        parts["mxnet-params"] = sorted(parts["mxnet-params"], key=lambda p: epoch(p.name))[-1:]
    found = {r: files[0] for r, files in parts.items() if len(files) == 1}
    for pair in (("keras-arch", "keras-weights"), ("mxnet-symbol", "mxnet-params")):
        if all(r in found for r in pair) and len(parts) == 2:
            return {r: found[r] for r in pair}
    raise TvmflowError(
        f"directory {path} must hold one model: arch.json + weights.h5 (Keras) or "
        f"prefix-symbol.json + prefix-NNNN.params (MXNet); found {sorted(parts) or 'nothing'}"
    )


# ------------------------------------------------------------------ fetching
def is_multi_file(spec: str) -> bool:
    """A directory, a -symbol.json, or parts joined by `+` (one of them a .json: a file name with
    a `+` in it is still one file)."""
    local = Path(spec)
    joined = "+" in spec and not local.exists() and any(p.endswith(".json") for p in spec.split("+"))
    return local.is_dir() or spec.endswith("-symbol.json") or joined


def _part_uris(spec: str) -> list[str]:
    if Path(spec).is_dir():
        return [str(p) for p in dir_parts(Path(spec)).values()]
    if "+" in spec and not spec.endswith("-symbol.json"):
        return [p for p in spec.split("+") if p]
    import fsspec

    prefix = spec[: -len("-symbol.json")]
    try:
        fs, root = fsspec.core.url_to_fs(prefix + "-*.params")
        found = sorted(fs.glob(root), key=epoch)
    except Exception as err:  # noqa: BLE001 - remote listing can fail in many ways
        raise TvmflowError(
            f"cannot list the params next to {spec} ({err}); give symbol.json+params explicitly"
        ) from None
    if not found:
        raise TvmflowError(
            f"no {Path(prefix).name}-NNNN.params next to {spec}; put it there or give "
            f"--model {spec}+path/to/{Path(prefix).name}-0000.params"
        )
    params = found[-1]
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol not in ("file", "local") and "://" in spec:
        params = f"{protocol}://{params}"
    return [spec, params]


def write_bundle(parts: dict[str, bytes], dest: Path) -> None:
    """Lay the parts out under the names the Keras / MXNet importers read."""
    names = {"keras-arch": ARCH, "keras-weights": WEIGHTS, "mxnet-symbol": SYMBOL, "mxnet-params": PARAMS}
    for r, data in parts.items():
        (Path(dest) / names[r]).write_bytes(data)


def fetch_model_files(spec: str, dest_dir: Path) -> Fetched:
    """Fetch a model: one file as tasks.importers.fetch does, or the parts of a multi-file model into one
    bundle directory whose sha256 covers every part (so a changed weights file is a new model)."""
    if not is_multi_file(spec):
        return fetch(spec, dest_dir)
    parts = {}
    for uri in _part_uris(spec):
        data = read_bytes(uri)
        if not data:
            raise TvmflowError(f"{uri} is empty; give a model file with content")
        r = role(uri.rsplit("/", 1)[-1], data)
        if r in parts:
            raise TvmflowError(f"{spec}: two parts are both a {r}; give one of each")
        parts[r] = data
    if set(parts) not in ({"keras-arch", "keras-weights"}, {"mxnet-symbol", "mxnet-params"}):
        raise TvmflowError(f"{spec}: {MULTI_FILE_HELP}; got {sorted(parts)}")
    digest = hashlib.sha256(
        json.dumps({r: hashlib.sha256(data).hexdigest() for r, data in sorted(parts.items())}).encode()
    ).hexdigest()
    bundle = Path(dest_dir) / digest[:16] / "bundle"
    if not bundle.exists():
        tmp = bundle.with_name("bundle.part")
        tmp.mkdir(parents=True, exist_ok=True)
        write_bundle(parts, tmp)
        tmp.rename(bundle)
    return Fetched(uri=spec, path=bundle, sha256=digest, size=sum(len(d) for d in parts.values()))
