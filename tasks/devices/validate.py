"""Validate a built library on the device through RPC: outputs against the source framework,
and latency from the device's own time evaluator."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tasks.errors import TvmflowError

log = logging.getLogger("tvmflow.validate")

# max relative error (|tvm - ref| / max|ref|) and top-1 agreement, per precision
THRESHOLDS = {
    "fp32": {"max_rel_err": 1e-3, "top1_agreement": 1.0},
    "fp16": {"max_rel_err": 2e-2, "top1_agreement": 0.99},
    "bf16": {"max_rel_err": 6e-2, "top1_agreement": 0.99},
    # int8 gate (issue 5): top-1 agreement with fp32 >= 99 %, accuracy drop <= 0.5 points with labels
    "int8": {"max_rel_err": None, "top1_agreement": 0.99, "max_accuracy_drop": 0.005},
}


@dataclass
class DeviceRun:
    outputs: list  # per sample: list of np.ndarray
    latencies_ms: list = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return float(np.median(self.latencies_ms))

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 90))


def _device(session, target_kind: str):
    return session.cuda(0) if target_kind == "cuda" else session.cpu(0)


def run_on_device(lib_path: str | Path, tracker: tuple[str, int], key: str, samples: list[dict],
                  input_names: list[str], target_kind: str = "llvm", repeat: int = 30,
                  timeout: float = 600) -> DeviceRun:
    """Upload the library to a worker with `key`, run every sample, then time one of them."""
    import tvm
    from tvm import relax, rpc

    try:
        session = rpc.connect_tracker(*tracker).request(key, priority=1, session_timeout=int(timeout))
    except Exception as err:  # noqa: BLE001
        raise TvmflowError(f"cannot get a device worker {key!r} from tracker {tracker[0]}:{tracker[1]} "
                           f"({str(err).splitlines()[0] if str(err) else err.__class__.__name__}); is one registered?") from None
    lib_path = Path(lib_path)
    session.upload(str(lib_path))
    dev = _device(session, target_kind)
    vm = relax.VirtualMachine(session.load_module(lib_path.name), dev)
    outputs = []
    for sample in samples:
        vm.set_input("main", *[tvm.runtime.tensor(np.ascontiguousarray(sample[n]), dev) for n in input_names])
        vm.invoke_stateful("main")
        result = vm.get_outputs("main")
        items = [result] if hasattr(result, "numpy") else [result[i] for i in range(len(result))]
        outputs.append([item.numpy() for item in items])
    timer = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=repeat, min_repeat_ms=0)
    latencies = [r * 1000 for r in timer("main").results]
    return DeviceRun(outputs, latencies)


@dataclass
class Validation:
    passed: bool
    precision: str
    samples: int
    max_abs_err: float
    max_rel_err: float
    top1_agreement: float | None
    thresholds: dict
    accuracy: float | None = None
    reference_accuracy: float | None = None
    reason: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def _max_diff(got: np.ndarray, want: np.ndarray) -> float:
    """Max |got - want|; inf where the build gives NaN/inf and the reference does not
    (a plain np.max would be NaN, and max(err, NaN) silently keeps the old err)."""
    if not got.size:
        return 0.0
    if np.any(~np.isfinite(got) & np.isfinite(want)):
        return float("inf")
    diff = np.abs(got - want)
    diff = diff[np.isfinite(diff)]  # the same NaN/inf in both outputs agrees
    return float(diff.max()) if diff.size else 0.0


def compare(tvm_outputs: list, ref_outputs: list, precision: str = "fp32", labels=None) -> Validation:
    """Max abs/rel error over every output, and top-1 agreement where outputs are class scores."""
    thresholds = THRESHOLDS[precision]
    max_abs, max_rel, agree, count, correct, ref_correct = 0.0, 0.0, 0, 0, 0, 0
    for i, (got, want) in enumerate(zip(tvm_outputs, ref_outputs)):
        if len(got) != len(want):
            raise TvmflowError(f"the build returns {len(got)} outputs but the reference returns {len(want)}")
        for g, w in zip(got, want):
            g, w = np.asarray(g, dtype="float64"), np.asarray(w, dtype="float64")
            if g.shape != w.shape:
                raise TvmflowError(f"output shape {g.shape} differs from the reference's {w.shape}")
            diff = _max_diff(g, w)
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / max(float(np.max(np.abs(w))) if w.size else 0.0, 1e-12))
        first_got, first_want = np.asarray(got[0]), np.asarray(want[0])
        if first_want.ndim == 2 and first_want.shape[-1] > 1:
            top_got, top_want = first_got.argmax(-1), first_want.argmax(-1)
            agree += int(np.sum(top_got == top_want))
            count += top_want.size
            if labels is not None:
                correct += int(np.sum(top_got == labels[i]))
                ref_correct += int(np.sum(top_want == labels[i]))
    top1 = agree / count if count else None
    reasons = []
    if thresholds["max_rel_err"] is not None and max_rel > thresholds["max_rel_err"]:
        reasons.append(f"max relative error {max_rel:.2e} > {thresholds['max_rel_err']:.0e}")
    if top1 is not None and top1 < thresholds["top1_agreement"]:
        reasons.append(f"top-1 agreement {top1:.3f} < {thresholds['top1_agreement']}")
    drop_limit = thresholds.get("max_accuracy_drop")
    if drop_limit is not None and labels is not None and count and (ref_correct - correct) / count > drop_limit:
        reasons.append(f"accuracy drop {100 * (ref_correct - correct) / count:.2f} points > {100 * drop_limit:.1f}")
    labelled = labels is not None and count
    return Validation(
        passed=not reasons, precision=precision, samples=len(tvm_outputs), max_abs_err=max_abs,
        max_rel_err=max_rel, top1_agreement=top1, thresholds=thresholds,
        accuracy=correct / count if labelled else None,
        reference_accuracy=ref_correct / count if labelled else None, reason="; ".join(reasons))
