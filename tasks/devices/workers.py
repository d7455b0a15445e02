"""Device workers: a TVM RPC tracker and rpc_server processes on loopback.

Each process runs in its own process group so that stopping it also stops the popen
workers it forked (SIGTERM to the leader alone leaves ~0.5 GB orphans behind).

A CUDA device gets one rpc server per GPU, each pinned with CUDA_VISIBLE_DEVICES to its GPU
(which it then sees as cuda(0)), all under the device's key: MetaSchedule's RPC runner measures
as many candidates at once as there are GPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.errors import TvmflowError, Unreachable

if TYPE_CHECKING:
    from tasks.devices.profiles import DeviceProfile

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


def registered_servers(host: str, port: int, key: str) -> int:
    """How many rpc servers are registered under `key`, idle or busy (what a runner can fan out to)."""
    summary = tracker_summary(host, port)
    registered = sum(1 for s in summary.get("server_info", []) if s.get("key") == f"server:{key}")
    return max(registered, int(summary.get("queue_info", {}).get(key, {}).get("free", 0)))


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
    gpus: list[str] = field(default_factory=list)  # CUDA_VISIBLE_DEVICES of each server, in server order

    @property
    def tracker(self) -> str:
        return f"{self.host}:{self.tracker_port}"

    def add_server(self, gpu: str | None = None) -> int:
        """Start one rpc server; `gpu` pins it to that GPU (CUDA_VISIBLE_DEVICES)."""
        env = {"TVM_NUM_THREADS": str(self.threads), "OMP_NUM_THREADS": str(self.threads)} if self.threads else {}
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # oneDNN's OpenMP threads must not spin (tasks/build/cpu_vendor.py)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
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
            env,
        )
        self.server_pids.append(proc.pid)
        if gpu is not None:
            self.gpus.append(str(gpu))
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
    gpus: Sequence[str] | None = None,
) -> LocalWorkers:
    """Start a tracker and `servers` rpc servers registered under `key`; wait until all are free.

    `threads` should be the target's num-cores: without TVM_NUM_THREADS the runtime uses half
    the hardware threads (1 on a 2-core VM), so kernels tuned for 2 cores would run on one.
    `gpus`: one server per entry instead, each with CUDA_VISIBLE_DEVICES set to it."""
    gpu_list: list[str | None] = [str(g) for g in gpus] if gpus else [None] * servers
    servers = len(gpu_list)
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
        for gpu in gpu_list:
            workers.add_server(gpu)
        wait_for_servers("127.0.0.1", port, key, servers, timeout)
    except BaseException:
        workers.stop()
        raise
    return workers


def is_cuda(profile: DeviceProfile) -> bool:
    """A device whose workers are CUDA GPUs: one rpc server per GPU."""
    return profile.target.get("kind") == "cuda"


def detected_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set (as CUDA reads it: up to the
    first empty or negative entry), else one index per `nvidia-smi -L` line, else none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        found = []
        for entry in (e.strip() for e in visible.split(",")):
            if not entry or entry.startswith("-"):
                break
            found.append(entry)
        return found
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, _ in enumerate(line for line in listing.splitlines() if line.startswith("GPU "))]


def visible_gpus(gpus: int | str | Sequence[str] | None = "all") -> list[str]:
    """The GPUs to start one rpc server each for: an explicit list of CUDA_VISIBLE_DEVICES
    entries, a count N (the first N detected), or "all"/None (every detected one)."""
    if isinstance(gpus, Sequence) and not isinstance(gpus, str):
        chosen = [str(g).strip() for g in gpus]
        if not chosen or not all(chosen) or len(set(chosen)) != len(chosen):
            raise TvmflowError(f"bad GPU list {list(gpus)!r}: give distinct GPU indices, e.g. ['0', '1']")
        return chosen
    wanted = None if gpus is None or str(gpus).strip().lower() == "all" else str(gpus).strip()
    if wanted is not None and (not wanted.isdigit() or int(wanted) < 1):
        raise TvmflowError(f"bad --gpus {gpus!r}: give a count of GPUs (e.g. 4) or all")
    found = detected_gpus()
    if not found:
        raise TvmflowError(
            "no GPU visible (CUDA_VISIBLE_DEVICES is empty or unset and `nvidia-smi -L` lists none); "
            "run this on the GPU host, or set CUDA_VISIBLE_DEVICES=0,1,... to the GPUs to use"
        )
    if wanted is not None and int(wanted) > len(found):
        raise TvmflowError(
            f"--gpus {wanted} but only {len(found)} GPU(s) visible ({','.join(found)}); "
            f"pass --gpus {len(found)} or --gpus all"
        )
    return found[: int(wanted)] if wanted is not None else found


def start_device_workers(
    profile: DeviceProfile,
    servers: int | None = None,
    gpus: int | str | Sequence[str] | None = None,
    log_dir: str | os.PathLike | None = None,
    timeout: float = 60.0,
) -> LocalWorkers:
    """Local workers for a device profile: one rpc server per GPU for a CUDA device (`gpus`: a
    count, "all" (default) or a list of indices), else `servers` CPU servers (default: the
    profile's local_workers, else 2) running the target's num-cores threads."""
    if is_cuda(profile):
        return start_local_workers(profile.rpc_key, log_dir=log_dir, timeout=timeout, gpus=visible_gpus(gpus))
    if gpus is not None:
        raise TvmflowError(
            f"--gpus is for CUDA devices; {profile.name!r} is a {profile.target.get('kind')} device: "
            "give --servers instead"
        )
    return start_local_workers(
        profile.rpc_key,
        servers or profile.local_workers or 2,
        log_dir,
        timeout,
        threads=profile.target.get("num-cores"),
    )


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
