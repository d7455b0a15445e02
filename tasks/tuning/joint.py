"""Tune all tasks of a model in ONE MetaSchedule session: trials go where they pay.

tasks.tuning.tune searches each task alone with a budget fixed up front by FLOPs and a fresh
cost model, so nothing learned on one conv helps the next and small-but-slow kernels starve.
Here every task is a TuneContext of one `ms.tune_tasks` call with the gradient task scheduler
(each round goes to the task whose latency is expected to drop most, weighted by how often the
model runs it) and ONE XGBoost cost model shared by all tasks, loaded from and saved to
`cost_model_dir` (tasks.tuning.cost_model) so the next session starts warm. A task whose best
stopped improving for `patience` of its rounds is terminated (its trials go to the others);
`time_budget_s` ends the whole session once spent (the round in flight finishes). Progress is
logged per round: "[task i/N] name: trials, best ms".

Measurement scales with devices: RPCRunner(max_workers=servers) measures `servers` candidates at
once and each round has at least 2 x servers candidates; builders use every host core.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks.tuning.cost_model import load_model, save_model
from tasks.tuning.extract import TuningTask
from tasks.tuning.tune import INVALID_SECS, TuneResult, local_builder, per_iter_for, rpc_runner, seed_database

log = logging.getLogger("tvmflow.joint")


@dataclass
class JointSummary:
    """What the whole session did (written to work_dir/joint.json beside the database)."""

    tasks: int
    trials_budget: int
    trials_run: int = 0
    seconds: float = 0.0
    stopped_by: str = "trial budget"  # or "time budget", "every task converged"
    cost_model_warm: bool = False
    cost_model_path: str | None = None
    per_iter: int = 0
    servers: int = 1
    results: list = field(default_factory=list)

    def to_json(self) -> dict:
        data = asdict(self)
        data["results"] = [r.to_json() if hasattr(r, "to_json") else r for r in self.results]
        return data


def tunable(tasks: list[TuningTask], min_share: float = 0.0001) -> list[TuningTask]:
    """Tasks worth a search: reshapes and other kernels under `min_share` of the FLOPs keep the
    default CPU schedule (tasks.build.cpu_fallback) and cost no rounds."""
    total = sum(t.weighted_flops for t in tasks)
    if total <= 0:
        return []
    return [t for t in tasks if t.weighted_flops / total >= min_share]


def _callback(
    results: list[TuneResult],
    started: float,
    time_budget_s: float | None,
    patience: int,
    min_gain: float,
    report,
    summary: JointSummary,
):
    """Per round: count trials, track the best, log, stop converged tasks / the whole session."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    total = len(results)
    stale = [0] * total
    done: set[int] = set()

    @derived_object
    class JointProgress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            result = results[task_id]
            before = result.best_ms
            failed = 0
            for built, ran in zip(builder_results, runner_results):
                result.trials_run += 1
                summary.trials_run += 1
                secs = [float(s) for s in (ran.run_secs or [])]
                if built.error_msg or ran.error_msg or not secs or min(secs) >= INVALID_SECS:
                    failed += 1
                    if result.valid == 0 and not result.error:
                        result.error = (built.error_msg or ran.error_msg or "no timing").strip().splitlines()[0][:300]
                    continue
                result.valid += 1
                ms_ = 1000 * sum(secs) / len(secs)
                result.best_ms = ms_ if result.best_ms is None else min(result.best_ms, ms_)
            if result.valid:
                result.error = None
            result.curve.append((summary.trials_run, result.trials_run, result.best_ms))
            elapsed = time.monotonic() - started
            improved = before is None or (result.best_ms is not None and result.best_ms < before * (1 - min_gain))
            stale[task_id] = 0 if improved else stale[task_id] + 1
            best = f"{result.best_ms:.4f} ms" if result.best_ms is not None else "none valid yet"
            report(
                f"[task {task_id + 1}/{total}] {result.name}: {result.trials_run} trials, best {best}"
                + (f", {failed} failed" if failed else "")
                + f" ({summary.trials_run} in all, {elapsed:.0f} s)"
            )
            if stale[task_id] >= patience and task_id not in done:
                done.add(task_id)
                result.cached = False
                report(
                    f"[task {task_id + 1}/{total}] {result.name}: stopped, no gain over "
                    f"{min_gain:.0%} in {patience} rounds"
                )
                task_scheduler.terminate_task(task_id)
                if len(done) == total:
                    summary.stopped_by = "every task converged"
            if time_budget_s is not None and elapsed >= time_budget_s:
                summary.stopped_by = "time budget"
                for other in range(total):
                    if other not in done:
                        done.add(other)
                        task_scheduler.terminate_task(other)

    return JointProgress()


