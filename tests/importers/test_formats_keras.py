"""Keras 3 models (KERAS_BACKEND=torch): a MobileNetV2-style net saved as .keras, legacy full .h5,
and architecture json + weights h5 (Keras 2 `save_weights` layout, as MobileNetV2 alpha=0.5
deployments ship it, and the Keras 3 `.weights.h5` layout). All four import to the same Relax
module; the json + legacy weights pair goes through the whole flow, validated against Keras."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from tasks.errors import TvmflowError
from tasks.importers.model_import import (
    detect_format,
    fetch_model_files,
    import_model,
    model_name,
)
from tests.format_models import KERAS_INPUT, keras_mobilenet_like, save_keras_variants


@pytest.fixture(scope="module")
def keras_models(tmp_path_factory):
    return save_keras_variants(keras_mobilenet_like(), tmp_path_factory.mktemp("keras"))


def test_every_keras_variant_is_detected_and_imports_to_the_same_module(keras_models, tmp_path):
    import tvm

    mods = {}
    for variant, uri in keras_models.items():
        fetched = fetch_model_files(uri, tmp_path / "downloads")
        if variant == "keras":  # content, not name: a .keras archive called model.bin
            renamed = tmp_path / "model.bin"
            renamed.write_bytes(fetched.path.read_bytes())
            fetched = fetch_model_files(str(renamed), tmp_path / "downloads")
        assert detect_format(fetched.path) == "keras", variant
        imported = import_model(fetched.path)
        assert imported.framework == "keras"
        assert [(s.name, s.shape, s.dtype) for s in imported.inputs] == [("image", KERAS_INPUT, "float32")]  # NHWC
        mods[variant] = imported.mod
    for mod in mods.values():  # same graph and the same weights, whatever the file layout
        tvm.ir.assert_structural_equal(mod, mods["keras"])  # raises, naming the first difference
    assert model_name(keras_models["json+legacy_h5"]) == "arch"


def test_keras_files_with_something_missing_get_one_line_errors(keras_models, tmp_path):
    arch, legacy = keras_models["json+legacy_h5"].split("+")
    with pytest.raises(TvmflowError, match=r"Keras weights only; give the architecture too: --model arch.json\+"):
        detect_format(Path(legacy))
    with pytest.raises(TvmflowError, match=r"architecture without weights; give --model arch.json\+weights.h5"):
        detect_format(Path(arch))
    with pytest.raises(TvmflowError, match="two parts are both a keras-arch"):
        fetch_model_files(f"{arch}+{arch}", tmp_path)
    archive = zipfile.ZipFile(keras_models["keras"])
    broken = tmp_path / "broken.keras"  # a .keras whose weights file is missing
    with zipfile.ZipFile(broken, "w") as out:
        for name in ("config.json", "metadata.json"):
            out.writestr(name, archive.read(name))
    with pytest.raises(TvmflowError, match="Keras could not load broken.keras") as info:
        import_model(broken)
    assert "\n" not in str(info.value)


def test_keras_json_plus_weights_through_the_flow(keras_models, local_workers, prefect_harness, tmp_path):
    from flows.compile import compile_flow

    report = compile_flow(
        model=keras_models["json+legacy_h5"],
        device="local",
        trials=0,
        store=str(tmp_path / "store"),
        tracker=local_workers.tracker,
        measure_untuned=False,
    )
    assert report["framework"] == "keras" and report["reference"]["framework"] == "keras"
    assert report["validation"]["passed"] is True
    assert report["inputs"] == ["image:1x32x32x3:float32"]
    assert report["model"] == "arch"
    manifest = json.loads(Path(report["manifest_uri"].removeprefix("file://")).read_text())
    assert manifest["framework"] == "keras" and manifest["validation"]["passed"]
