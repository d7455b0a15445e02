"""Reports: report.json / report.md files and Prefect artifacts of the same content, all read
from one tasks.records.BuildReport (report.json is its to_json())."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.build.candidates import choices_table
from tasks.devices import layer_times
from tasks.records import BuildReport, TaskResult
from tasks.tuning_curve import curve_points, write_tuning_curve


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def tuning_rows(results: list[TaskResult]) -> list[dict]:
    return [
        {
            "task": r.name,
            "trials": r.trials_run,
            "valid": r.valid,
            "best_ms": _fmt(r.best_ms, 4),
            "cached": r.cached,
            "status": "reused (shared db)" if r.reused else "tuned" if not r.error else f"untuned: {r.error}",
        }
        for r in results
    ]


def latency_rows(report: BuildReport) -> list[dict]:
    rows = [{"path": "TVM tuned (device)", "median_ms": _fmt(report.latency_ms), "p90_ms": _fmt(report.latency_p90_ms)}]
    if report.untuned_latency_ms is not None:
        rows.append({"path": "TVM untuned (device)", "median_ms": _fmt(report.untuned_latency_ms), "p90_ms": "–"})
    for name, value in (report.baselines or {}).items():
        rows.append({"path": name, "median_ms": _fmt(value), "p90_ms": "–"})
    return rows


def _prequantized(report: BuildReport) -> str:
    """' (pre-quantized QDQ model: ...)' for a model that arrived quantized (tasks/precision/qdq.py), else ''."""
    info = report.precision_info or {}
    if not info.get("prequantized"):
        return ""
    floats = [k["name"] for k in info["kept_float"]]
    return (
        f" (pre-quantized {info['format']} model: {len(info['integer_layers'])} integer layers"
        + (f", float: {', '.join(floats)}" if floats else "")
        + ")"
    )


def markdown(report: BuildReport) -> str:
    val = report.validation
    reuse = report.tuning_reuse
    lines = [
        f"# tvmflow build: {report.model} on {report.device}",
        "",
        f"- build: `{report.build_uri or '(not published)'}`",
        f"- precision: {report.precision}{_prequantized(report)}, TVM {report.tvm_version}, "
        f"tvmflow {report.tvmflow_version or '?'}, target `{report.target}`",
        f"- validation: **{'passed' if val.passed else 'not run' if val.passed is None else 'FAILED'}** "
        f"on {val.samples} samples "
        f"(max abs err {val.max_abs_err:.2e}, max rel err {val.max_rel_err:.2e}, "
        f"top-1 agreement {_fmt(val.top1_agreement)}, accuracy {_fmt(val.accuracy)})"
        + (f": {val.reason}" if val.reason else ""),
        *(
            [
                f"- top-5 agreement {_fmt(val.top5_agreement)}; top-1 flips {val.flips} "
                f"(the gate allows {val.allowed_flips} for {val.samples} samples)"
            ]
            if val.top5_agreement is not None
            else []
        ),
        *([f"- framework int8 baseline on the same samples: {val.baseline}"] if val.baseline else []),
        f"- tuning: {report.tasks} tasks, {report.trials} trials run, "
        f"{report.tuning_seconds:.0f} s; cache hits: {', '.join(report.cache_hits) or 'none'}",
        "",
        *(
            [
                f"- shared tuning database: {reuse['reused']} tasks reused, {reuse['warm_started']} warm-started, "
                f"{reuse['fresh']} tuned fresh ({reuse['shards']} shards)",
                "",
            ]
            if reuse
            else []
        ),
        *([f"- retune: {report.retune.get('decision')}", ""] if report.retune else []),
        *([f"- import: {'; '.join(report.import_notes)}", ""] if report.import_notes else []),
        "## Latency (batch as compiled, median over repeats)",
        "",
        "| path | median ms | p90 ms |",
        "|---|---|---|",
    ]
    lines += [f"| {r['path']} | {r['median_ms']} | {r['p90_ms']} |" for r in latency_rows(report)]
    lines += layer_time_section(report)
    lines += ["", "## Tuning tasks", "", "| task | trials | valid | best ms | status |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['task']} | {r['trials']} | {r['valid']} | {r['best_ms']} | {r['status']} |"
        for r in tuning_rows(report.tuning)
    ]
    untuned = [r.name for r in report.tuning if r.error]
    if untuned:
        lines += ["", f"Untuned tasks (default schedule): {', '.join(untuned)}"]
    if report.operator_choices:  # per-operator pick-best across backends (tasks.build.candidates)
        lines += ["", "## Per-operator backend choice", "", choices_table(report.operator_choices).rstrip()]
    if report.per_layer_error:  # issue 5: low-precision layer outputs against fp32
        lines += [
            "",
            "## Per-layer error against fp32 (errors accumulate downstream)",
            "",
            "| layer | rel max err | SNR dB | cosine |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['layer']} | {r['rel_max_err']:.3e} | {r['snr_db']:.1f} | {r['cosine']:.5f} |"
            for r in report.per_layer_error
        ]
    lines += top5_examples(val.examples)
    return "\n".join(lines) + "\n"


LAYER_ROWS = 10  # report.md embeds the slowest layers; layer_times.md has them all


def layer_time_section(report: BuildReport) -> list[str]:
    """report.md's per-layer time section: the slowest kernels and a link to the full table, or why
    there is none for a validated build (its device is not this host's CPU)."""
    profile = report.layer_times
    if profile is None:
        if report.validation.passed and not report.build_only:
            return [
                "",
                f"Per-layer times: not measured (device {report.device!r} is not this host's CPU; "
                "TVM 0.27's VM profiling hook cannot run over RPC).",
            ]
        return []
    more = f"; all {len(profile.layers)} in [layer_times.md](layer_times.md)" if profile.layers else ""
    return [
        "",
        f"## Per-layer time (slowest {min(LAYER_ROWS, len(profile.layers))} kernels{more})",
        "",
        layer_times.markdown(profile, LAYER_ROWS).rstrip(),
    ]


def layer_times_markdown(report: BuildReport) -> str:
    """layer_times.md: every kernel of the build, slowest first."""
    assert report.layer_times is not None
    return (
        f"# Per-layer time: {report.model} on {report.device} ({report.precision})\n\n"
        + (f"Build: `{report.build_uri}`\n\n" if report.build_uri else "")
        + layer_times.markdown(report.layer_times)
    )


def top5_examples(examples: list) -> list[str]:
    """Markdown rows: per example image, the source framework's and the device's top-5 classes."""
    if not examples:
        return []

    def classes(top) -> str:
        return ", ".join(f"{c[0]} {c[1]} ({float(c[2]):.2f})" if len(c) > 2 else f"{c[0]} {c[1]}" for c in top or [])

    rows = ["", "## Top-5 on the first samples (framework vs device)", "", "| sample | label | framework | device |"]
    rows.append("|---|---|---|---|")
    for ex in examples:
        rows.append(
            f"| {ex.get('file', '')} | {ex.get('label', '')} | {classes(ex.get('framework'))} | {classes(ex.get('device'))} |"
        )
    return rows


def write_report_files(report: BuildReport, folder: Path) -> dict[str, Path]:
    """report.json, report.md and, when a task was searched in this run, tuning_curve.png; with a
    per-layer profile, layer_times.md / layer_times.json."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"report.json": folder / "report.json", "report.md": folder / "report.md"}
    curve = write_tuning_curve(report.tuning, folder / "tuning_curve.png", f"{report.model} on {report.device}")
    if curve is not None:
        files["tuning_curve.png"] = curve
    if report.layer_times is not None:
        files["layer_times.md"], files["layer_times.json"] = folder / "layer_times.md", folder / "layer_times.json"
        files["layer_times.md"].write_text(layer_times_markdown(report))
        files["layer_times.json"].write_text(json.dumps(report.layer_times.to_json(), indent=2))
    (folder / "report.json").write_text(json.dumps(report.to_json(), indent=2, sort_keys=True, default=str))
    (folder / "report.md").write_text(markdown(report) + ("\n![tuning curve](tuning_curve.png)\n" if curve else ""))
    return files


CURVE_INLINE_MAX = 1_000_000  # bytes of PNG shown inline in the UI; a bigger one is only linked


def tuning_curve_markdown(report: BuildReport) -> str | None:
    """The tuning curve as a markdown artifact: the PNG inline (a data: URI, so the UI shows it without
    reaching the store), and where the published file is. None when nothing was searched in this run."""
    import base64
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tvmflow-curve-") as tmp:
        png = write_tuning_curve(report.tuning, Path(tmp) / "tuning_curve.png", f"{report.model} on {report.device}")
        data = png.read_bytes() if png is not None else b""
    if not data:
        return None
    where = f"\n\nPublished as {report.build_uri}/tuning_curve.png\n" if report.build_uri else "\n"
    picture = (
        f"![tuning curve](data:image/png;base64,{base64.b64encode(data).decode()})"
        if len(data) <= CURVE_INLINE_MAX
        else f"(the picture is {len(data) // 1000} kB: open the published file)"
    )
    return (
        f"# Tuning curve: {report.model} on {report.device}\n\n"
        "Best latency of each task searched in this run, against trials (left) and seconds of search (right).\n\n"
        + picture
        + where
    )


def publish_artifacts(report: BuildReport) -> None:
    """The report, the tuning curve and the per-layer time table as markdown artifacts, latency and tuning
    tables as table artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = "".join(c if c.isalnum() else "-" for c in f"{report.model}-{report.device}").lower()
    text = markdown(report)
    if report.build_uri and any(curve_points(t) for t in report.tuning):
        text += f"\nTuning curve (best latency per task vs trials and vs time): {report.build_uri}/tuning_curve.png\n"
    if report.build_uri and report.layer_times is not None:
        text += f"\nPer-layer time table: {report.build_uri}/layer_times.md\n"
    create_markdown_artifact(markdown=text, key=f"{key}-report", description="tvmflow build report")
    if report.layer_times is not None:
        create_markdown_artifact(
            markdown=layer_times_markdown(report), key=f"{key}-layer-times", description="per-layer time"
        )
    curve = tuning_curve_markdown(report)
    if curve:
        create_markdown_artifact(markdown=curve, key=f"{key}-tuning-curve", description="tuning curve")
    create_table_artifact(table=latency_rows(report), key=f"{key}-latency", description="latency (ms)")
    create_table_artifact(table=tuning_rows(report.tuning), key=f"{key}-tuning", description="tuning tasks")
