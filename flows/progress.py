"""The terminal of `tvmflow compile` / `retune`: quiet, with a live progress line and a summary.

- Prefect's own console lines (temporary server, flow run states, task tracebacks) and Python
  warnings of the libraries are taken off
  the terminal unless --debug: the console handlers go, the API handlers stay, so the run's logs
  are still in the Prefect API and UI; what would have been printed goes to
  $TVMFLOW_HOME/logs/cli.log instead.
- `Display` listens to tasks.progress records and keeps one live rich line on stderr: stage,
  task i/N, trials/budget, best latency, ETA. On close it prints a summary table (stages with
  their time, tuned tasks with trials and best latency), then the caller prints the result or
  the `error:` line, which is therefore the last line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from tasks import progress

LOG_FILE = Path(os.environ.get("TVMFLOW_HOME", Path.home() / ".tvmflow")) / "logs" / "cli.log"


def quiet_prefect_console(log_file: Path | None = LOG_FILE) -> list[logging.Handler]:
    """Replace every console (stderr/stdout) handler Prefect configured with one file handler.
    Returns the removed handlers. Prefect configures logging on first import of prefect.main."""
    import prefect.main  # noqa: F401 - runs prefect.logging.configuration.setup_logging()

    logging.captureWarnings(True)  # library FutureWarnings etc. go to the log file, not the terminal
    removed: list[logging.Handler] = []
    sink: logging.Handler | None = None
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            sink = logging.FileHandler(log_file, encoding="utf-8")
            sink.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
        except OSError:
            sink = None
    names = ["", *logging.root.manager.loggerDict]
    for name in names:
        logger = logging.getLogger(name)
        if isinstance(logger, logging.PlaceHolder):  # pragma: no cover - getLogger never returns one
            continue
        for handler in list(logger.handlers):
            stream = getattr(handler, "stream", None)
            console = type(handler).__name__ in ("PrefectConsoleHandler", "_SafeStreamHandler") or stream in (
                sys.stderr,
                sys.stdout,
                sys.__stderr__,
                sys.__stdout__,
            )
            if console and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
                removed.append(handler)
                if sink is not None and sink not in logger.handlers and (name == "" or not logger.propagate):
                    logger.addHandler(sink)
    return removed


def _eta(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class Display(logging.Handler):
    """A logging.Handler on the `tvmflow.progress` logger that renders a live line with rich."""

    def __init__(self, stream=None, live: bool | None = None):
        super().__init__(logging.INFO)
        from rich.console import Console

        self.console = Console(file=stream or sys.stderr, highlight=False)
        self.live_enabled = self.console.is_terminal if live is None else live
        self.started = time.monotonic()
        self.fields: dict = {}
        self.stages: dict[str, list[float]] = {}  # stage -> [first seen, last seen] (monotonic)
        self.tasks: dict[str, dict] = {}  # task name -> {"trials", "best_ms"}
        self.tune_start: float | None = None
        self.tune_trials0 = 0
        self._last_trials = 0
        self._live: Any = None  # rich.live.Live while shown

    # logging.Handler
    def emit(self, record: logging.LogRecord) -> None:
        payload = getattr(record, "tvmflow_progress", None)
        if not payload:
            return
        try:
            self.feed(payload)
        except Exception:  # noqa: BLE001 - the display must never break a run
            self.handleError(record)

    def feed(self, payload: dict) -> None:
        now = time.monotonic()
        stage = payload.get("stage") or self.fields.get("stage")
        if stage != self.fields.get("stage"):
            self.fields = {k: v for k, v in self.fields.items() if k in ("model", "device")}
        self.fields.update(payload)
        self.stages.setdefault(str(stage), [now, now])[1] = now
        if payload.get("budget"):
            if self.tune_start is None:
                self.tune_start, self.tune_trials0 = now, int(payload.get("trials") or 0)
            if payload.get("name"):
                row = self.tasks.setdefault(payload["name"], {"trials": 0, "best_ms": None})
                own = payload.get("task_trials")
                if own is None:  # the task's share: the run's trials since the last report
                    own = int(payload.get("trials") or 0) - self._last_trials
                row["trials"] = max(row["trials"], int(own))
                if payload.get("task_best_ms") is not None:
                    row["best_ms"] = payload["task_best_ms"]
            self._last_trials = int(payload.get("trials") or 0)
        if self._live is not None:
            self._live.update(self.render())

    def eta_seconds(self) -> float | None:
        f, now = self.fields, time.monotonic()
        if not f.get("budget") or self.tune_start is None:
            return None
        done = int(f.get("trials") or 0) - self.tune_trials0
        if done <= 0:
            return None
        return (now - self.tune_start) / done * max(int(f["budget"]) - int(f.get("trials") or 0), 0)

    def line(self) -> str:
        f = self.fields
        text = progress.describe(f) or "starting"
        who = "/".join(str(f[k]) for k in ("model", "device") if f.get(k))
        eta = self.eta_seconds()
        return (
            (f"{who}: " if who else "")
            + text
            + (f", ETA {_eta(eta)}" if eta is not None else "")
            + f"  [{_eta(time.monotonic() - self.started)} elapsed]"
        )

    def render(self):
        from rich.text import Text

        share = progress.fraction(self.fields)
        bar = ""
        if share is not None:
            filled = round(share * 20)
            bar = "[" + "#" * filled + "." * (20 - filled) + f"] {share * 100:3.0f}%  "
        return Text(bar + self.line())

    def start(self) -> Display:
        progress.log.addHandler(self)
        if self.live_enabled:
            from rich.live import Live

            self._live = Live(self.render(), console=self.console, refresh_per_second=4, transient=True)
            self._live.start()
        return self

    def stop(self, summary: bool = True) -> None:
        progress.log.removeHandler(self)
        if self._live is not None:
            self._live.stop()
            self._live = None
        if summary and self.stages:
            self.console.print(self.summary())

    def summary(self):
        """Stages with their wall time, then the tuned tasks (trials, best latency)."""
        from rich.table import Table

        table = Table(title="tvmflow run", title_justify="left", show_edge=False, pad_edge=False)
        table.add_column("stage")
        table.add_column("seconds", justify="right")
        table.add_column("detail")
        order = sorted(self.stages.items(), key=lambda kv: kv[1][0])
        for i, (stage, (first, _)) in enumerate(order):
            end = order[i + 1][1][0] if i + 1 < len(order) else time.monotonic()
            detail = ""
            if stage == self.fields.get("stage"):
                detail = progress.describe(self.fields).partition(", ")[2]
            table.add_row(str(stage), f"{end - first:.1f}", detail)
        if self.tasks:
            table.add_section()
            for name, row in self.tasks.items():
                best = f"best {row['best_ms']:.4f} ms" if row["best_ms"] is not None else "no valid trial"
                table.add_row(f"  {name}", "", f"{row['trials']} trials, {best}")
        return table


@contextlib.contextmanager
def terminal(debug: bool = False, quiet: bool = False):
    """Around a command: Prefect's console lines off (unless debug), a live display on stderr
    (unless quiet), its summary table at the end (not with quiet or when it failed)."""
    if not debug:
        quiet_prefect_console()
        # worker processes (rpc servers, Dask, export) print library deprecation warnings themselves
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    display = None if quiet else Display().start()
    ok = False
    try:
        yield display
        ok = True
    finally:
        if display is not None:
            display.stop(summary=ok)
