"""One progress display for every long loop (prune blocks, training steps, perplexity tokens).

On a terminal it is a rich progress bar on stderr. When stderr is not a terminal (CI logs, pipes, files) a bar
would print nothing useful, so the same updates become plain log lines instead, at most one per
`SPARSETUNE_PROGRESS_INTERVAL` seconds (default 10) plus the last one. rich decides what a terminal is
(`Console.is_terminal`, which honours TTY_COMPATIBLE and FORCE_COLOR); colours follow rich too, so NO_COLOR works.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger("sparsetune.progress")

INTERVAL_ENV = "SPARSETUNE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def _seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """`with Progress(total, "pruning block") as bar: bar.update(completed=i)` (or `advance=n`, `info="loss 2.1"`).

    `unit` follows the counts ("tokens"); `rate=True` also shows completed units per second. `enabled=False`
    shows nothing (e.g. with --json, or on ranks other than 0).
    """

    def __init__(
        self,
        total: int,
        description: str,
        unit: str = "",
        completed: int = 0,
        enabled: bool = True,
        rate: bool = False,
    ) -> None:
        self.total, self.description, self.unit = int(total), description, unit
        self.completed, self.enabled, self.rate = int(completed), enabled, rate
        self.info = ""
        self._bar: Any = None

    # -- context manager ---------------------------------------------------------------------------------------

    def __enter__(self) -> Progress:
        self._start_completed = self.completed
        self._t0 = self._last_line = time.perf_counter()
        if self.enabled and stderr_is_terminal():
            self._bar = self._rich_bar()
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, completed=self.completed, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None

    # -- updates ---------------------------------------------------------------------------------------------

    def update(self, completed: int | None = None, advance: int = 0, info: str | None = None) -> None:
        if completed is not None:
            self.completed = int(completed)
        self.completed += int(advance)
        if info is not None:
            self.info = info
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed, info=self.info)
            return
        now = time.perf_counter()
        if self.completed >= self.total or now - self._last_line >= _interval():
            self._last_line = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """The plain-text form of the current state: `pruning block 3/30 (10%), ..., 12s elapsed, ETA 1m48s`."""
        now = time.perf_counter() if now is None else now
        elapsed = now - self._t0
        unit = f" {self.unit}" if self.unit else ""
        pct = 100.0 * self.completed / self.total if self.total else 100.0
        parts = [f"{self.description} {self.completed:,}/{self.total:,}{unit} ({pct:.0f}%)"]
        if self.info:
            parts.append(self.info)
        done_here = self.completed - self._start_completed
        if self.rate and elapsed > 0:
            parts.append(f"{done_here / elapsed:,.0f} {self.unit or 'units'}/s")
        parts.append(f"{_seconds(elapsed)} elapsed")
        if done_here > 0 and self.completed < self.total:
            parts.append(f"ETA {_seconds(elapsed * (self.total - self.completed) / done_here)}")
        return ", ".join(parts)

    def _rich_bar(self) -> Any:
        from rich.console import Console
        from rich.progress import BarColumn, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress
        from rich.text import Text

        unit = self.unit

        class Rate(ProgressColumn):
            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                return Text(f"{speed:,.0f} {unit or 'units'}/s" if speed else f"- {unit or 'units'}/s")

        columns: list[Any] = [
            TextColumn(f"{self.description} {{task.completed:,}}/{{task.total:,}}" + (f" {unit}" if unit else "")),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        if self.rate:
            columns.append(Rate())
        columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        return RichProgress(*columns, console=Console(stderr=True))


def stderr_is_terminal() -> bool:
    from rich.console import Console

    return bool(Console(stderr=True).is_terminal)


# The libraries' own tqdm bars ("Loading weights", "Writing model shards", dataset generation, GGUF conversion,
# lm-eval requests) read these once, at import; a user's explicit setting wins. TQDM_DISABLE covers the bars that
# use tqdm directly.
LIBRARY_BAR_SWITCHES = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")


def quiet_library_bars_off_terminal() -> None:
    """Off a terminal, turn the libraries' tqdm bars off (they would fill CI logs with carriage returns)."""
    if not stderr_is_terminal():
        for name in LIBRARY_BAR_SWITCHES:
            os.environ.setdefault(name, "1")
