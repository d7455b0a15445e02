"""Pick best per operator, across backends: the pipeline's pick-best step.

For every tunable operator (a convolution, a matmul, ...) the candidates are a vendor library
kernel (cuDNN / cuBLAS on CUDA, oneDNN / BLAS on CPU), the MetaSchedule-tuned TIR kernel and
the default schedule (DLight on GPUs, tasks.build.cpu_fallback on CPUs). Each is timed on the
device; the fastest that ran correctly is kept. The choices travel in the build report, so a
user sees per operator what every backend took and which one won.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Backends, by family. "tuned" and "default" are TVM's own kernels; the rest are extern calls.
TVM_BACKENDS = ("tuned", "default")
VENDOR_BACKENDS = ("cudnn", "cublas", "dnnl", "cblas")


@dataclass
class Candidate:
    """One way to run one operator, and what it measured on the device."""

    backend: str  # one of TVM_BACKENDS + VENDOR_BACKENDS
    ms: float | None = None  # median on the device; None when it did not build or run
    error: str | None = None  # why it has no time (build failure, wrong result, not available)
    detail: str | None = None  # which variant ran: cuDNN algorithm, DLight rule (others' times)

    @property
    def usable(self) -> bool:
        return self.ms is not None and self.error is None


@dataclass
class OperatorChoice:
    """All candidates of one operator and the chosen backend."""

    operator: str  # task / layer name, e.g. "fused_conv2d_add_relu"
    candidates: list[Candidate] = field(default_factory=list)
    chosen: str = "default"
    chosen_detail: str | None = None  # the chosen candidate's variant (e.g. DLight "Fallback")

    @property
    def chosen_ms(self) -> float | None:
        return next((c.ms for c in self.candidates if c.backend == self.chosen), None)

    def to_json(self) -> dict:
        return {
            "operator": self.operator,
            "chosen": self.chosen,
            "chosen_ms": self.chosen_ms,
            "chosen_detail": self.chosen_detail,
            "candidates": [asdict(c) for c in self.candidates],
        }

    @classmethod
    def from_json(cls, data: dict) -> OperatorChoice:
        return cls(
            data["operator"],
            [Candidate(**c) for c in data.get("candidates", [])],
            data.get("chosen", "default"),
            data.get("chosen_detail"),
        )


def choose(operator: str, candidates: list[Candidate], tie_margin: float = 0.02) -> OperatorChoice:
    """The fastest usable candidate. Within `tie_margin` of the fastest, TVM's own kernels win
    over an extern library (no extra runtime library to ship), and the tuned one over the default.
    With no usable candidate the default stays (it always builds)."""
    usable = [c for c in candidates if c.usable]
    if not usable:
        return OperatorChoice(operator, list(candidates), "default")
    best = min(c.ms for c in usable)  # type: ignore[type-var]
    close = [c for c in usable if c.ms <= best * (1 + tie_margin)]  # type: ignore[operator]
    order = {name: i for i, name in enumerate(("tuned", "default", *VENDOR_BACKENDS))}
    pick = min(close, key=lambda c: (order.get(c.backend, len(order)), c.ms))
    return OperatorChoice(operator, list(candidates), pick.backend, pick.detail)


def choices_table(choices: list[OperatorChoice]) -> str:
    """Markdown: one row per operator, one column per backend, the chosen time in bold."""
    backends = [
        b
        for b in ("tuned", "default", *VENDOR_BACKENDS)
        if any(c.backend == b for ch in choices for c in ch.candidates)
    ]
    lines = [
        "| operator | " + " | ".join(f"{b} ms" for b in backends) + " | chosen |",
        "|---|" + "---|" * len(backends) + "---|",
    ]
    for ch in choices:
        cells = []
        for b in backends:
            cand = next((c for c in ch.candidates if c.backend == b), None)
            text = "–" if cand is None else (f"{cand.ms:.4f}" if cand.usable else _why_not(cand))
            cells.append(f"**{text}**" if b == ch.chosen and cand is not None and cand.usable else text)
        lines.append(f"| {ch.operator} | " + " | ".join(cells) + f" | {ch.chosen} |")
    return "\n".join(lines) + "\n"


def _why_not(cand: Candidate) -> str:
    """A table cell for a candidate without a time: missing on purpose, or failed."""
    return (
        "no record"
        if cand.error == "no tuning record"
        else "not offloaded"
        if "not offloaded" in (cand.error or "")
        else "failed"
    )


def choices_summary(choices: list[OperatorChoice]) -> dict:
    """How many operators each backend won, and the summed chosen time (ms, per run of each once)."""
    won: dict[str, int] = {}
    for ch in choices:
        won[ch.chosen] = won.get(ch.chosen, 0) + 1
    return {
        "operators": len(choices),
        "won": won,
        "chosen_ms_total": round(sum(ch.chosen_ms or 0.0 for ch in choices), 4),
    }
