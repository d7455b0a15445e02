"""Shared fixtures. Real servers only: tracker and rpc servers are real processes on free
loopback ports, started and stopped here. Keep each fixture small and documented."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest_s3 import s3, s3_server  # noqa: E402,F401 - SeaweedFS fixtures (real S3)

# Prefect must not phone home or write into the user's profile from tests.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(autouse=True)
def tvmflow_cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own step cache (TVMFLOW_CACHE), so no test sees another's results."""
    folder = tmp_path / "tvmflow-cache"
    monkeypatch.setenv("TVMFLOW_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def local_workers(tmp_path_factory):
    """A real RPC tracker + 2 rpc servers (key `local`) for the whole session."""
    from tasks.devices.workers import start_local_workers

    workers = start_local_workers("local", 2, tmp_path_factory.mktemp("workers-logs"))
    try:
        yield workers
    finally:
        workers.stop()


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API (SQLite) for flow tests, shared by the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def mnist_pt2(tmp_path_factory) -> Path:
    """The bundled MNIST CNN exported once to a .pt2 file (real weights)."""
    from tasks.importers.model_import import export_factory

    return export_factory("tasks.importers.bundled:mnist_cnn", tmp_path_factory.mktemp("mnist") / "mnist.pt2")


@pytest.fixture(scope="session")
def mnist_onnx(tmp_path_factory) -> Path:
    """The same MNIST CNN as an ONNX file (torch's dynamo exporter, weights inline)."""
    import torch

    from tasks.importers.bundled import mnist_cnn

    module, example = mnist_cnn()
    out = tmp_path_factory.mktemp("mnist-onnx") / "mnist.onnx"
    torch.onnx.export(module, example, str(out), dynamo=True, external_data=False, verbose=False)
    return out
