"""Run bench/precision_bench.py on the lent GPU machine's CPU (Intel Xeon, AVX-512 VNNI, 16 cores;
the CPU the int8 issue asks for; this VM has AVX2 only).

There: no skimage, so the bundled photos come from a carried .npy (PHOTOS_NPY, made here with
tasks.datasets._imagenet_photos); MetaSchedule builds on all cores (the bench's 1 builder suits
the shared 2-core VM). Install TVM there first (bench/gpu_device.sh, see ../shared/gpu-device.md):
    bash bench/gpu_device.sh; PYTHONPATH=/root/site:$PWD TVM_NUM_THREADS=16 \
        python3 bench/on_device_cpu.py models --models resnet18 --trials 64
Results: bench/results/precision_vnni_xeon.json."""
import os, sys
sys.path.insert(0, ".")
import numpy as np
import tasks.datasets as datasets
datasets._imagenet_photos = lambda size=224: np.load(os.environ.get("PHOTOS_NPY", ".scratch/photos.npy"))
from tvm.s_tir import meta_schedule as ms
_LB = ms.builder.LocalBuilder
class ManyBuilders(_LB):
    def __init__(self, *a, **k):
        k["max_workers"] = os.cpu_count()
        super().__init__(*a, **k)
ms.builder.LocalBuilder = ManyBuilders
sys.argv = ["precision_bench.py", *sys.argv[1:]]
import runpy
runpy.run_path("bench/precision_bench.py", run_name="__main__")
