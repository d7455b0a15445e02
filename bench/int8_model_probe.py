"""int8 ResNet-18 on the lent Xeon (AVX-512 VNNI, 16 cores): latency with the default float layers
(first conv, last dense) and with every layer int8, plus each tuned kernel's best time, to see
where the time goes (TVM 0.27's Relax VM has no per-op profiler). Same setup as
bench/on_device_cpu.py; usage: python3 bench/int8_model_probe.py TRIALS.
Results: bench/results/int8_resnet18_xeon.json."""

import json
import os
import sys
import tempfile

sys.path.insert(0, "bench")
from on_device_cpu import setup_lent_cpu  # noqa: E402

pb = setup_lent_cpu()
from pathlib import Path  # noqa: E402

import tvm  # noqa: E402

from tasks.importers.datasets import load_dataset
from tasks.precision.calibrate import calibrate
from tasks.precision.quantize import QuantConfig, quantize_model, weights_need_7_bits
from tasks.tuning.extract import prepare_for_tuning

trials = int(sys.argv[1])
target = tvm.target.Target(
    {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count()}
)
mod, specs, pt2 = pb["_import"]("tasks.importers.bundled:resnet18")
names = [s.name for s in specs]
photos = load_dataset("bundled:imagenet-photos", specs)
ranges = calibrate(mod, photos, "percentile")
out = {}
for label, keep in (("int8_default_keep", None), ("int8_all_layers", [])):
    qmod, plan = quantize_model(mod, ranges, QuantConfig(keep_float=keep, reduce_range=weights_need_7_bits(target)))
    prepared = prepare_for_tuning(qmod, target)
    ex, tune_s, db = pb["_tune_and_build"](prepared, target, trials, Path(tempfile.mkdtemp()))
    lat, _ = pb["_tvm_latency"](ex, photos.sample(0), names)
    top = sorted(pb["kernel_ms"](db, prepared, target).items(), key=lambda kv: -kv[1])
    print(label, "latency", lat, flush=True)
    out[label] = {
        "latency_ms": lat,
        "tuning_s": round(tune_s, 1),
        "trials": trials,
        "tuned_kernels_ms": top,
        "plan_kept_float": [k["name"] for k in plan.kept_float],
    }
    print(label, json.dumps(out[label], indent=0), flush=True)
Path(os.environ.get("OUT", ".")).joinpath("int8_profile.json").write_text(json.dumps(out, indent=1))
