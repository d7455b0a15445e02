"""Validate a built library on the device through RPC: outputs against the source framework,
and latency from the device's own time evaluator."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tasks.errors import TvmflowError, Unreachable

log = logging.getLogger("tvmflow.validate")

# The gate, per precision. Rates (top-1/top-5 agreement, accuracy drop) are judged with the sample
# count in mind: k flips in n samples fail only when a binomial test says the true flip rate exceeds
# the allowed one (p-value below `significance`): one flip in 20 is not evidence against 99 %.
# max_rel_err: |tvm - ref| / max|ref| over every output (None: not judged).
THRESHOLDS: dict[str, dict[str, float | None]] = {
    "fp32": {"max_rel_err": 1e-3, "top1_agreement": 1.0, "top5_agreement": 1.0, "significance": 0.05},
    "fp16": {"max_rel_err": 2e-2, "top1_agreement": 0.99, "top5_agreement": 0.99, "significance": 0.05},
    "bf16": {"max_rel_err": 6e-2, "top1_agreement": 0.99, "top5_agreement": 0.99, "significance": 0.05},
    # int8 gate (issue 5): top-1 agreement with fp32 >= 99 %, accuracy drop <= 0.5 points with labels;
    # issue 16: a build at least as faithful as the framework's own int8 (onnxruntime QDQ) passes
    "int8": {
        "max_rel_err": None,
        "top1_agreement": 0.99,
        "top5_agreement": 0.99,
        "max_accuracy_drop": 0.005,
        "significance": 0.05,
    },
}
GATE_KEYS = ("max_rel_err", "top1_agreement", "top5_agreement", "max_accuracy_drop", "significance")


def gate_thresholds(precision: str, overrides: dict | None = None) -> dict:
    """The precision's default gate with the run's (or deployment's) overrides; unknown keys are an error."""
    if precision not in THRESHOLDS:
        raise TvmflowError(f"no gate for precision {precision!r}; known: {', '.join(THRESHOLDS)}")
    unknown = sorted(set(overrides or {}) - set(GATE_KEYS))
    if unknown:
        raise TvmflowError(f"unknown gate threshold(s) {unknown}; use {', '.join(GATE_KEYS)}")
    merged = dict(THRESHOLDS[precision])
    merged.update({k: (None if v is None else float(v)) for k, v in (overrides or {}).items()})
    return merged


def allowed_misses(n: int, rate: float, significance: float = 0.05) -> int:
    """The most misses (flips, lost correct answers) in n samples that are still consistent with a
    true miss rate of at most `rate`: the largest k with P[Binomial(n, rate) >= k] > significance,
    and never fewer than the plain rate allows (floor(n * rate))."""
    from math import comb

    if n <= 0 or rate <= 0:
        return 0
    k, tail = 0, 1.0  # tail = P[X >= k]
    while k < n:
        tail -= comb(n, k) * rate**k * (1 - rate) ** (n - k)
        if tail <= significance:
            break
        k += 1
    return max(k, int(n * rate + 1e-9))


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


def session_device(session, target_kind: str):
    """The device of the RPC session a build for `target_kind` runs on: its GPU for cuda, opencl,
    vulkan, rocm, metal and webgpu builds (validating an OpenCL build on the board's CPU would check
    nothing), its CPU for llvm / c."""
    if target_kind in ("llvm", "c"):
        return session.cpu(0)
    return session.device(target_kind, 0)


def run_on_device(
    lib_path: str | Path,
    tracker: tuple[str, int],
    key: str,
    samples: list[dict],
    input_names: list[str],
    target_kind: str = "llvm",
    repeat: int = 30,
    timeout: float = 600,
) -> DeviceRun:
    """Upload the library to a worker with `key`, run every sample, then time one of them."""
    import tvm
    from tvm import relax, rpc

    try:
        session = rpc.connect_tracker(*tracker).request(key, priority=1, session_timeout=int(timeout))
    except Exception as err:  # noqa: BLE001
        raise Unreachable(
            f"cannot get a device worker {key!r} from tracker {tracker[0]}:{tracker[1]} "
            f"({str(err).splitlines()[0] if str(err) else err.__class__.__name__}); is one registered?"
        ) from None
    lib_path = Path(lib_path)
    session.upload(str(lib_path))
    dev = session_device(session, target_kind)
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
    passed: bool | None  # None: not run (a build-only build)
    precision: str
    samples: int
    max_abs_err: float
    max_rel_err: float
    top1_agreement: float | None
    thresholds: dict
    accuracy: float | None = None
    reference_accuracy: float | None = None
    reason: str = ""
    # issue 16: top-5, the framework's own int8 beside ours, and the first images' top-5 with names
    top5_agreement: float | None = None  # the framework's top-1 class is in the build's top-5
    top5_accuracy: float | None = None
    reference_top5_accuracy: float | None = None
    flips: int | None = None  # samples whose top-1 differs from the framework's
    allowed_flips: int | None = None  # what the gate allows for this sample count
    baseline: dict | None = None  # e.g. onnxruntime int8 (QDQ) on the same samples
    examples: list = field(default_factory=list)  # [{file, label, framework: [[class, name, score]], device: [...]}]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def not_run(cls, precision: str, reason: str) -> Validation:
        """The validation of a build that was never run on a device (build-only)."""
        return cls(None, precision, 0, 0.0, 0.0, None, {}, reason=reason)


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


@dataclass
class _Agreement:
    """Classifier agreement of some outputs with the framework's, and accuracy against labels."""

    count: int = 0
    top1: int = 0
    top5: int = 0
    correct: int = 0
    correct5: int = 0
    ref_correct: int = 0
    ref_correct5: int = 0

    def add(self, got: np.ndarray, want: np.ndarray, label) -> None:
        k = min(5, want.shape[-1])
        top_got, top_want = got.argmax(-1), want.argmax(-1)
        got5 = np.argsort(-got, -1)[..., :k]
        want5 = np.argsort(-want, -1)[..., :k]
        self.count += top_want.size
        self.top1 += int(np.sum(top_got == top_want))
        self.top5 += int(np.sum(np.any(got5 == top_want[..., None], -1)))
        if label is not None:
            label = np.asarray(label).reshape(top_got.shape)
            self.correct += int(np.sum(top_got == label))
            self.ref_correct += int(np.sum(top_want == label))
            self.correct5 += int(np.sum(np.any(got5 == label[..., None], -1)))
            self.ref_correct5 += int(np.sum(np.any(want5 == label[..., None], -1)))


def _is_scores(arr: np.ndarray) -> bool:
    return arr.ndim == 2 and arr.shape[-1] > 1


def _top5(scores: np.ndarray, names: list[str] | None) -> list:
    """[[class, name, softmax probability]] of the first row, best first."""
    row = np.asarray(scores, "float64").reshape(-1, scores.shape[-1])[0]
    prob = np.exp(row - row.max())
    prob /= prob.sum()
    return [
        [int(c), names[c] if names and c < len(names) else str(int(c)), round(float(prob[c]), 4)]
        for c in np.argsort(-row)[:5]
    ]


def compare(
    tvm_outputs: list,
    ref_outputs: list,
    precision: str = "fp32",
    labels=None,
    *,
    thresholds: dict | None = None,
    baseline_outputs: list | None = None,
    baseline_name: str = "onnxruntime int8 (QDQ)",
    class_names: list[str] | None = None,
    files: list[str] | None = None,
    examples: int = 5,
) -> Validation:
    """Max abs/rel error over every output; top-1/top-5 agreement (and accuracy with labels) where
    outputs are class scores; the gate of `precision` with the run's `thresholds` overrides.

    `baseline_outputs` (per sample, like tvm_outputs): the framework's own quantized model on the
    same samples; a rate criterion that the build meets at least as well as the baseline passes.
    `class_names`/`files` name the first `examples` samples' top-5 rows."""
    gate = gate_thresholds(precision, thresholds)
    max_abs, max_rel = 0.0, 0.0
    ours, theirs = _Agreement(), _Agreement()
    rows: list[dict] = []
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
        first_got, first_want = np.asarray(got[0], "float64"), np.asarray(want[0], "float64")
        if not _is_scores(first_want):
            continue
        label = labels[i] if labels is not None else None
        ours.add(first_got, first_want, label)
        if baseline_outputs is not None:
            theirs.add(np.asarray(baseline_outputs[i][0], "float64"), first_want, label)
        if len(rows) < examples:
            rows.append(
                {
                    "file": files[i] if files and i < len(files) else f"sample {i}",
                    "label": None if label is None else int(np.asarray(label).reshape(-1)[0]),
                    "framework": _top5(first_want, class_names),
                    "device": _top5(first_got, class_names),
                }
            )
    n = ours.count
    labelled = labels is not None and n > 0
    rate = lambda part, whole: part / whole if whole else None
    baseline = None
    if baseline_outputs is not None and theirs.count:
        baseline = {
            "name": baseline_name,
            "top1_agreement": rate(theirs.top1, n),
            "top5_agreement": rate(theirs.top5, n),
            "accuracy": rate(theirs.correct, n) if labelled else None,
        }
    reasons, allowed = [], None
    significance = gate.get("significance") or 0.05
    if gate["max_rel_err"] is not None and max_rel > gate["max_rel_err"]:
        reasons.append(f"max relative error {max_rel:.2e} > {gate['max_rel_err']:.0e}")
    for key, label_text, hits, base_hits in (
        ("top1_agreement", "top-1 agreement", ours.top1, theirs.top1),
        ("top5_agreement", "top-5 agreement", ours.top5, theirs.top5),
    ):
        if not n or gate.get(key) is None:
            continue
        ok = allowed_misses(n, 1 - gate[key], significance)
        if key == "top1_agreement":
            allowed = ok
        if n - hits > ok:
            if baseline and hits >= base_hits:
                continue  # at least as faithful as the framework's own int8 on these samples
            reasons.append(
                f"{label_text} {hits / n:.3f} < {gate[key]} ({n - hits} of {n} differ, {ok} allowed"
                + (f"; {baseline_name}: {n - base_hits}" if baseline else "")
                + ")"
            )
    drop_limit = gate.get("max_accuracy_drop")
    if drop_limit is not None and labelled:
        lost, ok = ours.ref_correct - ours.correct, allowed_misses(n, drop_limit, significance)
        base_lost = theirs.ref_correct - theirs.correct
        if lost > ok and not (baseline and lost <= base_lost):
            reasons.append(
                f"accuracy drop {100 * lost / n:.2f} points > {100 * drop_limit:.1f} ({lost} of {n} lost, {ok} allowed)"
            )
    return Validation(
        passed=not reasons,
        precision=precision,
        samples=len(tvm_outputs),
        max_abs_err=max_abs,
        max_rel_err=max_rel,
        top1_agreement=rate(ours.top1, n),
        thresholds=gate,
        accuracy=rate(ours.correct, n) if labelled else None,
        reference_accuracy=rate(ours.ref_correct, n) if labelled else None,
        reason="; ".join(reasons),
        top5_agreement=rate(ours.top5, n),
        top5_accuracy=rate(ours.correct5, n) if labelled else None,
        reference_top5_accuracy=rate(ours.ref_correct5, n) if labelled else None,
        flips=n - ours.top1 if n else None,
        allowed_flips=allowed,
        baseline=baseline,
        examples=rows,
    )


def onnxruntime_int8_outputs(onnx_fp32, calibration, samples: list[dict], input_names: list[str], work_dir) -> list:
    """Outputs of onnxruntime's own int8 (quantize_static, QDQ, calibrated on `calibration`, the same
    samples tvmflow calibrates on) for `samples`: the baseline_outputs of compare() for ONNX models."""
    import onnxruntime as ort

    from tasks.precision.qdq import quantize_static_qdq

    out = quantize_static_qdq(onnx_fp32, calibration, Path(work_dir) / "onnxruntime-int8.onnx")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [
        [np.asarray(o) for o in session.run(None, {o: np.ascontiguousarray(s[n]) for o, n in zip(names, input_names)})]
        for s in samples
    ]
