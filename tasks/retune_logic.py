"""Nightly retuning, as plain functions: check parameters, find LATEST, tune more from where it
stopped, rebuild, validate, and publish only a build that validated and is no slower.

flows/retune.py only wires these together. Each model is retuned by `retune_model`, which
never raises: the outcome ("published", "kept" or "failed") and its reason go in the result,
so one model's failure does not stop the others.
"""
from __future__ import annotations

import importlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks import steps

from tasks.storage import cache
from tasks.importers.bundled import DEFAULT_DATA
from tasks.devices.profiles import DeviceProfile, get_device
from tasks.errors import TvmflowError
from tasks.tuning.pick_best import DB_FILES
from tasks.storage.publish import build_prefix, join, new_build_id, publish_build, safe_segment, store_fs, uri_of

# Two measurements of one build on a shared machine differ by a few percent: a new build
# within this margin of LATEST counts as "no slower".
NOISE_TOLERANCE = 0.03


@dataclass
class ModelEntry:
    """One model of the fleet: its URI or factory, validation data and input specs."""

    model: str
    data: str | None = None
    inputs: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        from tasks.importers.model_import import model_name

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
    validation: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)


def parse_models(models) -> list[ModelEntry]:
    """Models as deployment parameters give them: a URI string or {model, data, inputs}."""
    if isinstance(models, (str, dict)):
        models = [models]
    entries = []
    for item in models or []:
        if isinstance(item, str):
            entries.append(ModelEntry(item, DEFAULT_DATA.get(item)))
        elif isinstance(item, dict) and item.get("model"):
            entries.append(ModelEntry(item["model"], item.get("data") or DEFAULT_DATA.get(item["model"]),
                                      list(item.get("inputs") or [])))
        else:
            raise TvmflowError(f"bad model entry {item!r}: give a URI string or a map with a `model` key")
    return entries


def fleet_models(device: str) -> list[dict]:
    """The models listed for `device` in the fleet file (its `models:` key)."""
    return list(get_device(device).extra.get("models") or [])


def model_exists(spec: str) -> str | None:
    """None if the model can be fetched, else the reason (checked without downloading it)."""
    from tasks.importers.model_import import is_factory

    if is_factory(spec):
        module, _, attr = spec.partition(":")
        try:
            found = getattr(importlib.import_module(module), attr, None)
        except ImportError as err:
            return f"cannot import {module!r} ({err})"
        return None if callable(found) else f"{module!r} has no callable {attr!r}"
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(spec)
        return None if fs.exists(path) else "no such file"
    except Exception as err:  # noqa: BLE001 - any failure here means: cannot fetch it
        return f"{err.__class__.__name__}: {err}"


def check_parameters(device: str, models, budget: int, store: str) -> tuple[DeviceProfile, list[ModelEntry]]:
    """Every problem with the run's parameters, as one error, before any tuning starts."""
    profile = get_device(device)  # unknown device: one-line error naming the known ones
    safe_segment(device, "device")
    entries = parse_models(models if models is not None else fleet_models(device))
    problems = []
    if not entries:
        problems.append(f"no models given and none listed for {device!r} in the fleet file")
    if int(budget) < 0:
        problems.append(f"budget {budget} is negative; give the extra trials per model (0 = no tuning)")
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
    report: dict
    folder: Path  # local copy: model.so and the tuning database, sha256-verified

    @property
    def budget(self) -> int:
        """Trials planned for this build in total (earlier retunes included)."""
        if "trials_budget" in self.manifest:
            return int(self.manifest["trials_budget"])
        return sum(int(t.get("trials_planned") or 0) for t in self.report.get("tuning") or [])


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
            raise TvmflowError(f"{uri_of(store, join(prefix, name))} does not match its manifest sha256; "
                               "LATEST is corrupt: republish it with `tvmflow compile`")
    report = json.loads((dest / "report.json").read_text()) if (dest / "report.json").exists() else {}
    return LatestBuild(build_id, manifest, report, dest)


