"""Fetching builds back from S3 (SeaweedFS): verified round trip, tampering refused with nothing
left behind, listing, the CLI, the Prefect flows with results persisted in the store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flows import cli
from tasks.errors import TvmflowError
from tasks.storage.publish import build_prefix, publish_build
from tasks.storage.retrieve import fetch_build, list_builds, load_build


@pytest.fixture(scope="module")
def tiny_library(tmp_path_factory) -> Path:
    """A real TVM library: y = relu(x @ W + b) from torch, compiled for this CPU."""
    import torch
    import tvm
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval()
    x = torch.randn(1, 8)
    mod = from_exported_program(torch.export.export(module, (x,)), unwrap_unit_return_tuple=True)
    out = tmp_path_factory.mktemp("lib") / "model.so"
    tvm.compile(mod, target="llvm").export_library(str(out))
    np.save(out.with_suffix(".x.npy"), x.numpy())
    np.save(out.with_suffix(".y.npy"), module(x).detach().numpy())
    return out


def _publish(store: str, lib: Path, tmp_path: Path, model: str = "tiny", build_id: str | None = None) -> dict:
    report = tmp_path / "report.json"
    report.write_text('{"model": "tiny"}')
    meta = {
        "precision": "fp32",
        "latency_ms": 0.01,
        "trials": 0,
        "tvm_version": "0.27",
        "target": {"kind": "llvm"},
        "inputs": ["x:1x8:float32"],
        "validation": {"passed": True, "samples": 1, "max_abs_err": 0.0, "max_rel_err": 0.0, "top1_agreement": 1.0},
    }
    return publish_build(store, model, "local", {"model.so": lib, "report.json": report}, meta, build_id)


def test_publish_list_fetch_and_load_round_trip(s3, tiny_library, tmp_path):
    store = s3.store()
    old = _publish(store, tiny_library, tmp_path, build_id="20260101T000000Z-aaaaaa")
    new = _publish(store, tiny_library, tmp_path)
    rows = list_builds(store)
    assert [r["build_id"] for r in rows] == [new["build_id"], old["build_id"]]
    assert rows[0]["latest"] and not rows[1]["latest"]
    assert rows[0]["precision"] == "fp32" and rows[0]["latency_ms"] == 0.01 and rows[0]["validation"]["passed"]
    got = fetch_build(store, "tiny", "local", "latest", tmp_path / "out")
    assert got.build_id == new["build_id"] and sorted(p.name for p in got.path.iterdir()) == [
        "manifest.json",
        "model.so",
        "report.json",
    ]
    assert (got.path / "model.so").read_bytes() == tiny_library.read_bytes()
    loaded = load_build(store, "tiny", "local", old["build_id"])
    y = loaded.run(np.load(tiny_library.with_suffix(".x.npy")))
    np.testing.assert_allclose(y, np.load(tiny_library.with_suffix(".y.npy")), rtol=1e-5, atol=1e-6)


def test_tampered_file_is_refused_and_nothing_is_left(s3, tiny_library, tmp_path):
    store = s3.store()
    build = _publish(store, tiny_library, tmp_path)
    fs = s3.fs()
    so = f"{build_prefix(store, 'tiny', 'local', build['build_id'])}/model.so"
    data = bytearray(fs.cat(so))
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    fs.pipe(so, bytes(data))
    out = tmp_path / "fetched" / "out"
    with pytest.raises(TvmflowError, match="model.so does not match the sha256"):
        fetch_build(store, "tiny", "local", "latest", out)
    assert not out.exists() and list(out.parent.iterdir()) == []  # no staging folder left either
    out.mkdir()
    with pytest.raises(TvmflowError, match="sha256"):
        fetch_build(store, "tiny", "local", build["build_id"], out)
    assert list(out.iterdir()) == []
    with pytest.raises(TvmflowError, match="sha256"):
        load_build(store, "tiny", "local")
    # the CLI: non-zero exit, one line, nothing in --out
    code = cli.main(["fetch", "tiny", "--device", "local", "--store", store, "--out", str(tmp_path / "cli")])
    assert code == 2 and not (tmp_path / "cli").exists()


def test_tampered_manifest_cannot_write_outside_out_dir(s3, tiny_library, tmp_path):
    store = s3.store()
    build = _publish(store, tiny_library, tmp_path)
    fs = s3.fs()
    path = f"{build_prefix(store, 'tiny', 'local', build['build_id'])}/manifest.json"
    manifest = json.loads(fs.cat(path))
    manifest["files"]["../../escape.so"] = manifest["files"].pop("model.so")
    fs.pipe(path, json.dumps(manifest).encode())
    with pytest.raises(TvmflowError, match="not allowed"):
        fetch_build(store, "tiny", "local", "latest", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.so").exists()


def test_missing_builds_and_unsafe_names_are_one_line_errors(s3, tmp_path):
    store = s3.store()
    with pytest.raises(TvmflowError, match="no published build of 'nothing'"):
        fetch_build(store, "nothing", "local", "latest", tmp_path / "o")
    with pytest.raises(TvmflowError, match="does not exist or is incomplete"):
        fetch_build(store, "nothing", "local", "20260101T000000Z-000000", tmp_path / "o")
    for kwargs in ({"model": "../etc"}, {"device": "a/b"}, {"build": ".."}):
        args = {"model": "m", "device": "local", "build": "latest", **kwargs}
        with pytest.raises(TvmflowError, match="not allowed"):
            fetch_build(store, args["model"], args["device"], args["build"], tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert list_builds(store) == []


def test_cli_builds_and_fetch_with_keys_in_the_uri(s3, tiny_library, tmp_path, monkeypatch, capsys):
    bare = s3.store()
    build = _publish(bare, tiny_library, tmp_path)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    keyed = bare.replace("s3://", f"s3://{s3.access_key}:{s3.secret_key}@")
    assert cli.main(["builds", "--store", keyed]) == 0
    listing = capsys.readouterr().out
    assert build["build_id"] + " *" in listing and "passed" in listing and s3.secret_key not in listing
    assert cli.main(["builds", "tiny", "--device", "local", "--store", keyed, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rows[0]["build_id"] == build["build_id"] and s3.secret_key not in json.dumps(rows)
    assert cli.main(["fetch", "tiny", "--device", "local", "--store", keyed, "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr()
    assert "sha256 verified" in out.out and s3.secret_key not in out.out + out.err
    assert (tmp_path / "o" / "model.so").read_bytes() == tiny_library.read_bytes()


def test_prefect_flows_persist_results_in_the_store(s3, prefect_harness, tiny_library, tmp_path):
    from prefect.filesystems import RemoteFileSystem

    from flows.retrieve import run_builds, run_fetch
    from tasks.storage.results import results_block_name

    store = s3.store()
    build = _publish(store, tiny_library, tmp_path)
    rows = run_builds(store, "tiny")
    assert [r["build_id"] for r in rows] == [build["build_id"]]
    got = run_fetch(store, "tiny", "local", str(tmp_path / "flow-out"))
    assert got["build_id"] == build["build_id"] and (tmp_path / "flow-out" / "model.so").exists()
    block = RemoteFileSystem.load(results_block_name(store))
    assert block.basepath == f"{store}/prefect-results" and s3.secret_key not in json.dumps(block.settings)
    from prefect.serializers import PickleSerializer

    stored = [PickleSerializer().loads(s3.fs().cat(p)) for p in s3.fs().find(f"{store[5:]}/prefect-results")]
    assert rows in stored and got in stored  # each flow run's result, readable from the store
