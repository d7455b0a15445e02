"""The XGBoost cost model that one device's tuning sessions share, persisted between runs.

MetaSchedule's XGBModel predicts at random until it has `num_warmup_samples` measurements; a
fresh model per task (tasks.tuning.tune) therefore spends every task's first rounds blind. One
model for all tasks of a session, saved next to the tuning database and loaded by the next
session, starts that session warm: its first round is already ranked by what earlier sessions
measured (tests/tuning/test_joint.py checks the ranking is better than a fresh model's).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("tvmflow.cost_model")
FILE = "cost_model.tar"


def model_path(cost_model_dir: str | Path) -> Path:
    return Path(cost_model_dir) / FILE


WARMUP_SAMPLES = 32  # measurements before the model's predictions replace random ones (MetaSchedule: 100)


def new_model(cores: int | None = None, warmup: int = WARMUP_SAMPLES):
    """A fresh XGBModel. Fewer warm-up samples than MetaSchedule's 100: the model is shared by
    every task of a session, so 32 measurements already span several tasks' schedules."""
    from tvm.s_tir import meta_schedule as ms

    return ms.cost_model.XGBModel(num_tuning_cores=cores or os.cpu_count() or 1, num_warmup_samples=warmup)


def load_model(cost_model_dir: str | Path | None, cores: int | None = None):
    """The saved model of `cost_model_dir`, else a fresh one (also when the file is unreadable:
    a cost model only steers the search, losing it costs speed, never correctness)."""
    model = new_model(cores)
    path = model_path(cost_model_dir) if cost_model_dir else None
    if path is None or not path.exists():
        return model, False
    try:
        model.load(str(path))
        return model, True
    except Exception as err:  # noqa: BLE001 - see docstring
        log.warning("cost model %s not loaded (%s): starting fresh", path, err)
        return new_model(cores), False


def save_model(model, cost_model_dir: str | Path | None) -> Path | None:
    """Save `model` (booster and its training data) atomically; nothing when it never trained
    (XGBModel.load cannot read a file without a booster)."""
    if not cost_model_dir or getattr(model, "booster", None) is None:
        return None
    path = model_path(cost_model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.tar")
    model.save(str(tmp))
    os.replace(tmp, path)
    return path
