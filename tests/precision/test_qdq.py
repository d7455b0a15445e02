"""Pre-quantized QDQ ONNX models (onnxruntime quantize_static) on the integer path (tasks/precision/qdq.py).

The QDQ models are made here the way users make them: the bundled MNIST CNN exported to ONNX,
quantized by onnxruntime on 32 real digits. Three variants cover the zero-point cases:
- u8_rr: uint8 activations, 7-bit weights (reduce_range). onnxruntime's fused int8 kernels are
  exact on this CPU for it, so its default session is the reference.
- u8 / s8: full-range weights, uint8 / int8 activations (int8 post-ReLU zp -128 -> uint8 shift; the
  input's zp != 0 -> explicit zp padding + sum(W) correction). On CPUs without VNNI onnxruntime's
  u8 x s8 kernel (vpmaddubsw) saturates int16 pair sums, so its optimized session drifts by many
  quantization steps (measured: 12.3 at the logits); there the reference is onnxruntime with graph
  optimizations off, which computes the QDQ graph as ONNX defines it (the flow's validation
  reference does the same: tasks.importers.reference, tasks.precision.qdq.is_qdq_file).
Tolerance: one quantization step of the model's output (its last DequantizeLinear scale).
onnxruntime requantizes in one integer step, this path rescales in float and the next
QuantizeLinear rounds, so a value within float rounding of a .5 boundary may land one step away.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from flows.cli import main
from tasks.errors import TvmflowError
from tasks.importers.datasets import load_dataset
from tasks.importers.model_import import InputSpec, import_onnx

SPEC = [InputSpec("x", (1, 1, 28, 28))]
VARIANTS = {"u8_rr": ("uint8", True), "u8": ("uint8", False), "s8": ("int8", False)}


@pytest.fixture(scope="module")
def qdq(tmp_path_factory, mnist_onnx) -> dict[str, Path]:
    """The three QDQ variants of the MNIST CNN, calibrated on digits [0:32]."""
    from tasks.precision.qdq import quantize_static_qdq

    folder = tmp_path_factory.mktemp("qdq")
    calib = load_dataset("bundled:mnist:32:0", SPEC)
    return {
        name: quantize_static_qdq(mnist_onnx, calib, folder / f"{name}.onnx", act, rr)
        for name, (act, rr) in VARIANTS.items()
    }


def _calls(mod) -> list:
    from tvm import relax

    return [
        b.value
        for block in mod["main"].body.blocks
        for b in block.bindings
        if isinstance(b.value, relax.Call) and hasattr(b.value.op, "name")
    ]


def _output_step(path: Path) -> float:
    """The scale of the model's last DequantizeLinear: one quantization step of its output."""
    model = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    last = [n for n in model.graph.node if n.op_type == "DequantizeLinear"][-1]
    assert last.output[0] == model.graph.output[0].name
    return float(init[last.input[1]])


def _ort(path: Path, optimized: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("variant", ["u8", "s8"])
def test_import_gives_integer_layers_and_no_float_conv(qdq, variant):
    from tasks.precision.qdq import prequantized_info

    mod = import_onnx(qdq[variant]).mod
    layers = [c for c in _calls(mod) if c.op.name in ("relax.nn.conv2d", "relax.matmul")]
    assert [c.op.name for c in layers] == ["relax.nn.conv2d"] * 2 + ["relax.matmul"] * 2
    for call in layers:  # 8-bit activation x const int8 weight -> int32: what the int8 packing pass matches
        assert str(call.args[0].ty.dtype) in ("int8", "uint8")
        assert call.args[1].value.numpy().dtype == np.int8
        assert str(call.ty.dtype) == "int32"
    info = prequantized_info(mod)
    assert info["prequantized"] and info["kept_float"] == []
    handling = {l["name"]: l["zero_point"] for l in info["integer_layers"]}
    # the input's zero point is not 0 in either variant: explicit zp padding + sum(W) correction
    assert handling["conv2d_0"] == "pad + sum(W) correction"
    assert set(list(handling.values())[1:]) == ({"none"} if variant == "u8" else {"int8->uint8 shift"})
    assert all(l["act_dtype"] == "uint8" for l in info["integer_layers"][1:])


@pytest.mark.parametrize("variant,optimized", [("u8_rr", True), ("u8", False), ("s8", False)])
def test_outputs_match_onnxruntime_on_200_digits(qdq, variant, optimized):
    from tasks.precision.layers import host_runner

    run = host_runner(import_onnx(qdq[variant]).mod)
    session = _ort(qdq[variant], optimized)
    digits = load_dataset("bundled:mnist:200:500", SPEC)
    ours = np.concatenate([run(digits.sample(i))[0] for i in range(len(digits))])
    ref = np.concatenate([session.run(None, {"x": digits.sample(i)["x"]})[0] for i in range(len(digits))])
    step = _output_step(qdq[variant])
    assert np.abs(ours - ref).max() <= step * 1.001, (np.abs(ours - ref).max(), step)
    assert np.array_equal(ours.argmax(1), ref.argmax(1))
    assert np.mean(ours.argmax(1) == digits.labels) >= 0.98  # the real model still reads digits


def _mutated(src: Path, dest: Path, how: str) -> Path:
    """An unsupported QDQ form made from a real one."""
    model = onnx.load(str(src))
    init = {i.name: i for i in model.graph.initializer}
    if how == "weight_zero_point":  # asymmetric weights for the second conv
        zp = init["features.3.weight_zero_point"]
        zp.CopyFrom(numpy_helper.from_array(np.ones(numpy_helper.to_array(zp).shape, np.int8), zp.name))
    else:  # a per-channel scale on the second conv's input activation
        node = next(
            n
            for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.output[0] == "max_pool2d_DequantizeLinear_Output"
        )
        scale = numpy_helper.to_array(init[node.input[1]])
        zp = numpy_helper.to_array(init[node.input[2]])
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(np.full(32, scale, np.float32), "pc_scale"),
                numpy_helper.from_array(np.full(32, zp, zp.dtype), "pc_zp"),
            ]
        )
        node.input[1], node.input[2] = "pc_scale", "pc_zp"
        node.attribute.append(onnx.helper.make_attribute("axis", 1))
    onnx.save(model, str(dest))
    return dest


