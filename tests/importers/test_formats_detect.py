"""Format detection from content, and the one-line error that lists every supported format."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from tasks.errors import TvmflowError
from tasks.importers.model_import import detect_format, fetch_model_files
from tasks.pipeline import fetch_model

LISTED = ("ONNX", ".pt2", "Keras 3", ".keras", "arch.json+weights.h5", "TFLite", "MXNet", "-symbol.json")


def _lists_every_format(message: str) -> bool:
    return "\n" not in message and all(word in message for word in LISTED)


def test_unknown_content_error_lists_the_supported_formats(tmp_path):
    junk = tmp_path / "model.tflite"  # the name says TFLite, the bytes say nothing
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(TvmflowError) as info:
        fetch_model(str(junk))  # the flow's first step
    assert "not a model this tool can read" in str(info.value) and _lists_every_format(str(info.value))

    other_zip = tmp_path / "model.keras"
    with zipfile.ZipFile(other_zip, "w") as out:
        out.writestr("readme.txt", "not a model")
    with pytest.raises(TvmflowError) as info:
        detect_format(other_zip)
    assert "not a torch.export .pt2 (nor a Keras .keras file, nor TorchScript)" in str(
        info.value
    ) and _lists_every_format(str(info.value))


def test_hdf5_and_json_that_are_not_models(tmp_path):
    import h5py

    data = tmp_path / "data.h5"
    with h5py.File(data, "w") as handle:
        handle["x"] = np.arange(4)
    with pytest.raises(TvmflowError) as info:
        detect_format(data)
    assert "HDF5 file but not a Keras model" in str(info.value) and _lists_every_format(str(info.value))

    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"lr": 0.1}))
    with pytest.raises(TvmflowError) as info:
        fetch_model_files(f"{settings}+{data}", tmp_path / "dl")
    assert "settings.json is neither a Keras architecture json" in str(info.value)
    assert _lists_every_format(str(info.value))
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "weights.h5").write_bytes(data.read_bytes())
    with pytest.raises(TvmflowError, match="must hold one model: arch.json"):
        detect_format(lonely)  # a directory with no complete pair
