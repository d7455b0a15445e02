"""Untuned CPU kernels get a parallel, vectorized default schedule; tuned ones keep their record."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def prepared(mnist_pt2):
    from tasks.devices.profiles import get_device
    from tasks.importers.model_import import import_pt2
    from tasks.tuning.extract import prepare_for_tuning

    imported = import_pt2(mnist_pt2)
    target = get_device("local").tvm_target()
    return prepare_for_tuning(imported.mod, target), imported.inputs, target


def _kernels(mod) -> dict:
    import tvm

    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _run(executable, x) -> np.ndarray:
    import tvm
    from tvm import relax

    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x))
    return (out if hasattr(out, "numpy") else out[0]).numpy()


def test_every_untuned_kernel_runs_parallel_and_computes_the_same(prepared):
    import tvm

    from tasks.build.cpu_fallback import apply_cpu_fallback

    mod, inputs, target = prepared
    scheduled = apply_cpu_fallback(tvm.ir.IRModule(dict(mod.functions_items())), target)
    kernels = _kernels(scheduled)
    assert kernels and all(f.attrs.get("tirx.is_scheduled") for f in kernels.values())
    convs = [name for name in kernels if "conv2d" in name]
    assert convs and all("T.parallel" in kernels[name].script() for name in convs)
    assert any("T.vectorized" in f.script() for f in kernels.values())

    x = np.random.default_rng(0).standard_normal([int(d) for d in inputs[0].shape]).astype("float32")
    plain, fast = tvm.compile(mod, target=target), tvm.compile(scheduled, target=target)
    np.testing.assert_array_equal(_run(fast, x), _run(plain, x))


def test_tuned_kernels_keep_their_record_and_the_build_stays_a_fusion_fixpoint(prepared, tmp_path):
    """The database is applied before the fallback, and nothing the build fuses afterwards changes
    a kernel: otherwise tuned records would be dropped silently."""
    import tvm
    from tvm.relax.transform import MetaScheduleApplyDatabase
    from tvm.s_tir import meta_schedule as ms
    from tvm_ffi.structural import structural_equal

    from tasks.build.cpu_fallback import apply_cpu_fallback
    from tasks.tuning.extract import extract_tasks, fuse_passes
    from tasks.tuning.pick_best import open_db

    mod, _, target = prepared
    task = max(extract_tasks(mod, target), key=lambda t: t.flops)
    workload = tvm.ir.load_json(task.mod_json)
    ctx = ms.TuneContext(mod=workload, target=target, space_generator="post-order-apply", task_name=task.name)
    trace = ctx.generate_design_space()[0].trace
    db = open_db(tmp_path / "db")
    db.commit_tuning_record(
        ms.database.TuningRecord(
            trace, db.commit_workload(workload), [1e-4], target, ms.arg_info.ArgInfo.from_prim_func(workload["main"])
        )
    )
    with target, db, tvm.transform.PassContext(opt_level=3):
        tuned = MetaScheduleApplyDatabase()(mod)
    expected = trace.apply_to_schedule  # the record's own schedule of that workload
    sch = tvm.s_tir.Schedule(workload)
    expected(sch, remove_postproc=False)
    scheduled = apply_cpu_fallback(tuned, target)
    kernel = _kernels(scheduled)[task.name]
    assert structural_equal(kernel.body, sch.mod["main"].body, map_free_vars=True)
    with target:
        refused = tvm.transform.Sequential(fuse_passes(target))(scheduled)
    assert structural_equal(refused, scheduled)
