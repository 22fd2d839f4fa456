"""Stage 6, schedule: greedy replacement under a validation budget (DtR's "Replace").

Greedy rule (arXiv 2601.11667, the Replace stage): with committed set ``C``, evaluate every
remaining site ``s`` on ``C ∪ {s}``, commit the best one, and stop when even the best would break
the budget. At most ``L(L+1)/2`` evaluations for ``L`` sites. Ties go to the site that comes first
in graph order, so the same metric values always give the same choices.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Evaluation:
    """One measured candidate: the linear site set, its metric, and how long it took."""

    step: int
    candidate: str | None
    linear: tuple[str, ...]
    metric: float
    seconds: float
    within_budget: bool


@dataclass
class ScheduleResult:
    """Outcome of the search: the committed sites in order, and every evaluation made."""

    baseline: float
    threshold: float
    higher_is_better: bool
    committed: list[str] = field(default_factory=list)
    metric_after_step: list[float] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    stop_reason: str = ""

    @property
    def final_metric(self) -> float:
        return self.metric_after_step[-1] if self.metric_after_step else self.baseline

    def to_dict(self) -> dict:
        d = asdict(self)
        d["final_metric"] = self.final_metric
        return d


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
    """Greedy search over ``site_ids`` (in graph order).

    Args:
        site_ids: candidate sites (already excluding kept and failed sites).
        evaluate: metric of the model with exactly the given sites linear.
        baseline: metric of the original model.
        threshold: worst acceptable metric (see :meth:`Budget.threshold`).
        higher_is_better: metric direction.
        max_linear: stop after this many commits.
    """
    res = ScheduleResult(baseline, threshold, higher_is_better)

    def ok(m: float) -> bool:
        return m >= threshold if higher_is_better else m <= threshold

    def better(a: float, b: float) -> bool:
        return a > b if higher_is_better else a < b

    remaining = list(site_ids)
    step = 0
    while remaining:
        if max_linear is not None and len(res.committed) >= max_linear:
            res.stop_reason = f"reached --max-linear {max_linear}"
            break
        step += 1
        best: tuple[str, float] | None = None
        for sid in remaining:
            linear = tuple(res.committed) + (sid,)
            t0 = time.perf_counter()
            m = evaluate(linear)
            ev = Evaluation(step, sid, linear, m, time.perf_counter() - t0, ok(m))
            res.evaluations.append(ev)
            if on_eval is not None:
                on_eval(ev)
            if best is None or better(m, best[1]):
                best = (sid, m)
        assert best is not None
        if not ok(best[1]):
            res.stop_reason = (f"best next site {best[0]} gives {best[1]:.6g}, beyond the "
                               f"threshold {threshold:.6g}")
            break
        res.committed.append(best[0])
        res.metric_after_step.append(best[1])
        remaining.remove(best[0])
    else:
        res.stop_reason = "every candidate site is linear"
    return res
