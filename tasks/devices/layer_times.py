"""Per-layer times of a built library: which kernels a run of the model spends its time in.

TVM 0.27's Relax VM has no profiler (no `profile=True`, no `tvm.runtime.profiling`). Its
instrument hook (`VirtualMachine.set_instrument`: called before and after every call the VM
makes) is what is left, and it takes a Python function, which cannot be passed to a VM on an
RPC server ("Cannot pass type ffi.Function as an argument to the remote"). So layers are timed
in this process, on this host, and only when the device IS this host's CPU (see `profiles_here`);
for any other device the report says they were not measured.

Times are wall-clock between the before- and after-hook of each kernel call (a few microseconds
of hook overhead included), the median over `repeats` runs of one sample after `warmup` runs.
A "layer" is one fused kernel as the VM calls it (e.g. `fused_conv2d_add_relu`); a kernel that
several layers share is one row with its calls summed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tasks.runlog import native_stderr_muted

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class LayerTime:
    """One kernel: its calls per run, its time per run (calls summed) and share of all kernels' time."""

    kernel: str
    calls: int
    ms: float  # per run, every call of the kernel summed; median over the repeats
    share: float  # of the sum over every kernel, 0..1
    shapes: list[str] = field(default_factory=list)  # argument shapes of its first call ("1x32x28x28 float32")

    @classmethod
    def from_json(cls, data: dict) -> LayerTime:
        return cls(**data)


@dataclass
class LayerProfile:
    """The per-layer table of one build on one device, slowest layer first."""

    layers: list[LayerTime]
    run_ms: float  # median time of a whole run under the hook (kernels + VM builtins + hook overhead)
    repeats: int
    where: str  # what it was measured on, e.g. "this host's CPU (local)"

    @property
    def kernels_ms(self) -> float:
        return sum(layer.ms for layer in self.layers)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> LayerProfile:
        return cls(
            [LayerTime.from_json(x) for x in data.get("layers") or []],
            float(data["run_ms"]),
            int(data["repeats"]),
            str(data.get("where", "")),
        )


def profiles_here(target: dict, tracker_host: str | None) -> bool:
    """True when the device is this host's CPU: an llvm target without a cross triple whose rpc
    servers register on a loopback tracker (the local workers tvmflow starts, or a test's)."""
    return target.get("kind") == "llvm" and "mtriple" not in target and tracker_host in LOOPBACK


def _shape(arg) -> str | None:
    shape = getattr(arg, "shape", None)
    return None if shape is None else f"{'x'.join(str(int(d)) for d in shape)} {arg.dtype}"


def profile_layers(
    lib_path: str | Path, sample: dict, input_names: list[str], where: str, repeats: int = 20, warmup: int = 2
) -> LayerProfile:
    """Run `sample` through the library `warmup + repeats` times on this host's CPU, timing every
    kernel call through the VM's instrument hook; builtins (`vm.builtin.*`: allocation, shape checks)
    are left out of the table but stay in `run_ms`."""
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    with native_stderr_muted():
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), dev)
    inputs = [tvm.runtime.tensor(np.ascontiguousarray(sample[n]), dev) for n in input_names]
    run: list[list] = []  # this run's calls: [name, start ns, elapsed ns, shapes]
    stack: list[list] = []

    def hook(func, name, before, ret, *args):
        now = time.perf_counter_ns()
        if str(name).startswith("vm."):
            return 0
        if before:
            stack.append([str(name), now, 0, [s for s in map(_shape, args) if s]])
        else:
            call = stack.pop()
            call[2] = now - call[1]
            run.append(call)
        return 0

    vm.set_instrument(hook)
    per_run: list[list] = []
    run_ns: list[int] = []
    for i in range(warmup + max(int(repeats), 1)):
        run.clear()
        vm.set_input("main", *inputs)
        started = time.perf_counter_ns()
        vm.invoke_stateful("main")
        elapsed = time.perf_counter_ns() - started
        if i >= warmup:
            per_run.append(list(run))
            run_ns.append(elapsed)
    return summarize(per_run, run_ns, where)


def summarize(per_run: list[list], run_ns: list[int], where: str) -> LayerProfile:
    """Median per call site over the runs, summed per kernel, slowest first."""
    sites = per_run[0]
    kernels: dict[str, LayerTime] = {}
    for index, (name, _, _, shapes) in enumerate(sites):
        ms = statistics.median(r[index][2] for r in per_run if len(r) > index) / 1e6
        row = kernels.setdefault(name, LayerTime(name, 0, 0.0, 0.0, shapes))
        row.calls += 1
        row.ms += ms
    total = sum(k.ms for k in kernels.values()) or 1.0
    rows = sorted(kernels.values(), key=lambda k: -k.ms)
    for row in rows:
        row.ms, row.share = round(row.ms, 4), round(row.ms / total, 4)
    return LayerProfile(rows, round(statistics.median(run_ns) / 1e6, 4), len(per_run), where)


def markdown(profile: LayerProfile, limit: int | None = None) -> str:
    """The table (the `limit` slowest layers, or all) with a line saying what was measured where."""
    shown = profile.layers[:limit] if limit else profile.layers
    lines = [
        f"Measured on {profile.where}: median of {profile.repeats} runs of one sample; a whole run "
        f"{profile.run_ms:.3f} ms, its {len(profile.layers)} kernels {profile.kernels_ms:.3f} ms "
        "(the rest: VM builtins and the timing hook).",
        "",
        "| # | kernel | calls | ms per run | share | argument shapes |",
        "|---:|---|---:|---:|---:|---|",
    ]
    lines += [
        f"| {i} | `{x.kernel}` | {x.calls} | {x.ms:.4f} | {100 * x.share:.1f} % | {', '.join(x.shapes)} |"
        for i, x in enumerate(shown, 1)
    ]
    if len(shown) < len(profile.layers):
        lines.append(f"| | ... {len(profile.layers) - len(shown)} more | | | | |")
    return "\n".join(lines) + "\n"
