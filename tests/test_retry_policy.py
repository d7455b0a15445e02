"""Retries and timeouts of device/store steps (tasks/retry_policy.py) on a real Prefect API and a
real RPC tracker that is killed and restarted on the same port while the flow runs."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from prefect import flow, task

from tasks import retry_policy
from tasks.errors import GateFailed, TvmflowError, Unreachable


def test_only_transient_failures_are_retried():
    transient = [Unreachable("tracker down"), TimeoutError(), ConnectionResetError(), OSError("Connection refused")]
    permanent = [TvmflowError("bad model"), GateFailed("validation failed"), FileNotFoundError("x"), ValueError("bug")]
    assert [retry_policy.is_transient(e) for e in transient] == [True] * 4
    assert [retry_policy.is_transient(e) for e in permanent] == [False] * 4


def _restart_tracker(workers, down_s: float) -> threading.Thread:
    """Kill the tracker now; start a new one on the same port `down_s` later (the rpc servers
    notice on their next ping and register again)."""
    from tasks.devices.workers import kill_group

    kill_group(workers.tracker_pid)

    def again():
        time.sleep(down_s)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tvm.exec.rpc_tracker",
                "--host",
                "127.0.0.1",
                "--port",
                str(workers.tracker_port),
                "--port-end",
                str(workers.tracker_port + 1),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        workers.tracker_pid = proc.pid

    thread = threading.Thread(target=again, daemon=True)
    thread.start()
    return thread


def test_tracker_restarted_mid_run_the_run_still_finishes(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from tvm import rpc

    from tasks.devices.workers import start_local_workers, wait_for_servers

    key = "retry-test"
    attempts = [0, 0]  # task bodies run in this process: counted here, not read back from Prefect's event stream
    workers = start_local_workers(key, 1, tmp_path / "workers")
    try:
        # a new tracker process takes 5-60 s to listen on a busy 2-core machine: room for that
        @task(name="on-device", **retry_policy.device(retries=6, delays_s=[3, 5, 10, 20, 30, 40], timeout_s=300))
        def on_device(i: int) -> bool:
            attempts[i] += 1
            wait_for_servers(workers.host, workers.tracker_port, key, 1, timeout=5)  # Unreachable while down
            remote = rpc.connect_tracker(workers.host, workers.tracker_port).request(key, session_timeout=30)
            return bool(remote.cpu(0).exist)

        @flow(name="retry-through-tracker-restart")
        def measured() -> list[bool]:
            first = on_device(0)
            restarted = _restart_tracker(workers, down_s=2)
            second = on_device(1)
            restarted.join()
            return [first, second]

        state = measured(return_state=True)
        assert state.is_completed(), state
        assert state.result() == [True, True]
        assert attempts[0] == 1 and attempts[1] >= 2, attempts  # one step retried, then finished
        with get_client(sync_client=True) as client:  # the flow run itself is written over HTTP, not via events
            assert client.read_flow_run(state.state_details.flow_run_id).state.is_completed()
    finally:
        workers.stop()


def test_a_step_that_hangs_times_out_and_a_user_error_is_not_retried(prefect_harness):
    calls = {"hang": 0, "user": 0}

    @task(name="hangs", **retry_policy.store(retries=1, delays_s=[0], timeout_s=1))
    def hangs():
        calls["hang"] += 1
        time.sleep(5)

    @task(name="bad-input", **retry_policy.store(retries=2, delays_s=[0]))
    def bad_input():
        calls["user"] += 1
        raise TvmflowError("model is missing")

    @flow(name="timeouts")
    def both():
        hung = hangs(return_state=True)
        bad = bad_input(return_state=True)
        return hung, bad

    hung, bad = both()
    assert hung.is_failed() and bad.is_failed()
    with pytest.raises(TimeoutError):
        hung.result()
    assert calls == {"hang": 2, "user": 1}  # the timeout was retried once; the user error never
