"""The `tvmflow` command around the pipeline: exit codes, --version, `devices`, `builds` filters,
unvalidated (build-only) builds, and a quiet terminal whose last line is the error."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flows import cli
from tasks.errors import GateFailed, TvmflowError, Unreachable, exit_code
from tasks.storage.publish import publish_build

ROOT = Path(__file__).resolve().parent.parent
PREFECT_LINE = re.compile(r"\|\s*(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*\||temporary server|Flow run|Task run")


def test_exit_codes_per_error_class():
    assert [exit_code(e) for e in (TvmflowError("x"), GateFailed("x"), Unreachable("x"), ValueError("x"))] == [
        2,
        3,
        4,
        1,
    ]
    assert isinstance(GateFailed("x"), TvmflowError) and isinstance(Unreachable("x"), TvmflowError)


def test_version_and_bad_flag(capsys):
    import tvm

    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("tvmflow ") and f"TVM {tvm.__version__}" in out
    assert cli.main(["compile", "--no-such-flag"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_devices_shows_workers_registered_now(local_workers, capsys):
    assert cli.main(["devices", "--json", "--tracker", local_workers.tracker]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["local"]["tracker"] == local_workers.tracker and rows["local"]["reachable"] is True
    assert rows["local"]["registered"] == 2 and rows["local"]["busy"] + rows["local"]["free"] == 2
    assert rows["aarch64-linux"]["registered"] == 0  # same tracker, no board with its key
    assert rows["mali-opencl"]["build_only"] and "opencl" in rows["mali-opencl"]["target"]
    assert "fp32" in rows["local"]["precisions"]
    from tasks.devices.workers import free_port

    assert cli.main(["devices", "--tracker", f"127.0.0.1:{free_port()}"]) == 0  # nothing listens there
    table = capsys.readouterr().out
    assert re.search(r"^local\s.*\(unreachable\)", table, re.MULTILINE), table


def _publish(
    store: Path,
    tmp_path: Path,
    model: str,
    device: str = "local",
    build_only: bool = False,
    build_id: str | None = None,
) -> str:
    lib = tmp_path / "model.so"
    lib.write_bytes(os.urandom(64))
    meta = {"precision": "fp32", "latency_ms": 1.5, "validation": {"passed": None if build_only else True}}
    if build_only:
        meta["build_only"] = True
    return publish_build(str(store), model, device, {"model.so": lib}, meta, build_id)["build_id"]


def test_builds_filters_and_unvalidated_builds(tmp_path, capsys):
    store = tmp_path / "store"
    good = _publish(store, tmp_path, "net_a", build_id="20260101T000000Z-aaaaaa")
    _publish(store, tmp_path, "net_b")
    unval = _publish(store, tmp_path, "net_a", build_only=True)
    assert (store / "builds/net_a/local/LATEST").read_text() == good  # build-only never moves LATEST
    assert cli.main(["builds", "--model", "net_a", "--device", "local", "--store", str(store), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["build_id"], r["validated"], r["latest"]) for r in rows] == [(unval, False, False), (good, True, True)]
    assert cli.main(["builds", "--device", "cuda", "--store", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert cli.main(["builds", "--store", str(store)]) == 0
    table = capsys.readouterr().out
    assert re.search(rf"^net_a\s+local\s+{unval}\s.*unvalidated$", table, re.MULTILINE), table
    assert "3 build(s)" in table
    # fetch: a build-only build only when asked for
    assert (
        cli.main(
            [
                "fetch",
                "net_a",
                "--device",
                "local",
                "--build",
                unval,
                "--store",
                str(store),
                "--out",
                str(tmp_path / "o1"),
            ]
        )
        == 2
    )
    assert "--allow-unvalidated" in capsys.readouterr().err and not (tmp_path / "o1").exists()
    assert (
        cli.main(
            [
                "fetch",
                "net_a",
                "--device",
                "local",
                "--build",
                unval,
                "--store",
                str(store),
                "--out",
                str(tmp_path / "o2"),
                "--allow-unvalidated",
            ]
        )
        == 0
    )
    assert "UNVALIDATED" in capsys.readouterr().out and (tmp_path / "o2" / "model.so").exists()
    # a device with build-only builds only: no LATEST; --allow-unvalidated takes the newest
    only = _publish(store, tmp_path, "net_c", device="mali-opencl", build_only=True)
    assert (
        cli.main(["fetch", "net_c", "--device", "mali-opencl", "--store", str(store), "--out", str(tmp_path / "o3")])
        == 2
    )
    capsys.readouterr()
    assert (
        cli.main(
            [
                "fetch",
                "net_c",
                "--device",
                "mali-opencl",
                "--store",
                str(store),
                "--out",
                str(tmp_path / "o4"),
                "--allow-unvalidated",
            ]
        )
        == 0
    )
    assert only in capsys.readouterr().out


def test_progress_display_summary_from_progress_updates():
    from flows.progress import Display
    from tasks import progress

    stream = io.StringIO()
    display = Display(stream=stream, live=False).start()
    try:
        progress.update(stage="import", model="mnist_cnn", device="local")
        progress.update(
            stage="tune", task=1, of=2, name="conv", trials=4, budget=8, best_ms=2.0, task_trials=4, task_best_ms=0.5
        )
        progress.update(
            stage="tune", task=2, of=2, name="dense", trials=8, budget=8, best_ms=1.5, task_best_ms=0.25
        )  # no task_trials: the run's trials since the last report
        assert "mnist_cnn/local: tune, 2/2 dense, 8/8 trials, best 1.500 ms" in display.line()
        assert progress.fraction(display.fields) == 1.0
        with pytest.raises(TypeError):
            progress.update(stage="tune", best=1.0)  # a typo is an error, not silence
    finally:
        display.stop()
    text = stream.getvalue()
    for expected in ("import", "tune", "conv", "4 trials, best 0.5000 ms", "dense", "best 0.2500 ms"):
        assert expected in text, text


def test_compile_terminal_is_quiet_and_the_error_is_last(tmp_path):
    """The real command, its own process: an unreachable tracker exits 4; no Prefect log line
    reaches stderr (they stay in the run's logs) and `error: ...` is the last line."""
    from tasks.devices.workers import free_port

    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "TVMFLOW_CACHE": str(tmp_path / "cache"),
        "TVMFLOW_HOME": str(tmp_path / "home"),
    }
    env.pop("PREFECT_API_URL", None)
    env.pop("TVMFLOW_TRACKER", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "compile",
            "--model",
            "tasks.importers.bundled:mnist_cnn",
            "--data",
            "bundled:mnist:8",
            "--trials",
            "0",
            "--no-untuned",
            "--worker-timeout",
            "5",
            "--tracker",
            f"127.0.0.1:{free_port()}",
            "--store",
            str(tmp_path / "store"),
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert lines[-1].startswith("error: ") and "tracker" in lines[-1], lines[-5:]
    assert not [line for line in lines if PREFECT_LINE.search(line)], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # what Prefect would have printed is in the CLI log file, not lost
    assert "temporary server" in (tmp_path / "home" / "logs" / "cli.log").read_text()
