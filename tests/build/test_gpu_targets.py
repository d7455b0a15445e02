"""GPU profiles and GPU code generation (issue 7). CI has no GPU and no OpenCL runtime, so these
tests build and inspect code and never run it: CUDA source for the `cuda` profile (codegen needs
no GPU), OpenCL for Mali (cross-linked for aarch64) and Adreno, WGSL for WebGPU. The timings on a
real GPU come from bench/gpu_bench.py on the lent GPU machine (bench/README_gpu.md)."""

from __future__ import annotations

import tarfile

import pytest
import tvm

from tasks.build import gpu
from tasks.devices.profiles import get_device, load_fleet
from tasks.errors import TvmflowError
from tasks.importers.model_import import export_factory, import_pt2
from tasks.tuning.extract import extract_tasks, prepare_for_tuning


@pytest.fixture(scope="module")
def mnist_mod(mnist_pt2):
    return import_pt2(mnist_pt2).mod


def _build(mod, profile, fp16=False):
    mod = gpu.to_mixed_fp16(mod) if fp16 else mod
    return gpu.compile_prepared(prepare_for_tuning(mod, profile.target), profile.target)


def test_cuda_profile_has_what_metaschedule_needs():
    cuda = get_device("cuda")
    target = cuda.tvm_target()
    assert target.kind.name == "cuda" and target.attrs["arch"] == "sm_90"
    for key, value in gpu.CUDA_LIMITS.items():
        assert int(target.attrs[key]) == value
    assert target.host.kind.name == "llvm"
    assert cuda.precisions == ("fp32", "fp16")
    assert cuda.extra["build"]["pass_config"] == gpu.BUILD_CONFIG


def test_cuda_arch_names_resolve_from_the_cuda_profile():
    a10 = get_device("cuda-sm_86")
    assert a10.target["arch"] == "sm_86" and a10.rpc_key == "cuda-sm_86"
    assert a10.tvm_target().attrs["max_threads_per_block"] == 1024
    assert get_device("cuda").target["arch"] == "sm_90"  # the base profile is untouched
    assert "cuda-sm_86" not in load_fleet()
    with pytest.raises(TvmflowError, match="unknown device 'cuda-ampere'"):
        get_device("cuda-ampere")


def test_build_only_profiles_are_marked():
    fleet = load_fleet()
    for name in ("mali-opencl", "adreno-opencl", "webgpu"):
        assert fleet[name].extra.get("build_only") is True
        assert gpu.is_gpu(fleet[name].target)
    assert not fleet["cuda"].extra.get("build_only")


def test_cuda_fp16_builds_to_cuda_source_and_a_library(mnist_mod, tmp_path):
    cuda = get_device("cuda")
    executable = _build(mnist_mod, cuda, fp16=True)
    source = gpu.generated_source(executable)["cuda"]
    assert "__global__" in source and "half" in source  # fp16 kernels, not fp32 ones
    lib = tmp_path / "mnist_cuda.so"
    executable.export_library(str(lib))
    assert lib.read_bytes()[:4] == b"\x7fELF" and lib.stat().st_size > 10_000
    # tuning tasks extract for the GPU target as for CPU
    tasks = extract_tasks(prepare_for_tuning(gpu.to_mixed_fp16(mnist_mod), cuda.target), cuda.tvm_target())
    assert any("conv2d" in t.name for t in tasks) and all(t.flops >= 0 for t in tasks)


def test_mali_opencl_cross_builds_an_aarch64_library(tmp_path):
    """ResNet-18 for a Mali board: OpenCL kernels inside an aarch64 shared library. Not run."""
    mali = get_device("mali-opencl")
    program = export_factory("tasks.importers.bundled:resnet18", tmp_path / "resnet18.pt2")
    executable = _build(import_pt2(program).mod, mali)
    source = gpu.generated_source(executable)["opencl"]
    assert "__kernel" in source and source.count("__kernel") >= 10
    lib = tmp_path / "resnet18_mali.so"
    executable.export_library(str(lib), fcompile=mali.export_compiler())
    head = lib.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64


def test_adreno_opencl_and_webgpu_generate_code(mnist_mod, tmp_path):
    """Adreno (Android) and WebGPU need the NDK / emscripten to link: export objects, inspect source."""
    adreno = _build(mnist_mod, get_device("adreno-opencl"), fp16=True)
    cl = gpu.generated_source(adreno)["opencl"]
    assert "__kernel" in cl and "half" in cl
    archive = tmp_path / "mnist_adreno.tar"
    adreno.export_library(str(archive))
    assert any(n.endswith(".o") for n in tarfile.open(archive).getnames())
    wgsl = gpu.generated_source(_build(mnist_mod, get_device("webgpu")))["webgpu"]
    assert "@compute" in wgsl


def test_no_vulkan_codegen_in_this_wheel():
    """Why the fleet has no Vulkan profile: the wheel has no SPIR-V code generator."""
    assert tvm.get_global_func("target.build.vulkan", allow_missing=True) is None
    assert tvm.get_global_func("target.build.opencl", allow_missing=True) is not None
