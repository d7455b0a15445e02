"""Model import: format detection by content, ONNX / .pt2 / factory import, and one-line errors."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from tasks.errors import TvmflowError
from tasks.importers.model_import import (
    InputSpec,
    detect_format,
    export_factory,
    import_model,
    import_onnx,
    import_pt2,
    is_factory,
    model_name,
    parse_input_spec,
)


def _tiny_onnx(path, op="Relu", shape=(1, 4), out_shape=None, **attrs):
    """A one-node ONNX graph x -> op -> y."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node(op, ["x"], ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape or shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _dynamic_onnx(path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_parse_input_spec():
    assert parse_input_spec("x:1x3x224x224:float32") == InputSpec("x", (1, 3, 224, 224), "float32")
    assert parse_input_spec("ids:1X8:int64") == InputSpec("ids", (1, 8), "int64")
    assert parse_input_spec("x:2x2").dtype == "float32"
    assert str(InputSpec("x", (1, 3), "float32")) == "x:1x3:float32"
    for bad in ("x", "x:1x0:float32", ":1x2", "x:1xa", "x:1x2:float32:extra"):
        with pytest.raises(TvmflowError, match="bad --input"):
            parse_input_spec(bad)


def test_detect_format_by_content_not_name(tmp_path, mnist_pt2):
    onnx_named_bin = _tiny_onnx(tmp_path / "model.bin")
    assert detect_format(onnx_named_bin) == "onnx"
    pt2_named_onnx = tmp_path / "really_a_pt2.onnx"
    pt2_named_onnx.write_bytes(mnist_pt2.read_bytes())
    assert detect_format(pt2_named_onnx) == "pt2"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is not a model at all\n" * 4, "not a model this tool can read"),
        (b"\x89HDF\r\n\x1a\n" + b"\0" * 64, "HDF5"),
        (b"\x1c\0\0\0TFL3" + b"\0" * 64, "TFLite"),
    ],
)
def test_detect_format_rejects_unsupported_content(tmp_path, content, message):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(TvmflowError, match=message) as info:
        detect_format(path)
    assert "\n" not in str(info.value)


def test_truncated_onnx_is_rejected(tmp_path, mnist_onnx):
    data = mnist_onnx.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(TvmflowError, match="corrupt, truncated"):
        import_model(path)


def test_truncated_pt2_is_rejected(tmp_path, mnist_pt2):
    data = mnist_pt2.read_bytes()
    path = tmp_path / "truncated.pt2"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TvmflowError, match="corrupt or truncated"):
        import_model(path)


def test_zip_that_is_not_pt2_is_rejected(tmp_path):
    path = tmp_path / "model.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(TvmflowError, match="not a torch.export .pt2"):
        detect_format(path)


def test_empty_file_is_rejected(tmp_path):
    from tasks.importers.fetch import fetch

    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(TvmflowError, match="empty"):
        fetch(str(path), tmp_path / "dl")
    with pytest.raises(TvmflowError):
        detect_format(path)


def test_missing_file_is_one_line_error(tmp_path):
    from tasks.importers.fetch import fetch

    with pytest.raises(TvmflowError, match="does not exist"):
        fetch(str(tmp_path / "nope.onnx"), tmp_path / "dl")


def test_fetch_hashes_content(tmp_path):
    import hashlib

    from tasks.importers.fetch import fetch

    src = tmp_path / "m.onnx"
    src.write_bytes(b"abc" * 100)
    got = fetch("file://" + str(src), tmp_path / "dl")
    assert got.sha256 == hashlib.sha256(b"abc" * 100).hexdigest()
    assert got.path.read_bytes() == b"abc" * 100 and got.size == 300


def test_import_onnx_tiny_graph_runs(tmp_path):
    import tvm
    from tvm import relax

    imported = import_model(_tiny_onnx(tmp_path / "relu.onnx"))
    assert imported.framework == "onnx"
    assert imported.inputs == [InputSpec("x", (1, 4), "float32")]
    ex = tvm.compile(imported.mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = np.array([[-1, 2, -3, 4]], dtype="float32")
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), np.maximum(x, 0))


