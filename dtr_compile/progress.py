"""What a compile shows while it runs: a progress bar per task and each stage's wall time and
peak memory (the report's ``timings_s`` and ``runtime.peak_rss_by_stage_mib``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dtr_compile.device import peak_memory


def progress_bar(console: Console, enabled: bool) -> Progress:
    """A transient bar per task (description, count, its ``info`` field, elapsed time); off
    unless ``enabled`` (``--no-progress``)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                    console=console, transient=True, disable=not enabled)


@dataclass
class Stages:
    """Wall time (s) of each pipeline stage and this process's peak RSS (MiB) once it ended.

    ``ru_maxrss`` only grows, so the first stage whose ``peak_rss_mib`` reaches the run's peak is
    the one that set it.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str, console: Console) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 3)
        self.peak_rss_mib[name] = peak_memory()["peak_rss_mib"]  # type: ignore[assignment]
        console.log(f"[bold]{name}[/bold] done in {self.seconds[name]:.1f} s "
                    f"(peak RSS {self.peak_rss_mib[name] / 1024:.2f} GiB)")
