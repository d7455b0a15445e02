"""The store on a real S3 server (SeaweedFS): publish, atomicity, clear errors, no leaked keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.errors import TvmflowError
from tasks.storage.publish import build_prefix, clean_partial_builds, publish_build, store_fs
from tasks.storage.retrieve import list_builds
from tasks.storage.store import check_store, clean_uri, redact, split_credentials, stored_objects


def _files(tmp_path: Path, tag: str = "a") -> dict[str, Path]:
    folder = tmp_path / f"src-{tag}"
    folder.mkdir(exist_ok=True)
    out = {}
    for name, content in (("model.so", b"\x7fELF" + tag.encode() * 5000), ("report.json", b'{"ok": true}')):
        (folder / name).write_bytes(content)
        out[name] = folder / name
    return out


def _meta() -> dict:
    return {
        "precision": "fp32",
        "latency_ms": 1.25,
        "trials": 16,
        "tvm_version": "0.27",
        "validation": {"passed": True, "samples": 4, "max_abs_err": 1e-6, "max_rel_err": 1e-5, "top1_agreement": 1.0},
        "target": {"kind": "llvm"},
        "inputs": ["x:1x4:float32"],
    }


def test_publish_to_s3_writes_files_manifest_then_latest(s3, tmp_path):
    store = s3.store()
    result = publish_build(store, "mnist_cnn", "local", _files(tmp_path), _meta())
    fs = s3.fs()
    base = f"{store[5:]}/builds/mnist_cnn/local"
    manifest = json.loads(fs.cat(f"{base}/{result['build_id']}/manifest.json"))
    assert set(manifest["files"]) == {"model.so", "report.json"}
    assert fs.cat(f"{base}/LATEST").decode() == result["build_id"]
    assert result["build_uri"] == f"{store}/builds/mnist_cnn/local/{result['build_id']}"


def test_interrupted_publish_leaves_latest_and_is_never_listed(s3, tmp_path):
    store = s3.store()
    first = publish_build(store, "m", "local", _files(tmp_path), _meta())
    fs, _ = store_fs(store)
    real_put = fs.put_file  # s3fs mirrors its sync methods onto the instance

    def interrupted(lpath, rpath, *a, **kw):
        real_put(lpath, rpath, *a, **kw)
        raise KeyboardInterrupt  # Ctrl-C right after the first file went up

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(fs, "put_file", interrupted)
        publish_build(store, "m", "local", _files(tmp_path, "b"), _meta(), build_id="second")
    base = build_prefix(store, "m", "local")
    assert fs.cat(f"{base}/LATEST").decode() == first["build_id"]
    assert not stored_objects(fs, f"{base}/second")
    assert [b["build_id"] for b in list_builds(store, "m", "local")] == [first["build_id"]]


def test_killed_publish_is_ignored_then_cleaned(s3, tmp_path):
    """A publish killed -9 leaves files without a manifest: never listed, removed once stale."""
    store = s3.store()
    first = publish_build(store, "m", "local", _files(tmp_path), _meta())
    fs, _ = store_fs(store)
    base = build_prefix(store, "m", "local")
    fs.pipe_file(f"{base}/20000101T000000Z-dead00/model.so", b"half")
    assert [b["build_id"] for b in list_builds(store)] == [first["build_id"]]
    assert clean_partial_builds(fs, base, max_age_s=3600) == []  # young: may still be uploading
    assert fs.exists(f"{base}/20000101T000000Z-dead00/model.so")
    assert clean_partial_builds(fs, base, max_age_s=0) == [f"{base}/20000101T000000Z-dead00"]
    assert not stored_objects(fs, f"{base}/20000101T000000Z-dead00")
    assert fs.exists(f"{base}/{first['build_id']}/manifest.json")


def test_missing_bucket_is_one_clear_line(s3, tmp_path):
    store = f"s3://no-such-bucket-{s3.bucket}/x"
    for i, call in enumerate(
        (
            lambda: check_store(store),
            lambda: list_builds(store),
            lambda: publish_build(store, "m", "local", _files(tmp_path), _meta()),
        )
    ):
        with pytest.raises(TvmflowError, match="bucket 'no-such-bucket-.*' does not exist") as info:
            call()
            print("did not raise:", i)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("key,secret", [("tvmflowtestkey", "wrong-secret"), ("unknown-key", "whatever")])
def test_wrong_credentials_are_one_clear_line_without_the_secret(s3, tmp_path, monkeypatch, key, secret):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = s3.store()
    for call in (lambda: check_store(store), lambda: publish_build(store, "m", "local", _files(tmp_path), _meta())):
        with pytest.raises(TvmflowError, match="access denied .*check AWS_ACCESS_KEY_ID") as info:
            call()
        assert "\n" not in str(info.value) and secret not in str(info.value)


def test_credentials_in_the_uri_work_and_are_redacted(s3, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    bare = s3.store()
    store = bare.replace("s3://", f"s3://{s3.access_key}:{s3.secret_key}@")
    assert split_credentials(store) == (bare, {"key": s3.access_key, "secret": s3.secret_key})
    assert clean_uri(store) == bare and s3.secret_key not in redact(f"error at {store}: denied")
    result = publish_build(store, "m", "local", _files(tmp_path), _meta())
    assert s3.secret_key not in json.dumps(result) and result["build_uri"].startswith(bare)
    manifest = s3.fs().cat(f"{bare[5:]}/builds/m/local/{result['build_id']}/manifest.json").decode()
    assert s3.secret_key not in manifest and s3.access_key not in manifest
    bad = bare.replace("s3://", f"s3://{s3.access_key}:not-the-secret@")
    with pytest.raises(TvmflowError) as info:
        check_store(bad)
    assert "not-the-secret" not in str(info.value) and bare in str(info.value)


def test_redact_masks_userinfo_and_secret_query_parameters():
    text = "open s3://AKIA:abc/def@bkt/x and https://u:p@host/f?X-Amz-Signature=s1g&a=1 and gs://b/k"
    out = redact(text)
    assert "abc/def" not in out and ":p@" not in out and "s1g" not in out
    assert "s3://***@bkt/x" in out and "a=1" in out and "gs://b/k" in out


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "/abs", "a\x00b", "a\nb", ".hidden"])
def test_unsafe_names_never_reach_s3(s3, tmp_path, name):
    store = s3.store()
    with pytest.raises(TvmflowError, match="not allowed"):
        publish_build(store, name, "local", _files(tmp_path), _meta())
    with pytest.raises(TvmflowError, match="not allowed"):
        publish_build(store, "m", name, _files(tmp_path), _meta())
    with pytest.raises(TvmflowError, match="not allowed"):
        list_builds(store, name)
    assert not stored_objects(s3.fs(), store[5:])
