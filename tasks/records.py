"""Typed records passed between the pipeline's stages (flows/stages.py).

    fetch     -> ModelSource
    import (+ precision) -> PreparedModel
    plan      -> TuningPlan (TuningTask list with trials allotted)
    tune      -> TaskResult per task, gathered in a Tuning
    pick best + build -> Build
    validate  -> Validation (tasks.devices.validate) and a DeviceRun
    publish   -> BuildReport; report.json is BuildReport.to_json()

The CLI, the Prefect UI artifacts (tasks/report.py) and the retune decisions read fields of
these, not keys of dicts. `to_json` keeps report.json's keys as they were, so readers of the
published JSON (bench, UI, `tvmflow builds`) keep working.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.build.candidates import OperatorChoice
from tasks.devices.layer_times import LayerProfile
from tasks.devices.validate import Validation
from tasks.importers.model_import import InputSpec
from tasks.tuning.extract import TuningTask


@dataclass
class ModelSource:
    """The fetched model: a local file (or a multi-file model's bundle folder) and its hash."""

    name: str
    path: Path
    sha256: str
    framework: str  # "onnx" | "torch" | "keras" | "mxnet" | "tflite"


@dataclass
class PreparedModel:
    """The model imported to Relax, in its final precision, lowered and fused for tuning."""

    source: ModelSource
    mod: Any  # tvm.IRModule, prepared for tuning
    specs: list[InputSpec]  # the model's inputs as imported
    key: str  # cache key of this module: later stages' keys build on it
    precision: str = "fp32"  # the precision the module computes in (a QDQ model is int8)
    requested_inputs: list[InputSpec] = field(default_factory=list)  # --input overrides
    precision_info: dict | None = None  # calibration, plan, converted layers, or the QDQ summary
    converted: Any = None  # the converted module before lowering (per-layer error on a failed gate)
    cache_hits: list[str] = field(default_factory=list)  # "import", "precision"
    batch: int | None = None  # --batch: the dynamic batch dimension fixed at import (None: 1)
    notes: list[str] = field(default_factory=list)  # what the importer changed (batch, folding)
    graph: Any = None  # fp32 module before lowering (BN folded, device layout): the CPU pick-best's input

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.specs]


@dataclass
class TuningPlan:
    """The model's tuning tasks with the trials allotted to each."""

    tasks: list[TuningTask]
    budget: int

    @property
    def tuned(self) -> list[TuningTask]:
        return [t for t in self.tasks if t.trials > 0]


@dataclass
class TaskResult:
    """One task's tuning outcome; `db_dir` holds its records (search, cache or shared database)."""

    name: str
    trials_planned: int
    trials_run: int = 0
    valid: int = 0
    best_ms: float | None = None
    seconds: float = 0.0
    db_dir: str = ""
    error: str | None = None
    cached: bool = False  # from the local stage cache
    curve: list | None = None
    reused: bool = False  # from the shared per-device tuning database, no new trials
    trials_prior: int = 0  # trials paid for the reused records

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TaskResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def new_trials(self) -> int:
        """Trials measured in this run (0 for cached or reused results)."""
        return 0 if self.cached or self.reused else self.trials_run


@dataclass
class Tuning:
    """The tune stage's output: every task's result and what the shared database contributed."""

    results: list[TaskResult]
    seconds: float = 0.0
    reuse: dict | None = None  # tasks.tuning.shared_db.ReusePlan.summary() (+ "shard": the pushed one)

    @property
    def new_trials(self) -> int:
        return sum(r.new_trials for r in self.results)

    @property
    def untuned(self) -> list[str]:
        return [r.name for r in self.results if r.error]


@dataclass
class Build:
    """The exported library and the tuning database it was built with."""

    library: Path
    db_dir: Path | None
    records: int
    cached: bool = False
    choices: list[OperatorChoice] = field(default_factory=list)  # per-operator pick-best (tasks.build.candidates)


@dataclass
class BuildReport:
    """Everything a build's report.json holds; `to_json()` is that file."""

    model: str
    model_sha256: str
    device: str
    target: dict
    tvm_version: str
    precision: str
    framework: str
    inputs: list[str]
    data: str
    tasks: int
    trials: int  # measured in this run
    tuning: list[TaskResult]
    untuned_tasks: list[str]
    records: int
    latency_ms: float | None  # None: build-only (never run)
    latency_p90_ms: float | None
    validation: Validation
    tvmflow_version: str = ""
    trials_total: int = 0  # trials behind the records used (cached and reused ones included)
    trials_budget: int | None = None  # retune: trials planned over every build of this model
    untuned_latency_ms: float | None = None
    reference: dict = field(default_factory=dict)  # {"framework", "latency_ms"} on this host
    baselines: dict = field(default_factory=dict)  # name -> ms
    cache_hits: list[str] = field(default_factory=list)
    tuning_seconds: float = 0.0
    tuning_reuse: dict | None = None
    precision_info: dict | None = None
    precision_warning: str | None = None
    retune: dict | None = None  # previous build, its latency now, the decision
    operator_choices: list[OperatorChoice] = field(default_factory=list)
    per_layer_error: list[dict] | None = None
    build_id: str | None = None
    build_uri: str | None = None
    manifest_uri: str | None = None
    wall_seconds: float | None = None
    import_notes: list[str] = field(default_factory=list)  # what the importer changed (batch, folding)
    build_only: bool = False  # built without a device: not tuned, not validated, never LATEST
    layer_times: LayerProfile | None = None  # per-layer time table (None: not measured on this device)

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["tuning"] = [r.to_json() for r in self.tuning]
        out["validation"] = self.validation.to_json()
        out["operator_choices"] = [c.to_json() for c in self.operator_choices]
        out["layer_times"] = self.layer_times.to_json() if self.layer_times else None
        return out

    @classmethod
    def from_json(cls, data: dict) -> BuildReport:
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in data.items() if k in names}
        kept["tuning"] = [TaskResult.from_json(r) for r in data.get("tuning") or []]
        kept["validation"] = Validation(**data["validation"])
        kept["operator_choices"] = [OperatorChoice.from_json(c) for c in data.get("operator_choices") or []]
        kept["layer_times"] = LayerProfile.from_json(data["layer_times"]) if data.get("layer_times") else None
        return cls(**kept)

    def manifest_meta(self) -> dict:
        """The report's fields copied into manifest.json (read by `tvmflow builds` and retune)."""
        meta = {
            k: v
            for k, v in self.to_json().items()
            if k
            in (
                "model_sha256",
                "target",
                "tvm_version",
                "tvmflow_version",
                "precision",
                "trials",
                "tasks",
                "latency_ms",
                "validation",
                "framework",
                "inputs",
            )
        }
        if self.trials_budget is not None:
            meta["trials_budget"] = self.trials_budget
        if self.retune is not None:
            meta["retune"] = self.retune
        meta["timings"] = {"tuning_seconds": self.tuning_seconds, "wall_seconds": self.wall_seconds}
        if self.build_only:  # tasks.storage.publish never moves LATEST to it; fetch needs --allow-unvalidated
            meta.update(
                build_only=True,
                validation={"passed": None, "reason": self.validation.reason},
                latency_ms=None,
            )
        return meta
