"""The tuning curve as a picture: best latency per task against trials and against time.

People read a tuning run from its curve (did a task converge, where did trials go); the numbers
behind it are each task's `curve` in the build report (tasks.tuning.tune records them per round).
"""

from __future__ import annotations

from pathlib import Path

from tasks.records import TaskResult


def curve_points(result: TaskResult) -> list[tuple[int, float, float | None]]:
    """(trials, best ms, seconds) of every measured round that has a best latency yet."""
    points = []
    for point in result.curve or []:
        trials, best = point[0], point[1]
        seconds = point[2] if len(point) > 2 else None
        if best is not None:
            points.append((int(trials), float(best), None if seconds is None else float(seconds)))
    return points


def write_tuning_curve(results: list[TaskResult], out: Path, title: str = "") -> Path | None:
    """tuning_curve.png (left: best ms vs trials; right: vs seconds), one line per task that was
    searched in this run; None when no task has a curve (nothing tuned, all reused from the db)."""
    curves = {r.name: curve_points(r) for r in results}
    curves = {name: pts for name, pts in curves.items() if pts}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    fig, (by_trials, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pts in sorted(curves.items()):
        label = name if len(name) <= 40 else name[:37] + "..."
        by_trials.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=label)
        timed = [p for p in pts if p[2] is not None]
        if timed:
            by_time.plot([p[2] for p in timed], [p[1] for p in timed], marker=".", label=label)
    for axis, xlabel in ((by_trials, "trials"), (by_time, "seconds of search")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel("best kernel latency (ms)")
        axis.set_yscale("log")
        axis.grid(True, alpha=0.3)
    by_trials.legend(fontsize=6, loc="upper right")
    fig.suptitle(title or "tuning curve: best latency per task")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
