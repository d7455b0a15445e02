"""Publish a build to the object store: every file, then manifest.json, then LATEST.

Readers only follow LATEST, and LATEST moves only after the manifest (which lists the sha256
of every file) is in, so nobody ever sees half a build.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

from tasks.cache import sha256_file
from tasks.errors import TvmflowError

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def safe_segment(value: str, what: str) -> str:
    """Model/device names become path segments: refuse anything that could escape the prefix."""
    if not SAFE_NAME.match(value or "") or ".." in value:
        raise TvmflowError(f"{what} name {value!r} is not allowed: use letters, digits, '_', '-', '.' "
                           "(no '/', '..', or control characters)")
    return value


def store_fs(store: str):
    """(filesystem, root path) for a store URI; a plain path means a local folder."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(store)
    except (ImportError, ValueError) as err:
        raise TvmflowError(f"cannot open store {store!r}: {err}") from None
    return fs, root.rstrip("/")


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def new_build_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def build_prefix(store: str, model: str, device: str, build_id: str = "") -> str:
    fs, root = store_fs(store)
    base = join(root, "builds", safe_segment(model, "model"), safe_segment(device, "device"))
    return join(base, build_id) if build_id else base


def uri_of(store: str, path: str) -> str:
    fs, _ = store_fs(store)
    return fs.unstrip_protocol(path)


def publish_build(store: str, model: str, device: str, files: dict[str, Path], manifest_meta: dict,
                  build_id: str | None = None) -> dict:
    """Upload `files` (name -> local path), then manifest.json, then LATEST. Returns URIs."""
    fs, _ = store_fs(store)
    build_id = build_id or new_build_id()
    prefix = build_prefix(store, model, device, build_id)
    entries = {}
    try:
        fs.makedirs(prefix, exist_ok=True)
        for name, local in files.items():
            entries[name] = {"sha256": sha256_file(local), "size": Path(local).stat().st_size}
            fs.put_file(str(local), join(prefix, name))
        manifest = {**manifest_meta, "build_id": build_id, "model": model, "device": device,
                    "files": entries, "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with fs.open(join(prefix, "manifest.json"), "w") as handle:
            handle.write(json.dumps(manifest, indent=2, sort_keys=True))
        with fs.open(join(build_prefix(store, model, device), "LATEST"), "w") as handle:
            handle.write(build_id)
    except (OSError, PermissionError) as err:
        _remove_quietly(fs, prefix)
        raise TvmflowError(f"publishing to {store} failed ({err.__class__.__name__}: {err}); "
                           "check the store URI and credentials") from None
    return {"build_id": build_id, "build_uri": uri_of(store, prefix),
            "manifest_uri": uri_of(store, join(prefix, "manifest.json"))}


def _remove_quietly(fs, prefix: str) -> None:
    try:
        if fs.exists(prefix):
            fs.rm(prefix, recursive=True)
    except OSError:
        pass
