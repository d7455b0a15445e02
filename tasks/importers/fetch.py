"""Fetch models and data through fsspec: local paths, file://, s3://, http(s)://."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import TvmflowError, Unreachable


@dataclass(frozen=True)
class Fetched:
    uri: str
    path: Path
    sha256: str
    size: int


CONNECTION_ERRORS = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerTimeoutError")


def is_connection_error(err: BaseException) -> bool:
    """A refused / timed-out connection (worth a retry later), not a missing or unreadable file."""
    return isinstance(err, (ConnectionError, TimeoutError)) or any(
        cls.__name__ in CONNECTION_ERRORS for cls in type(err).__mro__
    )


def read_bytes(uri: str) -> bytes:
    import fsspec

    try:
        with fsspec.open(uri, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise TvmflowError(f"{uri} does not exist; check the path or URI") from None
    except PermissionError as err:
        raise TvmflowError(f"access to {uri} was denied ({err}); check the credentials") from None
    except Exception as err:
        if is_connection_error(err):
            raise Unreachable(f"cannot reach {uri}: {err.__class__.__name__}: {err}; check the network") from None
        if isinstance(err, (OSError, ValueError, ImportError)):
            raise TvmflowError(f"cannot read {uri}: {err.__class__.__name__}: {err}") from None
        raise


def fetch(uri: str, dest_dir: str | os.PathLike) -> Fetched:
    """Copy `uri` into dest_dir under its content hash, so identical bytes share one file."""
    data = read_bytes(uri)
    if not data:
        raise TvmflowError(f"{uri} is empty; give a model file with content")
    digest = hashlib.sha256(data).hexdigest()
    name = Path(uri.rstrip("/").split("/")[-1] or "model").name
    dest = Path(dest_dir) / digest[:16] / name
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    return Fetched(uri=uri, path=dest, sha256=digest, size=len(data))
