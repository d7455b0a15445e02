"""`tvmflow retune` outcomes on the real Prefect server (its events read back through the API) with real
device workers and a local store: a rebuilt model slower than LATEST (kept, `tvmflow.build.regressed`,
exit 0), a failed validation gate (exit 3) and an unreachable tracker (exit 4), each publishing
nothing; and `--batch`, as compile's. Tiny budgets on tiny models keep each test short."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import prefect_env
import pytest

from tasks import events
from tasks import retune as retune_logic
from tasks.devices.workers import free_port
from tasks.errors import TvmflowError
from tasks.importers.model_import import export_factory

DATA = "bundled:mnist:16"


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def srv():
    """The process-wide Prefect server; the CLI runs as its own process against it, as a user runs it.

    Not in this process: Prefect's slot-acquisition service is one per process, bound to the first API
    it served (the test harness's), while releases go to the API of the current settings; a CLI run here
    against another server left the harness's device slots held and the next run waited on them."""
    return prefect_env.server()


def _cli(srv, *args: str) -> tuple[int, str, str]:
    """`tvmflow *args` in a fresh process talking to `srv` (exit code, stdout, stderr)."""
    env = {**os.environ, "PREFECT_API_URL": srv.api, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "tvmflow"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    return done.returncode, done.stdout, done.stderr


def _now() -> str:
    """Now, for an `occurred since` filter (events carry the emitting process's clock: this machine's)."""
    return datetime.now(UTC).isoformat()


def _events(srv, name: str, resource_id: str, since: str, timeout: float = 60) -> list[dict]:
    """The `name` events about `resource_id` since `since` (they reach the API asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        found = srv.post(
            "/events/filter",
            {
                "filter": {
                    "event": {"name": [name]},
                    "resource": {"id": [resource_id]},
                    "occurred": {"since": since},
                },
                "limit": 10,
            },
        )["events"]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(1)


def _retune(srv, *args: str) -> tuple[int, str, str]:
    return _cli(srv, "retune", "--quiet", "--budget", "0", "--data", DATA, "--worker-timeout", "10", *args)


def _error_line_last(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[-1]


def _published(store: Path) -> list[Path]:
    """Build folders, LATEST files and tuning shards in the store (Prefect's persisted results aside)."""
    return (
        [
            p.relative_to(store)
            for p in store.rglob("*")
            if p.is_file() and p.relative_to(store).parts[0] != "prefect-results"
        ]
        if store.exists()
        else []
    )


def test_a_retune_slower_than_latest_is_kept_and_emits_regressed(srv, tmp_path):
    """LATEST of `digits.pt2` is a one-layer classifier; then the file is replaced by a conv net taking the
    same input (a retrained, bigger model at the same URI). The nightly rebuild validates but is slower than LATEST
    measured in the same run: LATEST stays, no build folder is added, the regression is an event."""
    store, model = tmp_path / "store", tmp_path / "digits.pt2"
    export_factory("tests.flow_models:linear_digits", model)
    common = ["--store", str(store), "--tracker", srv.tracker]
    code, _, err = _cli(
        srv, "compile", "--quiet", "--model", str(model), "--data", DATA, "--trials", "0", "--no-untuned", *common
    )
    assert code == 0, err[-3000:]
    base = store / "builds" / "digits" / "local"
    before, builds = (base / "LATEST").read_text(), sorted(p.name for p in base.iterdir())
    since = _now()  # after the compile's own `published` event
    export_factory("tests.flow_models:heavier_digits", model)  # same input, ~100x the work
    # --refresh: rebuild and validate now although there is no extra budget to tune with
    code, out, err = _retune(srv, "--model", str(model), "--refresh", "--json", *common)
    assert code == 0, err[-3000:]
    [outcome] = json.loads(out.strip().splitlines()[-1])
    assert outcome["status"] == "kept" and outcome["latest_build"] == before, outcome
    assert "slower than LATEST" in outcome["reason"] and outcome["new_ms"] > outcome["latest_ms"], outcome
    assert outcome["validation"]["passed"]  # validated, only slower
    assert (base / "LATEST").read_text() == before and sorted(p.name for p in base.iterdir()) == builds
    [event] = _events(srv, events.REGRESSED, "tvmflow.build.digits.local", since)
    payload = event["payload"]
    assert payload["model"] == "digits" and payload["device"] == "local" and payload["build_id"] == before
    assert payload["latency_ms"] == outcome["new_ms"] and payload["previous_ms"] == outcome["latest_ms"]
    assert payload["slower_percent"] > 3
    assert not _events(srv, events.PUBLISHED, "tvmflow.build.digits.local", since, timeout=0)


def test_a_retune_whose_gate_fails_exits_3_and_publishes_nothing(srv, tmp_path):
    """A model left in training mode (torch runs its dropout, the build does not) fails validation."""
    store = tmp_path / "store"
    since = _now()
    code, out, err = _retune(
        srv, "--model", "tests.flow_models:train_mode_dropout", "--store", str(store), "--tracker", srv.tracker
    )
    assert code == 3, err[-3000:]
    line = _error_line_last(err)
    assert "1 of 1 models failed" in line and "validation failed" in line and "nothing published" in line, line
    assert _published(store) == []
    [event] = _events(srv, events.RETUNE_FAILED, "tvmflow.build.train_mode_dropout.local", since)
    assert event["payload"]["failure"] == "gate" and "validation failed" in event["payload"]["reason"]


def test_a_retune_with_an_unreachable_tracker_exits_4_and_publishes_nothing(srv, tmp_path):
    """Nobody listens on the tracker's port: the model fails before its first measurement."""
    store, port = tmp_path / "store", free_port()
    since = _now()
    code, out, err = _retune(
        srv,
        "--model",
        prefect_env.MNIST["model"],
        "--budget",
        "8",  # something to tune, so the run needs the device
        "--store",
        str(store),
        "--tracker",
        f"127.0.0.1:{port}",
    )
    assert code == 4, err[-3000:]
    line = _error_line_last(err)
    assert "1 of 1 models failed" in line and f"127.0.0.1:{port}" in line, line
    assert _published(store) == []
    [event] = _events(srv, events.RETUNE_FAILED, "tvmflow.build.mnist_cnn.local", since)
    assert event["payload"]["failure"] == "unreachable"


def test_batch_comes_from_the_entry_else_the_run_and_must_be_positive(tmp_path):
    [own, plain] = retune_logic.parse_models([{"model": prefect_env.MNIST["model"], "batch": 4}, "x.onnx"])
    assert retune_logic.entry_batch(own, 2) == 4 and retune_logic.entry_batch(plain, 2) == 2
    assert retune_logic.entry_batch(plain, None) is None
    with pytest.raises(TvmflowError, match="batch 0 is not a positive integer"):
        retune_logic.check_parameters("local", [prefect_env.MNIST["model"]], 0, str(tmp_path), batch=0)
    with pytest.raises(TvmflowError, match="batch -2 is not a positive integer"):
        retune_logic.check_parameters("local", [{"model": prefect_env.MNIST["model"], "batch": -2}], 0, str(tmp_path))


def _mnist_onnx_dynamic_batch(path: Path) -> Path:
    """The bundled MNIST CNN as ONNX with a dynamic batch dimension (what --batch fixes)."""
    import torch

    from tasks.importers.bundled import mnist_cnn

    module, example = mnist_cnn()
    torch.onnx.export(
        module.eval(),
        example,
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    return path


def _pairs_npz(path: Path) -> Path:
    """8 real digits as 4 samples of 2 images each (an npz: [N, *input shape], labels [N, 2])."""
    import numpy as np

    from tasks.importers.datasets import load_dataset
    from tasks.importers.types import InputSpec

    digits = load_dataset("bundled:mnist:8", [InputSpec("input", (1, 1, 28, 28), "float32")])
    np.savez(
        path, input=digits.inputs["input"].reshape(4, 2, 1, 28, 28), labels=np.asarray(digits.labels).reshape(4, 2)
    )
    return path


def test_retune_with_another_batch_rebuilds_for_it(srv, tmp_path):
    """LATEST takes one image; `retune --batch 2` builds and validates the model for two images a call
    and publishes it: LATEST's latency is for other inputs, so it is not compared (the reason says so)."""
    store, model = tmp_path / "store", _mnist_onnx_dynamic_batch(tmp_path / "digits.onnx")
    common = ["--store", str(store), "--tracker", srv.tracker]
    code, _, err = _cli(
        srv, "compile", "--quiet", "--model", str(model), "--data", DATA, "--trials", "0", "--no-untuned", *common
    )
    assert code == 0, err[-3000:]
    base = store / "builds" / "digits" / "local"
    before = (base / "LATEST").read_text()
    pairs = _pairs_npz(tmp_path / "pairs.npz")
    code, out, err = _retune(srv, "--model", str(model), "--batch", "2", "--data", str(pairs), "--json", *common)
    assert code == 0, err[-3000:]
    [outcome] = json.loads(out.strip().splitlines()[-1])
    assert outcome["status"] == "published" and outcome["latest_ms"] is None, outcome
    assert f"LATEST {before} takes inputs input:1x1x28x28:float32: not compared" in outcome["reason"], outcome
    assert (base / "LATEST").read_text() == outcome["build_id"] != before
    manifest = json.loads((base / outcome["build_id"] / "manifest.json").read_text())
    assert manifest["inputs"] == ["input:2x1x28x28:float32"]
    assert manifest["validation"]["passed"] and manifest["validation"]["samples"] == 4
