"""What `tvmflow devices` shows: each fleet device with its tracker and the workers registered
there now. A tracker that does not answer is a row saying so, not an error: the listing is how
an operator finds out which boards are missing."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from tasks.devices.profiles import DeviceProfile, load_fleet
from tasks.errors import TvmflowError


@dataclass
class DeviceStatus:
    name: str
    target: str
    precisions: list[str]
    tracker: str | None  # host:port, or None when none is configured
    reachable: bool | None  # None: no tracker to ask
    registered: int | None  # rpc servers registered under the device's key
    free: int | None  # of those, idle now
    busy: int | None  # registered - free: measuring right now
    build_only: bool
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def tracker_of(profile: DeviceProfile, default: str | None = None) -> str | None:
    """The device's tracker: `tracker:` in the fleet file, else `default` (--tracker or
    TVMFLOW_TRACKER), else the local workers `tvmflow workers start` left running for its key."""
    found = profile.extra.get("tracker") or default or os.environ.get("TVMFLOW_TRACKER")
    if found:
        return str(found)
    if profile.local_workers > 0:
        from tasks.devices.workers import load_state

        state = load_state()
        if state and state.key == profile.rpc_key:
            return state.tracker
    return None


def short_target(target: dict) -> str:
    """`llvm mcpu=znver3 num-cores=2`: the kind and the attributes that tell devices apart."""
    keys = ("device", "arch", "mtriple", "mcpu", "num-cores")
    host = target.get("host") or {}
    text = " ".join([str(target.get("kind")), *(f"{k}={target[k]}" for k in keys if k in target)])
    return text + (f" (host {short_target(host)})" if isinstance(host, dict) and host else "")


def device_status(profile: DeviceProfile, tracker: str | None, timeout: float = 3.0) -> DeviceStatus:
    from tasks.devices.workers import parse_tracker, tracker_summary

    status = DeviceStatus(
        name=profile.name,
        target=short_target(profile.target),
        precisions=list(profile.precisions),
        tracker=tracker,
        reachable=None,
        registered=None,
        free=None,
        busy=None,
        build_only=bool(profile.extra.get("build_only")),
    )
    if not tracker:
        return status
    try:
        summary = tracker_summary(*parse_tracker(tracker), timeout=timeout)
    except TvmflowError as err:
        status.reachable, status.error = False, str(err)
        return status
    status.reachable = True
    servers = [s for s in summary.get("server_info", []) if str(s.get("key", "")).split(":", 1)[-1] == profile.rpc_key]
    status.registered = len(servers)
    status.free = int(summary.get("queue_info", {}).get(profile.rpc_key, {}).get("free", 0))
    status.busy = max(status.registered - status.free, 0)
    return status


def fleet_status(tracker: str | None = None, fleet_path: str | None = None) -> list[DeviceStatus]:
    """One DeviceStatus per device of the fleet file, in file order."""
    return [device_status(p, tracker_of(p, tracker)) for p in load_fleet(fleet_path).values()]
