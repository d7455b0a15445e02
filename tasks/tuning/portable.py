"""Ship tuning databases between machines as text, for tuning tasks that run on a Dask cluster.

A Dask worker on another machine has its own cache folder: a path it returns means nothing to
the flow, and a seed path the flow passes means nothing to it. The few-KB JSON files travel
inside the task's arguments and result instead, and land in content-addressed cache folders.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tasks.storage import cache
from tasks.tuning.pick_best import DB_FILES, has_db


def pack_db(folder: str | Path | None) -> dict[str, str] | None:
    """{file name: text} of a tuning database folder, or None if it has none."""
    if not folder or not has_db(folder):
        return None
    return {name: (Path(folder) / name).read_text() for name in DB_FILES}


def unpack_db(files: dict[str, str] | None, kind: str = "shipped-db") -> str | None:
    """Write packed database files into a cache folder named by their content; return its path."""
    if not files:
        return None
    digest = hashlib.sha256("\0".join(files[n] for n in DB_FILES).encode()).hexdigest()[:24]
    folder = cache.cache_root() / kind / digest
    if not has_db(folder):
        folder.mkdir(parents=True, exist_ok=True)
        for name in DB_FILES:
            tmp = folder / f".{name}.tmp"
            tmp.write_text(files[name])
            tmp.replace(folder / name)
    return str(folder)
