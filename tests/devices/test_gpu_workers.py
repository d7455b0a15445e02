"""One rpc server per GPU (issue 17), on this GPU-less machine: the GPU list is given (fake indices),
the servers, tracker and Prefect concurrency limit are real. What a GPU host adds is only that
each pinned server's cuda(0) is then its own GPU."""

from __future__ import annotations

import dataclasses
import logging
import uuid

import pytest

from tasks.devices.capacity import limit_name, on_device
from tasks.devices.profiles import get_device
from tasks.devices.session import DeviceSession
from tasks.devices.workers import (
    free_servers,
    registered_servers,
    start_device_workers,
    visible_gpus,
)
from tasks.errors import TvmflowError
from tasks.tuning.tune import per_iter_for, rpc_runner

GPUS = ["0", "1", "2"]


def _environ(pid: int) -> dict[str, str]:
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.fixture(scope="module")
def cuda_profile():
    """The fleet's cuda profile under a key of its own (no other test's servers answer it)."""
    return dataclasses.replace(get_device("cuda"), rpc_key=f"cuda-test-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def gpu_workers(cuda_profile, tmp_path_factory):
    """A real tracker and one rpc server per (fake) GPU, started the way `workers start` does."""
    workers = start_device_workers(cuda_profile, gpus=GPUS, log_dir=tmp_path_factory.mktemp("gpu-workers"))
    try:
        yield workers
    finally:
        workers.stop()


def test_one_server_per_gpu_under_one_key(gpu_workers, cuda_profile):
    host, port, key = gpu_workers.host, gpu_workers.tracker_port, cuda_profile.rpc_key
    assert gpu_workers.gpus == GPUS and len(set(gpu_workers.server_pids)) == 3
    assert free_servers(host, port, key) == 3
    assert registered_servers(host, port, key) == 3
    for pid, gpu in zip(gpu_workers.server_pids, GPUS):
        env = _environ(pid)
        assert env["CUDA_VISIBLE_DEVICES"] == gpu, f"server {pid} must see only GPU {gpu}"
        assert "TVM_NUM_THREADS" not in env  # GPU servers: no CPU thread count forced on them


def test_busy_servers_still_count(gpu_workers, cuda_profile):
    """A server in a session is not free but is still one the runner fans out to."""
    from tvm import rpc

    host, port, key = gpu_workers.host, gpu_workers.tracker_port, cuda_profile.rpc_key
    session = rpc.connect_tracker(host, port).request(key, session_timeout=60)
    try:
        assert session.cpu(0).exist
        assert free_servers(host, port, key) == 2
        assert registered_servers(host, port, key) == 3
    finally:
        del session


def test_runner_and_limit_count_the_gpus(gpu_workers, cuda_profile, prefect_harness, caplog):
    """Session over the tracker: 3 servers -> RPCRunner max_workers 3, rounds of >= 6 candidates,
    and the device's global concurrency limit created with 3 slots (one per GPU worker)."""
    from prefect.client.orchestration import get_client

    with DeviceSession(cuda_profile, tracker_uri=gpu_workers.tracker) as session:
        assert session.servers == 3 and session.slots == 3
        with caplog.at_level(logging.INFO, logger="tvm.s_tir.meta_schedule.runner.rpc_runner"):
            rpc_runner(*session.tracker, cuda_profile.rpc_key, session.servers)
        assert "RPCRunner: max_workers = 3" in caplog.text
        assert per_iter_for(session.servers) >= 2 * 3 and per_iter_for(16) == 32
        with on_device(cuda_profile.rpc_key, session.slots):
            pass
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit_name(cuda_profile.rpc_key)).limit == 3


def test_cuda_slots_follow_gpus_not_fleet_count(cuda_profile):
    """A CPU kind's slots are its fleet `count`; a CUDA kind's are its GPU workers."""
    from tasks.devices.capacity import device_slots

    counted = dataclasses.replace(cuda_profile, extra={**cuda_profile.extra, "count": 1})
    assert device_slots(counted, 8) == 8
    assert device_slots(get_device("local"), 8) == int(get_device("local").extra["count"])


def test_visible_gpus_reads_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    assert visible_gpus("all") == ["2", "3", "5"] and visible_gpus(None) == ["2", "3", "5"]
    assert visible_gpus(2) == ["2", "3"] and visible_gpus("1") == ["2"]
    assert visible_gpus(["7", "4"]) == ["7", "4"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,-1,2")  # CUDA stops at the first invalid entry
    assert visible_gpus("all") == ["1"]


@pytest.mark.parametrize(
    ("env", "gpus", "message"),
    [
        ("0,1", "3", r"--gpus 3 but only 2 GPU\(s\) visible \(0,1\); pass --gpus 2"),
        ("0,1", "two", "bad --gpus 'two': give a count"),
        ("0,1", "0", "bad --gpus '0'"),
        ("", "all", "no GPU visible"),
        ("0", ["1", "1"], "give distinct GPU indices"),
    ],
)
def test_bad_gpu_choice_is_one_line_error(monkeypatch, env, gpus, message):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    with pytest.raises(TvmflowError, match=message) as info:
        visible_gpus(gpus)
    assert "\n" not in str(info.value)


def test_gpus_on_a_cpu_device_is_refused():
    with pytest.raises(TvmflowError, match="--gpus is for CUDA devices; 'local' is a llvm device"):
        start_device_workers(get_device("local"), gpus=2)


def test_cli_workers_start_gpus(monkeypatch, tmp_path, capsys):
    """`tvmflow workers start --device cuda --gpus 2` with three GPUs visible: two pinned servers."""
    import tasks.devices.workers as workers_mod
    from flows.cli import main

    monkeypatch.setattr(workers_mod, "STATE_FILE", tmp_path / "workers.json")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert main(["workers", "start", "--device", "cuda", "--servers", "2"]) == 2
    assert "is a CUDA device: give --gpus N|all" in capsys.readouterr().err
    assert main(["workers", "start", "--device", "cuda", "--gpus", "2"]) == 0
    try:
        assert "2 rpc server(s) (one per GPU: 4,5), key 'cuda'" in capsys.readouterr().out
        state = workers_mod.load_state()
        assert state is not None and state.gpus == ["4", "5"]
        assert [_environ(pid)["CUDA_VISIBLE_DEVICES"] for pid in state.server_pids] == ["4", "5"]
        assert free_servers(state.host, state.tracker_port, "cuda") == 2
    finally:
        assert main(["workers", "stop"]) == 0
    assert workers_mod.load_state() is None
