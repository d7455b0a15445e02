"""examples/cpp: a published build loaded and run from C++ with the TVM runtime of the installed
wheels, built here with g++; its outputs match Python's VM on real MNIST digits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def test_cpp_example_runs_a_published_build_like_python(tmp_path, mnist_pt2):
    import tvm
    from tvm import relax

    from tasks.build.compile import build_library
    from tasks.devices.profiles import get_device
    from tasks.importers.datasets import load_dataset
    from tasks.importers.model_import import import_pt2
    from tasks.storage.publish import publish_build
    from tasks.storage.retrieve import fetch_build
    from tasks.tuning.extract import prepare_for_tuning

    binary = tmp_path / "run_model"
    built = subprocess.run(
        ["bash", str(ROOT / "examples/cpp/build.sh"), sys.executable, str(binary)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-2000:]

    device = get_device("local")
    imported = import_pt2(mnist_pt2)
    lib = build_library(prepare_for_tuning(imported.mod, device.tvm_target()), device, None, tmp_path / "model.so")
    store = tmp_path / "store"
    publish_build(str(store), "mnist_cnn", "local", {"model.so": lib}, {"precision": "fp32"})
    folder = tmp_path / "fetched"
    fetch_build(str(store), "mnist_cnn", "local", "latest", folder)

    spec = imported.inputs[0]
    data = load_dataset("bundled:mnist:3", imported.inputs)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(folder / "model.so")), tvm.cpu())
    for i in range(len(data)):
        x = data.sample(i)[spec.name]
        x.tofile(tmp_path / "x.bin")
        run = subprocess.run(
            [
                str(binary),
                str(folder),
                str(tmp_path / "x.bin"),
                "x".join(map(str, spec.shape)),
                str(tmp_path / "y.bin"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        got = np.fromfile(tmp_path / "y.bin", dtype="float32")
        want = vm["main"](tvm.runtime.tensor(x)).numpy().ravel()
        assert got.shape == want.shape == (10,)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert int(got.argmax()) == int(data.labels[i])
