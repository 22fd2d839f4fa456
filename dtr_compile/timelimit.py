"""``--time-limit`` over the whole run: one clock started with the compile, and each stage that
can stop early asking it how long it may take (:class:`RunClock`).

The limit ``L`` counts from the start of the compile. Stages that cannot stop (load, capture,
baseline, the heal's teacher outputs, test, export, bench, report) just spend. A reserve of
:data:`EXPORT_RESERVE` ``· L`` is kept for the export and what follows it. The stages that stop
early get, when they start, a share of what is left then (``left = L − elapsed``, ``avail =
max(0, left − reserve)``):

* distill: ``min(DISTILL_SHARE · L, avail)``; within it each site trains for its part of the
  time still left (:func:`site_seconds`), keeps its best weights so far and says it was cut;
* search: ``avail``, or with ``--heal`` ``(1 − HEAL_SHARE) · avail``, so that the heal keeps at
  least :data:`HEAL_SHARE` of it whatever the search does;
* heal (its rounds: heals and the searches after them): ``avail``, so the search's unused time
  flows to it.

A stage checks its share before each unit of work (an evaluation, a training step), so it may
overrun it by one unit; the export is not interruptible, so a run may end later than ``L`` by
the export's time. Under torchrun every rank gets rank 0's shares and, where the ranks must stop
together, rank 0's clock (:meth:`RunClock.agreed_clock`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dtr_compile.config import CompileConfig, parse_duration
from dtr_compile.parallel import Group

#: Share of the limit kept for the export and the stages after it.
EXPORT_RESERVE = 0.15
#: Most of the limit the distillation may take.
DISTILL_SHARE = 0.40
#: With ``--heal``: least share of the time after the reserve, when the search starts, left to
#: the heal rounds.
HEAL_SHARE = 1 / 3

#: How a stop reason starts when a stage's share of the limit ended it.
TIME_LIMIT_STOP = "reached --time-limit"

#: The stages that get a share, in pipeline order.
STOPPABLE = ("distill", "search", "heal")


def site_seconds(left: float, waiting: int, workers: int) -> float:
    """Seconds one site's distillation may train: the ``left`` seconds of the distillation
    shared by the ``waiting`` sites not yet started (this one included) over ``workers``
    processes, ``left · min(workers, waiting) / waiting`` (0 when nothing is left)."""
    if waiting < 1 or left <= 0:
        return 0.0
    return left * min(max(1, workers), waiting) / waiting


class RunClock:
    """The run's ``--time-limit`` clock (module docstring); ``limit_s`` None: no limit, every
    share is None.

    Args:
        limit_s: the whole run's limit in seconds, or None.
        clock: this process's time source in seconds (tests pass a fake one).
        group: the ranks of the run; shares are computed on rank 0 and given to every rank, so
            every rank must ask for them at the same points (each stage's start).
    """

    def __init__(self, limit_s: float | None, clock: Callable[[], float] = time.perf_counter,
                 group: Group | None = None) -> None:
        self.limit_s = limit_s
        self.clock = clock
        self.group = group or Group()
        self.start = clock()
        self.stages: dict[str, dict[str, Any]] = {}

    @classmethod
    def of(cls, config: CompileConfig, group: Group | None = None,
           clock: Callable[[], float] = time.perf_counter) -> RunClock:
        """The clock of ``config.time_limit``, started now."""
        limit = None if config.time_limit is None else parse_duration(config.time_limit)
        return cls(limit, clock, group)

    def elapsed(self) -> float:
        """Seconds since the run started, on this process's clock."""
        return self.clock() - self.start

    @property
    def reserve_s(self) -> float | None:
        """The seconds kept for the export and what follows it."""
        return None if self.limit_s is None else EXPORT_RESERVE * self.limit_s

    def agreed_clock(self) -> Callable[[], float]:
        """The clock every rank reads alike: rank 0's, broadcast at each reading (so every rank
        must read it at the same points), or this process's on one process."""
        if not self.group.distributed:
            return self.clock
        return lambda: self.group.broadcast(self.clock)

    def share(self, stage: str, *, heal: bool = False) -> float | None:
        """Seconds ``stage`` (one of :data:`STOPPABLE`) may take from now (module docstring);
        recorded for the report. ``heal``: the run heals after the search.

        Raises:
            ValueError: an unknown stage.
        """
        if stage not in STOPPABLE:
            raise ValueError(f"unknown stoppable stage {stage!r}: expected one of {STOPPABLE}")
        if self.limit_s is None:
            return None
        limit, reserve = self.limit_s, EXPORT_RESERVE * self.limit_s

        def compute() -> tuple[float, float]:
            started = self.elapsed()
            avail = max(0.0, limit - started - reserve)
            if stage == "distill":
                return started, min(DISTILL_SHARE * limit, avail)
            if stage == "search" and heal:
                return started, (1 - HEAL_SHARE) * avail
            return started, avail

        started, seconds = self.group.broadcast(compute)
        self.stages[stage] = {"started_s": round(started, 3), "share_s": round(seconds, 3),
                              "used_s": None, "stopped_by_limit": False}
        return seconds

    def used(self, stage: str, seconds: float, stopped: bool) -> None:
        """Record what ``stage`` took of its share and whether the limit stopped it."""
        if stage in self.stages:
            self.stages[stage].update(used_s=round(seconds, 3), stopped_by_limit=bool(stopped))

    def to_dict(self) -> dict[str, Any]:
        """The report's ``time_limit`` section: the limit, the reserve, each stoppable stage's
        share and use, and the seconds elapsed when the report was built."""
        return {"limit_s": self.limit_s, "export_reserve_s": self.reserve_s,
                "split": {"distill_at_most": DISTILL_SHARE, "export_reserve": EXPORT_RESERVE,
                          "heal_at_least": HEAL_SHARE},
                "stages": self.stages, "elapsed_s": round(self.elapsed(), 3)}
