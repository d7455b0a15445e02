"""Device workers: a TVM RPC tracker and rpc_server processes on loopback.

Each process runs in its own process group so that stopping it also stops the popen
workers it forked (SIGTERM to the leader alone leaves ~0.5 GB orphans behind).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks.errors import TvmflowError, Unreachable

STATE_FILE = Path(os.environ.get("TVMFLOW_HOME", Path.home() / ".tvmflow")) / "workers.json"


def free_port() -> int:
    """A free loopback TCP port (never assume 9190 is free)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_tracker(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise TvmflowError(f"bad tracker address {address!r}: use host:port, e.g. 127.0.0.1:9190")
    return host or "127.0.0.1", int(port)


def tracker_summary(host: str, port: int, timeout: float = 5.0) -> dict:
    """The tracker's queue info ({key: {free, pending}}); raises a one-line error if unreachable."""
    from tvm import rpc

    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.close()
        return rpc.connect_tracker(host, port).summary()
    except (OSError, RuntimeError) as err:
        raise Unreachable(
            f"cannot reach the RPC tracker at {host}:{port} ({err.__class__.__name__}); "
            "start it with `tvmflow workers start` or pass --tracker host:port of a running one"
        ) from None


def free_servers(host: str, port: int, key: str) -> int:
    """How many rpc servers registered under `key` are idle right now."""
    queue = tracker_summary(host, port).get("queue_info", {})
    return int(queue.get(key, {}).get("free", 0))


def wait_for_servers(host: str, port: int, key: str, count: int = 1, timeout: float = 60.0) -> int:
    """Block until `count` servers with `key` are free; one-line error after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = free_servers(host, port, key)
        if found >= count:
            return found
        if time.monotonic() > deadline:
            raise Unreachable(
                f"no free device worker with key {key!r} on tracker {host}:{port} after {timeout:.0f} s; "
                f"register one (`python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}`) "
                "or pick another --device"
            )
        time.sleep(0.5)


def _spawn(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )


def kill_group(pid: int, sig: int = signal.SIGTERM) -> None:
    """Signal a worker's whole process group; a group that is already gone is fine."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM a child's process group, SIGKILL it if it has not exited within `timeout` s."""
    if proc.poll() is not None:
        return
    kill_group(proc.pid)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid, signal.SIGKILL)


@dataclass
class LocalWorkers:
    """A tracker plus rpc servers started on free loopback ports by this process."""

    key: str
    tracker_port: int
    tracker_pid: int
    server_pids: list[int] = field(default_factory=list)
    host: str = "127.0.0.1"
    log_dir: str = ""
    threads: int | None = None  # TVM_NUM_THREADS of the servers; TVM's own default is half the CPUs

    @property
    def tracker(self) -> str:
        return f"{self.host}:{self.tracker_port}"

    def add_server(self) -> int:
        proc = _spawn(
            [
                "-m",
                "tvm.exec.rpc_server",
                "--host",
                self.host,
                "--port",
                str(free_port()),
                "--port-end",
                "65000",
                "--tracker",
                self.tracker,
                "--key",
                self.key,
            ],
            Path(self.log_dir) / f"rpc_server_{len(self.server_pids)}.log",
            {"TVM_NUM_THREADS": str(self.threads)} if self.threads else None,
        )
        self.server_pids.append(proc.pid)
        return proc.pid

    def stop(self) -> None:
        for pid in [*self.server_pids, self.tracker_pid]:
            kill_group(pid)
        deadline = time.monotonic() + 5
        for pid in [*self.server_pids, self.tracker_pid]:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                kill_group(pid, signal.SIGKILL)
        self.server_pids.clear()

    def __enter__(self) -> LocalWorkers:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
        return finished == 0
    except ChildProcessError:  # not our child: probe it
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def start_local_workers(
    key: str,
    servers: int = 2,
    log_dir: str | os.PathLike | None = None,
    timeout: float = 60.0,
    threads: int | None = None,
) -> LocalWorkers:
    """Start a tracker and `servers` rpc servers registered under `key`; wait until all are free.

    `threads` should be the target's num-cores: without TVM_NUM_THREADS the runtime uses half
    the hardware threads (1 on a 2-core VM), so kernels tuned for 2 cores would run on one."""
    log_dir = Path(log_dir or STATE_FILE.parent / "logs")
    port = free_port()
    tracker = _spawn(
        ["-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)],
        log_dir / "rpc_tracker.log",
    )
    workers = LocalWorkers(key=key, tracker_port=port, tracker_pid=tracker.pid, log_dir=str(log_dir), threads=threads)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if tracker.poll() is not None or time.monotonic() > deadline:
                    raise TvmflowError(f"the RPC tracker did not start; see {log_dir / 'rpc_tracker.log'}") from None
                time.sleep(0.2)
        for _ in range(servers):
            workers.add_server()
        wait_for_servers("127.0.0.1", port, key, servers, timeout)
    except BaseException:
        workers.stop()
        raise
    return workers


def save_state(workers: LocalWorkers) -> None:
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    STATE_FILE.write_text(json.dumps(asdict(workers)))


def load_state() -> LocalWorkers | None:
    """The workers `tvmflow workers start` left running, or None. A state file whose tracker has
    died (machine rebooted, process killed) is stale: its leftover servers are stopped and the file
    removed, so it cannot block the next `start`."""
    if not STATE_FILE.exists():
        return None
    state = LocalWorkers(**json.loads(STATE_FILE.read_text()))
    if not _alive(state.tracker_pid):
        state.stop()
        clear_state()
        return None
    return state


def clear_state() -> None:
    STATE_FILE.unlink(missing_ok=True)
