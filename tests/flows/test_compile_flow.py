"""End to end: the compile flow under prefect_test_harness with real local workers on the MNIST CNN,
the `tvmflow compile` CLI (JSON output, cache reuse), and bad input that must publish nothing."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from tasks.devices.workers import free_port

MODEL, DATA = "tasks.importers.bundled:mnist_cnn", "bundled:mnist:32"
EM_X86_64 = 62


@pytest.fixture(scope="module")
def flow_env(tmp_path_factory):
    """One step cache and one store shared by the runs of this module (a second run must hit)."""
    root = tmp_path_factory.mktemp("flow")
    return root / "cache", root / "store"


@pytest.fixture
def shared_cache(flow_env, monkeypatch):
    monkeypatch.setenv("TVMFLOW_CACHE", str(flow_env[0]))
    return flow_env[0]


@pytest.fixture(scope="module")
def first_run(flow_env, prefect_harness):
    """compile_flow with a 32-trial budget; the flow starts and stops its own tracker + servers."""
    from flows.compile import compile_flow

    cache, store = flow_env
    patch = pytest.MonkeyPatch()
    patch.setenv("TVMFLOW_CACHE", str(cache))
    try:
        return compile_flow(model=MODEL, data=DATA, trials=32, store=str(store))
    finally:
        patch.undo()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_cli(args, capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_e2e_publishes_a_verified_build(first_run, flow_env):
    _, store = flow_env
    report = first_run
    base = store / "builds" / "mnist_cnn" / "local"
    assert (base / "LATEST").read_text() == report["build_id"]
    folder = base / report["build_id"]
    assert report["build_uri"].endswith(str(folder))
    names = {p.name for p in folder.iterdir()}
    assert {
        "model.so",
        "database_workload.json",
        "database_tuning_record.json",
        "report.json",
        "report.md",
        "tuning_curve.png",  # the first run searched: its tuning curve is published with the build
        "layer_times.md",  # the per-layer time table of the validated build (measured on this host's CPU)
        "layer_times.json",
        "manifest.json",
    } <= names
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == _sha(folder / name), name
        assert entry["size"] == (folder / name).stat().st_size
    assert manifest["device"] == "local" and manifest["model"] == "mnist_cnn"
    assert manifest["precision"] == "fp32" and manifest["tvm_version"].startswith("0.27")
    assert manifest["model_sha256"] == report["model_sha256"] and len(manifest["model_sha256"]) == 64
    assert manifest["validation"]["passed"] is True and manifest["trials"] == report["trials"]
    header = (folder / "model.so").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and struct.unpack_from("<H", header, 18)[0] == EM_X86_64

    saved = json.loads((folder / "report.json").read_text())
    assert saved["validation"]["passed"] and saved["validation"]["samples"] == 32
    assert saved["validation"]["top1_agreement"] == 1.0 and saved["validation"]["accuracy"] >= 0.9
    assert saved["tasks"] >= 3 and 0 < saved["trials"] <= 32 and saved["records"] >= 1
    assert saved["latency_ms"] > 0 and saved["untuned_latency_ms"] > 0
    assert saved["reference"]["framework"] == "torch" and saved["reference"]["latency_ms"] > 0
    assert saved["cache_hits"] == []  # a fresh cache
    tuned = [r for r in saved["tuning"] if r["trials_run"] > 0]
    assert tuned and all(r["error"] is None and r["best_ms"] > 0 for r in tuned)
    assert set(saved["untuned_tasks"]) == {r["name"] for r in saved["tuning"] if r["error"]}
    text = (folder / "report.md").read_text()
    assert "# tvmflow build: mnist_cnn on local" in text
    layers = saved["layer_times"]["layers"]
    assert any("conv2d" in x["kernel"] for x in layers) and all(x["ms"] > 0 for x in layers)
    assert "## Per-layer time" in text and f"`{layers[0]['kernel']}`" in text and "(layer_times.md)" in text


def test_second_identical_run_reuses_everything(first_run, flow_env, shared_cache, capsys):
    """The same command again, through the CLI with --json: import, tuning and build are reused."""
    _, store = flow_env
    code, out, err = _run_cli(
        ["compile", "--model", MODEL, "--data", DATA, "--trials", "32", "--store", str(store), "--json"], capsys
    )
    assert code == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    for key in ("build_uri", "manifest_uri", "latency_ms", "reference", "validation", "tasks", "trials"):
        assert key in summary, key
    assert summary["validation"]["passed"] and summary["latency_ms"] > 0
    assert summary["reference"]["framework"] == "torch"
    assert summary["tasks"] == first_run["tasks"]
    assert summary["trials"] == 0
    hits = summary["cache_hits"]
    assert "import" in hits and "build" in hits and any(h.startswith("tune") for h in hits), hits
    assert summary["build_uri"] != first_run["build_uri"]
    manifest = Path(summary["manifest_uri"].replace("file://", ""))
    assert manifest.exists()
    base = store / "builds" / "mnist_cnn" / "local"
    assert (base / "LATEST").read_text() == manifest.parent.name


def _assert_user_error(code, out, err, store: Path, match: str, expected: int = 2):
    """One `error:` line, the exit code of its kind (tasks/errors.py), nothing published."""
    assert code == expected, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert match in lines[0], lines[0]
    assert "Traceback" not in err
    _assert_nothing_published(store)


def _assert_nothing_published(store: Path):
    """No build, no LATEST, no tuning shard; only Prefect's own persisted flow result may be there."""
    files = [p.relative_to(store) for p in store.rglob("*") if p.is_file()] if store.exists() else []
    assert [f for f in files if f.parts[0] != "prefect-results"] == [], files


