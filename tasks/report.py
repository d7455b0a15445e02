"""Reports: report.json / report.md files and Prefect artifacts of the same content."""
from __future__ import annotations

import json
from pathlib import Path


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def tuning_rows(tune_results: list[dict]) -> list[dict]:
    return [{"task": r["name"], "trials": r["trials_run"], "valid": r["valid"],
             "best_ms": _fmt(r["best_ms"], 4), "cached": r.get("cached", False),
             "status": "reused (shared db)" if r.get("reused") else "tuned" if not r["error"] else f"untuned: {r['error']}"} for r in tune_results]


def latency_rows(report: dict) -> list[dict]:
    rows = [{"path": "TVM tuned (device)", "median_ms": _fmt(report["latency_ms"]),
             "p90_ms": _fmt(report.get("latency_p90_ms"))}]
    if report.get("untuned_latency_ms") is not None:
        rows.append({"path": "TVM untuned (device)", "median_ms": _fmt(report["untuned_latency_ms"]), "p90_ms": "–"})
    for name, value in (report.get("baselines") or {}).items():
        rows.append({"path": name, "median_ms": _fmt(value), "p90_ms": "–"})
    return rows


def _prequantized(report: dict) -> str:
    """' (pre-quantized QDQ model: ...)' for a model that arrived quantized (tasks/precision/qdq.py), else ''."""
    info = report.get("precision_info") or {}
    if not info.get("prequantized"):
        return ""
    floats = [k["name"] for k in info["kept_float"]]
    return (f" (pre-quantized {info['format']} model: {len(info['integer_layers'])} integer layers"
            + (f", float: {', '.join(floats)}" if floats else "") + ")")


def markdown(report: dict) -> str:
    val = report["validation"]
    lines = [f"# tvmflow build: {report['model']} on {report['device']}", "",
             f"- build: `{report.get('build_uri', '(not published)')}`",
             f"- precision: {report['precision']}{_prequantized(report)}, TVM {report['tvm_version']}, "
             f"target `{report['target']}`",
             f"- validation: **{'passed' if val['passed'] else 'FAILED'}** on {val['samples']} samples "
             f"(max abs err {val['max_abs_err']:.2e}, max rel err {val['max_rel_err']:.2e}, "
             f"top-1 agreement {_fmt(val['top1_agreement'])}, accuracy {_fmt(val.get('accuracy'))})"
             + (f": {val['reason']}" if val.get("reason") else ""),
             f"- tuning: {report['tasks']} tasks, {report['trials']} trials run, "
             f"{report['tuning_seconds']:.0f} s; cache hits: {', '.join(report['cache_hits']) or 'none'}", "",
             *([f"- shared tuning database: {r['reused']} tasks reused, {r['warm_started']} warm-started, "
                f"{r['fresh']} tuned fresh ({r['shards']} shards)", ""] if (r := report.get("tuning_reuse")) else []),
             "## Latency (batch as compiled, median over repeats)", "", "| path | median ms | p90 ms |", "|---|---|---|"]
    lines += [f"| {r['path']} | {r['median_ms']} | {r['p90_ms']} |" for r in latency_rows(report)]
    lines += ["", "## Tuning tasks", "", "| task | trials | valid | best ms | status |", "|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['trials']} | {r['valid']} | {r['best_ms']} | {r['status']} |"
              for r in tuning_rows(report["tuning"])]
    untuned = [r["name"] for r in report["tuning"] if r["error"]]
    if untuned:
        lines += ["", f"Untuned tasks (default schedule): {', '.join(untuned)}"]
    if report.get("per_layer_error"):  # issue 5: low-precision layer outputs against fp32
        lines += ["", "## Per-layer error against fp32 (errors accumulate downstream)", "",
                  "| layer | rel max err | SNR dB | cosine |", "|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['rel_max_err']:.3e} | {r['snr_db']:.1f} | {r['cosine']:.5f} |"
                  for r in report["per_layer_error"]]
    return "\n".join(lines) + "\n"


def write_report_files(report: dict, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    (folder / "report.md").write_text(markdown(report))
    return {"report.json": folder / "report.json", "report.md": folder / "report.md"}


def publish_artifacts(report: dict) -> None:
    """The report as a markdown artifact, latency and tuning tables as table artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = "".join(c if c.isalnum() else "-" for c in f"{report['model']}-{report['device']}").lower()
    create_markdown_artifact(markdown=markdown(report), key=f"{key}-report", description="tvmflow build report")
    create_table_artifact(table=latency_rows(report), key=f"{key}-latency", description="latency (ms)")
    create_table_artifact(table=tuning_rows(report["tuning"]), key=f"{key}-tuning", description="tuning tasks")