def tune_jointly(
    tasks: list[TuningTask],
    device,
    tracker: tuple[str, int],
    servers: int,
    work_dir: str | Path,
    seed_db_dir: str | None = None,
    cost_model_dir: str | Path | None = None,
    trials: int = 200,
    time_budget_s: float | None = None,
    log=None,
    per_iter: int = 16,
    patience: int = 3,
    min_gain: float = 0.01,
    builder_workers: int | None = None,
    use_slots: bool = True,
    seed: int = 1,
    population: int = 128,
) -> list[TuneResult]:
    """Search every tunable task of `tasks` in one session; return one TuneResult per task
    (trials_run 0 for tasks that got none), in `tasks`' order.

    `device`: a tasks.devices.profiles.DeviceProfile (its target, rpc key, cross compiler).
    `tracker`: (host, port) of the RPC tracker its `servers` device workers are registered with.
    The database is work_dir's JSON database (seeded from `seed_db_dir` when given: the search
    then starts from earlier bests). `use_slots`: hold the device's Prefect concurrency slots
    while measuring (tasks.devices.capacity; off where no Prefect API is reachable).
    `population`: the evolutionary search's population per round (MetaSchedule's default 512
    made the first round-robin pass over ResNet-18's 17 tasks take over 2 minutes on the
    16-core host before the first measurement; every task gets its first round in that pass).
    Never raises for device-side failures: they land in each TuneResult's `error`."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tasks.build.int8_isa import space_for

    report = log or globals()["log"].info
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    chosen = tunable(tasks) if trials > 0 else []
    results = [TuneResult(t.name, 0, db_dir=str(work_dir), curve=[]) for t in chosen]
    summary = JointSummary(len(chosen), trials, per_iter=per_iter_for(servers, per_iter), servers=servers)
    started = time.monotonic()
    if chosen:
        target = tvm.target.Target(device.target)
        cores = os.cpu_count() or 1
        builder = local_builder(device.target, builder_workers or cores, device.cross_compiler)
        runner = rpc_runner(tracker[0], tracker[1], device.rpc_key, servers)
        if use_slots:
            from tasks.devices.capacity import device_slots, limited_runner

            runner = limited_runner(runner, device.rpc_key, device_slots(device, servers))
        database = ms.database.JSONDatabase(
            path_workload=str(work_dir / "database_workload.json"),
            path_tuning_record=str(work_dir / "database_tuning_record.json"),
        )
        if seed_db_dir:
            seed_database(database, seed_db_dir)
        cost_model, summary.cost_model_warm = load_model(cost_model_dir, cores)
        contexts = []
        for i, task in enumerate(chosen):
            mod = tvm.ir.load_json(task.mod_json)
            strategy = ms.search_strategy.EvolutionarySearch(
                population_size=population, init_min_unmeasured=min(50, population // 2), genetic_num_iters=2
            )
            contexts.append(
                ms.TuneContext(
                    mod=mod,
                    target=target,
                    space_generator=space_for(mod, device.target),
                    search_strategy=strategy,
                    task_name=task.name,
                    num_threads=cores,
                    rand_state=seed + i,
                )
            )
        report(
            f"joint tuning: {len(chosen)} of {len(tasks)} tasks, {trials} trials, {summary.per_iter} per round, "
            f"{servers} device worker(s), cost model {'warm' if summary.cost_model_warm else 'fresh'}"
            + (f", time budget {time_budget_s:.0f} s" if time_budget_s else "")
        )
        try:
            ms.tune_tasks(
                tasks=contexts,
                task_weights=[float(t.weight) for t in chosen],
                work_dir=str(work_dir),
                max_trials_global=trials,
                num_trials_per_iter=summary.per_iter,
                builder=builder,
                runner=runner,
                database=database,
                cost_model=cost_model,
                task_scheduler=ms.task_scheduler.GradientBased(seed=seed),
                measure_callbacks=[
                    *ms.measure_callback.MeasureCallback.create("default"),
                    _callback(results, started, time_budget_s, patience, min_gain, report, summary),
                ],
            )
        except Exception as err:  # noqa: BLE001 - keep what was measured; say why it ended
            text = str(err).strip()
            summary.stopped_by = f"error: {err.__class__.__name__}: {text.splitlines()[-1][:300] if text else ''}"
            for result in results:
                if not result.valid and not result.error:
                    result.error = summary.stopped_by
        path = save_model(cost_model, cost_model_dir)
        summary.cost_model_path = str(path) if path else None
    summary.seconds = round(time.monotonic() - started, 2)
    for result in results:
        result.trials_planned = result.trials_run
        result.seconds = summary.seconds
        if result.trials_run and not result.valid and not result.error:
            result.error = f"no valid candidate in {result.trials_run} trials"
    by_name = {r.name: r for r in results}
    out = [
        by_name.get(t.name)
        or TuneResult(
            t.name,
            0,
            db_dir=str(work_dir),
            curve=[],
            error="not tuned: too few FLOPs to matter" if trials > 0 else "not tuned: no trials",
        )
        for t in tasks
    ]
    summary.results = out
    (work_dir / "joint.json").write_text(json.dumps(summary.to_json(), default=str))
    report(
        f"joint tuning done: {summary.trials_run} trials in {summary.seconds:.0f} s, stopped by {summary.stopped_by}"
    )
    return out


def last_summary(work_dir: str | Path) -> dict | None:
    """The JointSummary JSON of the last session in `work_dir` (None before any)."""
    path = Path(work_dir) / "joint.json"
    return json.loads(path.read_text()) if path.exists() else None
