"""The pipeline's precision step: the model in fp16 / bf16 / int8, prepared for tuning.

It re-imports the model (the cached fp32 `prepared` module is already lowered, so its conv2d /
matmul calls can no longer be rewritten), converts it, and lowers it like the fp32 path. Cached
(tasks.storage.cache, stage "precision") by model bytes, inputs, target, precision options and
the calibration data's bytes. Both compile and retune run it (flows/stages.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from tasks.errors import TvmflowError
from tasks.storage import cache


@dataclass
class PrecisionOptions:
    calibration: str | None = None
    method: str = "percentile"
    percentile: float = 99.99
    keep_float: str | None = None  # "a,b" | "none" | None (default: first conv, last dense)
    allow: list | None = None  # fp16/bf16: op kinds or layer names to convert
    deny: list | None = None
    reduce_range: bool | None = (
        None  # None: 7-bit int8 weights where the device needs them (quantize.weights_need_7_bits)
    )

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class PrecisionResult:
    prepared: object
    key: str
    info: dict = field(default_factory=dict)  # plan / converted layers / ranges, for the report
    converted: object = None  # the converted module before lowering (per-layer error)
    cached: bool = False


def _data_digest(dataset) -> str:
    h = hashlib.sha256()
    for name in sorted(dataset.inputs):
        h.update(name.encode())
        h.update(dataset.inputs[name].tobytes())
    return h.hexdigest()


def convert_model(mod, specs, precision: str, opts: PrecisionOptions, target="llvm"):
    """(converted Relax module, info dict) for one precision."""
    from tasks.precision.policy import convert

    if precision in ("fp16", "bf16"):
        from tasks.precision.layers import list_layers

        converted = convert(mod, precision, opts.allow, opts.deny)
        return converted, {"layers": [l.name for l in list_layers(mod)], "allow": opts.allow, "deny": opts.deny}
    from tasks.precision.calibrate import calibrate, load_calibration
    from tasks.precision.layers import list_layers
    from tasks.precision.quantize import QuantConfig, parse_keep_float, quantize_model

    dataset = load_calibration(opts.calibration, specs)
    keep = parse_keep_float(opts.keep_float, list_layers(mod))
    ranges = calibrate(mod, dataset, opts.method, opts.percentile, target)
    qmod, plan = quantize_model(mod, ranges, QuantConfig(opts.method, opts.percentile, keep, bool(opts.reduce_range)))
    return qmod, {
        "calibration": {
            "source": dataset.source,
            "uri": opts.calibration,
            "samples": len(dataset),
            "method": opts.method,
        },
        **plan.to_json(),
    }


def lower_precision(
    source,
    device,
    specs_in,
    specs,
    precision: str,
    opts: PrecisionOptions,
    refresh: bool = False,
    batch: int | None = None,
) -> PrecisionResult:
    """`source` is a tasks.records.ModelSource (path, sha256); `refresh` ignores the cache;
    `batch` fixes a dynamic batch dimension as the import stage did."""
    import tvm

    from tasks.importers.model_import import import_model
    from tasks.tuning.extract import prepare_for_tuning

    data_key = ""
    if precision == "int8":
        from tasks.precision.calibrate import load_calibration

        data_key = _data_digest(load_calibration(opts.calibration, specs))
    elif precision not in ("fp16", "bf16"):
        raise TvmflowError(f"unknown precision {precision!r}; use fp32, fp16, bf16 or int8")
    key = cache.stage_key(
        "precision",
        device.target_key(),
        source.sha256,
        [str(s) for s in specs_in or []],
        precision,
        json.dumps(opts.to_json(), sort_keys=True),
        data_key,
        batch,
    )
    hit = cache.lookup("precision", key, refresh)
    if hit:
        return PrecisionResult(
            tvm.ir.load_json((hit / "prepared.json").read_text()),
            key,
            json.loads((hit / "info.json").read_text()),
            tvm.ir.load_json((hit / "converted.json").read_text()),
            True,
        )
    imported = import_model(source.path, specs_in, batch=batch)
    if precision == "int8" and opts.reduce_range is None:
        from dataclasses import replace

        from tasks.precision.quantize import weights_need_7_bits

        opts = replace(opts, reduce_range=weights_need_7_bits(device.tvm_target()))
    converted, info = convert_model(imported.mod, specs, precision, opts, "llvm")  # calibration runs on this host
    prepared = prepare_for_tuning(converted, device.tvm_target())
    with cache.CacheEntry("precision", key) as entry:
        (entry.path / "prepared.json").write_text(tvm.ir.save_json(prepared))
        (entry.path / "converted.json").write_text(tvm.ir.save_json(converted))
        (entry.path / "info.json").write_text(json.dumps(info, default=str))
        entry.commit()
    return PrecisionResult(prepared, key, info, converted, False)


def layer_report(source, specs_in, converted, dataset, count: int = 8) -> list[dict]:
    """Per-layer error of the converted model against fp32 on the first `count` samples (host)."""
    from tasks.importers.model_import import import_model
    from tasks.precision.quantize import per_layer_error

    samples = [dataset.sample(i) for i in range(min(count, len(dataset)))]
    return per_layer_error(import_model(source.path, specs_in).mod, converted, samples)


def worst_layer(rows: list[dict]) -> str:
    """The layer whose SNR drops most from the previous one: the first candidate to keep in float."""
    if not rows:
        return ""
    drops = [(rows[i - 1]["snr_db"] if i else 99.0) - r["snr_db"] for i, r in enumerate(rows)]
    return rows[max(range(len(rows)), key=lambda i: drops[i])]["layer"]
