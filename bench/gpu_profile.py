"""Per-kernel time of a TVM GPU build (Relax VM profiler): where the milliseconds go.

python3 bench/gpu_profile.py --model resnet18 --batch 16 --db /root/out/kept_db
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tvm  # noqa: E402
from tvm import relax  # noqa: E402

import bench.gpu_bench as gb  # noqa: E402 - imports tvm and the tensor intrinsics first


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", default="fp16")
    p.add_argument("--db", default=None)
    p.add_argument("--cache", default="/root/gpucache")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    target = tvm.target.Target(gb.gpu.cuda_target("sm_90"))
    database = gb.open_db(a.db) if a.db else None
    mod = gb.prepared(a.model, a.batch, a.precision, target, Path(a.cache))
    ex = gb.gpu.compile_prepared(mod, target, database)
    dev = tvm.cuda(0)
    vm = relax.VirtualMachine(ex, dev)
    x = tvm.runtime.tensor(gb.photo_batch(a.batch), dev)
    vm.set_input("main", x)
    for _ in range(5):
        vm.invoke_stateful("main")
    dev.sync()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            vm.invoke_stateful("main")
        dev.sync()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.top, max_name_column_width=70))


if __name__ == "__main__":
    main()
