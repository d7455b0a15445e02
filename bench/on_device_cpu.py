"""Run bench/precision_bench.py on the lent GPU machine's CPU (Intel Xeon, AVX-512 VNNI, 16 cores;
the CPU the int8 issue asks for; this VM has AVX2 only).

There: no skimage, so the bundled photos come from a carried .npy (PHOTOS_NPY, made here with
tasks.importers.datasets._imagenet_photos); MetaSchedule builds on all cores (the bench's 1 builder suits
the shared 2-core VM). Install TVM there first (bench/gpu_device.sh, see ../shared/gpu-device.md):
    bash bench/gpu_device.sh; PYTHONPATH=/root/site:$PWD TVM_NUM_THREADS=16 \
        python3 bench/on_device_cpu.py models --models resnet18 --trials 64
Results: bench/results/precision_vnni_xeon.json."""

import os
import runpy
import sys

sys.path.insert(0, ".")


def setup_lent_cpu() -> dict:
    """Photos from PHOTOS_NPY, MetaSchedule builders on every core; precision_bench's functions."""
    import numpy as np
    from tvm.s_tir import meta_schedule as ms

    import tasks.importers.datasets as datasets

    datasets._imagenet_photos = lambda size=224: np.load(os.environ.get("PHOTOS_NPY", ".scratch/photos.npy"))
    base = ms.builder.LocalBuilder

    class AllCoresBuilder(base):
        def __init__(self, *args, **kwargs):
            kwargs["max_workers"] = os.cpu_count()
            super().__init__(*args, **kwargs)

    ms.builder.LocalBuilder = AllCoresBuilder
    return runpy.run_path("bench/precision_bench.py")


if __name__ == "__main__":
    setup_lent_cpu()
    sys.argv = ["precision_bench.py", *sys.argv[1:]]
    runpy.run_path("bench/precision_bench.py", run_name="__main__")