def same_database(db_dir: Path, latest: LatestBuild) -> bool:
    """True when the merged database is byte-identical to LATEST's: nothing new was learnt."""
    files = latest.manifest.get("files", {})
    return all(n in files and cache.sha256_file(Path(db_dir) / n) == files[n]["sha256"] for n in DB_FILES)


def decide(validation_passed: bool, validation_reason: str, new_ms: float, latest_ms: float | None,
           tolerance: float = NOISE_TOLERANCE) -> tuple[bool, str]:
    """(publish?, why) for a rebuilt model, from its validation and both latencies."""
    if not validation_passed:
        return False, f"validation failed ({validation_reason}); kept LATEST"
    if latest_ms is None:
        return True, f"validated; no earlier build, published at {new_ms:.3f} ms"
    if new_ms <= latest_ms * (1 + tolerance):
        return True, f"validated and no slower: {new_ms:.3f} ms vs LATEST {latest_ms:.3f} ms"
    return False, (f"slower than LATEST: {new_ms:.3f} ms vs {latest_ms:.3f} ms "
                   f"(over the {tolerance:.0%} noise margin); kept LATEST")


def retune_model(entry: ModelEntry, profile: DeviceProfile, workers, store: str, budget: int,
                 fanout, precision: str = "fp32") -> Outcome:
    """Retune, rebuild, validate, compare and maybe publish one model; never raises.

    `workers()` returns (tracker address, server count), starting device workers on first use:
    a model with nothing to tune never waits for them. `fanout(plan, seed_db_dir, tracker,
    servers)` tunes the plan's tasks and returns their result dicts.
    """
    outcome = Outcome(entry.model, profile.name, "failed", "")
    work_dir = cache.cache_root() / "runs" / ("retune-" + uuid.uuid4().hex[:12])
    try:
        _retune(entry, profile, workers, store, budget, fanout, precision, work_dir, outcome)
    except TvmflowError as err:
        outcome.status, outcome.reason = "failed", str(err)
    except Exception as err:  # noqa: BLE001 - one model's failure must not stop the others
        outcome.status, outcome.reason = "failed", f"{err.__class__.__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    finally:
        steps.clean_dir(work_dir)
    steps._logger().info(f"{entry.name} on {profile.name}: {outcome.status}: {outcome.reason}")
    return outcome


