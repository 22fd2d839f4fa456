"""Stage 6, schedule: which attention sites become linear, under a validation budget (DtR's
"Replace").

Every strategy grows a committed set ``C`` one site at a time and measures candidates through one
callback, ``evaluate(C + (s,)) -> metric``: the tuple is the committed sites in commit order
followed by the candidate ``s``. The metric of a set depends only on the set, so measurements
can be replayed from a ledger (``known``) instead of recomputed. A site is committed only when its
measured metric is within the threshold, except while ``--min-linear`` forces commits.

Strategies (``L`` candidate sites, ``k`` commits):

* ``greedy`` — the paper's rule: each step evaluates ``C ∪ {s}`` for every remaining ``s`` and
  commits the best; it stops when even the best breaks the budget. ``Σ_{i<=k} (L − i)``
  evaluations when the budget stops it after ``k`` commits; ``L(L+1)/2`` at worst.
* ``lazy`` — lazy greedy (Minoux 1978): the same choices as ``greedy`` with fewer evaluations,
  see :func:`_lazy`. ``L + k`` evaluations when degradations are additive.
* ``ranked`` — one single-site sensitivity pass, then sites are added in that order until one
  breaks the budget; see :func:`_ranked`. ``L + k`` evaluations; at most ``2L − 1``.

Ties go to the site that comes first in the order of ``site_ids`` (graph order; the compile passes
them by distillation error, explosive students last: :func:`~dtr_compile.distill.plan.
search_order`), and each strategy's first pass measures them in that order. A NaN metric
ranks below every number, so the same metric values always give the same choices.
``max_evals`` (counting replayed evaluations too, so that a resumed search ends where an
uninterrupted one would) and ``time_limit_s`` (wall time of new evaluations in this process)
end a search early; what was committed until then stands. The measurements of the unfinished
step are evidence too (:meth:`_Search.settle`): the best site measured with exactly the committed
set whose set is within budget (and passes the ``judge``) is committed, as the step would have
committed it had every site been measured and none done better. So a limit inside ``ranked``'s
single-site pass still delivers the best single site that passed alone. Nothing is committed on
sets that were never measured: no pair of single-site results is assumed to add up.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dtr_compile.timelimit import TIME_LIMIT_STOP

STRATEGIES = ("greedy", "lazy", "ranked")

#: ``judge(linear, metric) -> (within budget, interval or None)``: the budget test of a measured
#: set when it needs more than its metric (``--confidence``: the bound of its degradation).
Judge = Callable[[tuple[str, ...], float], "tuple[bool, dict[str, Any] | None]"]


def meets(metric: float, threshold: float, higher_is_better: bool) -> bool:
    """``metric`` is within ``threshold`` (at or on the good side of it), up to rounding.

    The threshold is computed (``baseline − drop`` or ``baseline · (1 − r)``) and a share metric
    is a rounded ratio, so a metric exactly at the threshold in real numbers (190/200 against
    1.0 − 5pt) can land one or two float64 ulps on the wrong side; both are within a few ulps of
    their magnitude. A metric within ``4 · ulp(max(|metric|, |threshold|))`` of the threshold
    counts as at it: about 1e-16 of the metric, far below any difference a budget can mean. NaN
    never meets a threshold.
    """
    if math.isnan(metric):
        return False
    slack = 4 * math.ulp(max(abs(metric), abs(threshold)))
    return metric >= threshold - slack if higher_is_better else metric <= threshold + slack


@dataclass(frozen=True)
class Evaluation:
    """One measured candidate: the linear site set, its metric, and how long it took.

    Attributes:
        step: the step it belongs to: number of committed sites when measured, plus one.
        candidate: the site added to the committed set.
        linear: committed sites (in commit order) followed by ``candidate``.
        metric: validation metric of the model with exactly ``linear`` linear.
        seconds: wall time of the measurement (as recorded, when replayed).
        within_budget: ``metric`` is within the threshold.
        index: position in the search's sequence of evaluations, from 0.
        phase: ``"greedy"``, ``"lazy"``, ``"sensitivity"`` or ``"ranked"``.
        replayed: taken from the ledger of an earlier run instead of measured.
        interval: the confidence bound of its degradation against the original (see
            :mod:`dtr_compile.search.confidence`), when the search was given a ``judge``.
    """

    step: int
    candidate: str | None
    linear: tuple[str, ...]
    metric: float
    seconds: float
    within_budget: bool
    index: int = 0
    phase: str = "greedy"
    replayed: bool = False
    interval: dict[str, Any] | None = None


@dataclass
class ScheduleResult:
    """Outcome of the search: the committed sites in order, and every evaluation made.

    ``committed_within_budget[i]`` is False for a commit forced by ``min_linear`` beyond the
    threshold; ``evaluations_at_commit[i]`` is how many evaluations had been made by then.
    """

    baseline: float
    threshold: float
    higher_is_better: bool
    committed: list[str] = field(default_factory=list)
    metric_after_step: list[float] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    stop_reason: str = ""
    strategy: str = "greedy"
    min_linear: int = 0
    committed_within_budget: list[bool] = field(default_factory=list)
    evaluations_at_commit: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_metric(self) -> float:
        return self.metric_after_step[-1] if self.metric_after_step else self.baseline

    @property
    def evaluations_replayed(self) -> int:
        return sum(ev.replayed for ev in self.evaluations)

    @property
    def evaluations_run(self) -> int:
        return len(self.evaluations) - self.evaluations_replayed

    @property
    def fits(self) -> bool:
        """At least one site and ``min_linear`` sites committed, every one within budget."""
        return (bool(self.committed) and len(self.committed) >= self.min_linear
                and all(self.committed_within_budget))

    def best(self) -> Evaluation | None:
        """M_best: the evaluated set with at least one linear site and the best metric among
        those within budget (ties: more linear sites, then the earliest); None if none is.

        DtR's second output beside M_opt (``committed``, the most linear sites within budget):
        the hybrid that loses least, whatever its size, among every set the search measured.
        """
        sign = 1.0 if self.higher_is_better else -1.0
        ok = [e for e in self.evaluations if e.within_budget and e.linear
              and not math.isnan(e.metric)]
        if not ok:
            return None
        return min(ok, key=lambda e: (-sign * e.metric, -len(e.linear), e.index))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(final_metric=self.final_metric, fits=self.fits,
                 evaluations_total=len(self.evaluations), evaluations_run=self.evaluations_run,
                 evaluations_replayed=self.evaluations_replayed)
        return d


def _distinct(a: float, b: float) -> tuple[str, str]:
    """``a`` and ``b`` printed with the fewest digits (at least 6) that tell them apart."""
    for digits in range(6, 18):
        sa, sb = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if sa != sb:
            return sa, sb
    return repr(a), repr(b)


class _Stop(Exception):
    """A search limit was reached; the message is the stop reason."""


class _Search:
    """Shared state of one search: the committed set, the budget test, measuring and limits."""

    def __init__(self, res: ScheduleResult, evaluate: Callable[[tuple[str, ...]], float],
                 known: Mapping[frozenset[str], tuple[float, float]], max_linear: int | None,
                 max_evals: int | None, time_limit_s: float | None,
                 on_eval: Callable[[Evaluation], None] | None,
                 clock: Callable[[], float], judge: Judge | None = None) -> None:
        self.res, self.evaluate, self.known = res, evaluate, known
        self.max_linear, self.max_evals, self.time_limit_s = max_linear, max_evals, time_limit_s
        self.on_eval, self.clock, self.judge = on_eval, clock, judge
        self.within: dict[frozenset[str], bool] = {}
        self.order: dict[str, int] = {}  # site -> graph index, for ties
        self.start = clock()

    def ok(self, m: float) -> bool:
        return meets(m, self.res.threshold, self.res.higher_is_better)

    def badness(self, m: float) -> float:
        """Sort key, smaller is better; NaN is worst."""
        if math.isnan(m):
            return math.inf
        return -m if self.res.higher_is_better else m

    @property
    def committed(self) -> tuple[str, ...]:
        return tuple(self.res.committed)

    @property
    def current_metric(self) -> float:
        return self.res.final_metric

    def measure(self, candidate: str, phase: str) -> float:
        """Metric of ``committed + (candidate,)``: replayed from ``known`` or evaluated.

        Raises:
            _Stop: ``max_evals`` evaluations were made, or ``time_limit_s`` has passed.
        """
        n = len(self.res.evaluations)
        if self.max_evals is not None and n >= self.max_evals:
            raise _Stop(f"reached --max-evals {self.max_evals}")
        linear = self.committed + (candidate,)
        hit = self.known.get(frozenset(linear))
        if hit is None and self.time_limit_s is not None:
            spent = self.clock() - self.start
            if spent >= self.time_limit_s:
                raise _Stop(f"{TIME_LIMIT_STOP} {self.time_limit_s:g} s after {n} evaluations")
        if hit is not None:
            m, seconds = hit
        else:
            t0 = time.perf_counter()
            m = float(self.evaluate(linear))
            seconds = time.perf_counter() - t0
        within, interval = self.judge(linear, m) if self.judge is not None else (self.ok(m), None)
        self.within[frozenset(linear)] = within
        ev = Evaluation(len(self.res.committed) + 1, candidate, linear, m, seconds, within,
                        index=n, phase=phase, replayed=hit is not None, interval=interval)
        self.res.evaluations.append(ev)
        if self.on_eval is not None:
            self.on_eval(ev)
        return m

    def full(self) -> str | None:
        """The stop reason when no further site may be committed, else None."""
        if self.max_linear is not None and len(self.res.committed) >= self.max_linear:
            return f"reached --max-linear {self.max_linear}"
        return None

    def decide(self, site: str, m: float) -> bool:
        """Commit ``site`` (measured at ``m``) if within budget or forced by ``min_linear``."""
        within = self.within.get(frozenset(self.committed + (site,)), self.ok(m))
        if not within and len(self.res.committed) >= self.res.min_linear:
            return False
        self.res.committed.append(site)
        self.res.metric_after_step.append(m)
        self.res.committed_within_budget.append(within)
        self.res.evaluations_at_commit.append(len(self.res.evaluations))
        return True

    def settle(self, stop: str) -> str:
        """After a limit stopped the search mid-step: commit the best site of the unfinished step,
        i.e. the best evaluation of ``committed + (site,)`` whose set is within budget (ties:
        graph order); none when no such set was measured or ``max_linear`` is reached. Returns
        the stop reason, saying what was committed and how many sites were not measured."""
        if self.full() is not None:
            return stop
        done = set(self.committed)
        step = {e.candidate: e for e in self.res.evaluations
                if e.linear[:-1] == self.committed and e.candidate not in done}
        fit = [e for e in step.values() if self.within.get(frozenset(e.linear), False)]
        if not fit:
            return stop
        best = min(fit, key=lambda e: (self.badness(e.metric), self.order.get(str(e.candidate), 0)))
        assert best.candidate is not None
        self.decide(best.candidate, best.metric)
        unmeasured = len(self.order) - len(done) - len(step)
        return (f"{stop}; committed {best.candidate} ({best.metric:.6g}), the best within budget "
                f"of the {len(step)} site{'s' if len(step) != 1 else ''} measured in the "
                f"unfinished step ({unmeasured} sites not measured)")

    def beyond(self, site: str, m: float, what: str = "best next site") -> str:
        if self.ok(m):  # within the threshold, not within the judge's test
            return f"{what} {site} gives {m:.6g}, within the threshold but not the confidence bound"
        a, t = _distinct(m, self.res.threshold)
        return f"{what} {site} gives {a}, beyond the threshold {t}"


def _greedy(search: _Search, site_ids: Sequence[str]) -> str:
    """The paper's rule: evaluate every remaining site, commit the best, repeat."""
    remaining = list(site_ids)
    while remaining:
        if (why := search.full()) is not None:
            return why
        metrics = [search.measure(s, "greedy") for s in remaining]
        _, i = min((search.badness(m), i) for i, m in enumerate(metrics))
        best, m = remaining[i], metrics[i]
        if not search.decide(best, m):
            return search.beyond(best, m)
        remaining.remove(best)
    return "every candidate site is linear"


