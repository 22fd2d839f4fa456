"""Rounds: search → heal → search again from the healed hybrid → heal …

Healing lowers the committed sites' error, which leaves room in the budget; a further search
from the healed hybrid re-evaluates the remaining sites on top of it (each with its own distilled
student) and may commit more. :func:`run_rounds` alternates the two until a search adds nothing,
a heal does not improve the validation metric (or leaves the budget), ``max_rounds`` heals were
made, or the time limit is spent. The stages themselves are callbacks, so the rounds do not
depend on how the search is run (strategy, ledger, ranks) or where the heal trains.

What each round records (:class:`RoundRecord`): the sites committed by its search and those it
added, the validation metric before and after its heal, whether the healed students were kept,
the heal's tokens and the seconds of each half. A healed student is kept only when the healed
hybrid is within the budget and its metric at least as good as before the heal; otherwise the
round's students stay as they were and the rounds stop.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dtr_compile.heal.train import Healed
from dtr_compile.timelimit import TIME_LIMIT_STOP


@dataclass
class SearchOutcome:
    """A round's search: the committed sites (the round's base first, in commit order) and
    their validation metric (the base's when nothing was added)."""

    linear: tuple[str, ...]
    metric: float
    stop_reason: str = ""


@dataclass
class RoundRecord:
    """One round (see the module docstring)."""

    round: int
    linear: list[str]
    added: list[str]
    metric_before_heal: float
    search_seconds: float
    search_stop: str = ""
    metric_after_heal: float | None = None
    within_after_heal: bool | None = None
    heal_kept: bool = False
    heal_seconds: float = 0.0
    tokens: int = 0
    heal: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RoundsResult:
    """Where the rounds ended.

    Attributes:
        linear: the committed sites, in commit order over all rounds.
        metric: their validation metric with ``students``.
        students: every site's student: healed where a kept heal trained it, else as given.
        rounds: one record per round.
        stop_reason: why no further round ran.
    """

    linear: tuple[str, ...]
    metric: float
    students: dict[str, nn.Module]
    rounds: list[RoundRecord] = field(default_factory=list)
    stop_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"linear": list(self.linear), "metric": self.metric,
                "stop_reason": self.stop_reason, "rounds": [r.to_dict() for r in self.rounds]}


#: ``search(round, students, base, seconds left or None) -> SearchOutcome``
SearchFn = Callable[[int, Mapping[str, nn.Module], tuple[str, ...], "float | None"], SearchOutcome]
#: ``heal(round, students, linear, seconds left or None) -> Healed``
HealFn = Callable[[int, Mapping[str, nn.Module], tuple[str, ...], "float | None"], Healed]
#: ``measure(students, linear) -> (validation metric, within the budget)``
MeasureFn = Callable[[Mapping[str, nn.Module], tuple[str, ...]], "tuple[float, bool]"]


def run_rounds(
    students: Mapping[str, nn.Module],
    *,
    search: SearchFn,
    heal: HealFn,
    measure: MeasureFn,
    higher_is_better: bool,
    max_rounds: int,
    time_limit_s: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> RoundsResult:
    """Alternate ``search`` and ``heal`` (see the module docstring).

    Args:
        students: every candidate site's student (the distilled ones).
        search: the round's search from ``base`` (the sites committed so far, with the current
            students); it must keep ``base`` as the prefix of what it returns.
        heal: trains the students of ``linear`` (e.g. :func:`~dtr_compile.heal.train.heal`).
        measure: the validation metric of a hybrid and whether it is within the budget (with
            ``--confidence``, the bound too).
        higher_is_better: the metric's direction.
        max_rounds: heals at most (``--heal-rounds``); the search runs at most this many times.
        time_limit_s: for the rounds all together; each callback gets what is left.
        on_round: called with each round's record when it is complete.
    """
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    start = clock()
    current = dict(students)
    linear: tuple[str, ...] = ()
    metric = math.nan
    rounds: list[RoundRecord] = []

    def left() -> float | None:
        return None if time_limit_s is None else max(0.0, time_limit_s - (clock() - start))

    def done(rec: RoundRecord) -> None:
        rounds.append(rec)
        if on_round is not None:
            on_round(rec)

    def not_worse(a: float, b: float) -> bool:
        if math.isnan(a):
            return False
        return a >= b if higher_is_better else a <= b

    stop = f"reached --heal-rounds {max_rounds}"
    for r in range(1, max_rounds + 1):
        t0 = clock()
        found = search(r, current, linear, left())
        if tuple(found.linear[:len(linear)]) != linear:
            raise AssertionError(f"round {r}: the search dropped committed sites {linear} "
                                 f"(returned {found.linear})")
        added = list(found.linear[len(linear):])
        rec = RoundRecord(r, list(found.linear), added, found.metric, clock() - t0,
                          search_stop=found.stop_reason)
        if r == 1 or added:
            metric = found.metric
        linear = tuple(found.linear)
        if not linear:
            done(rec)
            stop = "no site fits the budget: nothing to heal"
            break
        if r > 1 and not added:
            done(rec)
            stop = f"round {r}: no further site fits the budget after healing"
            break
        remaining = left()
        if remaining is not None and remaining <= 0:
            done(rec)
            stop = f"{TIME_LIMIT_STOP} ({time_limit_s:g} s) after round {r}'s search"
            break
        t1 = clock()
        healed = heal(r, current, linear, remaining)
        after, within = measure({**current, **healed.students}, linear)
        rec.heal_seconds, rec.tokens = clock() - t1, healed.record.tokens
        rec.heal = healed.record.to_dict()
        rec.metric_after_heal, rec.within_after_heal = after, within
        rec.heal_kept = bool(within and healed.record.ok and not_worse(after, metric))
        done(rec)
        if not rec.heal_kept:
            stop = (f"round {r}: the healed hybrid's metric {after:.6g} is "
                    + ("beyond the budget" if not within else f"no better than {metric:.6g}")
                    + "; kept the students from before the heal")
            break
        current.update(healed.students)
        metric = after
        remaining = left()
        if remaining is not None and remaining <= 0 and r < max_rounds:
            stop = f"{TIME_LIMIT_STOP} ({time_limit_s:g} s) after round {r}'s heal"
            break
    return RoundsResult(linear, metric, current, rounds, stop)
