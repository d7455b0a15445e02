"""ONNX exported the standard way (torch.onnx.export): shape arithmetic folded before import, a
dynamic batch set to 1 with one notice, and one error that lists every problem of a model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from tasks.errors import TvmflowError
from tasks.importers.model_import import InputSpec, import_model


class SamePadNet(nn.Module):
    """EfficientNet-Lite's padding pattern (Conv2dDynamicSamePadding: pads computed from x.size()),
    small enough to compile in seconds."""

    def __init__(self):
        super().__init__()
        from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

        torch.manual_seed(0)
        self.stem = Conv2dDynamicSamePadding(3, 8, 3, stride=2, bias=False)
        self.dw = Conv2dDynamicSamePadding(8, 8, 5, stride=2, groups=8, bias=False)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.clamp(self.stem(x), 0, 6)
        x = torch.clamp(self.dw(x), 0, 6)
        return self.head(x.mean((2, 3)))


def _export(module, path, shape, dynamic_batch=True):
    torch.onnx.export(
        module.eval(),
        (torch.zeros(shape),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None,
    )
    return path


def test_torch_exported_pads_fold_import_and_compile(tmp_path):
    import onnxruntime as ort
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    path = _export(SamePadNet(), tmp_path / "samepad.onnx", (1, 3, 33, 33))
    raw = onnx.load(str(path))
    assert {"Shape", "Pad"} <= {n.op_type for n in raw.graph.node} or {"ConstantOfShape", "Pad"} <= {
        n.op_type for n in raw.graph.node
    }
    with pytest.raises(Exception):  # noqa: B017 - TVM raises its own error types. The premise: TVM refuses the unfolded graph (dynamic pads / reshape)
        from_onnx(raw, shape_dict={"input": [1, 3, 33, 33]})

    imported = import_model(path)  # no --input: the dynamic batch becomes 1
    assert imported.inputs == [InputSpec("input", (1, 3, 33, 33), "float32")]
    assert (
        imported.notes[0]
        == "dynamic batch dimension of input(s) input set to 1 (for another batch: --input input:Nx3x33x33:float32)"
    )
    assert sum("batch" in n for n in imported.notes) == 1
    assert (
        imported.notes[1].startswith("folded the shape computations") and "Pad" not in imported.notes[1].split("(")[1]
    )
    x = np.random.default_rng(0).standard_normal((1, 3, 33, 33)).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(imported.mod, target="llvm"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    assert import_model(path, batch=2).inputs[0].shape == (2, 3, 33, 33)


def test_efficientnet_lite0_exported_the_standard_way_imports(tmp_path):
    """The real model of issue 16: torch.onnx.export writes 17 dynamic Pads (and a dynamic batch);
    folded for batch 1, it imports with no --input."""
    from tasks.importers.bundled import efficientnet_lite0

    model, example = efficientnet_lite0()
    path = _export(model, tmp_path / "efficientnet_lite0.onnx", example[0].shape)  # dynamic batch, as exported usually
    pads_before = sum(n.op_type == "ConstantOfShape" for n in onnx.load(str(path)).graph.node)
    assert pads_before >= 10
    imported = import_model(path)  # no --input
    assert imported.inputs == [InputSpec("input", (1, 3, 224, 224), "float32")]
    assert sum("dynamic batch" in n for n in imported.notes) == 1
    folded = [n for n in imported.notes if n.startswith("folded")]
    assert len(folded) == 1 and f"ConstantOfShape {pads_before}" in folded[0]


def test_one_error_lists_every_problem(tmp_path):
    """Two inputs with dynamic non-batch dims and two unsupported operators: one line, three problems."""
    nodes = [
        helper.make_node("Det", ["a"], ["d"]),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("Bernoulli", ["r"], ["u"]),
    ]
    graph = helper.make_graph(
        nodes,
        "many",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "h", "h"]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, "w"]),
        ],
        [
            helper.make_tensor_value_info("d", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("u", TensorProto.FLOAT, [None]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "many.onnx"
    onnx.save(model, str(path))
    with pytest.raises(TvmflowError) as info:
        import_model(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot import the model, 3 problems:")
    assert "input 'a' has dynamic dims (?, ?, ?): give them with --input a:1xNxN:float32" in message
    assert "input 'b' has dynamic dims (1, ?): give them with --input b:1xN:float32" in message
    assert "unsupported operator(s): Bernoulli, Det" in message
