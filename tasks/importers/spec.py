"""What the user wrote in --model: a file/URI or a `package.module:callable` factory."""

from __future__ import annotations

import re
from pathlib import Path

FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_factory(spec: str) -> bool:
    return bool(FACTORY_RE.match(spec)) and not Path(spec).exists()


def model_name(spec: str) -> str:
    """A readable model name: the factory's callable, or the (first) file's stem."""
    if is_factory(spec):
        return spec.split(":")[1]
    if "+" in spec and not Path(spec).exists():
        spec = spec.split("+")[0]
    stem = re.sub(r"-symbol$", "", Path(spec.rstrip("/").split("/")[-1]).stem)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or "model"
