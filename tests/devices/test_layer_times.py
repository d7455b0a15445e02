"""The per-layer time table of a real build of the bundled MNIST CNN: measured through the Relax VM's
instrument hook on this host's CPU, written as layer_times.md / .json beside report.json, embedded
(slowest layers) and linked in report.md, and kept in report.json."""

from __future__ import annotations

import json

import pytest

from tasks import pipeline
from tasks.devices.layer_times import LayerProfile, markdown, profile_layers, profiles_here
from tasks.devices.profiles import get_device
from tasks.devices.validate import Validation
from tasks.importers.datasets import load_dataset
from tasks.records import BuildReport
from tasks.report import write_report_files

MNIST = "tasks.importers.bundled:mnist_cnn"


@pytest.fixture(scope="module")
def mnist_build(tmp_path_factory):
    """(library path, prepared model, dataset): the MNIST CNN built untuned for this CPU, in a module cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TVMFLOW_CACHE", str(tmp_path_factory.mktemp("layer-times-cache")))
    try:
        device = get_device("local")
        prepared = pipeline.import_stage(pipeline.fetch_model(MNIST), device, None, "fp32")
        built = pipeline.build(prepared, device, None)
    finally:
        patch.undo()
    return built.library, prepared, load_dataset("bundled:mnist:2", prepared.specs)


def test_every_kernel_of_a_real_build_is_timed(mnist_build):
    library, prepared, dataset = mnist_build
    profile = profile_layers(library, dataset.sample(0), prepared.input_names, "this host's CPU", repeats=3)
    names = [layer.kernel for layer in profile.layers]
    # the MNIST CNN's fused kernels: two conv blocks, two pools, two dense layers; VM builtins left out
    assert any("conv2d" in n for n in names) and any("matmul" in n for n in names), names
    assert any("max_pool2d" in n for n in names) and not any(n.startswith("vm.") for n in names), names
    assert profile.repeats == 3 and all(layer.calls >= 1 and layer.ms > 0 for layer in profile.layers)
    assert [layer.ms for layer in profile.layers] == sorted((layer.ms for layer in profile.layers), reverse=True)
    assert sum(layer.share for layer in profile.layers) == pytest.approx(1.0, abs=1e-3)
    digit = ("1x1x28x28 float32", "1x28x28x1 float32")  # the image, NCHW or NHWC (the build picks the layout)
    first_conv = next(layer for layer in profile.layers if layer.shapes and layer.shapes[0] in digit)
    assert "conv2d" in first_conv.kernel and any(s.startswith("32x") and "3x3" in s for s in first_conv.shapes)
    assert profile.run_ms >= profile.kernels_ms  # every kernel call lies inside the run it was timed in
    table = markdown(profile, limit=2)
    assert "| 1 | `" + names[0] + "` |" in table and f"... {len(names) - 2} more" in table


def test_layer_times_are_published_beside_report_json(mnist_build, tmp_path):
    library, prepared, dataset = mnist_build
    profile = profile_layers(library, dataset.sample(0), prepared.input_names, "this host's CPU", repeats=2)
    report = BuildReport(
        model="mnist_cnn",
        model_sha256="0" * 64,
        device="local",
        target={"kind": "llvm"},
        tvm_version="0.27",
        precision="fp32",
        framework="torch",
        inputs=[str(s) for s in prepared.specs],
        data="bundled:mnist:2",
        tasks=0,
        trials=0,
        tuning=[],
        untuned_tasks=[],
        records=0,
        latency_ms=1.0,
        latency_p90_ms=1.0,
        validation=Validation(True, "fp32", 2, 0.0, 0.0, 1.0, {}),
        build_uri="file:///store/builds/mnist_cnn/local/b1",
        layer_times=profile,
    )
    files = write_report_files(report, tmp_path)
    assert {"report.json", "report.md", "layer_times.md", "layer_times.json"} <= set(files)
    slowest = profile.layers[0].kernel
    assert f"`{slowest}`" in files["layer_times.md"].read_text()
    assert "file:///store/builds/mnist_cnn/local/b1" in files["layer_times.md"].read_text()
    assert LayerProfile.from_json(json.loads(files["layer_times.json"].read_text())) == profile
    text = files["report.md"].read_text()
    assert "## Per-layer time" in text and "(layer_times.md)" in text and f"`{slowest}`" in text
    saved = json.loads(files["report.json"].read_text())
    assert BuildReport.from_json(saved).layer_times == profile
    # a validated build on a device that is not this host: report.md says why there is no table
    report.layer_times = None
    assert "Per-layer times: not measured" in (write_report_files(report, tmp_path / "remote")["report.md"]).read_text()


def test_only_this_hosts_cpu_is_profiled_here():
    host = {"kind": "llvm", "mcpu": "znver3"}
    assert profiles_here(host, "127.0.0.1")
    assert not profiles_here(host, "10.0.0.5")  # a board of the same ISA behind another tracker
    assert not profiles_here({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}, "127.0.0.1")  # cross-compiled
    assert not profiles_here({"kind": "cuda"}, "127.0.0.1")
