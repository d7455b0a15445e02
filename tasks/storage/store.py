"""The object store behind `--store`: any fsspec URI; s3:// through s3fs against any S3 endpoint.

Credentials come the usual botocore way (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, AWS_PROFILE and ~/.aws files). `s3://KEY:SECRET@bucket/x`
is accepted too, but such a URI is never logged, reported or written anywhere: every string
that reaches a user goes through `redact`. Store failures become one-line TvmflowErrors that say
what to fix (missing bucket, wrong credentials, unreachable endpoint).
"""

from __future__ import annotations

import os
import re
import threading
import uuid

from tasks.errors import TvmflowError, Unreachable

# scheme://user:secret@host -> scheme://***@host ; ?secret=...&token=... -> ***
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][\w+.-]*://)[^@\s'\"]+@")
_SECRET_QUERY = re.compile(r"(?i)([?&;][\w.-]*(?:key|secret|token|signature|password|credential)[\w.-]*=)[^&\s'\"]*")
_AWS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)
_FS_CACHE: dict = {}
_FS_LOCK = threading.Lock()


def redact(text) -> str:
    """`text` with credentials in any URI in it replaced by ***."""
    text = _USERINFO.sub(lambda m: m.group("scheme") + "***@", str(text))
    return _SECRET_QUERY.sub(r"\1***", text)


def split_credentials(uri: str) -> tuple[str, dict]:
    """(URI without credentials, fsspec options carrying them) for s3://KEY:SECRET@bucket/..."""
    match = re.match(r"^s3[an]?://([^:/@]+):([^@]*)@(.*)$", uri or "")  # AWS secrets may hold '/'
    if not match:
        return uri, {}
    from urllib.parse import unquote

    return f"s3://{match.group(3)}", {"key": unquote(match.group(1)), "secret": unquote(match.group(2))}


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def open_store(store: str):
    """(filesystem, root path) for a store URI; a plain path means a local folder.

    S3 filesystems are cached per URI options and AWS environment, so a changed environment
    (another profile, other keys) gets a fresh client rather than fsspec's cached one.
    """
    import fsspec

    clean, options = split_credentials(str(store))
    env = tuple(os.environ.get(k) for k in _AWS_ENV)
    ident = (clean.split("://")[0] if "://" in clean else "file", tuple(sorted(options.items())), env)
    try:
        if clean.startswith("s3://"):
            with _FS_LOCK:
                if ident not in _FS_CACHE:
                    _FS_CACHE[ident] = fsspec.filesystem("s3", skip_instance_cache=True, **options)
                fs = _FS_CACHE[ident]
            root = fs._strip_protocol(clean)
        else:
            fs, root = fsspec.core.url_to_fs(clean, **options)
    except (ImportError, ValueError) as err:
        raise TvmflowError(f"cannot open store {redact(store)!r}: {redact(err)}") from None
    return fs, root.rstrip("/")


def clean_uri(store: str) -> str:
    """The store URI without credentials (what reports and Prefect blocks may show)."""
    return redact(split_credentials(str(store))[0])


def _bucket(root: str) -> str:
    return root.split("/", 1)[0]


def store_error(err: BaseException, store: str, action: str = "accessing") -> TvmflowError:
    """One line that names the cause: missing bucket, wrong credentials, endpoint, or the error."""
    text = " ".join(redact(err).split())[:300]
    where = clean_uri(store)
    name = err.__class__.__name__
    low = text.lower()
    if "bucket does not exist" in low or "nosuchbucket" in low:
        bucket = _bucket(split_credentials(str(store))[0].split("://", 1)[-1])
        return TvmflowError(
            f"{action} {where} failed: bucket {bucket!r} does not exist; create it "
            "(e.g. `aws s3 mb s3://" + bucket + "`) or fix --store"
        )
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return TvmflowError(
            f"{action} {where} failed: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        )
    if isinstance(err, PermissionError) or "accessdenied" in low or "signature" in low or "access key" in low:
        return TvmflowError(
            f"{action} {where} failed: access denied ({text}); check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, and that the key may use this bucket"
        )
    if (
        name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError")
        or "could not connect" in low
        or "connection refused" in low
    ):
        return Unreachable(
            f"{action} {where} failed: cannot reach the S3 endpoint ({text}); check AWS_ENDPOINT_URL and the network"
        )
    return TvmflowError(f"{action} {where} failed ({name}: {text}); check the store URI and credentials")


def check_store(store: str) -> None:
    """Fail early, before hours of tuning, if the store's bucket or credentials are wrong."""
    fs, root = open_store(store)
    if is_local(fs):
        return
    try:
        fs.ls(_bucket(root), detail=False, refresh=True)
    except Exception as err:  # noqa: BLE001 - botocore raises many kinds; store_error names them
        raise store_error(err, store, "opening") from None


def stored_objects(fs, path: str) -> dict:
    """{path: info} of the objects under `path` (S3 servers may list empty "folders" too: not those)."""
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return {}
    return {p: i for p, i in found.items() if i.get("type") == "file" and i.get("StorageClass") != "DIRECTORY"}


def write_atomic(fs, path: str, data: bytes) -> None:
    """Readers see the old content or the new, never a torn file.

    An S3 PUT is atomic already; a local file is written beside the target and renamed.
    """
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    parent, name = os.path.split(path)
    tmp_dir = os.path.join(parent, f".tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp_dir)
    try:
        with fs.open(os.path.join(tmp_dir, name), "wb") as handle:
            handle.write(data)
        os.replace(os.path.join(tmp_dir, name), path)
    finally:
        import shutil

        shutil.rmtree(tmp_dir, ignore_errors=True)