def _lazy(search: _Search, site_ids: Sequence[str]) -> str:
    """Lazy greedy: a priority queue of stale degradations; only the top is re-evaluated.

    The degradation of adding ``s`` to ``C`` is ``Δ(s | C) = metric(C) − metric(C ∪ {s})`` (sign
    flipped for lower-is-better metrics); greedy commits the ``s`` of least ``Δ``. The queue holds
    each site's ``Δ`` as last measured, against an older, smaller committed set. The top is
    re-measured against the current ``C``; when the top is already current it is committed.

    Exact (the same commits, in the same order, as ``greedy``) under one assumption: a site never
    hurts less once more sites are linear, ``Δ(s | A) <= Δ(s | B)`` for ``A ⊆ B``, i.e. the
    degradation is supermodular (the metric submodular). Then a stale ``Δ`` is a lower bound of
    the current one, so a current ``Δ`` at the top of the queue is the smallest. Additive
    degradations satisfy it with equality: each step after the first makes one evaluation, ``L + k``
    in all. When sites interact the other way (one linear site masks another's error), ``lazy``
    can commit a different site than ``greedy``; every commit is still measured, so the budget
    holds either way. Ties in ``Δ`` go to the earlier site, as in ``greedy``.
    """
    sign = 1.0 if search.res.higher_is_better else -1.0
    # (Δ, graph index, site, size of C when measured, metric); -inf: never measured
    heap: list[tuple[float, int, str, int, float]] = [
        (-math.inf, i, s, -1, math.nan) for i, s in enumerate(site_ids)]
    heapq.heapify(heap)
    while heap:
        if (why := search.full()) is not None:
            return why
        delta, i, s, measured_at, m = heapq.heappop(heap)
        if measured_at == len(search.res.committed):
            if not search.decide(s, m):
                return search.beyond(s, m)
            continue
        m = search.measure(s, "lazy")
        delta = math.inf if math.isnan(m) else sign * (search.current_metric - m)
        heapq.heappush(heap, (delta, i, s, len(search.res.committed), m))
    return "every candidate site is linear"


