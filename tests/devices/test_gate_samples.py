"""The gate users can reason about: per-run thresholds, a sample-count-aware default (one flip in 20
is not evidence), top-5, and the framework's own int8 measured beside tvmflow's."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.devices.validate import allowed_misses, compare, gate_thresholds
from tasks.errors import TvmflowError


def _scores(n, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal((1, classes)).astype("float32")] for _ in range(n)]


def _flip(outputs, indices):
    """Swap the best and second-best class of these samples: top-1 flips, top-5 still holds it."""
    out = [[o.copy() for o in s] for s in outputs]
    for i in indices:
        row = out[i][0][0]
        best, second = np.argsort(-row)[:2]
        row[best], row[second] = row[second], row[best]
    return out


def test_binomial_allowance():
    assert allowed_misses(20, 0.01) == 1  # P[X >= 1] = 0.18: one flip in 20 is not evidence
    assert allowed_misses(20, 0.01, significance=1.0) == 0  # plain rate: 0.2 flips allowed
    assert allowed_misses(1000, 0.01) >= 10 and allowed_misses(1000, 0.01) <= 16
    assert allowed_misses(50, 0.0) == 0


def test_one_flip_in_twenty_passes_two_fail_and_the_reason_says_why():
    ref = _scores(20)
    one = compare(_flip(ref, [3]), ref, "int8")
    assert one.passed and one.flips == 1 and one.allowed_flips == 1 and one.top1_agreement == 0.95
    assert one.top5_agreement == 1.0
    two = compare(_flip(ref, [3, 7]), ref, "int8")
    assert not two.passed and "top-1 agreement 0.900 < 0.99 (2 of 20 differ, 1 allowed)" in two.reason


def test_the_frameworks_own_int8_sets_the_bar():
    """Issue 16: tvmflow 18/20 where onnxruntime's int8 of the same model also got 18/20: passes."""
    ref = _scores(20)
    ours, theirs = _flip(ref, [1, 2]), _flip(ref, [5, 6])
    val = compare(ours, ref, "int8", baseline_outputs=theirs)
    assert val.passed and val.baseline["top1_agreement"] == 0.9 and val.baseline["name"].startswith("onnxruntime")
    worse = compare(_flip(ref, [1, 2, 3]), ref, "int8", baseline_outputs=theirs)
    assert not worse.passed and "onnxruntime int8 (QDQ): 2" in worse.reason


def test_per_run_thresholds_and_labels():
    ref = _scores(20)
    labels = np.array([int(s[0].argmax()) for s in ref])
    ours = _flip(ref, [0, 1, 2])
    assert not compare(ours, ref, "int8", labels).passed
    val = compare(ours, ref, "int8", labels, thresholds={"top1_agreement": 0.8, "max_accuracy_drop": 0.2})
    assert val.passed and val.thresholds["top1_agreement"] == 0.8
    assert val.accuracy == pytest.approx(17 / 20) and val.reference_accuracy == 1.0
    assert val.top5_accuracy == 1.0 and val.reference_top5_accuracy == 1.0
    strict = compare(_flip(ref, [0]), ref, "int8", labels, thresholds={"max_accuracy_drop": 0.0})
    assert not strict.passed and "accuracy drop 5.00 points" in strict.reason
    with pytest.raises(TvmflowError, match="unknown gate threshold"):
        gate_thresholds("int8", {"top1": 0.9})


def test_examples_name_the_top5_classes():
    ref = [[np.eye(1000, dtype="float32")[[967]] * 10]]
    from tasks.importers.class_names import names_for

    val = compare(ref, ref, "fp32", np.array([967]), class_names=names_for(1000), files=["coffee.jpg"])
    row = val.examples[0]
    assert row["file"] == "coffee.jpg" and row["label"] == 967
    assert row["framework"][0][:2] == [967, "espresso"] and row["device"] == row["framework"]


def test_onnxruntime_int8_baseline_on_a_real_onnx_model(mnist_onnx, tmp_path):
    """onnxruntime's own int8 of the real MNIST CNN, calibrated on real digits, measured on other
    digits: the bar a tvmflow int8 build of the same ONNX file is held to."""
    import onnxruntime as ort

    from tasks.devices.validate import onnxruntime_int8_outputs
    from tasks.importers.datasets import load_dataset
    from tasks.importers.model_import import import_onnx

    specs = import_onnx(mnist_onnx).inputs
    name = specs[0].name
    calibration, data = load_dataset("bundled:mnist:32", specs), load_dataset("bundled:mnist:20:1000", specs)
    samples = [data.sample(i) for i in range(len(data))]
    fp32 = ort.InferenceSession(str(mnist_onnx), providers=["CPUExecutionProvider"])
    ref = [[np.asarray(o) for o in fp32.run(None, {fp32.get_inputs()[0].name: s[name]})] for s in samples]
    int8 = onnxruntime_int8_outputs(mnist_onnx, calibration, samples, [name], tmp_path)
    assert len(int8) == 20 and not np.array_equal(int8[0][0], ref[0][0])  # really quantized
    val = compare(ref, ref, "int8", data.labels, baseline_outputs=int8)
    assert val.passed and val.baseline["top1_agreement"] >= 0.9 and val.baseline["accuracy"] >= 0.9


def test_validate_stage_measures_onnxruntime_int8_for_a_quantized_onnx_model(mnist_onnx):
    """The validate stage's baseline: only for ONNX models tvmflow quantized itself (calibration URI
    known), calibrated on the same samples; none for fp32 or for a model without that URI."""
    from tasks.importers.datasets import load_dataset
    from tasks.importers.model_import import import_onnx
    from tasks.pipeline import framework_int8_outputs
    from tasks.records import ModelSource, PreparedModel

    specs = import_onnx(mnist_onnx).inputs
    data = load_dataset("bundled:mnist:8:2000", specs)
    samples = [data.sample(i) for i in range(len(data))]
    source = ModelSource("mnist", mnist_onnx, "0" * 64, "onnx")
    info = {"calibration": {"uri": "bundled:mnist:32:0", "samples": 32}}
    quantized = PreparedModel(source, None, specs, "k", precision="int8", precision_info=info)
    outs = framework_int8_outputs(quantized, samples)
    assert outs is not None and len(outs) == 8 and outs[0][0].shape[-1] == 10
    assert framework_int8_outputs(PreparedModel(source, None, specs, "k", precision="fp32"), samples) is None
    no_uri = PreparedModel(source, None, specs, "k", precision="int8", precision_info={"calibration": {}})
    assert framework_int8_outputs(no_uri, samples) is None
