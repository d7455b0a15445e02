"""Prefect events the flows emit, so users can hang their own notifications on them (and
`tvmflow alerts install` does, for regressions). The resource is the model on the device:
`tvmflow.build.<model>.<device>`, labelled with `tvmflow.model` / `tvmflow.device`; inside a flow
run Prefect relates the event to the run, its flow and deployment.

    from tasks import events
    events.emit_published(model, device, latency_ms, build_id=..., precision=..., store=..., previous_ms=...)
    events.emit_regressed(model, device, latency_ms, previous_ms, build_id=...)
    events.emit_retune_failed(model, device, reason, latency_ms=None)

Sending never fails a run: without an API the event is dropped (returned None).
"""

from __future__ import annotations

import logging

PUBLISHED = "tvmflow.build.published"
REGRESSED = "tvmflow.build.regressed"
RETUNE_FAILED = "tvmflow.retune.failed"

log = logging.getLogger("tvmflow.events")


def resource(model: str, device: str) -> dict:
    return {
        "prefect.resource.id": f"tvmflow.build.{model}.{device}",
        "prefect.resource.name": f"{model} on {device}",
        "tvmflow.model": model,
        "tvmflow.device": device,
    }


def emit(event: str, model: str, device: str, **payload):
    """Emit one tvmflow event; the payload always has model, device and latency_ms."""
    from prefect.events import emit_event

    body = {"model": model, "device": device, "latency_ms": payload.pop("latency_ms", None), **payload}
    try:
        return emit_event(event=event, resource=resource(model, device), payload=body)
    except Exception as err:  # noqa: BLE001 - an alert channel must never fail the build
        log.warning(f"event {event} not sent: {err}")
        return None


def emit_published(model: str, device: str, latency_ms: float | None, **payload):
    return emit(PUBLISHED, model, device, latency_ms=latency_ms, **payload)


def emit_regressed(model: str, device: str, latency_ms: float, previous_ms: float, **payload):
    slower = (latency_ms / previous_ms - 1.0) * 100.0 if previous_ms else None
    return emit(
        REGRESSED,
        model,
        device,
        latency_ms=latency_ms,
        previous_ms=previous_ms,
        slower_percent=round(slower, 2) if slower is not None else None,
        **payload,
    )


def emit_retune_failed(model: str, device: str, reason: str, latency_ms: float | None = None, **payload):
    return emit(RETUNE_FAILED, model, device, latency_ms=latency_ms, reason=reason, **payload)
