"""The one content-addressed cache for stage outputs.

A key (`stage_key`) hashes: tvmflow's own version, the stage's schema version (SCHEMA, bumped
when that stage's output changes), the TVM version, the target and the stage's inputs (content
hashes of model bytes, tuning databases, calibration data, options). An upgrade of tvmflow or
TVM, or a bumped schema, therefore misses every older entry instead of serving a stale one.
`refresh=True` on a lookup ignores what is cached (the `--refresh` flag); the new output then
replaces the old entry.

Why not Prefect's cache policies: the outputs are folders of files (an IRModule as JSON, a
shared library, MetaSchedule databases) that tuning workers on other machines, later flow
runs against another Prefect server and the benchmarks all reuse. Prefect's cache would pickle
the in-memory objects into its result storage per API, and its input hashing cannot see a
model's bytes behind a path. So the stages' Prefect tasks run with NO_CACHE and this module
caches by content, once, for every stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CACHE_ROOT = Path(os.environ.get("TVMFLOW_CACHE", Path.home() / ".cache" / "tvmflow"))

# Bump a stage's number when what it writes (or how it computes it) changes: older entries miss.
SCHEMA: dict[str, int] = {
    # import 1: fixpoint fusion, 2: QDQ models imported as real int8 (tasks/precision/qdq.py),
    # 4: prepare_for_tuning folds batch norm; ONNX import folds shape arithmetic, fixes the dynamic batch
    # 5: NHWC on this host's x86 CPU, the unlowered graph kept (graph.json) for the CPU pick-best
    "import": 5,
    "precision": 4,  # 3: the same import and batch-norm folding (it imports on its own); 4: calibration URI in info
    # build, untuned-latency: keyed by the prepared model's import / precision key, so they miss with them
    "tune": 2,
    "build": 3,  # 3: oneDNN per-operator pick-best on this host's x86 CPU
    "untuned-latency": 1,
    "value": 1,
}


def tvmflow_version() -> str:
    """The installed tvmflow's version (pyproject.toml); part of every key."""
    try:
        return importlib.metadata.version("tvmflow")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def tvm_version() -> str:
    import tvm

    return str(tvm.__version__)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def files_digest(folder: str | os.PathLike, names: tuple[str, ...] | list[str]) -> str:
    """One hash of several files' bytes (e.g. a tuning database's two JSON files)."""
    return hashlib.sha256("\0".join(sha256_file(Path(folder) / n) for n in names).encode()).hexdigest()


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts, tvmflow's version and TVM's version."""
    blob = json.dumps([tvmflow_version(), tvm_version(), *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def stage_key(stage: str, target: str, *parts: Any) -> str:
    """The cache key of one stage's output: its schema version, the target and its inputs."""
    if stage not in SCHEMA:
        raise KeyError(f"stage {stage!r} has no schema version in tasks.storage.cache.SCHEMA")
    return content_key(stage, SCHEMA[stage], target, *parts)


def cache_root() -> Path:
    return Path(os.environ.get("TVMFLOW_CACHE", CACHE_ROOT))


def lookup(step: str, key: str, refresh: bool = False) -> Path | None:
    """The finished output folder of `step` for `key`, or None (always None with `refresh`)."""
    if refresh:
        return None
    folder = cache_root() / step / key
    return folder if (folder / ".complete").exists() else None


class CacheEntry:
    """Write a step's output into a temp folder; it becomes visible only when complete.

    As a context manager it commits on success and removes the temp folder on any failure."""

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

    def __enter__(self) -> CacheEntry:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()


def cached_json(step: str, key: str, compute: Callable[[], Any], refresh: bool = False) -> tuple[Any, bool]:
    """(value, cache hit?) of a small JSON value (e.g. a slow untuned latency) cached under `key`."""
    hit = lookup(step, key, refresh)
    if hit:
        return json.loads((hit / "value.json").read_text()), True
    value = compute()
    with CacheEntry(step, key) as entry:
        (entry.path / "value.json").write_text(json.dumps(value))
        entry.commit()
    return value, False


@contextlib.contextmanager
def run_dir(prefix: str = "run-") -> Iterator[Path]:
    """A scratch folder for one run under the cache root, removed on success and on failure."""
    parent = cache_root() / "runs"
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as folder:
        yield Path(folder)