def test_missing_model_file(tmp_path, prefect_harness, capsys):
    store = tmp_path / "store"
    code, out, err = _run_cli(["compile", "--model", str(tmp_path / "nope.onnx"), "--store", str(store)], capsys)
    _assert_user_error(code, out, err, store, "does not exist")


def test_corrupt_model_file(tmp_path, prefect_harness, capsys):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07\x12\x04junk" + os.urandom(200))
    store = tmp_path / "store"
    code, out, err = _run_cli(["compile", "--model", str(bad), "--store", str(store)], capsys)
    _assert_user_error(code, out, err, store, "model.onnx")


def test_unknown_device(tmp_path, prefect_harness, capsys):
    store = tmp_path / "store"
    code, out, err = _run_cli(["compile", "--model", MODEL, "--device", "rk9999", "--store", str(store)], capsys)
    _assert_user_error(code, out, err, store, "unknown device 'rk9999'")


def test_unreachable_tracker(tmp_path, first_run, shared_cache, prefect_harness, capsys):
    store = tmp_path / "store"
    port = free_port()
    code, out, err = _run_cli(
        [
            "compile",
            "--model",
            MODEL,
            "--data",
            DATA,
            "--trials",
            "32",
            "--store",
            str(store),
            "--tracker",
            f"127.0.0.1:{port}",
        ],
        capsys,
    )
    _assert_user_error(code, out, err, store, f"cannot reach the RPC tracker at 127.0.0.1:{port}", expected=4)


def test_data_that_does_not_fit_the_model(tmp_path, first_run, shared_cache, prefect_harness, capsys):
    store = tmp_path / "store"
    code, out, err = _run_cli(
        ["compile", "--model", MODEL, "--data", "bundled:imagenet-photos", "--store", str(store)], capsys
    )
    _assert_user_error(code, out, err, store, "but the model expects (1, 1, 28, 28)")


def test_failed_validation_publishes_nothing(tmp_path, local_workers, prefect_harness, capsys):
    """A model left in training mode: torch runs its dropout, the compiled model does not."""
    store = tmp_path / "store"
    code, out, err = _run_cli(
        [
            "compile",
            "--model",
            "tests.flow_models:train_mode_dropout",
            "--data",
            DATA,
            "--trials",
            "0",
            "--no-untuned",
            "--store",
            str(store),
            "--tracker",
            local_workers.tracker,
        ],
        capsys,
    )
    _assert_user_error(code, out, err, store, "validation failed", expected=3)
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    report = Path(line.rsplit("report in ", 1)[-1].strip())
    assert report.exists() and "FAILED" in report.read_text()


