"""The small records every importer shares: an input's name/shape/dtype and an imported model.

Also the input-shape rules (dynamic batch -> `batch`, other dynamic dims need --input) and the
one-line error that lists every problem of a model at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tasks.errors import TvmflowError


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple
    dtype: str = "float32"

    def __str__(self) -> str:
        return f"{self.name}:{'x'.join(map(str, self.shape))}:{self.dtype}"


@dataclass
class ImportedModel:
    mod: object  # tvm.IRModule, weights bound as constants
    inputs: list[InputSpec]
    framework: str  # "onnx" | "torch" | "torchscript" | "keras" | "mxnet" | "tflite"
    notes: list[str] = field(default_factory=list)  # one line each: what the importer changed (batch, folding)


def parse_input_spec(text: str) -> InputSpec:
    """`name:1x3x224x224:float32` (dtype optional)."""
    parts = text.split(":")
    try:
        name, shape = parts[0], tuple(int(d) for d in parts[1].lower().split("x"))
        dtype = parts[2] if len(parts) > 2 else "float32"
        if not name or len(parts) > 3 or any(d <= 0 for d in shape):
            raise ValueError
    except (IndexError, ValueError):
        raise TvmflowError(f"bad --input {text!r}: use name:shape:dtype, e.g. input:1x3x224x224:float32") from None
    return InputSpec(name, shape, dtype)


def _shown(dims) -> str:
    return "(" + ", ".join("?" if d < 0 else str(d) for d in dims) + ")"


@dataclass
class ResolvedInputs:
    specs: list[InputSpec]
    problems: list[str]  # each one clause of the final error
    notes: list[str]


def resolve_inputs(
    declared: list[InputSpec], overrides: list[InputSpec] | None = None, batch: int | None = None
) -> ResolvedInputs:
    """Static input specs from a model's declared ones (-1 = dynamic dim).

    --input wins; a dynamic first dim of a rank>=2 input is the batch: `batch` (default 1) with one
    notice; any other dynamic dim is a problem naming the --input to give. Problems are collected,
    not raised, so the caller can add its own (unsupported operators) to one error."""
    if batch is not None and batch <= 0:
        raise TvmflowError(f"--batch {batch}: give a positive batch size")
    given = {s.name: s for s in overrides or []}
    problems, specs, batched = [], [], []
    unknown = sorted(set(given) - {s.name for s in declared})
    if unknown:
        problems.append(
            f"--input names {unknown} are not inputs of the model (its inputs are {[s.name for s in declared]})"
        )
    for spec in declared:
        new = given.get(spec.name)
        if new:
            if len(new.shape) != len(spec.shape) or any(d not in (-1, g) for d, g in zip(spec.shape, new.shape)):
                problems.append(f"--input {new} does not fit input {spec.name!r} of shape {_shown(spec.shape)}")
            specs.append(new)
            continue
        dims = list(spec.shape)
        if len(dims) >= 2 and dims[0] < 0:
            dims[0] = batch or 1
            batched.append(spec.name)
        if any(d <= 0 for d in dims):
            example = "x".join(str(d) if d > 0 else "N" for d in dims)
            problems.append(
                f"input {spec.name!r} has dynamic dims {_shown(spec.shape)}: give them with "
                f"--input {spec.name}:{example}:{spec.dtype}"
            )
        specs.append(InputSpec(spec.name, tuple(dims), spec.dtype))
    notes = []
    if batched:
        first = next(s for s in specs if s.name == batched[0])
        example = f"--input {first.name}:{'x'.join(['N', *map(str, first.shape[1:])])}:{first.dtype}"
        notes.append(
            f"dynamic batch dimension of input(s) {', '.join(batched)} set to {batch or 1}"
            + ("" if batch else f" (for another batch: {example})")
        )
    elif batch is not None and batch != 1:
        notes.append(f"--batch {batch} ignored: the model has no dynamic batch dimension")
    return ResolvedInputs(specs, problems, notes)


def problems_error(problems: list[str]) -> TvmflowError:
    """One line that lists every problem, so the user fixes them all in one go."""
    if len(problems) == 1:
        return TvmflowError(f"cannot import the model: {problems[0]}")
    listed = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
    return TvmflowError(f"cannot import the model, {len(problems)} problems: {listed}")


def resolve_checked(
    specs: list[InputSpec], overrides: list[InputSpec] | None, batch: int | None = None
) -> ResolvedInputs:
    """resolve_inputs for importers with no problems of their own to add: one error with every problem."""
    resolved = resolve_inputs(specs, overrides, batch)
    if resolved.problems:
        raise problems_error(resolved.problems)
    return resolved


def check_overrides(
    specs: list[InputSpec], overrides: list[InputSpec] | None, batch: int | None = None
) -> list[InputSpec]:
    return resolve_checked(specs, overrides, batch).specs


def unsupported_operators_problem(names) -> str:
    return (
        f"unsupported operator(s): {', '.join(sorted(set(names)))} (replace them in the model or keep "
        "that part out of the exported graph)"
    )


def unsupported_error(err: Exception) -> TvmflowError | None:
    """The one-line error for a frontend's 'operator not supported' exception, None for any other."""
    text = str(err)
    match = re.search(r"operators are not supported for frontend ONNX: ([\w, ]+)", text) or re.search(
        r"Unsupported function types? \[([^\]]+)\]", text
    )
    if match:
        names = [n.strip().strip("'\"") for n in match.group(1).split(",") if n.strip()]
        return TvmflowError(unsupported_operators_problem(names))
    return None


def import_failed(source: str, err: Exception) -> TvmflowError:
    """The frontend's last error line, for failures that are not an unsupported operator."""
    return unsupported_error(err) or TvmflowError(f"{source} import failed: {str(err).strip().splitlines()[-1][:300]}")


@dataclass(frozen=True)
class Importer:
    """One model format: how to recognise it, import it, and run it in its own framework.

    detect(path) -> bool may raise a one-line TvmflowError for a file it recognises but cannot use
    (truncated, weights only); import_(path, overrides, batch) -> ImportedModel;
    reference(path, input_names) -> an object with run(sample) -> [np.ndarray] (and maybe
    latency_ms(sample)); export_onnx(path, out, input_names) -> Path for the onnxruntime baseline."""

    format: str
    framework: str
    description: str  # for the "supported:" list of errors
    detect: Callable[[Path], bool]
    import_: Callable[..., ImportedModel]
    reference: Callable[[Path, list], object]
    export_onnx: Callable[[Path, Path, list], Path] | None = None


class UnknownFormat(TvmflowError):
    """Raised by a detect() for bytes it can tell are no model; the registry adds the list of formats."""
