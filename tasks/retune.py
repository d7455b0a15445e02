"""What the nightly retune decides, around the stages it shares with compile (flows/stages.py):
which models to retune (parameter checks up front), the precision and budget of each (from the
entry, else LATEST), and whether a rebuilt model is published (validated and no slower than
LATEST measured now on the same device). Prefect-free; flows/retune.py wires it.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec

from tasks.devices.profiles import DeviceProfile, get_device
from tasks.errors import TvmflowError
from tasks.importers.bundled import DEFAULT_DATA
from tasks.importers.model_import import is_factory, model_name
from tasks.precision.policy import check_precision
from tasks.records import BuildReport
from tasks.storage import cache
from tasks.storage.publish import build_prefix, join, safe_segment, store_fs, uri_of
from tasks.tuning.pick_best import DB_FILES

# Two measurements of one build on a shared machine differ by a few percent: a new build
# within this margin of LATEST counts as "no slower".
NOISE_TOLERANCE = 0.03


@dataclass
class ModelEntry:
    """One model of the fleet: its URI or factory, validation data, input specs, precision and batch.

    `precision` None: the run's precision if given, else LATEST's, else fp32. `calibration`
    (int8): calibration samples, by default the entry's data. `batch` None: the run's, else 1
    (the model's dynamic batch dimension fixed to it, as compile's --batch)."""

    model: str
    data: str | None = None
    inputs: list[str] = field(default_factory=list)
    precision: str | None = None
    calibration: str | None = None
    batch: int | None = None

    @property
    def name(self) -> str:
        return model_name(self.model)


@dataclass
class Outcome:
    model: str
    device: str
    status: str  # published | kept | failed
    reason: str
    new_ms: float | None = None
    latest_ms: float | None = None
    latest_build: str | None = None
    build_id: str | None = None
    build_uri: str | None = None
    trials: int = 0
    budget: int = 0
    precision: str | None = None
    validation: dict | None = None
    failure: str | None = None  # a failed model's kind: gate | unreachable | error (the run's exit code)

    def to_json(self) -> dict:
        return asdict(self)


def parse_models(models) -> list[ModelEntry]:
    """Models as deployment parameters give them: a URI string or {model, data, inputs, precision, calibration,
    batch}."""
    if isinstance(models, (str, dict)):
        models = [models]
    entries = []
    for item in models or []:
        if isinstance(item, str):
            entries.append(ModelEntry(item, DEFAULT_DATA.get(item)))
        elif isinstance(item, dict) and item.get("model"):
            entries.append(
                ModelEntry(
                    item["model"],
                    item.get("data") or DEFAULT_DATA.get(item["model"]),
                    list(item.get("inputs") or []),
                    item.get("precision"),
                    item.get("calibration"),
                    item.get("batch"),
                )
            )
        else:
            raise TvmflowError(f"bad model entry {item!r}: give a URI string or a map with a `model` key")
    return entries


def fleet_models(device: str) -> list[dict]:
    """The models listed for `device` in the fleet file (its `models:` key)."""
    return list(get_device(device).extra.get("models") or [])


def model_exists(spec: str) -> str | None:
    """None if the model can be fetched, else the reason (checked without downloading it)."""
    if is_factory(spec):
        module, _, attr = spec.partition(":")
        try:
            found = getattr(importlib.import_module(module), attr, None)
        except ImportError as err:
            return f"cannot import {module!r} ({err})"
        return None if callable(found) else f"{module!r} has no callable {attr!r}"
    try:
        fs, path = fsspec.core.url_to_fs(spec)
        return None if fs.exists(path) else "no such file"
    except Exception as err:  # noqa: BLE001 - any failure here means: cannot fetch it
        return f"{err.__class__.__name__}: {err}"


def check_parameters(
    device: str, models, budget: int, store: str, precision: str | None = None, batch: int | None = None
) -> tuple[DeviceProfile, list[ModelEntry]]:
    """Every problem with the run's parameters, as one error, before any tuning starts."""
    profile = get_device(device)  # unknown device: one-line error naming the known ones
    safe_segment(device, "device")
    entries = parse_models(models if models is not None else fleet_models(device))
    problems = []
    if not entries:
        problems.append(f"no models given and none listed for {device!r} in the fleet file")
    if int(budget) < 0:
        problems.append(f"budget {budget} is negative; give the extra trials per model (0 = no tuning)")
    for size in [batch, *(e.batch for e in entries)]:
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            problems.append(f"batch {size!r} is not a positive integer; give --batch 1 or more")
    for wanted in {precision, *(e.precision for e in entries)} - {None}:
        try:
            check_precision(str(wanted))
        except TvmflowError as err:
            problems.append(str(err))
    for entry in entries:
        reason = model_exists(entry.model)
        if reason:
            problems.append(f"model {entry.model!r} is missing: {reason}")
        else:
            try:
                safe_segment(entry.name, "model")
            except TvmflowError as err:
                problems.append(str(err))
    store_fs(store)
    if problems:
        raise TvmflowError("; ".join(problems))
    return profile, entries


