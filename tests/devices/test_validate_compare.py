"""compare(): errors and top-1 agreement against the reference, thresholds per precision."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.devices.validate import THRESHOLDS, DeviceRun, compare
from tasks.errors import TvmflowError


def _scores(n=8, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal((1, classes)).astype("float32")] for _ in range(n)]


def test_identical_outputs_pass_with_labels():
    ref = _scores()
    labels = [np.array([int(s[0].argmax())]) for s in ref]
    val = compare([[o.copy() for o in s] for s in ref], ref, "fp32", labels)
    assert val.passed and val.reason == ""
    assert val.max_abs_err == 0.0 and val.max_rel_err == 0.0
    assert val.top1_agreement == 1.0 and val.accuracy == 1.0 and val.reference_accuracy == 1.0
    assert val.samples == 8 and val.thresholds == THRESHOLDS["fp32"]


def test_tiny_numeric_noise_passes_fp32():
    ref = _scores()
    got = [[s[0] * (1 + 1e-6)] for s in ref]
    val = compare(got, ref)
    assert val.passed and 0 < val.max_rel_err < 1e-5


def test_tampered_reference_fails_with_reason():
    ref = _scores()
    tampered = [[s[0].copy()] for s in ref]
    tampered[3][0][0, ::-1] = tampered[3][0][0].copy()  # one sample's scores reversed: top-1 flips
    val = compare(ref, tampered, "fp32")
    assert not val.passed
    assert "max relative error" in val.reason and "top-1 agreement 0.875" in val.reason
    assert val.top1_agreement == pytest.approx(7 / 8)


def test_thresholds_depend_on_precision():
    ref = _scores()
    got = [[s[0] + 5e-3 * np.abs(s[0]).max()] for s in ref]  # rel err 5e-3, top-1 unchanged
    assert not compare(got, ref, "fp32").passed
    assert compare(got, ref, "fp16").passed
    assert compare(got, ref, "int8").passed  # int8 judges by top-1 only


def test_accuracy_against_labels():
    ref = _scores()
    labels = [np.array([(int(s[0].argmax()) + (1 if i < 2 else 0)) % 10]) for i, s in enumerate(ref)]
    val = compare(ref, ref, "fp32", labels)
    assert val.passed
    assert val.accuracy == pytest.approx(6 / 8) and val.reference_accuracy == pytest.approx(6 / 8)


def test_non_class_outputs_have_no_top1():
    ref = [[np.ones((1, 3, 4, 4), "float32")]]
    val = compare(ref, ref)
    assert val.passed and val.top1_agreement is None and val.accuracy is None


def test_shape_and_count_mismatch_are_errors():
    ref = _scores(1)
    with pytest.raises(TvmflowError, match="output shape"):
        compare([[np.zeros((1, 11), "float32")]], ref)
    with pytest.raises(TvmflowError, match="2 outputs but the reference returns 1"):
        compare([[ref[0][0], ref[0][0]]], ref)


def test_device_run_statistics():
    run = DeviceRun(outputs=[], latencies_ms=[1.0, 2.0, 3.0, 4.0, 100.0])
    assert run.median_ms == 3.0
    assert 4.0 < run.p90_ms <= 100.0


def test_nan_or_inf_in_the_build_fails():
    ref = _scores()
    got = [[s[0].copy()] for s in ref]
    got[5][0][0, 3] = np.nan
    val = compare(got, ref)
    assert not val.passed and val.max_rel_err == float("inf") and "max relative error" in val.reason
    got[5][0][0, 3] = np.inf
    assert not compare(got, ref).passed


def test_nan_in_both_agrees():
    ref = [[np.array([[1.0, np.nan, 3.0]], "float32")]]
    val = compare([[ref[0][0].copy()]], ref)
    assert val.passed and val.max_abs_err == 0.0
