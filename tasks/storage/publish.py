"""Publish a build to the object store: every file, then manifest.json, then LATEST.

Readers only follow LATEST, and LATEST moves only after the manifest (which lists the sha256
of every file) is in, so nobody ever sees half a build. A build folder without manifest.json is
an interrupted publish: readers never list or fetch it, and the next publish of the same
model/device removes it once it is older than PARTIAL_MAX_AGE_S (younger ones may still be
uploading).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

from tasks.errors import TvmflowError
from tasks.storage.cache import sha256_file

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
PARTIAL_MAX_AGE_S = 3600.0


def safe_segment(value: str, what: str) -> str:
    """Model/device names become path segments: refuse anything that could escape the prefix."""
    if not SAFE_NAME.match(value or "") or ".." in value:
        raise TvmflowError(
            f"{what} name {value!r} is not allowed: use letters, digits, '_', '-', '.' "
            "(no '/', '..', or control characters)"
        )
    return value


def store_fs(store: str):
    """(filesystem, root path) for a store URI; a plain path means a local folder (tasks.storage.store)."""
    from tasks.storage.store import open_store

    return open_store(store)


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


def publish_build(
    store: str, model: str, device: str, files: dict[str, Path], manifest_meta: dict, build_id: str | None = None
) -> dict:
    """Upload `files` (name -> local path), then manifest.json, then LATEST (not for a
    `build_only` manifest: unvalidated builds never become LATEST). Returns URIs.

    Any failure or interruption (Ctrl-C included) removes the half-written build folder and
    leaves LATEST where it was.
    """
    from tasks.storage.store import check_store, is_local, store_error, write_atomic

    fs, _ = store_fs(store)
    build_id = safe_segment(build_id or new_build_id(), "build id")
    base = build_prefix(store, model, device)
    prefix = join(base, build_id)
    for name in files:
        safe_segment(name, "file")
    entries = {}
    check_store(store)
    try:
        clean_partial_builds(fs, base)
        if is_local(fs):
            fs.makedirs(prefix, exist_ok=True)  # (s3fs's would create a missing bucket)
        for name, local in files.items():
            entries[name] = {"sha256": sha256_file(local), "size": Path(local).stat().st_size}
            fs.put_file(str(local), join(prefix, name))
            if fs.size(join(prefix, name)) != entries[name]["size"]:
                raise OSError(f"{name}: uploaded size differs from the local file")
        manifest = {
            **manifest_meta,
            "build_id": build_id,
            "model": model,
            "device": device,
            "files": entries,
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_atomic(fs, join(prefix, "manifest.json"), json.dumps(manifest, indent=2, sort_keys=True).encode())
        if not manifest.get("build_only"):  # a build-only build (never validated) is never LATEST
            write_atomic(fs, join(base, "LATEST"), build_id.encode())
    except BaseException as err:  # noqa: BLE001 - interrupted or failed: no half build stays behind
        _remove_quietly(fs, prefix)
        if isinstance(err, Exception) and not isinstance(err, TvmflowError):
            raise store_error(err, store, "publishing to") from None
        raise
    return {
        "build_id": build_id,
        "build_uri": uri_of(store, prefix),
        "manifest_uri": uri_of(store, join(prefix, "manifest.json")),
    }


def clean_partial_builds(fs, base: str, max_age_s: float = PARTIAL_MAX_AGE_S) -> list[str]:
    """Remove build folders under `base` that have no manifest.json and nothing newer than max_age_s.

    Returns the removed paths. A store we cannot list (nothing published yet) has nothing to clean.
    """
    from tasks.storage.store import stored_objects

    try:
        entries = fs.ls(base, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        path = entry["name"].rstrip("/")
        if entry.get("type") != "directory" or fs.exists(join(path, "manifest.json")):
            continue
        stored = stored_objects(fs, path)
        if not stored and "file" not in fs.protocol:
            continue  # an S3 "folder" with no objects in it holds nothing
        newest = max((_mtime(info) for info in stored.values()), default=0.0)
        if time.time() - newest >= max_age_s:
            _remove_quietly(fs, path)
            removed.append(path)
    return removed


def _mtime(info: dict) -> float:
    """Modification time of one listed object (local: mtime; S3: LastModified)."""
    value = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    if value is None:
        return time.time()  # unknown age: treat as fresh, never delete what might be uploading
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def _remove_quietly(fs, prefix: str) -> None:
    try:
        if fs.exists(prefix):
            fs.rm(prefix, recursive=True)
    except Exception:  # noqa: BLE001 - best effort; readers ignore folders without a manifest
        pass
