"""`tvmflow serve`: the one-machine setup. A local Prefect server (SQLite under PREFECT_HOME), the
process work pool and the deployments of deployments/prefect.yaml, local device workers (RPC
tracker + rpc servers), and a Prefect worker whose flow runs use that tracker. Ctrl-C stops all."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tasks.errors import TvmflowError

ROOT = Path(__file__).resolve().parent.parent
POOL = "tvmflow-process"
STORE_VARIABLE = "tvmflow_store"  # deployments/generate.py


def _prefect(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "prefect"), *args]


def _wait_healthy(api: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TvmflowError(f"the Prefect server did not start; see {log} (is the port taken? try --port)")


def _run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
        raise TvmflowError(f"`{' '.join(cmd[1:])}` failed: {tail[0]}")


def _store_variable(store: str | None, env: dict) -> None:
    """The deployments' `store` default (Prefect Variable tvmflow_store, resolved when deployed):
    set to --store, or created as ~/.tvmflow/artifacts if missing (never the worker's cwd)."""
    if store is None:
        probe = subprocess.run(
            _prefect("--no-prompt", "variable", "get", STORE_VARIABLE),
            env=env,
            cwd=ROOT,
            check=False,
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0 and probe.stdout.strip():
            return
        store = str(Path.home() / ".tvmflow" / "artifacts")
    _run(_prefect("--no-prompt", "variable", "set", STORE_VARIABLE, store, "--overwrite"), env)


def serve(
    port: int = 4200,
    device: str = "local",
    servers: int = 2,
    deploy: bool = True,
    log_dir: str | None = None,
    ready=None,
    store: str | None = None,
) -> int:
    """Start everything, print where it is, and block until interrupted."""
    from tasks.devices.profiles import get_device
    from tasks.devices.workers import start_local_workers, stop_group

    profile = get_device(device)
    logs = Path(log_dir or Path.home() / ".tvmflow" / "serve")
    logs.mkdir(parents=True, exist_ok=True)
    url, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    base.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    procs: list[subprocess.Popen] = []
    workers = None

    def spawn(cmd, env, name):
        out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - the child process writes to it
        procs.append(
            subprocess.Popen(
                cmd,
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        return procs[-1]

    try:
        server = spawn(
            _prefect("server", "start", "--host", "127.0.0.1", "--port", str(port)),
            {**base, "PREFECT_UI_API_URL": api},
            "server",
        )  # the UI's API, else :4200
        workers = start_local_workers(
            profile.rpc_key, servers, logs / "device-workers", threads=profile.target.get("num-cores")
        )
        _wait_healthy(api, server, logs / "server.log")
        env = {**base, "PREFECT_API_URL": api, "TVMFLOW_TRACKER": workers.tracker}
        if deploy:
            subprocess.run(
                _prefect("--no-prompt", "work-pool", "create", POOL, "--type", "process"),
                env=env,
                cwd=ROOT,
                capture_output=True,
                check=False,
            )  # exists already: fine
            _store_variable(store, env)
            _run(_prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"), env)
        spawn(_prefect("worker", "start", "--pool", POOL, "--type", "process"), env, "worker")
        print(
            f"Prefect UI:      {url}\n"
            f"Prefect API:     {api}   (export PREFECT_API_URL={api})\n"
            f"device workers:  tracker {workers.tracker}, {servers} rpc server(s) with key {profile.rpc_key!r}\n"
            f"work pool:       {POOL} (one process worker running)\n"
            f"logs:            {logs}\n"
            "Trigger a run:   prefect deployment run tvmflow-compile/compile-local\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        if ready:
            ready(url)
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        dead = next(p for p in procs if p.poll() is not None)
        command = dead.args if isinstance(dead.args, list) else [dead.args]
        raise TvmflowError(f"{' '.join(map(str, command[1:3]))} exited ({dead.returncode}); see {logs}")
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in reversed(procs):
            stop_group(proc)
        if workers:
            workers.stop()
