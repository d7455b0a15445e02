"""The vendor-library candidate path with the real packages: oneDNN (PyPI onednn) and OpenBLAS
(PyPI scipy-openblas32) kernels compiled in place by scripts/build-cpu-contrib.sh, a model's
convs and dense layers rewritten to extern calls, built, run, and equal to torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.build import cpu_vendor
from tasks.build.candidates import Candidate, choose
from tasks.tuning.extract import prepare_for_tuning

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def native():
    """The kernels built for this environment (the build script, when they are missing)."""
    missing = [b for b in cpu_vendor.BACKENDS if not cpu_vendor.library_path(b).exists()]
    if missing:
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "build-cpu-contrib.sh"), sys.executable],
            check=True,
            cwd=ROOT,
            capture_output=True,
            timeout=600,
        )
    return cpu_vendor.library_path("dnnl").parent


def _net():
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16),
        nn.ReLU6(),
        nn.Conv2d(16, 32, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    return net, torch.randn(1, 3, 16, 16)


@pytest.mark.parametrize("backend", ["dnnl", "cblas"])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_library_candidate_builds_runs_and_matches_torch(native, backend, layout):
    import torch
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from tasks.build.compile import compile_module
    from tasks.devices.profiles import get_device

    assert cpu_vendor.available(backend), f"{backend} kernels do not load or compute wrong results"
    net, x = _net()
    with torch.no_grad():
        ref = net(x).numpy()
    mod = from_exported_program(torch.export.export(net, (x,)), unwrap_unit_return_tuple=True)
    device = get_device("local")
    prepared = prepare_for_tuning(mod, device.tvm_target(), layout=layout, vendor=backend)
    text = prepared.script()
    calls = text.count(f'"tvmflow.{backend}.conv2d"')
    assert calls == (3 if backend == "dnnl" else 2), text  # OpenBLAS leaves the depthwise conv to TVM
    assert f'"tvmflow.{backend}.matmul"' in text
    vm = relax.VirtualMachine(compile_module(prepared, device, None), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    np.testing.assert_allclose((out if hasattr(out, "numpy") else out[0]).numpy(), ref, rtol=1e-4, atol=1e-4)


def test_only_the_chosen_operators_are_offloaded(native):
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    from tasks.devices.profiles import get_device
    from tasks.tuning.extract import fold_batchnorm

    net, x = _net()
    mod = fold_batchnorm(from_exported_program(torch.export.export(net, (x,)), unwrap_unit_return_tuple=True))
    every = cpu_vendor.offload(mod, get_device("local").tvm_target())
    assert [op.op_id for op in every.ops] == ["conv2d_0", "conv2d_1", "conv2d_2", "matmul_0"]
    assert [op.post for op in every.ops] == ["relu", "relu6", "relu", None]
    picked = choose("conv2d_0", [Candidate("default", 0.5), Candidate("dnnl", 0.2)])
    assert picked.chosen == "dnnl"
    some = cpu_vendor.offload(mod, None, only={"conv2d_0"})
    assert [op.op_id for op in some.ops] == ["conv2d_0"] and len(some.candidates) == 4
    assert some.mod.script().count("tvmflow.dnnl") == 1


def test_missing_library_is_one_line_error(monkeypatch, tmp_path):
    from tasks.errors import TvmflowError

    monkeypatch.setenv("TVMFLOW_NATIVE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_vendor, "_LOADED", {})
    with pytest.raises(TvmflowError, match="build-cpu-contrib.sh"):
        cpu_vendor.load_library("cblas")
