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
