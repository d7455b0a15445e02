"""The build stage's per-operator race on this host's x86 CPU (tasks.build.cpu_pick_best): every
conv / dense of the bundled MNIST CNN timed on oneDNN and as TVM's kernel, the winners in one
library that a real rpc server loads and runs (it links our oneDNN kernels), outputs equal torch."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from tasks import pipeline
from tasks.build import cpu_pick_best
from tasks.devices.profiles import get_device


@pytest.fixture(scope="module")
def prepared(mnist_pt2):
    from tasks.records import ModelSource
    from tasks.storage import cache

    device = get_device("local")
    assert cpu_pick_best.library_here(device), "oneDNN kernels do not load here (scripts/build-cpu-contrib.sh)"
    source = ModelSource("mnist_cnn", mnist_pt2, cache.sha256_file(mnist_pt2), "torch")
    return pipeline.import_stage(source, device, None, "fp32")


def test_import_keeps_the_nhwc_graph_for_the_race(prepared):
    assert prepared.graph is not None
    assert 'data_layout="NHWC"' in prepared.graph.script()


def test_build_races_every_conv_and_dense_and_a_remote_server_runs_the_winner(prepared, local_workers, tmp_path):
    import torch

    from tasks.devices.validate import run_on_device
    from tasks.importers.bundled import mnist_cnn

    device = get_device("local")
    build = pipeline.build(prepared, device, None)
    kinds = sorted(c.operator.split("_")[0] for c in build.choices)
    assert kinds == ["conv2d", "conv2d", "matmul", "matmul"], [c.operator for c in build.choices]
    for choice in build.choices:
        backends = {c.backend for c in choice.candidates if c.usable}
        assert backends == {"default", "dnnl"}, choice  # both ran and were timed
        assert choice.chosen in backends
    needed = subprocess.run(["readelf", "-d", str(build.library)], capture_output=True, text=True).stdout
    uses_library = any(c.chosen == "dnnl" for c in build.choices)
    assert ("libtvmflow_dnnl.so" in needed) == uses_library, needed

    model, example = mnist_cnn()
    x = np.random.default_rng(1).standard_normal(tuple(example[0].shape)).astype("float32")
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    run = run_on_device(
        build.library,
        (local_workers.host, local_workers.tracker_port),
        "local",
        [{prepared.input_names[0]: x}],
        prepared.input_names,
        repeat=3,
    )
    np.testing.assert_allclose(run.outputs[0][0], ref, rtol=1e-4, atol=1e-4)


def test_a_lowered_precision_drops_the_fp32_graph(prepared):
    from dataclasses import replace

    fp16 = pipeline.precision_stage(replace(prepared, precision="fp16"), get_device("local"))
    assert fp16.precision_info is not None and fp16.graph is None  # the race would build the fp32 model
