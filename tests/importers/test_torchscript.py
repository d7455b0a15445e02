"""TorchScript .pt files (torch.jit.save, traced or scripted): detected by content, converted,
compiled and checked against the TorchScript module itself; a state dict gets a one-line error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tasks.errors import TvmflowError
from tasks.importers.model_import import (
    InputSpec,
    detect_format,
    framework_of,
    import_model,
    parse_input_spec,
)
from tasks.importers.reference import Reference


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + self.down(x))


class TinyResNet(nn.Module):
    """torchvision's ResNet layout (stem, residual basic block, pooled classifier), 32x32 input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block = BasicBlock(16, 32, 2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _compile_and_run(mod, x):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_traced_torchscript_compiles_and_matches_the_module(tmp_path):
    path = tmp_path / "resnet_traced.pth"  # the suffix says nothing: detection reads the content
    torch.jit.save(torch.jit.trace(TinyResNet().eval(), torch.zeros(1, 3, 32, 32)), str(path))
    assert detect_format(path) == "torchscript" and framework_of("torchscript") == "torchscript"

    imported = import_model(path)  # traced: the shape comes from the file, no --input
    assert imported.framework == "torchscript"
    assert imported.inputs == [InputSpec("x", (1, 3, 32, 32), "float32")]
    assert any("torch.onnx.export" in n for n in imported.notes)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype("float32")
    want = Reference(path, "torchscript", ["x"]).run({"x": x})[0]  # the TorchScript module itself
    np.testing.assert_allclose(_compile_and_run(imported.mod, x), want, rtol=1e-4, atol=1e-4)


def test_scripted_torchscript_needs_input_and_then_compiles(tmp_path):
    class Scaled(nn.Module):
        def forward(self, image):
            return torch.relu(image) * 2.0

    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(Scaled()), str(path))
    with pytest.raises(TvmflowError, match=r"no recorded shape .* --input image:1x3x224x224:float32") as info:
        import_model(path)
    assert "\n" not in str(info.value)
    imported = import_model(path, [parse_input_spec("image:2x4:float32")])
    assert imported.inputs == [InputSpec("image", (2, 4), "float32")]
    x = np.array([[-1, 2, -3, 4], [5, -6, 7, -8]], dtype="float32")
    np.testing.assert_allclose(_compile_and_run(imported.mod, x), np.maximum(x, 0) * 2)


@pytest.mark.parametrize("legacy", [False, True])
def test_state_dict_gets_one_line_error_saying_what_to_save(tmp_path, legacy):
    path = tmp_path / "weights.pth"
    torch.save(TinyResNet().state_dict(), str(path), _use_new_zipfile_serialization=not legacy)
    with pytest.raises(TvmflowError, match=r"torch.save checkpoint .* torch.jit.save\(torch.jit.trace") as info:
        detect_format(path)
    assert "\n" not in str(info.value)
