"""Step bookkeeping for the curation: a progress bar per step, and its time, rate and peak memory."""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RateColumn(ProgressColumn):
    """Rows per second."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f}/s" if task.speed else "", style="progress.data.speed")


@dataclass
class StepStat:
    name: str
    rows: int
    seconds: float
    peak_rss_mb: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows_per_s, 1) if self.seconds > 0 else None,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }


@dataclass
class Steps:
    console: Console
    quiet: bool = False
    stats: list[StepStat] = field(default_factory=list)

    @contextlib.contextmanager
    def step(self, name: str, rows: int, *, bar: bool = True) -> Iterator[Callable[[int], None]]:
        """Time a step over `rows` rows; yields `advance(k)` for its progress bar."""
        columns = (
            [TextColumn(f"curate · {name}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
             RateColumn(), TimeRemainingColumn()]
            if bar
            else [SpinnerColumn(), TextColumn(f"curate · {name}"), TimeElapsedColumn()]
        )  # fmt: skip
        t0 = time.perf_counter()
        with Progress(*columns, console=self.console, disable=self.quiet, transient=False) as progress:
            task = progress.add_task(name, total=rows if bar else None)
            yield lambda k: progress.advance(task, k)
            progress.update(task, completed=rows if bar else None)
        self.stats.append(StepStat(name, rows, time.perf_counter() - t0, peak_rss_mb()))
