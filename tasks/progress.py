"""Progress of a run, published by the stages and shown by whoever listens.

The stages call `update(...)` at stage boundaries and after each tuning round; that is all they
know about progress. Two listeners exist: the terminal display of `tvmflow compile` / `retune`
(flows/progress.py, a logging.Handler on the `tvmflow.progress` logger) and, inside a Prefect run,
a progress artifact (0-100 %, its description the stage line) that the UI shows while it runs.

    from tasks import progress
    progress.update(stage="import", model="mnist_cnn", device="local")
    progress.update(stage="tune", task=3, of=12, name="fused_conv2d", trials=40, budget=200,
                    best_ms=1.23, task_best_ms=0.21)
    progress.update(stage="publish", done=True)

Records carry their fields in `record.tvmflow_progress` (a dict); nothing is printed by default
(the logger does not propagate), so a deployment run's console stays as it was.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("tvmflow.progress")
log.setLevel(logging.INFO)
log.propagate = False  # only attached listeners see these records

FIELDS = (
    "stage",
    "task",
    "of",
    "name",
    "trials",
    "budget",
    "best_ms",
    "task_trials",
    "task_best_ms",
    "model",
    "device",
    "done",
)
ARTIFACT_EVERY_S = 2.0  # at most one progress-artifact write per run this often (plus stage changes)

_lock = threading.Lock()
_artifacts: dict[str, dict] = {}  # flow run id -> {"id", "stage", "at"}


def fraction(fields: dict) -> float | None:
    """Share of the run done, 0..1, from trials/budget (tuning) or task/of (other stages)."""
    if fields.get("done"):
        return 1.0
    if fields.get("budget"):
        return min(float(fields.get("trials") or 0) / float(fields["budget"]), 1.0)
    if fields.get("of"):
        return min(float(fields.get("task") or 0) / float(fields["of"]), 1.0)
    return None


def describe(fields: dict) -> str:
    """One line: `tune 3/12 fused_conv2d, 40/200 trials, best 1.230 ms`."""
    parts = [str(fields.get("stage") or "")]
    if fields.get("of"):
        parts.append(f"{fields.get('task') or 0}/{fields['of']}" + (f" {fields['name']}" if fields.get("name") else ""))
    if fields.get("budget"):
        parts.append(f"{fields.get('trials') or 0}/{fields['budget']} trials")
    if fields.get("best_ms") is not None:
        parts.append(f"best {float(fields['best_ms']):.3f} ms")
    return ", ".join(p for p in parts if p)


def update(stage: str, **fields) -> None:
    """Report where the run is. Unknown keys are refused (a typo would silently show nothing)."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise TypeError(f"progress.update: unknown field(s) {sorted(unknown)}; known: {FIELDS}")
    payload = {"stage": stage, **{k: v for k, v in fields.items() if v is not None}, "at": time.time()}
    log.info(describe(payload), extra={"tvmflow_progress": payload})
    _artifact(payload)


def _artifact(payload: dict) -> None:
    """Create/update this flow run's progress artifact (no-op outside a Prefect run). Its key is
    `<model>-<device>-progress`, from the first report that names them."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:  # pragma: no cover - prefect is a dependency
        return
    task_ctx = TaskRunContext.get()
    flow_ctx = FlowRunContext.get()
    if task_ctx:
        run_id = str(task_ctx.task_run.flow_run_id)
    elif flow_ctx and flow_ctx.flow_run:
        run_id = str(flow_ctx.flow_run.id)
    else:
        return
    share = fraction(payload)
    with _lock:
        state = _artifacts.setdefault(run_id, {"id": None, "stage": None, "at": 0.0, "model": None, "device": None})
        for k in ("model", "device"):
            state[k] = payload.get(k) or state[k]
        now = time.monotonic()
        if share is None or (
            state["id"]
            and state["stage"] == payload["stage"]
            and now - state["at"] < ARTIFACT_EVERY_S
            and not payload.get("done")
        ):
            return
        state["stage"], state["at"] = payload["stage"], now
        artifact_id = state["id"]
        key = "-".join(str(state[k]) for k in ("model", "device") if state[k]) or "run"
    try:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        percent = round(100.0 * share, 1)
        text = describe(payload)
        if artifact_id:
            update_progress_artifact(artifact_id, percent, description=text)
        else:
            key = "".join(c if c.isalnum() else "-" for c in f"{key}-progress").lower()
            created = create_progress_artifact(percent, key=key, description=text)
            with _lock:
                _artifacts[run_id]["id"] = created
    except Exception as err:  # noqa: BLE001 - progress must never fail a run
        logging.getLogger("tvmflow").debug(f"progress artifact not written: {err}")
