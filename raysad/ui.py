"""What raysad prints: one rich Console factory, and progress that also shows in logs.

When stdout is not a terminal (a log file, CI, `| tee`, a Ray job), rich would wrap every line at 80 columns
(paths broken in two, table headers cut to "meth…") and draw a progress bar only when it ends. Here lines are
not wrapped, tables get 160 columns, and `Progress` prints a plain line every `LOG_EVERY_S` seconds instead.
"""
from __future__ import annotations

import os
import sys
import time

LOG_EVERY_S = 30.0   # seconds between progress lines when the output is not a terminal
LOG_WIDTH = 160      # table width when the output is not a terminal ($COLUMNS wins when set)


class StageIncomplete(RuntimeError):
    """A stage that ran to its end but did less than it was asked (episodes given up): the CLI prints the
    message as one line and exits 1, after the stage's own summary."""


def console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if getattr(stream, "isatty", lambda: False)():
        return Console(stderr=stderr)
    width = int(os.environ.get("COLUMNS") or 0) or LOG_WIDTH
    return Console(stderr=stderr, width=width, soft_wrap=True)


class Progress:
    """A rich progress bar on a terminal; elsewhere a line `<name> done/total  <fields>  <elapsed>` every
    LOG_EVERY_S seconds and at the end. `update(advance, **fields)` (fields: short strings, e.g. success)."""

    def __init__(self, name: str, total: int, enabled: bool = True, fields: tuple[str, ...] = ()):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self.name, self.total, self.enabled, self.fields = name, total, enabled, fields
        self.console = console()
        self.live = enabled and self.console.is_terminal
        self.done, self.values = 0, dict.fromkeys(fields, "-")
        self.start = self.last_line = time.monotonic()
        columns = [TextColumn(name), BarColumn(), MofNCompleteColumn(),
                   *(TextColumn(f"{{task.fields[{f}]}}") for f in fields), TimeElapsedColumn()]
        self.bar = RichProgress(*columns, console=self.console, disable=not self.live)
        self.task = self.bar.add_task(name, total=total, **self.values)

    def __enter__(self) -> Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)
        if self.enabled and not self.live and exc[0] is None:
            self._line()

    def update(self, advance: int = 0, **fields: str) -> None:
        self.done += advance
        self.values.update(fields)
        self.bar.update(self.task, advance=advance, **fields)
        if self.enabled and not self.live and time.monotonic() - self.last_line >= LOG_EVERY_S:
            self._line()

    def _line(self) -> None:
        self.last_line = time.monotonic()
        elapsed = int(self.last_line - self.start)
        parts = "  ".join(f"{v}" for v in self.values.values())
        self.console.print(f"{self.name} {self.done}/{self.total}  {parts}  {elapsed // 60}:{elapsed % 60:02d}",
                           highlight=False)
