"""The logger a pipeline function writes to: Prefect's run logger inside a run, else `tvmflow`."""

from __future__ import annotations

import logging

log = logging.getLogger("tvmflow")


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run (shown in the UI), the module logger outside."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log
