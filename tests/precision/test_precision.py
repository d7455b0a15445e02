"""fp16 / bf16 mixed precision: numerics against fp32 within the per-precision thresholds,
allow/deny lists, and the device profile's "slower than fp32" warning."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from tasks.errors import TvmflowError
from tasks.importers.datasets import load_dataset
from tasks.importers.model_import import InputSpec

SPECS = [InputSpec("x", (1, 1, 28, 28))]


@pytest.fixture(scope="module")
def mnist():
    """(imported fp32 Relax module of the real MNIST CNN, 40 real digits, fp32 outputs)."""
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    from tasks.importers.bundled import mnist_cnn
    from tasks.precision.layers import host_runner

    model, example = mnist_cnn()
    mod = from_exported_program(torch.export.export(model, example), unwrap_unit_return_tuple=True)
    data = load_dataset("bundled:mnist:40:1000", SPECS)
    run = host_runner(mod)
    return mod, data, [run(data.sample(i)) for i in range(len(data))]


def _outputs(mod, data):
    from tasks.precision.layers import host_runner

    run = host_runner(mod)
    return [run(data.sample(i)) for i in range(len(data))]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_within_thresholds(mnist, precision):
    from tasks.devices.validate import compare
    from tasks.precision.layers import list_layers
    from tasks.precision.policy import convert

    mod, data, ref = mnist
    converted = convert(mod, precision)
    text = converted.script(show_meta=False)
    dtype = {"fp16": "float16", "bf16": "bfloat16"}[precision]
    assert f'dtype="{dtype}"' in text  # operands really are low precision...
    assert 'out_dtype="float32"' in text  # ...and accumulation stays fp32
    validation = compare(_outputs(converted, data), ref, precision, data.labels)
    assert validation.passed, validation.reason
    assert 0 < validation.max_rel_err  # not silently fp32
    assert validation.accuracy == validation.reference_accuracy == 1.0
    assert len(list_layers(mod)) == 4


def test_bf16_allow_and_deny_lists(mnist):
    from tasks.precision.policy import cast_operands

    mod = mnist[0]
    _, all_layers = cast_operands(mod, "bfloat16")
    assert all_layers == ["conv2d_0", "conv2d_1", "matmul_0", "matmul_1"]
    _, only_dense = cast_operands(mod, "bfloat16", allow=["matmul"])
    assert only_dense == ["matmul_0", "matmul_1"]
    _, denied = cast_operands(mod, "bfloat16", deny=["conv2d_0", "matmul"])
    assert denied == ["conv2d_1"]


def test_fp16_deny_list_keeps_layer_in_fp32(mnist):
    from tasks.devices.validate import compare
    from tasks.precision.policy import to_fp16

    mod, data, ref = mnist
    converted = to_fp16(mod, deny=["conv2d_0"])
    first_conv = next(line for line in converted.script(show_meta=False).splitlines() if "R.nn.conv2d" in line)
    assert "(x," in first_conv.replace(" ", "").replace("R.nn.conv2d", "(")  # fed by the fp32 input itself
    assert compare(_outputs(converted, data), ref, "fp16").passed


def test_precision_warning_from_device_profile():
    from tasks.devices.profiles import DeviceProfile
    from tasks.precision.policy import host_precisions, precision_warning

    avx2 = "flags\t\t: fpu sse2 avx avx2 fma f16c"
    sapphire = "flags\t\t: avx2 avx512f avx512_vnni avx512_bf16 avx512_fp16 amx_bf16"
    assert host_precisions(avx2) == ("fp32", "int8")
    assert host_precisions(sapphire) == ("fp32", "fp16", "bf16", "int8")
    cpu = DeviceProfile("cpu", {"kind": "llvm"}, "cpu", precisions=host_precisions(avx2))
    assert "AVX512-FP16" in precision_warning(cpu, "fp16")
    assert precision_warning(cpu, "bf16") and precision_warning(cpu, "fp32") is None
    assert precision_warning(cpu, "int8") is None


def test_cli_warns_and_rejects_unknown_precision(capsys):
    from flows.cli import _precision_options

    args = argparse.Namespace(
        precision="fp16",
        device="aarch64-linux",
        calibration=None,
        calib_method="max",
        keep_float=None,
        precision_allow="conv2d",
        precision_deny=None,
        reduce_range=False,
    )
    opts = _precision_options(args)
    assert opts["allow"] == ["conv2d"]
    assert "warning: fp16 is likely slower than fp32 on device 'aarch64-linux'" in capsys.readouterr().err
    args.precision = "int4"
    with pytest.raises(TvmflowError, match="unknown precision 'int4'"):
        _precision_options(args)


def test_mixed_precision_is_not_a_quantizer(mnist):
    from tasks.precision.policy import convert

    with pytest.raises(TvmflowError, match="not a mixed precision"):
        convert(mnist[0], "int8")
    assert np.isfinite(mnist[2][0][0]).all()
