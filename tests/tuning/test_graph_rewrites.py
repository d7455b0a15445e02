"""NHWC conversion of a MobileNet/EfficientNet-style block (TF "same" pad, depthwise conv, ReLU6):
no pad and no ReLU6 left behind in NCHW between two transposes, and outputs equal torch's."""

from __future__ import annotations

import numpy as np
import pytest


def _block():
    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.expand = nn.Conv2d(8, 24, 1)
            self.dw = nn.Conv2d(24, 24, 3, stride=2, groups=24)
            self.project = nn.Conv2d(24, 16, 1)

        def forward(self, x):
            y = torch.clamp(self.expand(x), 0, 6)
            y = torch.clamp(self.dw(F.pad(y, (0, 1, 0, 1))), 0, 6)  # TF "same": pad right/bottom only
            return self.project(F.pad(y, (1, 1, 1, 1)))

    return Block().eval(), torch.randn(1, 8, 15, 15)


@pytest.fixture(scope="module")
def block():
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    net, x = _block()
    with torch.no_grad():
        ref = net(x).numpy()
    return from_exported_program(torch.export.export(net, (x,)), unwrap_unit_return_tuple=True), x.numpy(), ref


def _ops(mod) -> list[str]:
    return [line.split("= R.")[1].split("(")[0] for line in mod.script().splitlines() if "= R." in line]


def test_nhwc_leaves_no_pad_or_relu6_stranded_in_nchw(block):
    from tasks.tuning.extract import convert_layout

    mod, _, _ = block
    assert _ops(mod).count("nn.pad") == 2 and _ops(mod).count("clip") == 2
    ops = _ops(convert_layout(mod, "NHWC"))
    assert "nn.pad" not in ops, ops  # folded into the convs' padding
    assert ops.count("clip") == 2, ops  # ReLU6 kept as one op (the vendor conv fuses it)
    assert ops.count("permute_dims") == 2, ops  # the input into NHWC, the output back: nothing between


def test_rewritten_block_computes_what_torch_does(block):
    import tvm
    from tvm import relax

    from tasks.build.compile import compile_module
    from tasks.devices.profiles import get_device
    from tasks.tuning.extract import prepare_for_tuning

    mod, x, ref = block
    device = get_device("local")
    prepared = prepare_for_tuning(mod, device.tvm_target(), layout="NHWC")
    out = relax.VirtualMachine(compile_module(prepared, device, None), tvm.cpu())["main"](tvm.runtime.tensor(x))
    np.testing.assert_allclose((out if hasattr(out, "numpy") else out[0]).numpy(), ref, rtol=1e-4, atol=1e-4)


def test_a_pad_with_a_nonzero_value_is_not_folded():
    import torch
    from torch.nn import functional as F
    from tvm.relax.frontend.torch import from_exported_program

    from tasks.tuning.graph_rewrites import before_layout_conversion

    class OnesPad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.conv(F.pad(x, (1, 1, 1, 1), value=1.0))  # not the conv's zero padding

    x = torch.randn(1, 4, 8, 8)
    mod = from_exported_program(torch.export.export(OnesPad().eval(), (x,)), unwrap_unit_return_tuple=True)
    assert _ops(mod).count("nn.pad") == 1
    assert _ops(before_layout_conversion(mod)).count("nn.pad") == 1
