"""Task extraction and trial allocation by weighted FLOPs."""

from __future__ import annotations

import random

import pytest

from tasks.tuning.extract import TuningTask, allocate_trials, extract_tasks, prepare_for_tuning


def _tasks(spec):
    return [TuningTask(f"t{i}", weight, flops, "") for i, (weight, flops) in enumerate(spec)]


@pytest.mark.parametrize("total", [0, 16, 32, 48, 100, 200, 1000])
@pytest.mark.parametrize("seed", range(5))
def test_budget_respected_in_whole_rounds(total, seed):
    rng = random.Random(seed)
    tasks = _tasks([(rng.randint(1, 4), rng.choice([1e3, 1e5, 1e6, 5e6, 2e7, 1e8])) for _ in range(rng.randint(1, 12))])
    allocate_trials(tasks, total, per_iter=16)
    spent = sum(t.trials for t in tasks)
    assert spent <= total
    assert all(t.trials % 16 == 0 and t.trials >= 0 for t in tasks)
    if total >= 16:
        assert spent > 0 and total - spent < 16, "a whole round of budget was left unused"


def test_budget_under_one_round_is_not_exceeded():
    tasks = _tasks([(1, 1e8), (1, 5e7)])
    allocate_trials(tasks, 8, per_iter=16)
    assert [t.trials for t in tasks] == [8, 0]


def test_tiny_tasks_get_nothing_heavy_ones_more():
    heavy, medium, reshape = _tasks([(1, 1e8), (2, 1e7), (1, 10.0)])
    allocate_trials([heavy, medium, reshape], 320)
    assert reshape.trials == 0
    assert heavy.trials > medium.trials > 0
    assert heavy.trials + medium.trials == 320


def test_small_but_real_kernels_get_a_round_when_the_budget_allows():
    # ResNet-18's shape: 8 big 3x3 convs and three 1x1 downsample convs at 0.36 % of FLOPs each,
    # whose default (untuned) kernels cost ~50 ms each; a reshape still gets nothing
    big = _tasks([(2, 3.5e8)] * 8)
    downsample = [TuningTask(f"ds{i}", 1, 1.3e7, "") for i in range(3)]
    reshape = TuningTask("reshape", 1, 10.0, "")
    allocate_trials([*big, *downsample, reshape], 320)
    assert all(t.trials >= 16 for t in downsample)
    assert reshape.trials == 0
    assert sum(t.trials for t in [*big, *downsample]) == 320


def test_weight_counts_as_much_as_flops():
    once, thrice = _tasks([(1, 3e7), (3, 1e7)])
    allocate_trials([once, thrice], 160)
    assert once.trials == thrice.trials == 80


def test_small_budget_goes_to_the_heaviest_tasks():
    tasks = _tasks([(1, 5e7), (1, 4e7), (1, 3e7), (1, 2e7)])
    allocate_trials(tasks, 32)
    assert [t.trials for t in tasks] == [16, 16, 0, 0]


def test_no_flops_no_trials():
    tasks = _tasks([(1, 0.0), (2, 0.0)])
    allocate_trials(tasks, 64)
    assert [t.trials for t in tasks] == [0, 0]


def test_reallocation_resets_earlier_trials():
    tasks = _tasks([(1, 1e8), (1, 1e7)])
    allocate_trials(tasks, 320)
    allocate_trials(tasks, 0)
    assert [t.trials for t in tasks] == [0, 0]


def test_extract_mnist_tasks(mnist_pt2):
    import tvm

    from tasks.devices.profiles import get_device
    from tasks.importers.model_import import import_pt2

    target = get_device("local").tvm_target()
    prepared = prepare_for_tuning(import_pt2(mnist_pt2).mod, target)
    tasks = extract_tasks(prepared, target)
    assert len(tasks) >= 3
    assert [t.weighted_flops for t in tasks] == sorted((t.weighted_flops for t in tasks), reverse=True)
    assert any("conv2d" in t.name for t in tasks)
    assert tasks[0].flops > 1e5
    assert isinstance(tvm.ir.load_json(tasks[0].mod_json), tvm.IRModule)
    allocate_trials(tasks, 32)
    assert sum(t.trials for t in tasks) == 32
    assert tasks[0].trials >= 16


class _ConvBnNet:
    """conv+BN+ReLU, a residual add, a depthwise conv+BN+ReLU6 and a dense layer: the shapes
    BN folding and the NHWC conversion have to keep exact (random BN statistics, eval mode)."""

    @staticmethod
    def make():
        import torch
        from torch import nn

        torch.manual_seed(0)

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
                self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
                self.dw, self.b3 = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
                self.fc = nn.Linear(16, 10)

            def forward(self, x):
                y = torch.relu(self.b1(self.c1(x)))
                y = torch.relu(self.b2(self.c2(y)) + y)
                y = torch.clamp(self.b3(self.dw(y)), 0, 6)
                return self.fc(y.mean((2, 3)))

        net = Net().eval()
        for bn in (net.b1, net.b2, net.b3):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)
        return net, torch.randn(1, 3, 16, 16)


@pytest.fixture(scope="module")
def conv_bn():
    """(Relax module, input, torch output) of _ConvBnNet."""
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    net, x = _ConvBnNet.make()
    with torch.no_grad():
        ref = net(x).numpy()
    mod = from_exported_program(torch.export.export(net, (x,)), unwrap_unit_return_tuple=True)
    return mod, x.numpy(), ref


def _run(prepared, x):
    import tvm
    from tvm import relax

    from tasks.build.compile import compile_module
    from tasks.devices.profiles import get_device

    vm = relax.VirtualMachine(compile_module(prepared, get_device("local"), None), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    return (out if hasattr(out, "numpy") else out[0]).numpy()


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_bn_folding_and_layout_keep_torch_outputs(conv_bn, layout):
    import numpy as np
    import tvm

    from tasks.devices.profiles import get_device

    mod, x, ref = conv_bn
    target = get_device("local").tvm_target()
    from tasks.tuning.extract import fold_batchnorm

    assert "batch_norm" in mod.script() and "batch_norm" not in fold_batchnorm(mod).script(), "BN survived"
    folded = prepare_for_tuning(mod, target, layout=layout)
    if layout == "NHWC":
        assert (
            'data_layout="NHWC"'
            in tvm.relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})(mod).script()
        )
    np.testing.assert_allclose(_run(folded, x), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        _run(prepare_for_tuning(mod, target, fold_bn=False, layout=layout), x), ref, rtol=1e-4, atol=1e-4
    )


def test_unknown_layout_is_one_line_error(conv_bn):
    from tasks.devices.profiles import get_device
    from tasks.errors import TvmflowError

    with pytest.raises(TvmflowError, match="layout"):
        prepare_for_tuning(conv_bn[0], get_device("local").tvm_target(), layout="NCHW8c")
