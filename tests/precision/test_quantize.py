"""Calibrated int8: calibration ranges, real integer compute, the accuracy gate on real MNIST
digits, one-line errors for bad calibration input, and a failing gate that publishes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.errors import TvmflowError
from tasks.importers.datasets import load_dataset
from tasks.importers.model_import import InputSpec

SPECS = [InputSpec("x", (1, 1, 28, 28))]


@pytest.fixture(scope="module")
def mnist_mod():
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    from tasks.importers.bundled import mnist_cnn

    model, example = mnist_cnn()
    return from_exported_program(torch.export.export(model, example), unwrap_unit_return_tuple=True)


def test_calibration_methods_give_sensible_ranges():
    from tasks.precision.calibrate import LayerStats, choose_range

    rng = np.random.default_rng(1)
    signed, relu = LayerStats(), LayerStats()
    for _ in range(20):
        x = rng.standard_normal(20000).astype("float32")
        x[:2] = 40.0  # rare outliers
        signed.add(x, rng)
        relu.add(np.maximum(x, 0), rng)
    lo, hi = choose_range(signed, "max")
    assert (lo, hi) == (-40.0, 40.0)
    p_lo, p_hi = choose_range(signed, "percentile", 99.9)
    assert 2.5 < p_hi < 4.5 and p_lo == -p_hi  # the outliers are clipped
    k_lo, k_hi = choose_range(signed, "kl")
    assert 2.0 < k_hi < 40.0 and k_lo == -k_hi
    r_lo, r_hi = choose_range(relu, "percentile")
    assert r_lo == 0.0 and 0 < r_hi <= 40.0  # post-ReLU: unsigned range, uint8 activations
    with pytest.raises(TvmflowError, match="unknown calibration method 'mse'"):
        choose_range(signed, "mse")


def test_empty_or_missing_calibration_is_a_one_line_error(tmp_path):
    from tasks.precision.calibrate import load_calibration

    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, 1, 1, 28, 28), "float32"))
    with pytest.raises(TvmflowError) as err:
        load_calibration(str(empty), SPECS)
    assert "calibration set" in str(err.value) and "empty" in str(err.value) and "\n" not in str(err.value)
    folder = tmp_path / "no-images"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    with pytest.raises(TvmflowError, match="no images .* give a folder or archive of photos"):
        load_calibration(str(folder), SPECS)
    with pytest.raises(TvmflowError, match="pass --calibration URI"):
        load_calibration(None, SPECS)


def test_image_folder_calibration_with_preprocessing_spec(tmp_path):
    from skimage import io

    from tasks.precision.calibrate import load_calibration

    for i in range(3):
        io.imsave(tmp_path / f"digit{i}.png", np.full((56, 40, 3), 50 * i, "uint8"), check_contrast=False)
    data = load_calibration(f"{tmp_path}#mean=0&std=255", SPECS)
    assert data.inputs["x"].shape == (3, 1, 1, 28, 28)
    assert np.allclose(data.inputs["x"][2], 100 / 255, atol=1e-3)


def test_int8_mnist_keeps_accuracy_within_the_gate(mnist_mod):
    from tasks.devices.validate import compare
    from tasks.precision.calibrate import calibrate
    from tasks.precision.layers import host_runner
    from tasks.precision.quantize import quantize_model

    ranges = calibrate(mnist_mod, load_dataset("bundled:mnist:200:0", SPECS), "percentile")
    assert set(ranges) == {"conv2d_0", "conv2d_1", "matmul_0", "matmul_1"}
    assert ranges["conv2d_1"][0] == 0.0 and ranges["conv2d_0"][0] < 0  # post-ReLU vs normalised input
    qmod, plan = quantize_model(mnist_mod, ranges)
    assert [k["name"] for k in plan.kept_float] == ["conv2d_0", "matmul_1"]  # first conv, last dense
    assert [q["name"] for q in plan.quantized] == ["conv2d_1", "matmul_0"]
    text = qmod.script(show_meta=False)
    int_conv = next(l for l in text.splitlines() if "acc_conv2d_1" in l and "R.nn.conv2d" in l)
    assert 'dtype="int32"' in int_conv and 'out_dtype="int32"' in int_conv  # integer accumulation
    assert 'R.Tensor((1, 32, 14, 14), dtype="uint8")' in text  # uint8 activations feed it
    data = load_dataset("bundled:mnist:250:600", SPECS)  # the bench runs all 4500; this keeps the test fast
    ref, q = host_runner(mnist_mod), host_runner(qmod)
    samples = [data.sample(i) for i in range(len(data))]
    validation = compare([q(s) for s in samples], [ref(s) for s in samples], "int8", data.labels)
    assert validation.passed, validation.reason
    assert validation.top1_agreement >= 0.99
    assert validation.reference_accuracy - validation.accuracy <= 0.005
    assert validation.max_abs_err > 0  # really quantized


def test_keep_float_names_are_checked(mnist_mod):
    from tasks.precision.layers import list_layers
    from tasks.precision.quantize import parse_keep_float

    layers = list_layers(mnist_mod)
    assert parse_keep_float("none", layers) == []
    assert parse_keep_float(None, layers) is None
    assert parse_keep_float("conv2d_1, matmul_0", layers) == ["conv2d_1", "matmul_0"]
    with pytest.raises(TvmflowError, match=r"not layers of the model; its layers are conv2d_0, conv2d_1"):
        parse_keep_float("conv2d_9", layers)


def test_failing_gate_publishes_nothing_and_reports_per_layer_error(tmp_path, local_workers, prefect_harness):
    """Unrepresentative calibration (blank images) with every layer quantized: the gate fails."""
    from flows.compile import compile_flow

    blank = tmp_path / "blank.npz"
    np.savez(blank, x=np.zeros((4, 1, 1, 28, 28), "float32"))
    store = tmp_path / "store"
    with pytest.raises(TvmflowError) as err:
        compile_flow(
            model="tasks.importers.bundled:mnist_cnn",
            device="local",
            trials=0,
            store=str(store),
            data="bundled:mnist:60:2000",
            tracker=local_workers.tracker,
            precision="int8",
            measure_untuned=False,
            precision_options={"calibration": str(blank), "method": "max", "keep_float": "none"},
        )
    message = str(err.value)
    assert "int8 validation failed" in message and "nothing published" in message and "\n" not in message
    assert "--keep-float" in message
    assert not (store / "builds").exists() or not any((store / "builds").rglob("LATEST"))
    report_md = message.split("per-layer report in ")[1]
    text = open(report_md).read()
    assert "Per-layer error against fp32" in text
    report = json.loads(open(report_md.replace("report.md", "report.json")).read())
    rows = {r["layer"]: r for r in report["per_layer_error"]}
    assert set(rows) == {"conv2d_0", "conv2d_1", "matmul_0", "matmul_1"}
    assert rows["matmul_1"]["snr_db"] < 10  # the logits are garbage, and the table shows it
    assert report["precision_info"]["kept_float"] == []


def _int8_conv_module():
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 32, 8, 8), "uint8"))
    with bb.function("main", [x]):
        weight = relax.const(np.ones((16, 32, 3, 3), "int8"))
        out = bb.emit(relax.op.nn.conv2d(x, weight, padding=1, out_dtype="int32"))
        bb.emit_func_output(out)
    return bb.get()


def test_int8_conv_reaches_dot_product_instructions_in_assembly():
    """LLVM turns the u8 x s8 -> s32 reduction into vpdpbusd for a VNNI CPU (cross-compiled: this
    host need not run it) and into vpmaddwd for AVX2; no widened vpmulld in either."""
    import tvm

    from tasks.build.int8_isa import assembly, instruction_counts

    counts = {}
    for mcpu in ("cascadelake", "znver3"):
        target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
        counts[mcpu] = instruction_counts(assembly(tvm.compile(_int8_conv_module(), target=target)))
    assert counts["cascadelake"]["vpdpbusd"] > 0, counts
    assert counts["znver3"]["vpmaddwd"] > 0 and counts["znver3"]["vpdpbusd"] == 0, counts


def test_avx2_dot_product_intrinsic_tensorizes_exactly():
    """dot_8x4_avx2 (vpmaddubsw + vpmaddwd) on a packed int8 GEMM: exact with 7-bit weights."""
    import tvm
    from tvm import te
    from tvm.s_tir import Schedule

    from tasks.build.int8_isa import instruction_counts, register_avx2_intrin

    m, n, k = 8, 16, 32
    a = te.placeholder((m, k), "uint8", name="A")
    b = te.placeholder((n // 8, k // 4, 8, 4), "int8", name="B")
    r = te.reduce_axis((0, k), "k")
    c = te.compute(
        (m, n),
        lambda i, j: te.sum(a[i, r].astype("int32") * b[j // 8, r // 4, j % 8, r % 4].astype("int32"), axis=r),
        name="C",
    )
    sch = Schedule(te.create_prim_func([a, b, c]))
    block = sch.get_sblock("C")
    i, j, kk = sch.get_loops(block)
    jo, ji = sch.split(j, [None, 8])
    ko, ki = sch.split(kk, [None, 4])
    sch.reorder(i, jo, ko, ji, ki)
    sch.decompose_reduction(block, ko)
    sch.tensorize(ji, register_avx2_intrin())
    lib = tvm.compile(sch.mod, target=tvm.target.Target({"kind": "llvm", "mcpu": "znver3"}))
    counts = instruction_counts(lib.mod.inspect_source("asm"))
    assert counts["vpmaddubsw"] > 0 and counts["vpmaddwd"] > 0, counts
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (m, k)).astype("uint8")
    w = rng.integers(-63, 64, (n, k)).astype("int8")  # reduce_range: 255 * 63 * 2 < 32767
    packed = w.reshape(n // 8, 8, k // 4, 4).transpose(0, 2, 1, 3).copy()
    out = tvm.runtime.tensor(np.zeros((m, n), "int32"))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(packed), out)
    assert np.array_equal(out.numpy(), x.astype("int64") @ w.astype("int64").T)


def test_int8_build_passes_the_gate_and_is_published(tmp_path, local_workers, prefect_harness):
    """The success path through the flow: calibrated int8 (7-bit weights by default on this AVX2
    host), its layers packed for the dot-product intrinsic (tasks.build.int8_pack) and the heaviest
    packed GEMM tuned, validated on the device on real labelled digits, published with precision
    int8 in the manifest."""
    from flows.compile import compile_flow

    report = compile_flow(
        model="tasks.importers.bundled:mnist_cnn",
        device="local",
        trials=16,
        store=str(tmp_path / "store"),
        data="bundled:mnist:100:3000",
        tracker=local_workers.tracker,
        precision="int8",
        measure_untuned=False,
        precision_options={"calibration": "bundled:mnist:100:0"},
    )
    assert report["validation"]["passed"] and report["validation"]["precision"] == "int8"
    assert report["validation"]["top1_agreement"] >= 0.99
    assert [q["name"] for q in report["precision_info"]["quantized"]] == ["conv2d_1", "matmul_0"]
    tuned = [r for r in report["tuning"] if r["trials_run"]]
    assert len(tuned) == 1 and "int8_gemm" in tuned[0]["name"] and tuned[0]["valid"] > 0, report["tuning"]
    manifest = json.loads(open(report["manifest_uri"].removeprefix("file://")).read())
    assert manifest["precision"] == "int8" and manifest["validation"]["passed"]