def _retune(entry, profile, workers, store, budget, fanout, precision, work_dir: Path, outcome: Outcome):
    import tvm

    from tasks.importers.datasets import load_dataset
    from tasks.importers.model_import import parse_input_spec
    from tasks.report import write_report_files

    started = time.monotonic()
    specs_in = [parse_input_spec(s) for s in entry.inputs]
    source = steps.fetch_model(entry.model, specs_in)
    prepared, specs, prep_key, _ = steps.import_and_prepare(source, profile, specs_in)
    dataset = load_dataset(entry.data, specs)
    latest = latest_build(store, source.name, profile.name, work_dir / "latest")
    outcome.latest_build = latest.build_id if latest else None
    plan = steps.plan_tuning(prepared, profile, budget)
    to_tune = [t for t in plan if t.trials > 0]
    outcome.budget = (latest.budget if latest else 0) + sum(t.trials for t in to_tune)
    if latest and not to_tune:
        outcome.status, outcome.reason = "kept", f"no extra budget: nothing tuned; LATEST {latest.build_id} is current"
        return
    seed = str(latest.folder) if latest else None
    tracker, servers = workers()
    tune_start = time.monotonic()
    results = fanout(to_tune, seed, tracker, servers)
    tuning_seconds = time.monotonic() - tune_start
    outcome.trials = sum(r["trials_run"] for r in results if not r.get("cached"))
    sources = ([{"db_dir": seed}] if seed else []) + results  # LATEST's records plus the new ones
    db_dir, records = steps.merge_step(sources, work_dir / "database", profile)
    if latest and same_database(db_dir, latest):
        outcome.status, outcome.reason = "kept", f"tuning found nothing better; LATEST {latest.build_id} is current"
        return
    lib, _ = steps.build_step(prepared, prep_key, profile, db_dir if records else None)
    run, validation, framework_ms = steps.validate_build(lib, source, specs, dataset, tracker, profile, precision, servers)
    outcome.validation = validation.to_json()
    names = [s.name for s in specs]
    outcome.new_ms = run.median_ms
    if latest:  # both measured now, on the same device kind, same input, same repeats
        outcome.latest_ms = steps.measure(latest.folder / "model.so", tracker, profile, servers,
                                          [dataset.sample(0)], names).median_ms
        outcome.new_ms = steps.measure(lib, tracker, profile, servers, [dataset.sample(0)], names).median_ms
    publish, outcome.reason = decide(validation.passed, validation.reason, outcome.new_ms, outcome.latest_ms)
    if not publish:
        outcome.status = "kept" if latest else "failed"
        if not latest:
            outcome.reason = outcome.reason.replace("; kept LATEST", "; nothing published")
        return
    build_id = new_build_id()
    report = {
        "model": source.name, "model_sha256": source.sha256, "device": profile.name, "target": profile.target,
        "tvm_version": tvm.__version__, "precision": precision, "framework": source.framework,
        "inputs": [str(s) for s in specs], "data": dataset.source, "tasks": len(plan), "trials": outcome.trials,
        "trials_budget": outcome.budget, "tuning": results, "untuned_tasks": [r["name"] for r in results if r["error"]],
        "records": records, "latency_ms": outcome.new_ms, "latency_p90_ms": run.p90_ms, "untuned_latency_ms": None,
        "reference": {"framework": source.framework, "latency_ms": framework_ms},
        "baselines": {f"{source.framework} (host)": framework_ms,
                      **({f"LATEST {latest.build_id} (device)": outcome.latest_ms} if latest else {})},
        "validation": validation.to_json(), "cache_hits": [], "tuning_seconds": round(tuning_seconds, 1),
        "retune": {"previous_build": outcome.latest_build, "previous_latency_ms": outcome.latest_ms,
                   "decision": outcome.reason},
        "build_id": build_id, "build_uri": uri_of(store, build_prefix(store, source.name, profile.name, build_id)),
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    files = {"model.so": lib, **{n: db_dir / n for n in DB_FILES}}
    files.update(write_report_files(report, work_dir / "report"))
    meta = {k: report[k] for k in ("model_sha256", "target", "tvm_version", "precision", "trials", "trials_budget",
                                   "tasks", "latency_ms", "validation", "framework", "inputs", "retune")}
    meta["timings"] = {"tuning_seconds": report["tuning_seconds"], "wall_seconds": report["wall_seconds"]}
    published = publish_build(store, source.name, profile.name, files, meta, build_id)
    outcome.status, outcome.build_id, outcome.build_uri = "published", build_id, published["build_uri"]


def summary_rows(outcomes: list[Outcome]) -> list[dict]:
    def ms(v):
        return "–" if v is None else f"{v:.3f}"

    return [{"model": o.model, "device": o.device, "status": o.status, "new_ms": ms(o.new_ms),
             "latest_ms": ms(o.latest_ms), "trials": o.trials, "budget": o.budget,
             "build": o.build_id or o.latest_build or "–", "reason": o.reason} for o in outcomes]


def summary_markdown(outcomes: list[Outcome], device: str, budget: int) -> str:
    lines = [f"# tvmflow nightly retune: {device}", "",
             f"Extra budget {budget} trials per model. Published {sum(o.status == 'published' for o in outcomes)}, "
             f"kept {sum(o.status == 'kept' for o in outcomes)}, failed {sum(o.status == 'failed' for o in outcomes)}.",
             "", "| model | status | new ms | LATEST ms | trials | build | reason |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['status']} | {r['new_ms']} | {r['latest_ms']} | {r['trials']} | {r['build']} | "
              f"{r['reason'].replace('|', '/')} |" for r in summary_rows(outcomes)]
    return "\n".join(lines) + "\n"
