"""The issue-13 GPU build path without a GPU (CI has none): cuDNN / cuBLAS extern calls and the
CUDA-graph rewrite build into a CUDA library here; pick-best's DLight rule choice reaches the
fused kernel; the contrib build's commands and the runtime-library manifest. Timings come from
bench/gpu_vs_torch.py on the lent H200 (bench/README_gpu.md)."""

from __future__ import annotations

import pytest
import torch
import tvm
from torch import nn

from tasks.build import cuda_vendor, gpu
from tasks.build.candidates import Candidate, OperatorChoice
from tasks.devices.profiles import get_device
from tasks.errors import TvmflowError
from tasks.importers.model_import import relax_from_program


class _Tiny(nn.Module):
    """conv + batch norm + ReLU, a depthwise conv + ReLU6, pooling, a linear layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, 1, 1, groups=16),
            nn.ReLU6(),
        )
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.body(x), 1), 1))


@pytest.fixture(scope="module")
def tiny_fp16():
    torch.manual_seed(0)
    mod = relax_from_program(torch.export.export(_Tiny().eval(), (torch.zeros(2, 3, 16, 16),)), "PyTorch")
    mod = tvm.transform.Sequential([tvm.relax.transform.FoldBatchnormToConv2D(), tvm.relax.transform.FoldConstant()])(
        mod
    )
    return gpu.to_mixed_fp16(mod)  # also checks the ReLU6 rewrite: ToMixedPrecision fails on clip's bounds


def _host_code(executable) -> str:
    return "".join(m.inspect_source("ll") for m in executable.mod.imports if m.kind == "llvm")


def test_extern_cudnn_cublas_and_cuda_graph_build_to_a_cuda_library(tiny_fp16, tmp_path):
    cuda = get_device("cuda")
    specs = cuda_vendor.collect_specs(gpu.prepare_layout(tiny_fp16))
    decide = {
        key: OperatorChoice(key, [Candidate(backend, 0.01, None, "algo 1")], backend, "algo 1")
        for key, backend in ((k, "cudnn" if k.startswith("conv2d") else "cublas") for k in specs)
    }
    executable, choices = gpu.compile_gpu(tiny_fp16, cuda, decide=decide)
    assert [c.chosen for c in choices] == ["cudnn", "cudnn", "cublas"]
    assert all("NHWC" in c.operator for c in choices if c.operator.startswith("conv2d"))
    host = _host_code(executable)
    assert "tvm.contrib.cudnn.conv2d.forward" in host and "tvm.contrib.cublas.matmul" in host
    assert cuda_vendor.used_globals(host) == list(cuda_vendor.GLOBALS.values())
    assert "vm.builtin.cuda_graph.run_or_capture" in executable.as_text()  # on by default
    assert "__global__" in gpu.generated_source(executable)["cuda"]  # the epilogues stay TVM kernels
    lib = tmp_path / "tiny_cudnn.so"
    executable.export_library(str(lib))
    assert lib.read_bytes()[:4] == b"\x7fELF"


def test_cuda_graph_can_be_turned_off_and_tvm_kernels_need_no_library(tiny_fp16):
    executable, choices = gpu.compile_gpu(tiny_fp16, get_device("cuda"), use_cuda_graph=False)
    assert {c.chosen for c in choices} == {"default"}
    assert "run_or_capture" not in executable.as_text()
    assert cuda_vendor.used_globals(_host_code(executable)) == []
    assert (
        cuda_vendor.needed_libraries(choices, [{"name": "x.so", "provides": list(cuda_vendor.GLOBALS.values())}]) == []
    )


def test_a_measured_fallback_win_schedules_the_fused_kernel_with_fallback(tiny_fp16):
    target = get_device("cuda").tvm_target()
    prepared = gpu.prepare_layout(tiny_fp16)
    depthwise = [
        s for s in cuda_vendor.collect_specs(prepared).values() if isinstance(s, cuda_vendor.ConvSpec) and s.depthwise
    ]
    assert len(depthwise) == 1
    choice = OperatorChoice(
        depthwise[0].key,
        [Candidate("cudnn", 0.061), Candidate("default", 0.054, None, "Fallback")],
        "default",
        "Fallback",
    )
    lowered = gpu.lower_with_choices(prepared, target, {choice.operator: choice})
    tagged = [g.name_hint for g, _ in lowered.functions_items() if gpu.FALLBACK_TAG in g.name_hint]
    assert tagged and all(gpu.rules_for(n)[0].__class__.__name__ == "Fallback" for n in tagged)
    assert "tvm.contrib.cudnn" not in str(lowered)
    executable = gpu.build_lowered(lowered, target, cuda_graph=False)
    assert "__global__" in gpu.generated_source(executable)["cuda"]


def test_contrib_build_commands_find_wheel_style_cuda_layouts(tmp_path, monkeypatch):
    """torch's CUDA wheels ship libcudnn.so.9 without an unversioned link: link it by file name."""
    for sub, header, libs in (
        ("cudnn", "cudnn.h", ["libcudnn.so.9"]),
        ("cu13", "cublas_v2.h", ["libcublas.so.13", "libcublasLt.so.13"]),
        ("rt", "cuda_runtime.h", ["libcudart.so.13"]),
    ):
        (tmp_path / sub / "include").mkdir(parents=True)
        (tmp_path / sub / "include" / header).write_text("")
        (tmp_path / sub / "lib").mkdir()
        for lib in libs:
            (tmp_path / sub / "lib" / lib).write_text("")
    monkeypatch.setenv("TVMFLOW_CUDA_ROOTS", ":".join(str(tmp_path / s) for s in ("rt", "cudnn", "cu13")))
    compiles, link = cuda_vendor.compile_commands(tmp_path / "build")
    assert len(compiles) == 4 and all(c[-1].endswith(".o") for c in compiles)
    assert {f"-l:{n}" for n in ("libcudnn.so.9", "libcublas.so.13", "libcublasLt.so.13", "libcudart.so.13")} <= set(
        link
    )
    assert f"-I{tmp_path / 'cudnn' / 'include'}" in compiles[0]
    assert (tmp_path / "build" / "stub" / "3rdparty" / "compiler-rt" / "builtin_fp16.h").exists()
    monkeypatch.setenv("TVMFLOW_CUDA_ROOTS", str(tmp_path / "cudnn"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    monkeypatch.setattr(cuda_vendor, "_search_roots", lambda: [tmp_path / "cudnn"])
    with pytest.raises(TvmflowError, match="cuda_runtime.h not found"):
        cuda_vendor.find_cuda_paths()


def test_runtime_library_manifest_verifies_sha256(tmp_path):
    lib = tmp_path / cuda_vendor.LIBRARY_NAME
    lib.write_bytes(b"\x7fELF not really a library")
    manifest = cuda_vendor.runtime_manifest([lib])
    assert manifest[0]["sha256"] == cuda_vendor.sha256_of(lib) and manifest[0]["bytes"] == lib.stat().st_size
    assert set(manifest[0]["provides"]) == set(cuda_vendor.GLOBALS.values()) and "libcudnn" in manifest[0]["needs"]
    assert cuda_vendor.verify_runtime_libraries(manifest, tmp_path) == [lib]
    chosen = [OperatorChoice("conv", [Candidate("cudnn", 0.01)], "cudnn"), OperatorChoice("mm", [], "default")]
    assert cuda_vendor.needed_libraries(chosen, manifest) == manifest
    lib.write_bytes(b"\x7fELF tampered")
    with pytest.raises(TvmflowError, match="sha256"):
        cuda_vendor.verify_runtime_libraries(manifest, tmp_path)
    with pytest.raises(TvmflowError, match="missing"):
        cuda_vendor.verify_runtime_libraries(manifest, tmp_path / "empty")


def test_pick_best_times_candidates_inside_a_cuda_graph():
    """A bare call of a cuDNN extern costs ~50 us of host setup that a CUDA graph removes: each
    candidate is timed as repeated calls captured in a graph, with one parameter (a zero-parameter
    capture failed in the VM on the H200)."""
    target = get_device("cuda").tvm_target()
    spec = cuda_vendor.ConvSpec(
        (1, 7, 7, 64), (64, 3, 3, 64), (1, 1), (1, 1, 1, 1), (1, 1), 1, "NHWC", "OHWI", "float16", "float32"
    )
    candidates = gpu.operator_candidates(spec, target, ("cudnn",), algo=1)
    assert [c[0] for c in candidates][:2] == ["cudnn", "default"]
    for backend, _detail, prim in candidates[:2]:
        timing = gpu.graph_timing_module(prim, target)
        assert len(timing["main"].params) == 1
        text = gpu.build_timing_worker(timing, target, None).as_text()
        assert "vm.builtin.cuda_graph.run_or_capture" in text
        assert text.count("call  kernel") == gpu.GRAPH_REPEAT + 1, backend
