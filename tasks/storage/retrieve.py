"""Get published builds back out of the store: list them, fetch one verified, load it to run.

Loading a .so runs its code, so nothing is handed over before every file's sha256 and size
match the manifest. A build-only build (published for a device no worker could run it on:
manifest `build_only: true`, validation not run) is never LATEST and is fetched only when asked
for with `allow_unvalidated`. A fetch downloads into a temporary folder beside `out_dir`, verifies, and
only then moves the files in: on any mismatch it raises and `out_dir` is left as it was
(absent, or empty). Only folders with a manifest.json are builds; LATEST names the newest.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tasks.errors import TvmflowError
from tasks.runlog import native_stderr_muted
from tasks.storage.publish import build_prefix, join, safe_segment, store_fs, uri_of
from tasks.storage.store import check_store, clean_uri, store_error


@dataclass
class FetchedBuild:
    path: Path
    build_id: str
    manifest: dict
    files: list[str] = field(default_factory=list)

    @property
    def validated(self) -> bool:
        return is_validated(self.manifest)


def is_validated(manifest: dict) -> bool:
    """False for a build-only one (validation never ran). A build that failed validation is never
    published, so every other build passed it."""
    return not manifest.get("build_only")


def _read(fs, path: str, store: str, missing: str) -> bytes:
    try:
        return fs.cat_file(path)
    except FileNotFoundError as err:
        if "bucket" in str(err).lower():
            raise store_error(err, store, "reading") from None
        raise TvmflowError(missing) from None
    except Exception as err:  # noqa: BLE001 - credentials, endpoint: one line via store_error
        raise store_error(err, store, "reading") from None


def resolve_build(
    store: str, model: str, device: str, build: str | None = "latest", allow_unvalidated: bool = False
) -> str:
    """The build id `build` names: itself, or what LATEST holds for 'latest' (with
    `allow_unvalidated` and no LATEST: the newest build, build-only ones included)."""
    fs, _ = store_fs(store)
    base = build_prefix(store, model, device)
    if build in (None, "", "latest"):
        if allow_unvalidated and not fs.exists(join(base, "LATEST")):
            rows = list_builds(store, model, device)
            if rows:
                return rows[0]["build_id"]
        text = (
            _read(
                fs,
                join(base, "LATEST"),
                store,
                f"no published build of {model!r} for device {device!r} in {clean_uri(store)}; "
                "see `tvmflow builds` for what there is",
            )
            .decode()
            .strip()
        )
        return safe_segment(text, "build id")
    return safe_segment(build, "build id")


def read_manifest(store: str, model: str, device: str, build_id: str) -> dict:
    fs, _ = store_fs(store)
    path = join(build_prefix(store, model, device, build_id), "manifest.json")
    raw = _read(
        fs,
        path,
        store,
        f"build {build_id!r} of {model!r} for {device!r} does not exist or is "
        f"incomplete (no manifest) in {clean_uri(store)}; see `tvmflow builds`",
    )
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise TvmflowError(f"manifest of build {build_id!r} is not valid JSON; refusing it") from None
    if manifest.get("model") != model or manifest.get("device") != device or manifest.get("build_id") != build_id:
        raise TvmflowError(f"manifest of build {build_id!r} names another model/device/build; refusing it")
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise TvmflowError(f"manifest of build {build_id!r} lists no files; refusing it")
    for name in manifest["files"]:
        safe_segment(name, "file")  # a tampered manifest must not write outside out_dir
    return manifest


def list_builds(store: str, model: str | None = None, device: str | None = None) -> list[dict]:
    """Every complete build (newest first): date, precision, latency, validation, trials, latest?"""
    check_store(store)  # else a missing bucket would just list nothing
    fs, root = store_fs(store)
    pattern = join(
        root,
        "builds",
        safe_segment(model, "model") if model else "*",
        safe_segment(device, "device") if device else "*",
    )
    try:
        manifests = fs.glob(join(pattern, "*", "manifest.json"))
        latest_files = fs.glob(join(pattern, "LATEST"))
        blobs = fs.cat(manifests + latest_files) if manifests else {}
    except FileNotFoundError as err:
        if "bucket" in str(err).lower():
            raise store_error(err, store, "listing") from None
        return []
    except Exception as err:  # noqa: BLE001
        raise store_error(err, store, "listing") from None
    latest = {p.rsplit("/", 1)[0]: blobs[p].decode().strip() for p in latest_files if p in blobs}
    rows = []
    for path in manifests:
        try:
            manifest = json.loads(blobs[path])
        except (KeyError, ValueError):
            continue
        folder = path.rsplit("/", 1)[0]
        base, build_id = folder.rsplit("/", 1)
        validation = manifest.get("validation") or {}
        rows.append(
            {
                "model": manifest.get("model"),
                "device": manifest.get("device"),
                "build_id": build_id,
                "published_at": manifest.get("published_at"),
                "precision": manifest.get("precision"),
                "latency_ms": manifest.get("latency_ms"),
                "validation": {
                    k: validation.get(k) for k in ("passed", "samples", "max_abs_err", "max_rel_err", "top1_agreement")
                },
                "trials": manifest.get("trials"),
                "tvm_version": manifest.get("tvm_version"),
                "validated": is_validated(manifest),
                "build_only": bool(manifest.get("build_only")),
                "latest": latest.get(base) == build_id,
                "uri": uri_of(store, folder),
            }
        )
    # build ids start with their UTC time: they break ties of builds published in the same second
    return sorted(
        rows,
        key=lambda r: (r["model"] or "", r["device"] or "", r["published_at"] or "", r["build_id"] or ""),
        reverse=True,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(folder: Path, manifest: dict) -> None:
    """Raise unless every file in the manifest is in `folder` with its size and sha256."""
    for name, entry in manifest["files"].items():
        local = folder / name
        if not local.is_file():
            raise TvmflowError(f"{name} is missing from the build; refusing it")
        if local.stat().st_size != entry.get("size") or _sha256(local) != entry.get("sha256"):
            raise TvmflowError(
                f"{name} does not match the sha256 in the manifest (tampered or corrupt); "
                "refusing the build, nothing was written"
            )


def fetch_build(
    store: str,
    model: str,
    device: str,
    build: str | None = "latest",
    out_dir: str | os.PathLike = "build",
    allow_unvalidated: bool = False,
) -> FetchedBuild:
    """Download one build into out_dir (absent or empty), every file verified against the manifest.
    A build-only (unvalidated) build only with `allow_unvalidated`."""
    fs, _ = store_fs(store)
    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TvmflowError(f"{out} exists and is not an empty folder; give a new or empty --out")
    build_id = resolve_build(store, model, device, build, allow_unvalidated)
    manifest = read_manifest(store, model, device, build_id)
    if not is_validated(manifest) and not allow_unvalidated:
        raise TvmflowError(
            f"build {build_id!r} of {model!r} for {device!r} is unvalidated (build-only: never run "
            "on the device); pass --allow-unvalidated to fetch it anyway"
        )
    prefix = build_prefix(store, model, device, build_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.fetch-", dir=out.parent))
    try:
        for name in manifest["files"]:
            try:
                fs.get_file(join(prefix, name), str(staging / name))
            except FileNotFoundError:
                raise TvmflowError(
                    f"{name} listed in the manifest is missing from the store; refusing the build"
                ) from None
            except Exception as err:  # noqa: BLE001
                raise store_error(err, store, "downloading from") from None
        verify_files(staging, manifest)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return FetchedBuild(out, build_id, manifest, sorted(manifest["files"]))


@dataclass
class LoadedBuild:
    """A verified build loaded in this process: `vm["main"](*inputs)` or `run(...)`."""

    path: Path
    build_id: str
    manifest: dict
    module: object
    vm: object
    device: object

    @property
    def inputs(self) -> list[str]:
        return list(self.manifest.get("inputs") or [])

    def run(self, *arrays):
        """Run `main` on numpy arrays (in input order); returns numpy outputs (list if several)."""
        import numpy as np
        import tvm

        args = [tvm.runtime.tensor(np.ascontiguousarray(a), self.device) for a in arrays]
        out = self.vm["main"](*args)
        if hasattr(out, "numpy"):
            return out.numpy()
        return [o.numpy() for o in out]


def _host_arch_ok(target: dict) -> bool:
    triple = str((target or {}).get("mtriple") or "")
    if not triple:
        return True
    return triple.split("-")[0] == platform.machine()


def load_build(
    store: str,
    model: str,
    device: str,
    build: str | None = "latest",
    out_dir: str | os.PathLike | None = None,
    dev: str = "cpu",
) -> LoadedBuild:
    """Fetch (or reuse a fetched and re-verified copy), then load the library into a Relax VM."""
    import tvm
    from tvm import relax

    from tasks.storage import cache

    build_id = resolve_build(store, model, device, build)
    manifest = read_manifest(store, model, device, build_id)
    if not _host_arch_ok(manifest.get("target") or {}):
        raise TvmflowError(
            f"build {build_id!r} targets {manifest['target'].get('mtriple')}, not this "
            f"{platform.machine()} host; fetch it with `tvmflow fetch` and load it on the device"
        )
    folder = (
        Path(out_dir)
        if out_dir
        else cache.cache_root() / "fetched" / safe_segment(model, "model") / safe_segment(device, "device") / build_id
    )
    if folder.exists() and any(folder.iterdir()):
        try:
            verify_files(folder, manifest)  # re-verified on every load: the folder is writable
        except TvmflowError:
            if out_dir:
                raise
            shutil.rmtree(folder)
    if not (folder.exists() and any(folder.iterdir())):
        fetch_build(store, model, device, build_id, folder)
    library = next((n for n in manifest["files"] if n.endswith(".so")), None)
    if library is None:
        raise TvmflowError(f"build {build_id!r} has no library (.so) to load")
    with native_stderr_muted():
        module = tvm.runtime.load_module(str(folder / library))
    device_ = tvm.device(dev, 0)
    return LoadedBuild(folder, build_id, manifest, module, relax.VirtualMachine(module, device_), device_)