@dataclass
class LatestBuild:
    build_id: str
    manifest: dict
    report: BuildReport | None  # None for a report this version cannot read
    folder: Path  # local copy: model.so and the tuning database, sha256-verified

    @property
    def budget(self) -> int:
        """Trials planned for this build in total (earlier retunes included)."""
        if "trials_budget" in self.manifest:
            return int(self.manifest["trials_budget"])
        if self.report is not None and self.report.trials_budget is not None:
            return int(self.report.trials_budget)
        return sum(int(t.trials_planned or 0) for t in self.report.tuning) if self.report else 0

    @property
    def precision(self) -> str | None:
        return self.manifest.get("precision") or (self.report.precision if self.report else None)

    @property
    def library(self) -> Path:
        return self.folder / "model.so"

    @property
    def inputs(self) -> list[str]:
        """Its input specs as published (`name:1x3x224x224:float32`); [] when not recorded."""
        return list(self.manifest.get("inputs") or (self.report.inputs if self.report else []))


def entry_batch(entry: ModelEntry, run_batch: int | None) -> int | None:
    """The entry's own batch, else the run's (None: the model's dynamic batch dimension becomes 1)."""
    return entry.batch if entry.batch is not None else run_batch


def comparable(latest: LatestBuild | None, specs) -> LatestBuild | None:
    """LATEST when it takes the same inputs as the rebuilt model (it can be measured on the same sample
    and its tuning records apply), else None: e.g. a retune with another --batch than LATEST's."""
    if latest is None or not latest.inputs:
        return latest
    return latest if latest.inputs == [str(s) for s in specs] else None


def latest_build(store: str, model: str, device: str, dest: Path) -> LatestBuild | None:
    """Download LATEST's library, database and report into `dest`, checking every sha256."""
    fs, _ = store_fs(store)
    base = build_prefix(store, model, device)
    latest = join(base, "LATEST")
    if not fs.exists(latest):
        return None
    build_id = fs.cat_file(latest).decode().strip()
    prefix = join(base, build_id)
    manifest = json.loads(fs.cat_file(join(prefix, "manifest.json")))
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("model.so", *DB_FILES, "report.json"):
        if name not in manifest["files"]:
            continue
        fs.get_file(join(prefix, name), str(dest / name))
        if cache.sha256_file(dest / name) != manifest["files"][name]["sha256"]:
            raise TvmflowError(
                f"{uri_of(store, join(prefix, name))} does not match its manifest sha256; "
                "LATEST is corrupt: republish it with `tvmflow compile`"
            )
    report = None
    if (dest / "report.json").exists():
        try:
            report = BuildReport.from_json(json.loads((dest / "report.json").read_text()))
        except (KeyError, TypeError, ValueError):  # written by an older tvmflow: the manifest still says enough
            report = None
    return LatestBuild(build_id, manifest, report, dest)


def entry_precision(entry: ModelEntry, run_precision: str | None, latest: LatestBuild | None) -> str:
    """The entry's own precision, else the run's, else LATEST's, else fp32."""
    return entry.precision or run_precision or (latest.precision if latest else None) or "fp32"