def _ranked(search: _Search, site_ids: Sequence[str]) -> str:
    """One sensitivity pass, then add sites in that order while the budget holds.

    The pass measures every single site alone (``L`` evaluations) and ranks them best first
    (ties: graph order). The first site's metric is already known; each further site is measured
    with everything committed before it, and the search stops at the first that breaks the
    budget, without trying the ones ranked after it. ``L + k`` evaluations for ``k`` commits
    (``2L − 1`` if all fit). Cheaper than ``greedy``, but it ignores how sites interact beyond
    the order, so it can commit fewer sites.
    """
    single = {s: search.measure(s, "sensitivity") for s in site_ids}
    order = sorted(range(len(site_ids)), key=lambda i: (search.badness(single[site_ids[i]]), i))
    for rank, i in enumerate(order):
        if (why := search.full()) is not None:
            return why
        s = site_ids[i]
        m = single[s] if rank == 0 else search.measure(s, "ranked")
        if not search.decide(s, m):
            return search.beyond(s, m, "next site in sensitivity order")
    return "every candidate site is linear"


_RUN = {"greedy": _greedy, "lazy": _lazy, "ranked": _ranked}


def schedule(
    site_ids: Sequence[str],
    evaluate: Callable[[tuple[str, ...]], float],
    *,
    baseline: float,
    threshold: float,
    higher_is_better: bool = True,
    strategy: str = "greedy",
    max_linear: int | None = None,
    min_linear: int = 0,
    max_evals: int | None = None,
    time_limit_s: float | None = None,
    known: Mapping[frozenset[str], tuple[float, float]] | None = None,
    on_eval: Callable[[Evaluation], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    judge: Judge | None = None,
) -> ScheduleResult:
    """Search which of ``site_ids`` (in graph order) to make linear.

    Args:
        site_ids: candidate sites (already excluding kept and failed sites), in the order that
            breaks ties (graph order, or :func:`~dtr_compile.distill.plan.search_order`'s).
        evaluate: metric of the model with exactly the given sites linear; the tuple is the
            committed sites in commit order, then the candidate.
        baseline: metric of the original model.
        threshold: worst acceptable metric (see :meth:`Budget.threshold`).
        higher_is_better: metric direction.
        strategy: ``"greedy"``, ``"lazy"`` or ``"ranked"`` (see the module docstring).
        max_linear: commit at most this many sites.
        min_linear: commit at least this many sites, beyond the budget if need be (the result's
            ``fits`` is then False).
        max_evals: stop after this many evaluations (replayed ones included); the best site
            of the unfinished step within budget is committed (see the module docstring).
        time_limit_s: stop before a new evaluation once this many seconds have passed; as
            ``max_evals``.
        known: ``{frozenset(linear): (metric, seconds)}`` from a ledger, replayed instead of
            evaluated.
        on_eval: called after every evaluation, replayed ones included.
        clock: time source for ``time_limit_s`` (tests pass a fake one).
        judge: the budget test of a measured set (see :data:`Judge`); default: its metric
            :func:`meets` the threshold.

    Raises:
        ValueError: unknown strategy, duplicate sites, or ``min_linear`` above the candidates or
            ``max_linear``.
    """
    if strategy not in _RUN:
        raise ValueError(f"unknown search strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if len(set(site_ids)) != len(site_ids):
        raise ValueError(f"duplicate site ids in {list(site_ids)}")
    if min_linear > len(site_ids) or (max_linear is not None and min_linear > max_linear):
        raise ValueError(f"min_linear {min_linear} exceeds the {len(site_ids)} candidate sites "
                         f"or max_linear {max_linear}")
    res = ScheduleResult(baseline, threshold, higher_is_better, strategy=strategy,
                         min_linear=min_linear)
    search = _Search(res, evaluate, known or {}, max_linear, max_evals, time_limit_s, on_eval,
                     clock, judge)
    search.order = {s: i for i, s in enumerate(site_ids)}
    try:
        res.stop_reason = _RUN[strategy](search, list(site_ids)) if site_ids else \
            "no candidate site"
    except _Stop as stop:
        res.stop_reason = search.settle(str(stop))
    res.seconds = clock() - search.start
    return res


def greedy_schedule(
    site_ids: Sequence[str],
    evaluate: Callable[[tuple[str, ...]], float],
    *,
    baseline: float,
    threshold: float,
    higher_is_better: bool = True,
    max_linear: int | None = None,
    on_eval: Callable[[Evaluation], None] | None = None,
) -> ScheduleResult:
    """The paper's greedy search: :func:`schedule` with ``strategy="greedy"``."""
    return schedule(site_ids, evaluate, baseline=baseline, threshold=threshold,
                    higher_is_better=higher_is_better, max_linear=max_linear, on_eval=on_eval)
