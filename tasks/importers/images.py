"""Image folders as data for validation and calibration, the way TVM tutorials feed photos.

A local or fsspec folder, or a .zip / .tar(.gz) of JPEG/PNG files, optionally in class subfolders
(ImageNet style). The class index comes from a mapping file at the top (`classes.txt`/`labels.txt`:
one class per line in index order, or `name index` lines; or `classes.json` {name: index}), else
from the folder names (an integer, an ImageNet WordNet id such as n02123045, or an ImageNet class
name), else from the sorted folder names. Preprocessing options go in the URI fragment:
`photos/#preset=imagenet&resize=256` (presets: imagenet, 0-1, -1-1, raw; or mean=..&std=.. in
0..255 units, e.g. mean=127&std=128 for EfficientNet-Lite); resize shorter side then centre crop
to the model's H x W; NCHW or NHWC follows the model's input (layout=nhwc to force).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np

from tasks.errors import TvmflowError
from tasks.importers.class_names import imagenet_names, imagenet_wnids

IMAGE_EXT = (".jpg", ".jpeg", ".png")
ARCHIVE_EXT = (".zip", ".tar", ".tar.gz", ".tgz")
MAPPING_FILES = ("classes.txt", "labels.txt", "classes.json", "labels.json")
PRESETS = {  # (mean, std) per channel in 0..255 pixel units
    "imagenet": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    "0-1": ((0.0,), (255.0,)),
    "-1-1": ((127.5,), (127.5,)),
    "raw": ((0.0,), (1.0,)),
}


@dataclass
class ImageOptions:
    preset: str = "imagenet"
    mean: tuple | None = None
    std: tuple | None = None
    resize: int | None = None  # shorter side before the centre crop; default crop / 0.875
    layout: str | None = None  # nchw | nhwc; default from the model's input shape
    limit: int | None = None

    @classmethod
    def parse(cls, fragment: str) -> ImageOptions:
        opts = dict(kv.split("=", 1) for kv in fragment.split("&") if "=" in kv)
        unknown = set(opts) - {"preset", "mean", "std", "resize", "size", "layout", "limit"}
        if unknown:
            raise TvmflowError(
                f"unknown image option(s) {sorted(unknown)}; use preset=imagenet|0-1|-1-1|raw, "
                "mean=R:G:B, std=R:G:B, resize=N, layout=nchw|nhwc, limit=N"
            )
        preset = opts.get("preset", "imagenet" if "mean" not in opts else "raw")
        if preset not in PRESETS:
            raise TvmflowError(f"unknown image preset {preset!r}; use one of {', '.join(PRESETS)}")
        floats = lambda key: tuple(float(v) for v in opts[key].split(":")) if key in opts else None
        ints = lambda key: int(opts[key]) if key in opts else None
        layout = opts.get("layout")
        if layout and layout.lower() not in ("nchw", "nhwc"):
            raise TvmflowError(f"layout={layout}: use nchw or nhwc")
        return cls(
            preset,
            floats("mean"),
            floats("std"),
            ints("resize") or ints("size"),
            layout.lower() if layout else None,
            ints("limit"),
        )

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        mean, std = PRESETS[self.preset]
        return np.array(self.mean or mean, "float32"), np.array(self.std or std, "float32")


@dataclass
class ImageSet:
    """Decoded-then-preprocessed images of one folder or archive."""

    images: np.ndarray  # [N, *input shape without batch]
    labels: np.ndarray | None
    files: list[str]
    class_names: list[str] = field(default_factory=list)


def is_image_source(uri: str) -> bool:
    """A local/fsspec directory or an archive: what load_dataset hands to this module."""
    base = uri.partition("#")[0]
    if base.lower().endswith(ARCHIVE_EXT):
        return True
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(base)
        return fs.isdir(path)
    except Exception:  # noqa: BLE001 - unreachable remote: not a folder we can read
        return False


def _read_members(uri: str) -> dict[str, bytes]:
    """Relative path -> bytes of every image and mapping file under the folder or in the archive."""
    import fsspec

    from tasks.importers.fetch import read_bytes

    wanted = lambda name: name.lower().endswith(IMAGE_EXT) or PurePosixPath(name).name in MAPPING_FILES
    if uri.lower().endswith(ARCHIVE_EXT):
        data = read_bytes(uri)
        if uri.lower().endswith(".zip"):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                return {n: archive.read(n) for n in archive.namelist() if wanted(n) and not n.endswith("/")}
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            return {
                m.name: archive.extractfile(m).read()  # type: ignore[union-attr]  # isfile(): never None
                for m in archive.getmembers()
                if m.isfile() and wanted(m.name)
            }
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    found = [p for p in fs.find(root) if wanted(p)]
    return {p[len(root) :].lstrip("/"): fs.cat_file(p) for p in found}


def _strip_archive_root(members: dict[str, bytes], archive: str) -> dict[str, bytes]:
    """`photos.zip` holding `photos/...` is the same dataset as the folder `photos` (one level, and only
    when it is named after the archive: a lone class folder must stay a class)."""
    stem = PurePosixPath(archive.rstrip("/")).name
    for ext in ARCHIVE_EXT:
        stem = stem[: -len(ext)] if stem.lower().endswith(ext) else stem
    if members and all(PurePosixPath(n).parts[0] == stem and len(PurePosixPath(n).parts) > 1 for n in members):
        return {str(PurePosixPath(*PurePosixPath(n).parts[1:])): d for n, d in members.items()}
    return members


def _mapping(members: dict[str, bytes]) -> dict[str, int] | None:
    for name in MAPPING_FILES:
        if name not in members:
            continue
        text = members[name].decode("utf-8", "replace")
        if name.endswith(".json"):
            return {str(k): int(v) for k, v in json.loads(text).items()}
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        pairs = [re.match(r"^(.*?)[\s,:]+(\d+)$", ln) for ln in lines]
        if all(pairs):
            return {m.group(1): int(m.group(2)) for m in pairs if m}
        return {ln: i for i, ln in enumerate(lines)}
    return None


def _class_index(folders: list[str], mapping: dict[str, int] | None) -> dict[str, int]:
    """Folder -> class index: the mapping file, else integers / WordNet ids / ImageNet names, else sorted order."""
    if mapping is not None:
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise TvmflowError(
                f"class folders {missing[:5]} are not in the mapping file; add them or rename the folders"
            )
        return {f: mapping[f] for f in folders}
    if all(f.isdigit() for f in folders):
        return {f: int(f) for f in folders}
    wnids = imagenet_wnids()
    if all(f in wnids for f in folders):
        return {f: wnids[f] for f in folders}
    by_name = {n.lower(): i for i, n in enumerate(imagenet_names())}
    if all(f.lower().replace("_", " ") in by_name for f in folders):
        return {f: by_name[f.lower().replace("_", " ")] for f in folders}
    return {f: i for i, f in enumerate(sorted(folders))}


def _layout(shape: tuple, forced: str | None) -> str:
    if forced:
        return forced
    if len(shape) < 3:
        raise TvmflowError(f"an image folder feeds image inputs (C,H,W or H,W,C); this input has shape {shape}")
    return "nchw" if shape[-3] in (1, 3) and shape[-1] not in (1, 3) else "nhwc" if shape[-1] in (1, 3) else "nchw"


def preprocess(data: bytes, shape: tuple, layout: str, options: ImageOptions) -> np.ndarray:
    """Decode, convert to RGB (or grey), resize the shorter side, centre crop, normalise, lay out."""
    from PIL import Image

    h, w = (shape[-2], shape[-1]) if layout == "nchw" else (shape[-3], shape[-2])
    channels = shape[-3] if layout == "nchw" else shape[-1]
    img: Image.Image = Image.open(io.BytesIO(data))
    img = img.convert("L" if channels == 1 else "RGB")
    short = options.resize or round(max(h, w) / 0.875)
    scale = short / min(img.size)
    img = img.resize(
        (max(w, round(img.size[0] * scale)), max(h, round(img.size[1] * scale))), Image.Resampling.BILINEAR
    )
    left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
    arr = np.asarray(img.crop((left, top, left + w, top + h)), "float32")
    arr = arr[..., None] if arr.ndim == 2 else arr
    mean, std = options.mean_std()
    arr = (arr - mean[:channels] if mean.size > 1 else arr - mean) / (std[:channels] if std.size > 1 else std)
    return arr.transpose(2, 0, 1) if layout == "nchw" else arr


def load_images(uri: str, shape: tuple, dtype: str = "float32") -> ImageSet:
    """The images of `uri` (fragment = options) preprocessed for an input of `shape` (batch first)."""
    base, _, fragment = uri.partition("#")
    options = ImageOptions.parse(fragment)
    try:
        members = _read_members(base)
        members = _strip_archive_root(members, base) if base.lower().endswith(ARCHIVE_EXT) else members
    except (OSError, ValueError, tarfile.TarError, zipfile.BadZipFile) as err:
        raise TvmflowError(f"cannot read the images of {base} ({err.__class__.__name__}: {err})") from None
    files = sorted(n for n in members if n.lower().endswith(IMAGE_EXT))[: options.limit]
    if not files:
        raise TvmflowError(f"no images ({', '.join(IMAGE_EXT)}) in {base}; give a folder or archive of photos")
    folders = sorted({PurePosixPath(f).parts[0] for f in files if len(PurePosixPath(f).parts) > 1})
    labelled = bool(folders) and all(len(PurePosixPath(f).parts) > 1 for f in files)
    index = _class_index(folders, _mapping(members)) if labelled else {}
    layout = _layout(tuple(shape), options.layout)
    batch = shape[0] if len(shape) == 4 else 1
    per_image = tuple(shape[1:]) if len(shape) == 4 else tuple(shape)
    images = []
    for name in files:
        try:
            images.append(preprocess(members[name], per_image, layout, options))
        except Exception as err:  # noqa: BLE001 - PIL raises many types for a broken image
            raise TvmflowError(f"cannot decode image {name} ({err.__class__.__name__}); remove or fix it") from None
    usable = len(images) // batch * batch
    if usable == 0:
        raise TvmflowError(f"{len(images)} images but the model's batch is {batch}; give at least {batch}")
    arr = np.stack(images[:usable]).reshape(usable // batch, *shape).astype(dtype)
    labels = None
    if labelled:
        flat = np.array([index[PurePosixPath(f).parts[0]] for f in files[:usable]])
        labels = flat.reshape(usable // batch, batch) if batch > 1 else flat
    names = [""] * (max(index.values()) + 1) if index else []
    for folder, i in index.items():
        names[i] = folder
    return ImageSet(arr, labels, files[:usable], names)
