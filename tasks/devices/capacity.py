"""Device capacity: every on-device measurement holds slots of a Prefect global concurrency limit.

The limit is named after the device key (`device:<rpc key>`) and has as many slots as there
are devices of that kind, so two flow runs (or a flow run and a tuning fan-out on Dask) never
put more measurements on a device kind than it has boards; for a CUDA device that is one slot
per GPU worker. A missing limit is created with that slot count; an existing one is left as an
operator set it.
"""

from __future__ import annotations

import contextlib
import logging

log = logging.getLogger("tvmflow.capacity")


def limit_name(rpc_key: str) -> str:
    return f"device:{rpc_key}"


def device_slots(profile, servers: int) -> int:
    """Devices of this kind. CUDA: one per GPU worker (rpc server) found on the tracker, so the
    slots follow `tvmflow workers start --gpus N`; others: the fleet file's `count` if set, else
    the servers found."""
    count = int(profile.extra.get("count") or 0)
    if profile.target.get("kind") == "cuda":
        return int(servers or count or 1)
    return int(count or servers or 1)


def ensure_limit(rpc_key: str, slots: int) -> int:
    """Create the limit for `rpc_key` with `slots` slots if missing; return its slot count."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = limit_name(rpc_key)
    slots = max(int(slots), 1)
    with get_client(sync_client=True) as client:
        try:
            return int(client.read_global_concurrency_limit_by_name(name).limit)
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
            log.info(f"created global concurrency limit {name!r} with {slots} slot(s)")
            return slots
        except ObjectAlreadyExists:  # another run created it at the same moment
            return int(client.read_global_concurrency_limit_by_name(name).limit)


@contextlib.contextmanager
def on_device(rpc_key: str, slots: int, occupy: int = 1, timeout: float | None = 3600):
    """Hold `occupy` slots (at most the limit's size) of the device kind while measuring."""
    from prefect.concurrency.sync import concurrency

    from tasks.errors import Unreachable

    size = ensure_limit(rpc_key, slots)
    try:
        with concurrency(
            limit_name(rpc_key), occupy=max(1, min(int(occupy), size)), timeout_seconds=timeout, strict=True
        ):
            yield
    except TimeoutError:
        raise Unreachable(
            f"no free {rpc_key!r} device slot within {timeout:.0f} s (global concurrency "
            f"limit {limit_name(rpc_key)!r} is full); retry later or raise its slots"
        ) from None


def limited_runner(runner, rpc_key: str, slots: int):
    """Wrap a MetaSchedule runner so each measurement round runs inside the device's slots.

    MetaSchedule hands the runner a batch of candidates; the wrapper takes min(batch, slots)
    slots, waits for the batch's results and releases them, then hands back finished futures.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture

    @derived_object
    class DoneFuture(PyRunnerFuture):
        def __init__(self, result):
            super().__init__()
            self._result = result

        def done(self) -> bool:
            return True

        def result(self):
            return self._result

    @derived_object
    class SlotRunner(PyRunner):
        def __init__(self):
            super().__init__()

        def run(self, runner_inputs):
            with on_device(rpc_key, slots, occupy=min(len(runner_inputs), slots)):
                results = [future.result() for future in runner.run(runner_inputs)]
            return [DoneFuture(r) for r in results]

    return SlotRunner()
