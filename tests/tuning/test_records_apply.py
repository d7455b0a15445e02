"""The build must apply tuned records: compile_relax fuses its input once more before it looks
records up, so the module we extract tasks from must already be a fusion fixpoint."""

import tvm
from tvm_ffi.structural import structural_equal

from tasks.devices.profiles import get_device
from tasks.importers.bundled import mnist_cnn
from tasks.tuning.extract import extract_tasks, fuse_passes, prepare_for_tuning


def test_prepared_module_is_a_fusion_fixpoint():
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    module, example = mnist_cnn()
    mod = from_exported_program(torch.export.export(module, example), unwrap_unit_return_tuple=True)
    target = get_device("local").tvm_target()
    prepared = prepare_for_tuning(mod, target)
    with target:
        refused = tvm.transform.Sequential(fuse_passes(target))(prepared)
    assert structural_equal(prepared, refused)
    # and so every extracted workload is exactly a kernel the build will look up
    before = {t.name: t.mod_json for t in extract_tasks(prepared, target)}
    after = {t.name: t.mod_json for t in extract_tasks(refused, target)}
    assert before.keys() == after.keys() and len(before) >= 5
    for name in before:
        assert structural_equal(tvm.ir.load_json(before[name]), tvm.ir.load_json(after[name])), name
