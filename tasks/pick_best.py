"""Merge per-task tuning databases into one, keeping the best record per workload."""
from __future__ import annotations

from pathlib import Path

DB_FILES = ("database_workload.json", "database_tuning_record.json")


def open_db(folder: str | Path):
    from tvm.s_tir import meta_schedule as ms

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(path_workload=str(folder / DB_FILES[0]),
                                    path_tuning_record=str(folder / DB_FILES[1]))


def has_db(folder: str | Path) -> bool:
    return all((Path(folder) / name).exists() for name in DB_FILES)


def merge_databases(sources: list[str | Path], out_dir: str | Path) -> int:
    """Commit every record into memory (workload indices differ per file), dump the best per workload.

    Returns the number of workloads in the merged database.
    """
    from tvm.s_tir import meta_schedule as ms

    memory = ms.database.MemoryDatabase()
    for src in sources:
        if not has_db(src):
            continue
        for record in open_db(src).get_all_tuning_records():
            workload = memory.commit_workload(record.workload.mod)
            memory.commit_tuning_record(ms.database.TuningRecord(
                record.trace, workload, record.run_secs, record.target, record.args_info))
    out_dir = Path(out_dir)
    for name in DB_FILES:
        (out_dir / name).unlink(missing_ok=True)
    merged = open_db(out_dir)
    memory.dump_pruned(merged)
    return len(merged.get_all_tuning_records())