@pytest.mark.parametrize(
    "how,message",
    [("weight_zero_point", "non-zero weight zero point"), ("per_channel_act", "per-channel input activation scale")],
)
def test_unsupported_qdq_forms_are_one_line_errors(qdq, tmp_path, how, message):
    bad = _mutated(qdq["u8"], tmp_path / "bad.onnx", how)
    with pytest.raises(TvmflowError) as err:
        import_onnx(bad)
    text = str(err.value)
    assert "\n" not in text and message in text and "conv2d_1" in text and "quantize_static" in text


def test_fp16_of_a_prequantized_model_is_refused():
    from tasks.precision.qdq import effective_precision

    info = {"prequantized": True, "integer_layers": [], "kept_float": []}
    assert effective_precision("fp32", info) == "int8" and effective_precision("fp32", None) == "fp32"
    with pytest.raises(TvmflowError, match="pre-quantized int8"):
        effective_precision("fp16", info)


@pytest.fixture(scope="module")
def published(qdq, tmp_path_factory, local_workers, prefect_harness) -> dict:
    """The u8 QDQ model through compile_flow (0 trials), validated on the device, published.
    The first flow run of the module happens here, outside any capsys: Prefect binds its console
    handler to the stream of its first run, and a test's capsys stream is closed after the test."""
    from flows.compile import compile_flow

    store = tmp_path_factory.mktemp("qdq-store")
    return compile_flow(
        model=str(qdq["u8"]),
        device="local",
        trials=0,
        store=str(store),
        data="bundled:mnist:100:3000",
        tracker=local_workers.tracker,
        measure_untuned=False,
    )


def test_flow_compiles_validates_and_publishes_a_qdq_model(qdq, published):
    manifest_path = Path(published["manifest_uri"].removeprefix("file://"))
    manifest = json.loads(manifest_path.read_text())
    # validated on the device against onnxruntime running the same QDQ model, with the int8 gate
    assert manifest["precision"] == "int8" and manifest["validation"]["passed"]
    assert manifest["validation"]["precision"] == "int8" and manifest["validation"]["top1_agreement"] == 1.0
    # the reference is the QDQ graph as ONNX defines it (tasks.precision.qdq.is_qdq_file): within one output step
    assert manifest["validation"]["max_abs_err"] <= _output_step(qdq["u8"]) * 1.001
    assert [l["name"] for l in published["precision_info"]["integer_layers"]] == [
        "conv2d_0",
        "conv2d_1",
        "matmul_0",
        "matmul_1",
    ]
    report = (manifest_path.parent / "report.md").read_text()
    assert "precision: int8 (pre-quantized QDQ model: 4 integer layers)" in report


def _cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_unsupported_qdq_model_exits_2_and_publishes_nothing(qdq, published, tmp_path, local_workers, capsys):
    bad = _mutated(qdq["u8"], tmp_path / "bad.onnx", "weight_zero_point")
    store = tmp_path / "store"
    code, out, err = _cli(
        [
            "compile",
            "--model",
            str(bad),
            "--trials",
            "0",
            "--data",
            "bundled:mnist:20",
            "--store",
            str(store),
            "--tracker",
            local_workers.tracker,
            "--no-untuned",
        ],
        capsys,
    )
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "non-zero weight zero point" in lines[0], err[-3000:]
    assert "Traceback" not in err
    files = [p.relative_to(store) for p in store.rglob("*") if p.is_file()] if store.exists() else []
    assert [f for f in files if f.parts[0] != "prefect-results"] == [], files
