"""Compile a Relax module for a device target, with a tuning database, and export the library."""

from __future__ import annotations

from pathlib import Path

from tasks.devices.profiles import DeviceProfile
from tasks.runlog import native_stderr_muted


def compile_module(prepared_mod, device: DeviceProfile, db_dir: str | Path | None):
    """Apply the database's best schedules, then give every kernel left untuned the default CPU
    schedule (tasks.build.cpu_fallback: parallel + vectorized; TVM's own lowering is serial, scalar).
    The database goes first: a scheduled kernel no longer matches its tuning record."""
    import tvm
    from tvm.relax.transform import MetaScheduleApplyDatabase
    from tvm.s_tir import meta_schedule as ms

    from tasks.build.cpu_fallback import apply_cpu_fallback
    from tasks.build.int8_isa import apply_packed_gemm_default  # untuned packed int8 GEMMs: the intrinsic anyway
    from tasks.tuning.pick_best import has_db, open_db

    target = device.tvm_target()
    database = open_db(db_dir) if db_dir and has_db(db_dir) else ms.database.MemoryDatabase()
    with target, database, tvm.transform.PassContext(opt_level=3):
        tuned = MetaScheduleApplyDatabase()(prepared_mod)
    scheduled = apply_cpu_fallback(apply_packed_gemm_default(tuned, target), target)
    with target:
        return ms.relax_integration.compile_relax(database, scheduled, target, params=None)


def export_library(executable, device: DeviceProfile, out_path: str | Path, options: list[str] | None = None) -> Path:
    """Write the shared library (weights embedded), through the device's cross compiler;
    `options`: extra linker options (a vendor kernel library the model calls)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fcompile = device.export_compiler()
    extra = {"options": options} if options else {}
    with native_stderr_muted():  # TVM warns once per constant it saves ("Scope Saving"), thousands of lines
        if fcompile is None:
            executable.export_library(str(out_path), **extra)
        else:
            executable.export_library(str(out_path), fcompile=fcompile, **extra)
    return out_path


def build_library(prepared_mod, device: DeviceProfile, db_dir, out_path) -> Path:
    return export_library(compile_module(prepared_mod, device, db_dir), device, out_path)
