"""Merge per-task tuning databases into one, keeping the best record per workload."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

DB_FILES = ("database_workload.json", "database_tuning_record.json")


def open_db(folder: str | Path):
    """The JSON database in `folder`. Also registers tvmflow's int8 tensor intrinsics: records of
    packed int8 GEMMs name them, and applying such a record (build, record_is_correct) needs them."""
    from tvm.s_tir import meta_schedule as ms

    from tasks.build.int8_isa import register_all

    register_all()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(
        path_workload=str(folder / DB_FILES[0]), path_tuning_record=str(folder / DB_FILES[1])
    )


def has_db(folder: str | Path) -> bool:
    return all((Path(folder) / name).exists() for name in DB_FILES)


def merge_databases(sources: Sequence[str | Path], out_dir: str | Path, verify_target: dict | None = None) -> int:
    """Commit every record into memory (workload indices differ per file), dump the best per workload.

    With `verify_target` (a target this host can run), a workload keeps its fastest record that
    computes the same result as the default lowering: MetaSchedule can emit wrong code (seen:
    a conv+BN+clip kernel fused with the next layer's pad, its pad border left unwritten after
    reverse_compute_at; EfficientNet-Lite0's output was off by 25 %). Returns the number of
    workloads in the merged database.
    """
    from tvm.s_tir import meta_schedule as ms

    memory = ms.database.MemoryDatabase()
    for src in sources:
        if not has_db(src):
            continue
        for record in open_db(src).get_all_tuning_records():
            workload = memory.commit_workload(record.workload.mod)
            memory.commit_tuning_record(
                ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target, record.args_info)
            )
    out_dir = Path(out_dir)
    for name in DB_FILES:
        (out_dir / name).unlink(missing_ok=True)
    merged = open_db(out_dir)
    if verify_target is None:
        memory.dump_pruned(merged)
    else:
        _dump_verified(memory, merged, verify_target)
    return len(merged.get_all_tuning_records())


def _dump_verified(memory, merged, target: dict, top_k: int = 5) -> None:
    import logging

    from tvm.s_tir import meta_schedule as ms
    from tvm_ffi.structural import structural_hash

    seen = set()
    for record in memory.get_all_tuning_records():
        mod = record.workload.mod
        key = structural_hash(mod)
        if key in seen:
            continue
        seen.add(key)
        for candidate in memory.get_top_k(record.workload, top_k):
            if record_is_correct(mod, candidate.trace, target):
                workload = merged.commit_workload(mod)
                merged.commit_tuning_record(
                    ms.database.TuningRecord(
                        candidate.trace, workload, candidate.run_secs, candidate.target, candidate.args_info
                    )
                )
                break
            logging.getLogger("tvmflow.pick_best").warning(
                "dropped a tuned record that computes a different result than the default kernel"
            )


def record_is_correct(mod, trace, target: dict, rtol: float = 1e-4) -> bool:
    """Run the scheduled kernel and the default lowering on the same random inputs, here."""
    import numpy as np
    import tvm
    from tvm import s_tir

    sch = s_tir.Schedule(mod)
    trace.apply_to_schedule(sch, remove_postproc=False)
    from tvm.s_tir import meta_schedule as ms

    func = mod[mod.get_global_vars()[0]]
    rng = np.random.default_rng(0)
    arrays = []
    for info in ms.arg_info.ArgInfo.from_prim_func(func):
        shape, dtype = [int(d) for d in info.shape], str(info.dtype)
        arrays.append(
            rng.integers(-8, 8, shape).astype(dtype) if "int" in dtype else rng.uniform(-1, 1, shape).astype(dtype)
        )
    outputs = []
    for candidate in (mod, sch.mod):
        lib = tvm.compile(candidate, target=tvm.target.Target(target))
        args = [tvm.runtime.tensor(a.copy()) for a in arrays]
        lib["main"](*args)
        outputs.append([a.numpy() for a in args])
    for want, got in zip(*outputs):
        scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-6)
        if not np.allclose(got, want, rtol=rtol, atol=rtol * scale, equal_nan=True):
            return False
    return True
