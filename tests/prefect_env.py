"""A real Prefect server, deployments and a process worker for the deployment tests.

One server per test process (started on first use, stopped at exit) on a free loopback port,
with its own PREFECT_HOME (SQLite) and analytics off. test_deployments.py, test_ui.py and
test_retune.py share it and the finished compile run, so the ~1 min of setup is paid once.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
POOL = "tvmflow-process"
MNIST = {"model": "tasks.importers.bundled:mnist_cnn", "data": "bundled:mnist:16"}

_STATE: dict = {}


def free_port() -> int:
    from tasks.devices.workers import free_port as port

    return port()


def _spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "ab")
    return subprocess.Popen(
        args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )


def _stop(proc: subprocess.Popen) -> None:
    from tasks.devices.workers import stop_group

    stop_group(proc)


class Server:
    """`prefect server start` on a free port; `env` points clients (CLI, worker) at it."""

    def __init__(self):
        self.home = Path(tempfile.mkdtemp(prefix="tvmflow-prefect-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.url}/api"
        self.store = self.home / "store"
        self.cache = self.home / "tvmflow-cache"
        # no S3 keys from the test process: a worker gets them only where a test starts it with them
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
        base.update(
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="3",
            PREFECT_WORKER_QUERY_SECONDS="2",
            PREFECT_WORKER_PREFETCH_SECONDS="5",
            PREFECT_LOGGING_LEVEL="INFO",
            TVMFLOW_CACHE=str(self.cache),
            TVMFLOW_HOME=str(self.home / "tvmflow-home"),
        )
        self.env = {**base, "PREFECT_API_URL": self.api}
        self.procs: list[subprocess.Popen] = []
        # the UI asks for the API at PREFECT_UI_API_URL (default port 4200, not --port)
        self.procs.append(
            _spawn(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                {**base, "PREFECT_UI_API_URL": self.api},
                self.home / "server.log",
            )
        )
        # device workers (tracker + 2 rpc servers, key `local`) boot while the server does;
        # runs get `tracker` so each does not pay their start again
        from tasks.devices.workers import start_local_workers

        self.workers = start_local_workers("local", 2, self.home / "device-logs")
        self.tracker = self.workers.tracker
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.api}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if self.procs[0].poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError("prefect server did not start:\n" + (self.home / "server.log").read_text()[-3000:])

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(BIN / "prefect"), "--no-prompt", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def start_worker(self, queue: str = "local", env: dict | None = None) -> subprocess.Popen:
        """A process worker for one queue of the pool, so a test's worker (its own queue and
        environment, e.g. S3 keys) never takes another test's runs."""
        worker = _spawn(
            [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--work-queue", queue],
            {**self.env, **(env or {})},
            self.home / ("worker.log" if queue == "local" else f"worker-{queue}.log"),
        )
        self.procs.append(worker)
        return worker

    def run_deployment(self, flow_name: str, name: str, parameters: dict, queue: str | None = None) -> str:
        """The id of a new run of a deployment (on `queue` of its pool, if given)."""
        dep = self.deployment(flow_name, name)
        body = {"parameters": parameters, **({"work_queue_name": queue} if queue else {})}
        return self.post(f"/deployments/{dep['id']}/create_flow_run", body)["id"]

    def get(self, path: str):
        return self._send(urllib.request.Request(f"{self.api}{path}"), timeout=10)

    def post(self, path: str, body: dict):
        req = urllib.request.Request(
            f"{self.api}{path}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        return self._send(req, timeout=30)

    @staticmethod
    def _send(req: urllib.request.Request, timeout: float, attempts: int = 6):
        """The request's JSON reply. A 503 is the server's "retry me" (e.g. its SQLite database was
        locked by a concurrent write; the transaction was rolled back): retried, as Prefect's own client does."""
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as err:
                if err.code != 503 or attempt == attempts - 1:
                    raise
                time.sleep(0.5 * 2**attempt)

    def deployment(self, flow_name: str, name: str) -> dict:
        return self.get(f"/deployments/name/{flow_name}/{name}")

    def wait_run(self, run_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.get(f"/flow_runs/{run_id}")
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            time.sleep(2)
        raise TimeoutError(f"flow run {run_id} did not finish in {timeout:.0f} s; see {self.home}/worker.log")

    def artifacts(self, run_id: str) -> list[dict]:
        return self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)
        self.workers.stop()


def compile_parameters(srv: Server, store: str) -> dict:
    """A compile-local run of the tiny MNIST CNN without tuning, on the server's device workers."""
    return {**MNIST, "device": "local", "trials": 0, "store": store, "measure_untuned": False, "tracker": srv.tracker}


def server() -> Server:
    """The process-wide server, with the pool created and prefect.yaml deployed."""
    if "server" not in _STATE:
        srv = Server()
        atexit.register(srv.stop)
        _STATE["server"] = srv
        srv.cli("work-pool", "create", POOL, "--type", "process")
        # the deployments' `store` default is this variable, resolved when deployed
        srv.cli("variable", "set", "tvmflow_store", str(srv.store), "--overwrite")
        srv.cli("deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        srv.start_worker()
        # triggered now, so that the worker runs it while other tests look at the server
        _STATE["compile_run_id"] = srv.run_deployment(
            "tvmflow-compile", "compile-local", compile_parameters(srv, str(srv.store))
        )
    return _STATE["server"]


def compile_run() -> tuple[Server, dict]:
    """The finished run of the compile-local deployment for the tiny MNIST CNN (no tuning)."""
    srv = server()
    if "compile_run" not in _STATE:
        _STATE["compile_run"] = srv.wait_run(_STATE["compile_run_id"])
    return srv, _STATE["compile_run"]