def test_failing_task_is_reported_and_build_still_publishes(
    tmp_path, first_run, local_workers, prefect_harness, monkeypatch
):
    """One task's candidates all fail to build on the 'device' (its cross compiler is /bin/false):
    the task is reported by name, the others are used, and the build is published."""
    import tasks.tuning.tune
    from flows.compile import compile_flow

    victim = next(r["name"] for r in first_run["tuning"] if r["trials_run"] > 0)
    real = tasks.tuning.tune.tune_task

    def tune_with_broken_toolchain(task, target, work_dir, tracker, key, servers=1, cross_compiler=None, *a, **kw):
        return real(
            task, target, work_dir, tracker, key, servers, "false" if task.name == victim else cross_compiler, *a, **kw
        )

    monkeypatch.setattr(tasks.tuning.tune, "tune_task", tune_with_broken_toolchain)
    store = tmp_path / "store"  # fresh store and step cache: the victim's earlier search is not reused
    report = compile_flow(
        model=MODEL, data=DATA, trials=32, store=str(store), tracker=local_workers.tracker, measure_untuned=False
    )
    failed = next(r for r in report["tuning"] if r["name"] == victim)
    assert failed["error"] and failed["valid"] == 0 and failed["trials_run"] > 0
    assert victim in report["untuned_tasks"]
    others = [r for r in report["tuning"] if r["trials_run"] > 0 and r["name"] != victim]
    assert all(r["error"] is None for r in others)
    assert report["validation"]["passed"]
    folder = Path(report["build_uri"].replace("file://", ""))
    assert (folder.parent / "LATEST").read_text() == folder.name
    assert victim in (folder / "report.md").read_text().split("Untuned tasks")[-1]


def test_cli_prints_no_traceback_for_user_errors(tmp_path):
    """The real `tvmflow` command in its own process: one `error:` line, no Prefect traceback."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "TVMFLOW_CACHE": str(tmp_path / "cache")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "compile",
            "--model",
            str(tmp_path / "missing.onnx"),
            "--store",
            str(tmp_path / "store"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parent.parent.parent,
        timeout=600,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "does not exist" in errors[0]
    _assert_nothing_published(tmp_path / "store")


def test_bumped_cache_version_misses(monkeypatch):
    """A stage's cache key carries tvmflow's version and the stage's schema version: bumping
    either makes the next run miss (and import again); `refresh` ignores the entry."""
    from tasks import pipeline
    from tasks.devices.profiles import get_device
    from tasks.storage import cache

    device = get_device("local")
    source = pipeline.fetch_model(MODEL)
    assert pipeline.import_prepared(source, device)[3] is False  # fresh cache (tvmflow_cache fixture)
    assert pipeline.import_prepared(source, device)[3] is True
    assert pipeline.import_prepared(source, device, refresh=True)[3] is False
    monkeypatch.setitem(cache.SCHEMA, "import", cache.SCHEMA["import"] + 1)
    assert pipeline.import_prepared(source, device)[3] is False
    assert pipeline.import_prepared(source, device)[3] is True
    monkeypatch.setattr(cache, "tvmflow_version", lambda: "999.0")
    assert pipeline.import_prepared(source, device)[3] is False
    leftovers = [p for p in (cache.cache_root() / "import").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no half-written entry stays behind


def test_refresh_reruns_every_stage(first_run, flow_env, shared_cache, capsys):
    """--refresh after identical runs: nothing comes from a cache, every tuned task is searched again
    (warm-started from the shared database instead of reused), and no run folder is left behind."""
    _, store = flow_env
    code, out, err = _run_cli(
        [
            "compile",
            "--model",
            MODEL,
            "--data",
            DATA,
            "--trials",
            "32",
            "--store",
            str(store),
            "--no-untuned",
            "--refresh",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["cache_hits"] == [] and summary["validation"]["passed"]
    assert summary["trials"] > 0
    assert summary["tuning_reuse"]["reused"] == 0 and summary["tuning_reuse"]["warm_started"] >= 1
    assert not list((shared_cache / "runs").iterdir())
