"""MXNet 1.9.1 Gluon exports (optional extra): the converter environment (.venv-mxnet, made by
scripts/setup-mxnet.sh) exports a real Gluon CNN, converts it to ONNX, and serves the MXNet
reference; the main environment never imports MXNet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.errors import TvmflowError
from tasks.importers.model_import import (
    detect_format,
    fetch_model_files,
    import_model,
    model_name,
    parse_input_spec,
)
from tests.format_models import MXNET_INPUT, mxnet_gluon_cnn

ROOT = Path(__file__).resolve().parent.parent.parent
SHAPE = f"data:{'x'.join(map(str, MXNET_INPUT))}:float32"


@pytest.fixture(scope="module")
def gluon_symbol(tmp_path_factory) -> Path:
    """setup-mxnet.sh is idempotent: it builds .venv-mxnet once, then only checks its stamp."""
    subprocess.run(["bash", str(ROOT / "scripts" / "setup-mxnet.sh")], check=True, timeout=900)
    folder = tmp_path_factory.mktemp("mxnet")
    return mxnet_gluon_cnn(folder / "gluon_cnn", epoch=3)


def test_main_env_stays_without_mxnet():
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('mxnet'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "None"
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert "mxnet" not in check.stdout.lower() and "numpy" not in check.stdout.lower()


def test_missing_converter_env_is_a_clear_error(gluon_symbol, tmp_path, monkeypatch):
    bundle = fetch_model_files(str(gluon_symbol), tmp_path)
    monkeypatch.setenv("TVMFLOW_MXNET_PYTHON", str(tmp_path / "no-such-python"))
    with pytest.raises(TvmflowError, match=r"optional converter environment .* run `bash scripts/setup-mxnet.sh`"):
        import_model(bundle.path, [parse_input_spec(SHAPE)])


def test_symbol_finds_its_params_and_errors_name_what_is_missing(gluon_symbol, tmp_path):
    params = gluon_symbol.with_name("gluon_cnn-0003.params")
    assert params.exists()
    by_sibling = fetch_model_files(str(gluon_symbol), tmp_path / "a")
    explicit = fetch_model_files(f"{gluon_symbol}+{params}", tmp_path / "b")
    assert by_sibling.sha256 == explicit.sha256 and detect_format(by_sibling.path) == "mxnet"
    assert model_name(str(gluon_symbol)) == "gluon_cnn"
    with pytest.raises(TvmflowError, match=r"MXNet symbols carry no input shapes: give --input data:"):
        import_model(by_sibling.path)
    alone = tmp_path / "lonely-symbol.json"
    alone.write_text(gluon_symbol.read_text())
    with pytest.raises(TvmflowError, match=r"no lonely-NNNN.params next to"):
        fetch_model_files(str(alone), tmp_path / "c")
    with pytest.raises(TvmflowError, match="MXNet symbol without its weights"):
        detect_format(alone)


def test_gluon_export_through_the_flow(gluon_symbol, local_workers, prefect_harness, tmp_path):
    from flows.compile import compile_flow

    report = compile_flow(
        model=str(gluon_symbol),
        device="local",
        trials=0,
        store=str(tmp_path / "store"),
        inputs=[SHAPE],
        tracker=local_workers.tracker,
        measure_untuned=False,
    )
    assert report["framework"] == "mxnet" and report["reference"]["framework"] == "mxnet"
    assert report["reference"]["latency_ms"] > 0  # timed inside the MXNet process
    assert report["validation"]["passed"] is True
    assert report["inputs"] == [SHAPE] and report["model"] == "gluon_cnn"
    assert "onnxruntime (host)" in report["baselines"]  # the converted ONNX doubles as the ORT baseline
    manifest = json.loads(Path(report["manifest_uri"].removeprefix("file://")).read_text())
    assert manifest["framework"] == "mxnet" and manifest["validation"]["passed"]
