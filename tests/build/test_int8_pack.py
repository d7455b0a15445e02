"""tasks.build.int8_pack: 8-bit conv2d / matmul layers become im2col + a GEMM against weights packed for
the target's dot-product intrinsic; bit-exact, tensorized by the tune space (vpmaddubsw here,
vpdpbusd in a cascadelake cross build), and the tuned record is what the build applies."""

from __future__ import annotations

import numpy as np
import pytest

HOST = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}  # AVX2, no VNNI: this machine
VNNI = {"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2}  # 16 lanes, vpdpbusd (cross only)


def _module(layers, x_shape, x_dtype):
    """main(x) = tuple of each layer applied to x: ("conv", W, stride, padding, dilation) or ("matmul", W)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, x_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            outs = []
            for kind, w, *conv in layers:
                if kind == "conv":
                    stride, padding, dilation = conv
                    call = relax.op.nn.conv2d(
                        x, relax.const(w), strides=stride, padding=padding, dilation=dilation, out_dtype="int32"
                    )
                else:
                    call = relax.op.matmul(x, relax.const(w), out_dtype="int32")
                outs.append(bb.emit(call))
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


def _weights(rng, shape, bits=7):
    q = 2 ** (bits - 1) - 1
    return rng.integers(-q, q + 1, shape).astype("int8")


def _input(rng, shape, dtype):
    return (rng.integers(0, 256, shape) if dtype == "uint8" else rng.integers(-127, 128, shape)).astype(dtype)


def _packed_blocks(mod) -> int:
    import tvm

    from tasks.build.int8_isa import PACKED_GEMM_BLOCK

    return sum(
        f.script().count(f'T.sblock("{PACKED_GEMM_BLOCK}")')
        for f in mod.functions.values()
        if isinstance(f, tvm.tirx.PrimFunc)
    )


def _run(mod, x):
    from tasks.precision.layers import host_runner

    return host_runner(mod, HOST)({"x": x})


@pytest.mark.parametrize("x_dtype", ["uint8", "int8"])
@pytest.mark.parametrize("target", [HOST, VNNI], ids=["avx2-8-lanes", "vnni-16-lanes"])
def test_packed_convs_are_bit_exact(x_dtype, target):
    """stride 2, asymmetric padding, dilation, 1x1, K = C*KH*KW not a multiple of 4 (3*3*3 = 27,
    5*3*3 = 45), O not a multiple of 8 or 16 (7, 10), batch 2; int8 activations take the +128
    shift and its per-channel correction. The 16-lane packing runs here too (plain lowering)."""
    from tasks.build.int8_pack import pack_int8_layers

    rng = np.random.default_rng(0)
    convs = [
        ("conv", _weights(rng, (10, 5, 3, 3)), 2, 1, 1),
        ("conv", _weights(rng, (16, 5, 1, 1)), 1, 0, 1),
        ("conv", _weights(rng, (7, 5, 3, 3)), 1, (1, 0, 2, 1), 1),
        ("conv", _weights(rng, (24, 5, 3, 3)), 2, 2, 2),
    ]
    mod = _module(convs, (2, 5, 11, 9), x_dtype)
    packed = pack_int8_layers(mod, target)
    assert _packed_blocks(packed) == len(convs)
    x = _input(rng, (2, 5, 11, 9), x_dtype)
    for want, got in zip(_run(mod, x), _run(packed, x)):
        assert want.dtype == got.dtype == np.int32 and want.shape == got.shape
        assert np.array_equal(want, got)


@pytest.mark.parametrize("x_shape", [(3, 30), (2, 3, 30)])
def test_packed_matmuls_are_bit_exact(x_shape):
    from tasks.build.int8_pack import pack_int8_layers

    rng = np.random.default_rng(1)
    layers = [("matmul", _weights(rng, (30, 10))), ("matmul", _weights(rng, (30, 17)))]
    mod = _module(layers, x_shape, "int8")
    packed = pack_int8_layers(mod, HOST)
    assert _packed_blocks(packed) == 2
    x = _input(rng, x_shape, "int8")
    for want, got in zip(_run(mod, x), _run(packed, x)):
        assert want.shape == got.shape and np.array_equal(want, got)


def test_what_is_left_unpacked():
    """Full 8-bit weights whose pairs can saturate vpmaddubsw: unpacked on AVX2, packed with VNNI.
    Depthwise convs, float layers and targets without a dot product (ARM): untouched."""
    from tvm import relax
    from tvm_ffi.structural import structural_equal

    from tasks.build.int8_pack import pack_int8_layers, pairs_never_saturate

    rng = np.random.default_rng(2)
    wide = _weights(rng, (8, 4, 3, 3), bits=8)
    wide[0, 0, 0, :2] = 127  # 255 * (127 + 127) > 32767
    assert not pairs_never_saturate(wide.reshape(8, -1))
    assert pairs_never_saturate(_weights(rng, (64, 99)))  # any 7-bit weights
    mod = _module([("conv", wide, 1, 1, 1)], (1, 4, 6, 6), "uint8")
    assert pack_int8_layers(mod, HOST) is mod
    assert _packed_blocks(pack_int8_layers(mod, VNNI)) == 1
    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}
    seven_bit = _module([("conv", _weights(rng, (8, 4, 3, 3)), 1, 1, 1)], (1, 4, 6, 6), "uint8")
    assert _packed_blocks(pack_int8_layers(seven_bit, HOST)) == 1
    assert pack_int8_layers(seven_bit, arm) is seven_bit

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 6, 6), "uint8"))
    f = relax.Var("f", relax.TensorType((1, 8, 6, 6), "float32"))
    with bb.function("main", [x, f]):
        with bb.dataflow():
            a = bb.emit(
                relax.op.nn.conv2d(x, relax.const(_weights(rng, (8, 1, 3, 3))), groups=8, padding=1, out_dtype="int32")
            )
            b = bb.emit(relax.op.nn.conv2d(f, relax.const(rng.normal(size=(8, 8, 3, 3)).astype("float32"))))
            out = bb.emit_output(relax.Tuple([a, b]))
        bb.emit_func_output(out)
    depthwise_and_float = bb.get()
    assert structural_equal(pack_int8_layers(depthwise_and_float, HOST), depthwise_and_float)


def _gemm_task(target, x_dtype="uint8"):
    """The packed GEMM task of one small int8 conv, prepared for `target` like every module."""
    import tvm

    from tasks.tuning.extract import extract_tasks, prepare_for_tuning

    rng = np.random.default_rng(3)
    mod = _module([("conv", _weights(rng, (32, 16, 3, 3)), 1, 1, 1)], (1, 16, 14, 14), x_dtype)
    prepared = prepare_for_tuning(mod, target)
    tasks = extract_tasks(prepared, tvm.target.Target(target))
    return mod, prepared, tasks, next(t for t in tasks if "int8_gemm" in t.name)


@pytest.mark.parametrize("x_dtype", ["uint8", "int8"])
def test_untuned_build_gets_fixed_int8_schedules(x_dtype):
    """No tuning record: tasks.build.compile gives the packed GEMM the fixed tensorized schedule and the
    im2col gather its parallel one (int8_isa.apply_packed_gemm_default); still bit-exact."""
    import tvm
    from tvm import relax

    from tasks.build.compile import compile_module
    from tasks.build.int8_isa import apply_packed_gemm_default, assembly, instruction_counts
    from tasks.devices.profiles import get_device
    from tasks.tuning.extract import prepare_for_tuning

    device = get_device("local")
    rng = np.random.default_rng(5)
    mod = _module(
        [("conv", _weights(rng, (24, 16, 3, 3)), 2, 1, 1), ("conv", _weights(rng, (8, 16, 1, 1)), 1, 0, 1)],
        (1, 16, 15, 15),
        x_dtype,
    )
    prepared = prepare_for_tuning(mod, device.tvm_target())
    scheduled = apply_packed_gemm_default(prepared, device.tvm_target())
    kernels = {gv.name_hint: f for gv, f in scheduled.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    int8_kernels = [n for n in kernels if "int8_gemm" in n or "int8_im2col" in n]
    assert len(int8_kernels) == 4 and all(kernels[n].attrs.get("tirx.is_scheduled") for n in int8_kernels)
    built = compile_module(prepared, device, None)
    assert instruction_counts(assembly(built))["vpmaddubsw"] > 0
    x = _input(rng, (1, 16, 15, 15), x_dtype)
    got = relax.VirtualMachine(built, tvm.cpu())["main"](tvm.runtime.tensor(x))
    for i, want in enumerate(_run(mod, x)):
        assert np.array_equal(got[i].numpy(), want)


def test_cross_build_for_vnni_uses_vpdpbusd():
    """The tensorize space with the cascadelake intrinsic: every design space builds (for that CPU;
    assembly only) and uses vpdpbusd; the other kernels of the module get the default space."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tasks.build.int8_isa import instruction_counts, space_for

    _, _, tasks, gemm = _gemm_task(VNNI)
    target = tvm.target.Target(VNNI)
    others = [t for t in tasks if t is not gemm]
    assert others and all(space_for(tvm.ir.load_json(t.mod_json), target) == "post-order-apply" for t in others)
    mod = tvm.ir.load_json(gemm.mod_json)
    context = ms.TuneContext(
        mod=mod, target=target, space_generator=space_for(mod, target), task_name="gemm", num_threads=1, rand_state=0
    )
    spaces = context.generate_design_space()
    assert spaces
    for sch in spaces:
        assert all(post.apply(sch) for post in context.space_generator.postprocs)
        counts = instruction_counts(tvm.compile(sch.mod, target=target).mod.inspect_source("asm"))
        assert counts["vpdpbusd"] > 0 and counts["vpmulld"] == 0, counts


def test_tuned_packed_kernel_is_applied_by_the_build(tmp_path, local_workers, prefect_harness):
    """Tune the packed GEMM through tune_task (RPC workers), keep it through pick_best's check
    against the default lowering, build with tasks.build.compile: the kernel in the build is the tuned
    record's schedule, with vpmaddubsw, and the output is bit-exact against the unpacked layer.
    Without a record the GEMM gets int8_isa's fixed tensorized schedule, also exact."""
    import tvm
    from tvm import relax, s_tir
    from tvm.relax.transform import MetaScheduleApplyDatabase
    from tvm_ffi.structural import structural_equal

    from tasks.build.compile import compile_module
    from tasks.build.int8_isa import assembly, instruction_counts
    from tasks.devices.profiles import get_device
    from tasks.tuning.pick_best import merge_databases, open_db
    from tasks.tuning.tune import tune_task

    device = get_device("local")
    mod, prepared, _, gemm = _gemm_task(device.tvm_target(), "int8")
    gemm.trials = 16
    result = tune_task(
        gemm, device.target, tmp_path / "work", (local_workers.host, local_workers.tracker_port), "local", servers=2
    )
    assert result.error is None and result.valid > 0, result.error
    assert merge_databases([tmp_path / "work"], tmp_path / "db", verify_target=device.target) == 1

    db = open_db(tmp_path / "db")
    record = db.get_all_tuning_records()[0]
    sch = s_tir.Schedule(record.workload.mod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    with device.tvm_target(), db, tvm.transform.PassContext(opt_level=3):
        applied = MetaScheduleApplyDatabase()(prepared)
    kernels = [f for gv, f in applied.functions.items() if gv.name_hint == gemm.name]
    assert len(kernels) == 1 and structural_equal(kernels[0].body, sch.mod["main"].body)

    x = _input(np.random.default_rng(4), (1, 16, 14, 14), "int8")
    want = _run(mod, x)[0]
    for db_dir in (tmp_path / "db", None):
        built = compile_module(prepared, device, db_dir)
        counts = instruction_counts(assembly(built))
        assert counts["vpmaddubsw"] > 0 and counts["vpmaddwd"] > 0, (db_dir, counts)
        got = relax.VirtualMachine(built, tvm.cpu())["main"](tvm.runtime.tensor(x))
        assert np.array_equal(got[0].numpy(), want)
