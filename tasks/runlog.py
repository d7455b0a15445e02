"""The logger a pipeline function writes to: Prefect's run logger inside a run, else `tvmflow`."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

log = logging.getLogger("tvmflow")


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run (shown in the UI), the module logger outside."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log


@contextmanager
def native_stderr_muted():
    """C++ log lines to fd 2 dropped for the block (Python exceptions still carry the errors): TVM
    0.27 warns once per VM constant it saves or loads ("Scope Saving" / "Scope Loaded"), thousands
    of lines for a model whose weights feed vendor kernels."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
