"""Calibration: activation ranges for int8, from the fp32 model run in TVM over the user's samples.

The fp32 module gets one extra output per compute layer (that layer's input, tasks.precision.layers.with_taps),
is compiled for the host and run on every calibration sample. Per layer we keep the exact min/max
and a bounded random subsample of |x| (at most SUBSAMPLE values per sample), from which the
methods choose a clipping range:
- max:        the largest |x| seen (no clipping; outliers stretch the scale)
- percentile: the p-th percentile of |x| (default 99.99)
- kl:         TensorRT's entropy calibration: the threshold whose 8-bit quantized histogram is
              closest (KL divergence) to the clipped fp32 histogram

Calibration data is the user's: an npz of named arrays, `bundled:*`, or a folder of images with a
preprocessing spec in the URI fragment (`photos/#size=224&mean=127&std=128`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tasks.errors import TvmflowError

METHODS = ("max", "percentile", "kl")
SUBSAMPLE = 16384


@dataclass
class LayerStats:
    lo: float = np.inf
    hi: float = -np.inf
    samples: list = field(default_factory=list)  # subsampled |x| arrays

    def add(self, x: np.ndarray, rng) -> None:
        x = np.asarray(x, dtype="float32").ravel()
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        ab = np.abs(x)
        self.samples.append(ab if ab.size <= SUBSAMPLE else rng.choice(ab, SUBSAMPLE, replace=False))

    def values(self) -> np.ndarray:
        return np.concatenate(self.samples) if self.samples else np.zeros(1, "float32")


def kl_threshold(values: np.ndarray, bins: int = 2048, levels: int = 128, stride: int = 4) -> float:
    """TensorRT-style entropy calibration on the histogram of |x| (exact zeros, e.g. from ReLU,
    are left out: they quantize exactly and would swamp the divergence)."""
    values = values[values > 0]
    if values.size == 0:
        return 0.0
    hist, edges = np.histogram(values, bins=bins, range=(0.0, float(values.max())))
    hist = hist.astype("float64")
    best, best_i = np.inf, bins
    for i in range(levels, bins + 1, stride):
        ref = hist[:i].copy()
        ref[i - 1] += hist[i:].sum()  # outliers clipped into the last bin
        # quantize hist[:i] into `levels` buckets, spreading each bucket's mass over its nonzero bins
        starts = np.linspace(0, i, levels + 1).astype(int)
        nonzero = hist[:i] > 0
        sums = np.add.reduceat(hist[:i], starts[:-1])
        counts = np.add.reduceat(nonzero.astype("float64"), starts[:-1])
        q = np.repeat(sums / np.maximum(counts, 1), np.diff(starts)) * nonzero
        p, q = ref / ref.sum(), q / max(q.sum(), 1e-30)
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    return float(edges[best_i])


def choose_range(stats: LayerStats, method: str, percentile: float = 99.99) -> tuple[float, float]:
    """(lo, hi) for the layer's input: sign from the exact min, magnitude from the method."""
    if method not in METHODS:
        raise TvmflowError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")
    exact = max(abs(stats.lo), abs(stats.hi))
    if method == "max":
        mag = exact
    elif method == "percentile":
        mag = float(np.percentile(stats.values(), percentile))
    else:
        mag = kl_threshold(stats.values(), levels=128 if stats.lo < 0 else 256)
    mag = min(max(mag, 1e-8), exact) if exact > 0 else 1e-8
    return (0.0 if stats.lo >= 0 else -mag), mag


def collect_stats(mod, dataset, target="llvm") -> dict[str, LayerStats]:
    """Run the fp32 model on the host over every calibration sample; stats per layer input."""
    from tasks.precision.layers import fold, host_runner, with_taps

    if len(dataset) == 0:
        raise TvmflowError("the calibration set is empty; give at least one sample (--calibration URI)")
    tapped, names, n_out = with_taps(fold(mod), "input")
    run = host_runner(tapped, target)
    stats = {name: LayerStats() for name in names}
    rng = np.random.default_rng(0)
    for i in range(len(dataset)):
        for name, value in zip(names, run(dataset.sample(i))[n_out:]):
            stats[name].add(value, rng)
    return stats


def calibrate(
    mod, dataset, method: str = "percentile", percentile: float = 99.99, target="llvm"
) -> dict[str, tuple[float, float]]:
    stats = collect_stats(mod, dataset, target)
    return {name: choose_range(s, method, percentile) for name, s in stats.items()}


def load_calibration(uri: str | None, input_specs):
    """The calibration Dataset, read like `--data` (tasks.importers.datasets.load_dataset): npz URI,
    bundled:*, or an image folder / zip / tar with its preprocessing (`photos/#preset=imagenet`)."""
    from tasks.importers.datasets import load_dataset

    if not uri:
        raise TvmflowError(
            "--precision int8 needs calibration samples: pass --calibration URI (an npz of "
            "named input arrays, an image folder, or bundled:mnist:500)"
        )
    try:
        return load_dataset(uri, input_specs)
    except TvmflowError as err:
        if "no samples" in str(err):
            raise TvmflowError(f"the calibration set {uri} is empty; give at least one sample") from None
        raise
