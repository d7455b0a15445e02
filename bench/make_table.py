"""Render bench/results/*.json as the markdown table in bench/README.md.

python bench/make_table.py            # print the table
python bench/make_table.py --readme   # replace the table between the markers in bench/README.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"

HEADER = (
    "| model | trials run (budget) | tasks tuned/total | tuning time | TVM tuned 1T | TVM tuned 2T "
    "| TVM untuned | onnxruntime 1T | onnxruntime 2T | torch 1T | torch 2T | max abs err (tuned vs torch) "
    "| untuned-task share of tuned time | date, CPU |"
)


def _ms(entry: dict | None, threads: str | None = None) -> str:
    """'median (p90)' in ms for one measurement, or — when absent."""
    if entry and threads is not None:
        entry = entry.get(threads)
    if not entry:
        return "—"
    med, p90 = entry["median_ms"], entry["p90_ms"]
    digits = 0 if med >= 100 else 1
    return f"{med:,.{digits}f} ({p90:,.{digits}f})"


def row(r: dict) -> str:
    tuned_tasks = sum(1 for t in r.get("tuning", []) if t.get("valid"))
    agreement = (r.get("agreement") or {}).get("tuned") or {}
    err = f"{agreement['max_abs_err']:.1e}" if agreement else "—"
    share = (r.get("breakdown") or {}).get("untuned_share")
    seconds = r.get("tuning_seconds", 0)
    if r.get("tuning_cache_hits"):  # re-measured on a cache from an earlier run: its searches' time
        seconds = r.get("tuning_seconds_of_searches", seconds)
    minutes = seconds / 60
    machine = r.get("machine", {})
    return (
        f"| {r['model'].split(':')[-1]} | {r.get('trials_run', 0)} ({r['trials_budget']}) "
        f"| {tuned_tasks}/{r.get('tasks', '?')} | {minutes:.1f} min "
        f"| {_ms(r.get('tvm_tuned'), '1')} | {_ms(r.get('tvm_tuned'), '2')} | {_ms(r.get('tvm_untuned'))} "
        f"| {_ms(r.get('onnxruntime'), '1')} | {_ms(r.get('onnxruntime'), '2')} "
        f"| {_ms(r.get('torch'), '1')} | {_ms(r.get('torch'), '2')} | {err} "
        f"| {'—' if share is None else f'{100 * share:.0f} %'} "
        f"| {r['date'][:10]}, {machine.get('cpu_model', '?')} ({machine.get('mcpu')}, {machine.get('cores')} cores) |"
    )


def render(results: list[dict]) -> str:
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    lines += [row(r) for r in sorted(results, key=lambda r: (r["model"], r["trials_budget"], r["date"]))]
    return "\n".join(lines) + "\n\nLatency: median (p90) in ms, batch 1, fp32, one process, same input."


def load(folder: Path = HERE / "results") -> list[dict]:
    """compile_bench results only: other benches (precision, GPU) share the folder."""
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    return [r for r in results if isinstance(r, dict) and {"model", "trials_budget", "tvm_tuned"} <= r.keys()]


def update_readme(table: str, readme: Path = HERE / "README.md") -> None:
    text = readme.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description="render bench/results/*.json as a markdown table")
    parser.add_argument("--readme", action="store_true", help="write the table into bench/README.md")
    args = parser.parse_args()
    table = render(load())
    if args.readme:
        update_readme(table)
    print(table)


if __name__ == "__main__":
    main()
