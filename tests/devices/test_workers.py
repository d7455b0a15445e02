"""Local device workers: real tracker + rpc servers on free loopback ports, no orphans left."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from tasks.devices.workers import (
    free_port,
    free_servers,
    parse_tracker,
    start_local_workers,
    tracker_summary,
    wait_for_servers,
)
from tasks.errors import TvmflowError


def _group_members(pgids: set[int]) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) in pgids and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            pass
    return members


def test_start_and_stop_leave_no_orphans(tmp_path):
    workers = start_local_workers("orphan-check", 2, tmp_path / "logs")
    try:
        pids = [workers.tracker_pid, *workers.server_pids]
        assert len(set(pids)) == 3
        for pid in pids:
            assert os.getpgid(pid) == pid, "each worker must lead its own process group"
        assert free_servers(workers.host, workers.tracker_port, "orphan-check") == 2
        # a session makes the rpc server fork its popen worker: that child must go too
        from tvm import rpc

        session = rpc.connect_tracker(workers.host, workers.tracker_port).request("orphan-check", session_timeout=60)
        assert session.cpu(0).exist
        members = _group_members(set(pids))
        assert len(members) > 3, "expected forked children inside the servers' groups"
    finally:
        workers.stop()
    deadline = time.monotonic() + 10
    while _group_members(set(pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _group_members(set(pids)) == []
    assert (tmp_path / "logs" / "rpc_tracker.log").exists() and (tmp_path / "logs" / "rpc_server_1.log").exists()


def test_unreachable_tracker_is_one_line_error():
    port = free_port()
    with pytest.raises(TvmflowError, match=f"cannot reach the RPC tracker at 127.0.0.1:{port}") as info:
        tracker_summary("127.0.0.1", port, timeout=2)
    assert "\n" not in str(info.value)
    with pytest.raises(TvmflowError, match="cannot reach"):
        wait_for_servers("127.0.0.1", port, "local", 1, timeout=1)


def test_wait_for_servers_times_out_with_one_line(local_workers):
    host, port = local_workers.host, local_workers.tracker_port
    assert wait_for_servers(host, port, "local", 2, timeout=30) >= 2
    with pytest.raises(TvmflowError, match=r"no free device worker with key 'no-such-board' .* after 1 s") as info:
        wait_for_servers(host, port, "no-such-board", 1, timeout=1)
    assert "\n" not in str(info.value)


def test_tracker_summary_lists_servers(local_workers):
    summary = tracker_summary(local_workers.host, local_workers.tracker_port)
    assert summary["queue_info"]["local"]["free"] >= 1
    assert len([s for s in summary["server_info"] if s["key"].startswith("server:local")]) == 2


def test_parse_tracker():
    assert parse_tracker("10.0.0.2:9190") == ("10.0.0.2", 9190)
    assert parse_tracker(":9190") == ("127.0.0.1", 9190)
    for bad in ("10.0.0.2", "host:port", ""):
        with pytest.raises(TvmflowError, match="bad tracker address"):
            parse_tracker(bad)


def test_servers_run_with_the_targets_thread_count(tmp_path):
    """TVM's default is half the hardware threads: the servers must get the target's num-cores."""
    import psutil

    workers = start_local_workers("threads-check", 1, tmp_path / "logs", threads=3)
    try:
        env = psutil.Process(workers.server_pids[0]).environ()
        assert env.get("TVM_NUM_THREADS") == "3"
    finally:
        workers.stop()


def test_stale_state_file_does_not_block_start(tmp_path, monkeypatch):
    """A workers.json whose tracker died is dropped (its servers stopped), not reported as running."""
    import tasks.devices.workers as workers_mod

    monkeypatch.setattr(workers_mod, "STATE_FILE", tmp_path / "workers.json")
    started = start_local_workers("stale-check", 1, tmp_path / "logs")
    workers_mod.save_state(started)
    server_pid = started.server_pids[0]
    workers_mod.kill_group(started.tracker_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while workers_mod._alive(started.tracker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert workers_mod.load_state() is None
    assert not (tmp_path / "workers.json").exists()
    assert not workers_mod._alive(server_pid)
