"""publish_build: files, then a manifest with every sha256, then LATEST; never half a build."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec
import pytest

from tasks.errors import TvmflowError
from tasks.storage.publish import build_prefix, publish_build, safe_segment


def _files(tmp_path) -> dict[str, Path]:
    out = {}
    for name, content in (
        ("model.so", b"\x7fELF" + bytes(range(256)) * 40),
        ("report.json", b'{"ok": true}'),
        ("database_tuning_record.json", b"[]\n"),
    ):
        path = tmp_path / "src" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        out[name] = path
    return out


def test_manifest_lists_sha256_of_every_file_and_latest_is_written(tmp_path):
    store = tmp_path / "store"
    files = _files(tmp_path)
    result = publish_build(str(store), "mnist_cnn", "local", files, {"tvm_version": "0.27", "trials": 32})
    folder = store / "builds" / "mnist_cnn" / "local" / result["build_id"]
    assert result["build_uri"].endswith(str(folder)) and result["manifest_uri"].endswith("manifest.json")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model"] == "mnist_cnn" and manifest["device"] == "local" and manifest["trials"] == 32
    assert set(manifest["files"]) == set(files)
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert (
            entry["sha256"] == hashlib.sha256(data).hexdigest() == hashlib.sha256(files[name].read_bytes()).hexdigest()
        )
        assert entry["size"] == len(data)
    assert (store / "builds" / "mnist_cnn" / "local" / "LATEST").read_text() == result["build_id"]


def test_latest_is_written_last(tmp_path, monkeypatch):
    """Record the order of writes through the real local filesystem."""
    order = []
    fs_cls = type(fsspec.filesystem("file"))
    real_put, real_open = fs_cls.put_file, fs_cls._open

    def put_file(self, lpath, rpath, *a, **kw):
        order.append(Path(rpath).name)
        return real_put(self, lpath, rpath, *a, **kw)

    def open_(self, path, mode="rb", *a, **kw):
        if "w" in mode:
            order.append(Path(path).name)
        return real_open(self, path, mode, *a, **kw)

    monkeypatch.setattr(fs_cls, "put_file", put_file)
    monkeypatch.setattr(fs_cls, "_open", open_)
    publish_build(str(tmp_path / "store"), "m", "local", _files(tmp_path), {})
    assert order[-2:] == ["manifest.json", "LATEST"]
    assert set(order[:-2]) == {"model.so", "report.json", "database_tuning_record.json"}


def test_failed_upload_leaves_no_build_and_no_latest(tmp_path, monkeypatch):
    store = tmp_path / "store"
    first = publish_build(str(store), "m", "local", _files(tmp_path), {})
    fs_cls = type(fsspec.filesystem("file"))
    real_put = fs_cls.put_file

    def flaky_put(self, lpath, rpath, *a, **kw):
        if Path(rpath).name == "report.json":
            raise OSError(28, "No space left on device")
        return real_put(self, lpath, rpath, *a, **kw)

    monkeypatch.setattr(fs_cls, "put_file", flaky_put)
    with pytest.raises(TvmflowError, match="publishing to .* failed") as info:
        publish_build(str(store), "m", "local", _files(tmp_path), {}, build_id="second")
    assert "\n" not in str(info.value)
    base = store / "builds" / "m" / "local"
    assert not (base / "second").exists()
    assert (base / "LATEST").read_text() == first["build_id"]  # the earlier build is still the latest
    assert sorted(p.name for p in base.iterdir()) == sorted(["LATEST", first["build_id"]])


def test_missing_local_file_publishes_nothing(tmp_path):
    store = tmp_path / "store"
    files = _files(tmp_path)
    files["gone.bin"] = tmp_path / "does-not-exist.bin"
    with pytest.raises(TvmflowError):
        publish_build(str(store), "m", "local", files, {}, build_id="b1")
    base = store / "builds" / "m" / "local"
    assert not (base / "b1").exists() and not (base / "LATEST").exists()


@pytest.mark.parametrize("name", ["", "..", "../etc", "a/b", "/abs", ".hidden", "a\nb", "x" * 200, "a..b"])
def test_unsafe_names_rejected(tmp_path, name):
    with pytest.raises(TvmflowError, match="not allowed"):
        safe_segment(name, "model")
    with pytest.raises(TvmflowError, match="not allowed"):
        publish_build(str(tmp_path / "store"), name, "local", _files(tmp_path), {})
    with pytest.raises(TvmflowError, match="not allowed"):
        build_prefix(str(tmp_path / "store"), "m", name)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.so"))


@pytest.mark.parametrize("name", ["mnist_cnn", "resnet-18", "efficientnet_lite0.v2", "aarch64-linux"])
def test_safe_names_accepted(name):
    assert safe_segment(name, "model") == name
