"""TFLite flatbuffers, fp32 and fp16 weights: detected by content, imported by relax.frontend.tflite,
compiled, run on a real rpc server and validated against the LiteRT interpreter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tasks.errors import TvmflowError
from tasks.importers.model_import import detect_format, import_model, parse_input_spec
from tests.format_models import TFLITE_INPUT, tflite_cnn


@pytest.fixture(scope="module")
def tflite_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tflite")
    return {"fp32": tflite_cnn(folder / "cnn_fp32.tflite"), "fp16": tflite_cnn(folder / "cnn_fp16.tflite", fp16=True)}


def test_tflite_detected_by_content_and_fp16_weights_stay_fp16(tflite_files, tmp_path):
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(tflite_files["fp16"].read_bytes())
    assert detect_format(renamed) == "tflite"
    # fp16 weights: about half the file, and they enter Relax as float16 constants cast to fp32
    assert tflite_files["fp16"].stat().st_size < 0.6 * tflite_files["fp32"].stat().st_size
    imported = import_model(renamed)
    assert imported.framework == "tflite"
    assert [(s.name, s.shape, s.dtype) for s in imported.inputs] == [("image", TFLITE_INPUT, "float32")]
    casts = [
        b.value
        for b in imported.mod["main"].body.blocks[0].bindings
        if getattr(getattr(b.value, "op", None), "name", "") == "relax.astype"
    ]
    assert sorted(str(c.args[0].ty.dtype) for c in casts) == ["float16"] * 6  # 3 weights + 3 biases


def test_truncated_and_misfit_tflite_get_one_line_errors(tflite_files, tmp_path):
    data = tflite_files["fp32"].read_bytes()
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TvmflowError, match="corrupt or truncated") as info:
        detect_format(cut)
    assert "\n" not in str(info.value)
    with pytest.raises(TvmflowError, match="does not fit input 'image'"):
        import_model(tflite_files["fp32"], [parse_input_spec("image:1x3x16x16")])


def test_tflite_fp32_build_and_validate_on_device(tflite_files, local_workers, tvmflow_cache):
    """import -> prepare -> build -> run over RPC -> compare against LiteRT, with the task functions."""
    from tasks.build.compile import build_library
    from tasks.devices.profiles import get_device
    from tasks.devices.validate import compare, run_on_device
    from tasks.importers.reference import Reference
    from tasks.tuning.extract import prepare_for_tuning

    device = get_device("local")
    imported = import_model(tflite_files["fp32"])
    lib = build_library(prepare_for_tuning(imported.mod, device.tvm_target()), device, None, tvmflow_cache / "cnn.so")
    rng = np.random.default_rng(3)
    samples = [{"image": rng.standard_normal(TFLITE_INPUT).astype("float32")} for _ in range(3)]
    run = run_on_device(lib, ("127.0.0.1", local_workers.tracker_port), "local", samples, ["image"], "llvm", repeat=2)
    reference = Reference(tflite_files["fp32"], "tflite", ["image"])
    expected = [reference.run(s) for s in samples]
    validation = compare(run.outputs, expected, "fp32")
    assert validation.passed, validation.reason
    assert np.allclose(np.asarray(expected[0][0]).sum(), 1.0, atol=1e-5)  # softmax: real probabilities


def test_tflite_fp16_model_through_the_flow(tflite_files, local_workers, prefect_harness, tmp_path):
    from flows.compile import compile_flow

    report = compile_flow(
        model=str(tflite_files["fp16"]),
        device="local",
        trials=0,
        store=str(tmp_path / "store"),
        tracker=local_workers.tracker,
        measure_untuned=False,
    )
    assert report["framework"] == "tflite" and report["reference"]["framework"] == "tflite"
    assert report["validation"]["passed"] is True
    assert report["inputs"] == [f"image:{'x'.join(map(str, TFLITE_INPUT))}:float32"]
    manifest = json.loads(Path(report["manifest_uri"].removeprefix("file://")).read_text())
    assert manifest["framework"] == "tflite" and manifest["validation"]["passed"]
