"""A device session: one device kind's profile, the RPC tracker its boards are registered to, how
many servers answer there, and its capacity slots. Stages take the session instead of
`(tracker, servers, device)` threaded through their signatures.

Used as a context manager: with no tracker given (argument or $TVMFLOW_TRACKER) and a profile
with `local_workers`, it starts a local tracker + rpc servers on first use (a CUDA profile: one
per visible GPU) and stops them on exit; a run with nothing to tune or measure never starts them.
`servers` counts every server registered under the key: the runner measures that many at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tasks.devices.capacity import device_slots, on_device
from tasks.devices.profiles import DeviceProfile
from tasks.devices.validate import DeviceRun, run_on_device
from tasks.devices.workers import (
    LocalWorkers,
    parse_tracker,
    registered_servers,
    start_device_workers,
    wait_for_servers,
)
from tasks.errors import TvmflowError


@dataclass
class DeviceAddress:
    """What a tuning task on another process needs to reach the devices (picklable, small)."""

    profile: DeviceProfile
    tracker: tuple[str, int]
    servers: int

    @property
    def slots(self) -> int:
        """Slots of the device's global concurrency limit (tasks.devices.capacity.device_slots)."""
        return device_slots(self.profile, self.servers)


@dataclass
class DeviceSession:
    profile: DeviceProfile
    tracker_uri: str | None = None  # host:port of an existing tracker; None: $TVMFLOW_TRACKER or local workers
    worker_timeout: float = 60.0
    log_dir: str | None = None  # local workers' logs
    local: LocalWorkers | None = field(default=None, repr=False)
    _address: DeviceAddress | None = field(default=None, repr=False)

    def start(self) -> DeviceAddress:
        """Connect (or start local workers) once; later calls return the same address."""
        if self._address is not None:
            return self._address
        uri = self.tracker_uri or os.environ.get("TVMFLOW_TRACKER")  # e.g. set by `tvmflow serve`
        if uri:
            host, port = parse_tracker(uri)
            wait_for_servers(host, port, self.profile.rpc_key, 1, self.worker_timeout)
            count = registered_servers(host, port, self.profile.rpc_key)  # busy ones measure too
            self._address = DeviceAddress(self.profile, (host, port), count)
            return self._address
        if self.profile.local_workers <= 0:
            raise TvmflowError(
                f"device {self.profile.name!r} has no local workers: pass --tracker host:port of a "
                f"tracker where its rpc servers (key {self.profile.rpc_key!r}) are registered"
            )
        # a CUDA profile with local_workers > 0 gets one server per visible GPU instead
        self.local = start_device_workers(self.profile, self.profile.local_workers, log_dir=self.log_dir)
        self._address = DeviceAddress(
            self.profile, (self.local.host, self.local.tracker_port), len(self.local.server_pids)
        )
        return self._address

    @property
    def started(self) -> bool:
        return self._address is not None

    @property
    def address(self) -> DeviceAddress:
        return self.start()

    @property
    def tracker(self) -> tuple[str, int]:
        return self.start().tracker

    @property
    def servers(self) -> int:
        return self.start().servers

    @property
    def slots(self) -> int:
        return self.start().slots

    def measure(self, lib, samples: list[dict], names: list[str], **kw) -> DeviceRun:
        """Run `samples` on one of the devices and time it, inside the device kind's capacity slot."""
        address = self.start()
        with on_device(self.profile.rpc_key, address.slots):
            return run_on_device(
                lib,
                address.tracker,
                self.profile.rpc_key,
                samples,
                names,
                self.profile.target.get("kind", "llvm"),
                **kw,
            )

    def stop(self) -> None:
        if self.local is not None:
            self.local.stop()
            self.local = None
        self._address = None

    def __enter__(self) -> DeviceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
