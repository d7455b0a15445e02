"""Retries with backoff and timeouts for the steps that wait on a device or on the store.

A transient failure (tracker or board restarting, S3 endpoint hiccup, a Prefect timeout) is
retried with growing, jittered delays; a user error (bad model, failed gate) is not: retrying it
would only repeat the same one-line error later. Use as Prefect task options:

    from tasks import retry_policy
    @task(name="validate", **retry_policy.DEVICE)          # runs on a board through the tracker
    @task(name="publish", **retry_policy.STORE)            # reads/writes the object store
    stages.validate.with_options(**retry_policy.device(timeout_s=1800))   # a longer step

Timeouts raise TimeoutError in the task; `tvmflow` exits 4 for it (README, Exit codes). A sync
task's timeout cannot interrupt a blocking C call; the RPC session's own timeouts end those.
"""

from __future__ import annotations

import logging

from tasks.errors import TvmflowError, Unreachable

log = logging.getLogger("tvmflow.retry")

DEVICE_RETRIES = 3
DEVICE_DELAYS_S = [5, 15, 45]  # a restarted tracker: rpc servers re-register within ~5-10 s
DEVICE_TIMEOUT_S = 3600.0  # one validation / measurement step; tuning has its own budget
STORE_RETRIES = 3
STORE_DELAYS_S = [2, 10, 30]
STORE_TIMEOUT_S = 900.0  # upload/download of one build
JITTER = 0.3  # +-30 % on each delay: parallel runs do not retry in lockstep


def is_transient(exc: BaseException | None) -> bool:
    """Worth retrying: unreachable device/tracker/store, a timeout, a dropped connection."""
    if exc is None:
        return False
    if isinstance(exc, Unreachable):
        return True
    if isinstance(exc, TvmflowError):  # usage error or failed gate: the same again on retry
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return True
    text = f"{exc.__class__.__name__} {exc}".lower()
    return any(s in text for s in ("connection refused", "connection reset", "timed out", "endpointconnection"))


def retry_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry only transient failures."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as err:  # noqa: BLE001 - a result we cannot read: judge by that error
        exc = err
    transient = is_transient(exc if isinstance(exc, BaseException) else None)
    if transient:
        log.info(f"{task.name}: transient failure ({exc.__class__.__name__}: {exc}); retrying")
    return transient


def device(
    retries: int = DEVICE_RETRIES, delays_s: list[float] | None = None, timeout_s: float | None = DEVICE_TIMEOUT_S
) -> dict:
    """Task options for a step that waits on a device through the tracker."""
    return {
        "retries": retries,
        "retry_delay_seconds": list(delays_s or DEVICE_DELAYS_S),
        "retry_jitter_factor": JITTER,
        "timeout_seconds": timeout_s,
        "retry_condition_fn": retry_transient,
    }


def store(
    retries: int = STORE_RETRIES, delays_s: list[float] | None = None, timeout_s: float | None = STORE_TIMEOUT_S
) -> dict:
    """Task options for a step that reads or writes the object store."""
    return {
        "retries": retries,
        "retry_delay_seconds": list(delays_s or STORE_DELAYS_S),
        "retry_jitter_factor": JITTER,
        "timeout_seconds": timeout_s,
        "retry_condition_fn": retry_transient,
    }


DEVICE = device()
STORE = store()