def same_database(db_dir: Path, latest: LatestBuild) -> bool:
    """True when the merged database is byte-identical to LATEST's: nothing new was learnt."""
    files = latest.manifest.get("files", {})
    return all(n in files and cache.sha256_file(Path(db_dir) / n) == files[n]["sha256"] for n in DB_FILES)


def decide(
    validation_passed: bool,
    validation_reason: str,
    new_ms: float,
    latest_ms: float | None,
    tolerance: float = NOISE_TOLERANCE,
) -> tuple[bool, str]:
    """(publish?, why) for a rebuilt model, from its validation and both latencies."""
    if not validation_passed:
        return False, f"validation failed ({validation_reason}); kept LATEST"
    if latest_ms is None:
        return True, f"validated; no earlier build, published at {new_ms:.3f} ms"
    if new_ms <= latest_ms * (1 + tolerance):
        return True, f"validated and no slower: {new_ms:.3f} ms vs LATEST {latest_ms:.3f} ms"
    return False, (
        f"slower than LATEST: {new_ms:.3f} ms vs {latest_ms:.3f} ms "
        f"(over the {tolerance:.0%} noise margin); kept LATEST"
    )


def failure_kind(err: BaseException) -> str:
    """gate | unreachable | error: what kind of failure an exception that ended a model's retune is."""
    from tasks.errors import GateFailed, Unreachable

    if isinstance(err, GateFailed):
        return "gate"
    if isinstance(err, (Unreachable, TimeoutError)):  # TimeoutError: a Prefect timeout (tasks.retry_policy)
        return "unreachable"
    return "error"


def run_failed(outcomes: list[Outcome]) -> TvmflowError | None:
    """The error that ends a run with failed models: GateFailed when every failure was a gate,
    Unreachable when a device or store could not be reached (and nothing else broke), else TvmflowError."""
    from tasks.errors import GateFailed, Unreachable

    failed = [o for o in outcomes if o.status == "failed"]
    if not failed:
        return None
    text = f"{len(failed)} of {len(outcomes)} models failed: " + "; ".join(f"{o.model}: {o.reason}" for o in failed)
    kinds = {o.failure or "error" for o in failed}
    if kinds == {"gate"}:
        return GateFailed(text)
    if kinds <= {"gate", "unreachable"}:
        return Unreachable(text)
    return TvmflowError(text)


def failure_reason(err: BaseException) -> str:
    """One line for a model's failure (a TvmflowError's own message, else the exception's first line)."""
    if isinstance(err, TvmflowError):
        return str(err)
    text = str(err).splitlines()[0][:300] if str(err) else ""
    return f"{err.__class__.__name__}: {text}"


def summary_rows(outcomes: list[Outcome]) -> list[dict]:
    def ms(v):
        return "–" if v is None else f"{v:.3f}"

    return [
        {
            "model": o.model,
            "device": o.device,
            "status": o.status,
            "new_ms": ms(o.new_ms),
            "latest_ms": ms(o.latest_ms),
            "trials": o.trials,
            "budget": o.budget,
            "build": o.build_id or o.latest_build or "–",
            "reason": o.reason,
        }
        for o in outcomes
    ]


def summary_markdown(outcomes: list[Outcome], device: str, budget: int) -> str:
    lines = [
        f"# tvmflow nightly retune: {device}",
        "",
        f"Extra budget {budget} trials per model. Published {sum(o.status == 'published' for o in outcomes)}, "
        f"kept {sum(o.status == 'kept' for o in outcomes)}, failed {sum(o.status == 'failed' for o in outcomes)}.",
        "",
        "| model | precision | status | new ms | LATEST ms | trials | build | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {o.precision or '–'} | {r['status']} | {r['new_ms']} | {r['latest_ms']} | "
        f"{r['trials']} | {r['build']} | {r['reason'].replace('|', '/')} |"
        for o, r in zip(outcomes, summary_rows(outcomes))
    ]
    return "\n".join(lines) + "\n"