def test_import_onnx_mnist_has_static_input(mnist_onnx):
    imported = import_onnx(mnist_onnx)
    assert len(imported.inputs) == 1
    assert imported.inputs[0].shape == (1, 1, 28, 28) and imported.inputs[0].dtype == "float32"


def test_unsupported_operator_is_named(tmp_path):
    from tvm.relax.frontend.onnx import onnx_frontend

    assert "Det" not in onnx_frontend._get_convert_map()  # the premise of this test
    path = _tiny_onnx(tmp_path / "det.onnx", op="Det", shape=(2, 3, 3), out_shape=(2,))
    with pytest.raises(TvmflowError, match=r"unsupported operator\(s\): Det") as info:
        import_model(path)
    assert "\n" not in str(info.value)


def test_wrong_input_shape_for_onnx(tmp_path):
    path = _tiny_onnx(tmp_path / "relu.onnx")
    with pytest.raises(TvmflowError, match="does not fit input 'x'"):
        import_model(path, [parse_input_spec("x:1x5:float32")])
    with pytest.raises(TvmflowError, match="not inputs of the model"):
        import_model(path, [parse_input_spec("y:1x4:float32")])


def test_dynamic_batch_becomes_one_or_batch_or_input_spec(tmp_path):
    path = _dynamic_onnx(tmp_path / "dyn.onnx")
    imported = import_model(path)
    assert imported.inputs == [InputSpec("x", (1, 4), "float32")]
    assert [n for n in imported.notes if "batch" in n] == [
        "dynamic batch dimension of input(s) x set to 1 (for another batch: --input x:Nx4:float32)"
    ]
    assert import_model(path, batch=2).inputs == [InputSpec("x", (2, 4), "float32")]
    imported = import_model(path, [parse_input_spec("x:3x4:float32")])
    assert imported.inputs == [InputSpec("x", (3, 4), "float32")] and imported.notes == []


def test_import_pt2(mnist_pt2):
    imported = import_pt2(mnist_pt2)
    assert imported.framework == "torch"
    assert [s.shape for s in imported.inputs] == [(1, 1, 28, 28)]
    assert "main" in [gv.name_hint for gv in imported.mod.get_global_vars()]


def test_wrong_input_shape_for_pt2(mnist_pt2):
    name = import_pt2(mnist_pt2).inputs[0].name
    with pytest.raises(TvmflowError, match="does not match the exported program"):
        import_pt2(mnist_pt2, [parse_input_spec(f"{name}:1x1x32x32:float32")])
    with pytest.raises(TvmflowError, match="is not an input of the model"):
        import_pt2(mnist_pt2, [parse_input_spec("nope:1x1x28x28:float32")])


def test_factory_export_and_names(tmp_path):
    assert is_factory("tasks.importers.bundled:mnist_cnn")
    assert not is_factory("model.onnx")
    assert model_name("tasks.importers.bundled:mnist_cnn") == "mnist_cnn"
    assert model_name("s3://bucket/dir/resnet 18.onnx") == "resnet_18"
    out = export_factory(
        "tasks.importers.bundled:mnist_cnn", tmp_path / "f" / "m.pt2", [parse_input_spec("x:2x1x28x28:float32")]
    )
    assert detect_format(out) == "pt2"
    assert import_pt2(out).inputs[0].shape == (2, 1, 28, 28)


def test_unknown_factory_is_one_line_error(tmp_path):
    with pytest.raises(TvmflowError, match="cannot load model factory"):
        export_factory("tasks.importers.bundled:no_such_model", tmp_path / "x.pt2")
    with pytest.raises(TvmflowError, match="cannot load model factory"):
        export_factory("no_such_package.mod:fn", tmp_path / "x.pt2")
