"""Content-addressed cache for step outputs.

Keys hash the bytes of a step's inputs, its config, the TVM version and the target, so a
re-run with nothing changed finds the earlier output, whatever Prefect run made it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("TVMFLOW_CACHE", Path.home() / ".cache" / "tvmflow"))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_key(*parts) -> str:
    """A short stable hash of JSON-able parts plus the TVM version."""
    import tvm

    blob = json.dumps([tvm.__version__, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def cache_root() -> Path:
    return Path(os.environ.get("TVMFLOW_CACHE", CACHE_ROOT))


def lookup(step: str, key: str) -> Path | None:
    """The finished output folder of `step` for `key`, or None."""
    folder = cache_root() / step / key
    return folder if (folder / ".complete").exists() else None


class CacheEntry:
    """Write a step's output into a temp folder; it becomes visible only when complete."""

    def __init__(self, step: str, key: str):
        self.final = cache_root() / step / key
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.final.parent))

    def commit(self) -> Path:
        (self.path / ".complete").write_text("")
        if self.final.exists():
            shutil.rmtree(self.final, ignore_errors=True)
        os.replace(self.path, self.final)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
