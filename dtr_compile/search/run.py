"""Stage ``schedule``, the search (:func:`search_stage`): which sites to replace, each candidate
set evaluated through the prefix cache (:mod:`~dtr_compile.search.prefix_cache`), bounded
(:mod:`~dtr_compile.search.confidence`), recorded in the ledger (:mod:`~dtr_compile.search.ledger`,
``--resume``) and chosen by a strategy (:mod:`~dtr_compile.search.schedule`); then DtR's two
outputs, M_opt and M_best, and the one ``-o`` gets (:func:`select`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from dtr_compile import __version__
from dtr_compile.config import Budget, CompileConfig
from dtr_compile.data import Dataset
from dtr_compile.device import Placement
from dtr_compile.distill.plan import search_order
from dtr_compile.distill.stage import Distilled
from dtr_compile.errors import EXIT_NO_REPLACEMENT, EXIT_OK
from dtr_compile.inputs import Inputs, Sites
from dtr_compile.linear.kernel import SiteSwitch
from dtr_compile.metrics import Metric
from dtr_compile.parallel import Group, batch_rows, gather_rows
from dtr_compile.passes.linearize import rewrite_sites
from dtr_compile.progress import Stages
from dtr_compile.search.baseline import Baseline
from dtr_compile.search.confidence import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    Bound,
    degradation_bound,
)
from dtr_compile.search.ledger import Ledger, fingerprint, hash_path, hash_tensors
from dtr_compile.search.prefix_cache import PrefixCache, SegmentedGraph
from dtr_compile.search.schedule import Evaluation, ScheduleResult, meets, schedule
from dtr_compile.timelimit import TIME_LIMIT_STOP, RunClock

SELECT = ("most-linear", "best")


def input_hashes(config: CompileConfig) -> dict[str, str]:
    """SHA-256 of the model and of the validation and calibration files."""
    data = hash_path(config.data)  # type: ignore[arg-type]
    return {"model": hash_path(config.model), "data": data,
            "calib": hash_path(config.calib) if config.calib else data}


def search(
    config: CompileConfig,
    hashes: dict[str, str],
    search_gm: torch.fx.GraphModule,
    switches: dict[str, SiteSwitch],
    candidates: list[str],
    students: dict[str, torch.nn.Module],
    val: Dataset,
    names: list[str],
    metric: Metric,
    reference: torch.Tensor,
    baseline: float,
    threshold: float,
    allowed_drop: float,
    ledger_path: Path,
    console: Console,
    stages: Stages,
    *,
    group: Group | None = None,
    placement: Placement | None = None,
    base: tuple[str, ...] = (),
    time_limit_s: float | None = None,
    stage: str = "schedule",
) -> tuple[ScheduleResult, dict[str, Any], Callable[[tuple[str, ...]], Bound | None]]:
    """Stage 6: the search, evaluated through the prefix cache and recorded in the ledger.

    ``base``: sites already committed (e.g. by an earlier round of ``--heal``, see
    :mod:`dtr_compile.heal.rounds`): every evaluated set is ``base`` plus the schedule's own,
    ``candidates`` are the others, ``baseline`` is the metric of ``base``, and the result's sets
    (committed, evaluations, the ledger's) are the schedule's own, without ``base``.
    ``time_limit_s``: the seconds this search may take (its share of ``--time-limit``,
    :mod:`dtr_compile.timelimit`), None: no limit; ``stage``: the timing's name.

    The ledger's fingerprint covers everything an evaluation's metric (and its confidence bound)
    depends on, so ``--resume`` replays only measurements of these exact inputs. Ctrl-C
    propagates after the ledger is closed: every finished evaluation is on disk.

    Each evaluation gets the bound of its degradation (:mod:`dtr_compile.search.confidence`)
    when the metric has row statistics or ``--confidence`` is set; with ``--confidence`` a set is
    within budget only when its metric meets the threshold and the bound is within
    ``allowed_drop``. Returns the result, the report's search section, and ``bound_of(linear)``
    (computed on demand for a set never bounded; after a distributed search, only sets bounded
    during it).

    Over several ranks (``group``), each evaluates its run of whole validation batches and the
    reduced rows are gathered before the metric (see :mod:`dtr_compile.parallel`): every rank
    makes the same decisions; rank 0 alone reads and writes the ledger.
    """
    group = group or Group()
    placement = placement or Placement()
    parts = ledger_inputs(config, hashes, [*base, *candidates], students, metric, placement)
    if base:
        parts["base"] = ",".join(base)
    fp = fingerprint(parts)
    opened: list[Ledger] = []

    def open_ledger(resume: bool) -> tuple[dict[frozenset[str], tuple[float, float]], str,
                                           dict[frozenset[str], dict[str, Any]]]:
        for old in opened:
            old.close()
        ledger, known, note = Ledger.open(ledger_path, fp, resume=resume, inputs=parts)
        opened[:] = [ledger]
        intervals = {k: rec["interval"] for k, rec in ledger.recorded.items()
                     if isinstance(rec.get("interval"), dict)}
        return known, note, intervals

    known, note, intervals = group.broadcast(lambda: open_ledger(config.resume))
    console.log(note)
    cache = _prefix_cache(config, search_gm, switches, candidates, val, names, metric, group,
                          placement)
    first = len(base)  # sets are base + the schedule's own

    level = config.confidence or DEFAULT_CONFIDENCE
    every = config.confidence is not None or metric.stats is not None
    bounds: dict[frozenset[str], Bound] = {}
    for key, iv in intervals.items():
        try:
            bounds[key] = Bound(**iv)
        except TypeError:
            pass  # a record of another format: bounded again on demand
    searching = [True]  # after a distributed search the other ranks are gone: no more gathers

    def outputs(linear: tuple[str, ...], base: tuple[str, ...] | None = None) -> torch.Tensor:
        """The reduced outputs of the whole validation set with ``linear`` replaced (gathered
        from every rank's batches)."""
        return gather_rows(lambda: None if cache is None else
                           cache.outputs(linear, base=base), group)

    def bound(out: torch.Tensor) -> Bound:
        return degradation_bound(metric, out, val.labels, reference, level, seed=config.seed)

    def evaluate(own: tuple[str, ...]) -> float:
        linear = base + own
        out = outputs(linear, base=linear[:-1])
        if every:
            bounds[frozenset(linear)] = group.guard(lambda: bound(out))
        value = group.guard(lambda: metric.value(out, val.labels, reference))
        # NaN / ±inf (a diverged student, a metric's overflow) never fits: NaN is the
        # schedule's worst value, whereas +inf would pass any higher-is-better threshold
        return value if math.isfinite(value) else math.nan

    def bound_of(linear: tuple[str, ...]) -> Bound | None:
        """The bound of the set ``linear`` (whole: ``base`` included)."""
        key = frozenset(linear)
        if key not in bounds and linear and (searching[0] or not group.distributed):
            bounds[key] = bound(outputs(linear))
        return bounds.get(key)

    def judge(own: tuple[str, ...], m: float) -> tuple[bool, dict[str, Any] | None]:
        linear = base + own
        within = meets(m, threshold, metric.higher_is_better)
        b = bound_of(linear) if config.confidence is not None else bounds.get(frozenset(linear))
        if config.confidence is not None and b is not None:
            within = within and meets(b.upper, allowed_drop, False)
        return within, None if b is None else b.to_dict()

    def on_eval(ev: Evaluation) -> None:
        if not ev.replayed and opened:
            opened[0].append(ev, strategy=config.search, interval=ev.interval)
        console.log(_evaluation_line(ev, metric.name, config.confidence is not None))

    min_linear = min(max(0, config.min_linear - first), len(candidates))
    if min_linear + first < config.min_linear:
        console.log(f"[yellow]--min-linear {config.min_linear}: only {len(candidates) + first} "
                    "sites distilled successfully[/yellow]")
    max_linear = None if config.max_linear is None else max(0, config.max_linear - first)

    def run(known: dict[frozenset[str], tuple[float, float]]) -> ScheduleResult:
        try:
            with stages(stage, console):
                return schedule(
                    candidates, evaluate, baseline=baseline, threshold=threshold,
                    higher_is_better=metric.higher_is_better, strategy=config.search,
                    max_linear=max_linear, min_linear=min_linear,
                    max_evals=config.max_evals, time_limit_s=time_limit_s, known=known,
                    on_eval=on_eval, judge=judge,
                    clock=(lambda: group.broadcast(time.perf_counter)) if group.distributed
                    else time.perf_counter)
        except KeyboardInterrupt:
            console.log(f"interrupted: the finished evaluations are in {ledger_path}; rerun "
                        "with --resume to continue from them")
            raise
        finally:
            for ledger in opened:
                ledger.close()

    sched = run(known)
    verified = None
    if sched.evaluations_replayed and sched.committed:
        # the ledger is a file anyone can edit: re-measure what it made us commit, once
        recorded = sched.metric_after_step[-1]
        measured = evaluate(tuple(sched.committed))
        claimed_fit = sched.committed_within_budget[-1]
        within = meets(measured, threshold, metric.higher_is_better)
        same = abs(measured - recorded) <= 1e-6 * max(1.0, abs(recorded))
        verified = {"committed": list(sched.committed), "ledger_metric": recorded,
                    "measured_metric": measured, "trusted": same and (within or not claimed_fit)}
        if not verified["trusted"]:
            console.log(f"[yellow]--resume: the ledger gives {metric.name} {recorded:.8g} for "
                        f"{sched.committed}, re-measured {measured:.8g}"
                        + (" (beyond the threshold)" if claimed_fit and not within else "")
                        + "; the ledger is not trusted: searching again without it[/yellow]")
            group.broadcast(lambda: open_ledger(False))
            bounds.clear()
            note += "; its replayed metrics failed the re-measurement, so it was discarded"
            sched = run({})
        else:
            console.log(f"--resume: re-measured the committed set {sched.committed}: "
                        f"{metric.name} {measured:.8g}, as the ledger says")
    searching[0] = False
    if len(sched.committed) + first < config.min_linear:
        sched.min_linear = config.min_linear - first  # not met: `fits` is False, exit 3
    info = _search_info(config, sched, time_limit_s, ledger_path, note, verified, fp, parts,
                        cache, group)
    if cache is not None:
        st = cache.stats
        console.log(f"prefix cache: {st.segments_run}/{st.segments_full} segment runs "
                    f"({100 * st.saved:.0f}% saved), peak {st.peak_bytes / 2**20:.0f} MiB")
    return sched, info, bound_of


def search_outputs(config: CompileConfig, sched: ScheduleResult,
             bound_of: Callable[[tuple[str, ...]], Bound | None]) -> dict[str, Any]:
    """DtR's two outputs and which one ``-o`` gets.

    ``m_opt``: the committed sites (the most linear sites within budget: today's output).
    ``m_best``: :meth:`ScheduleResult.best`, the best validation metric among every evaluated
    set with at least one linear site that is within budget. ``selected`` is ``"m_best"`` with
    ``--select best`` when there is one, else ``"m_opt"``.
    """
    def entry(linear: tuple[str, ...], metric: float, within: bool) -> dict[str, Any]:
        b = bound_of(linear) if linear else None
        return {"linear": list(linear), "metric": metric, "within_budget": within,
                "interval": None if b is None else b.to_dict()}

    m_opt = entry(tuple(sched.committed), sched.final_metric, sched.fits) \
        if sched.committed else None
    best = sched.best()
    m_best = entry(best.linear, best.metric, True) if best is not None else None
    if m_best is not None and best is not None:
        m_best["evaluation"] = best.index
    selected = "m_best" if config.select == "best" and m_best is not None else "m_opt"
    return {"select": config.select, "selected": selected, "m_opt": m_opt, "m_best": m_best}


def resolution_warnings(metric: Metric, rows: int, allowed_drop: float, budget_text: str,
                         baseline: float, confidence: float | None) -> list[str]:
    """Warnings when the budget is finer than the validation set can resolve: one row of a
    share metric is ``1/N``; with ``--confidence`` and an original right on every row, even a
    candidate that changes no row has a bound above 0 (:func:`bound_without_change`)."""
    from dtr_compile.search.confidence import bound_without_change, resolution, rows_for_bound

    out = []
    step = resolution(metric, rows)
    if step is not None and allowed_drop < step:
        out.append(f"the budget {budget_text} allows {metric.name} to drop by {allowed_drop:.4g}, "
                   f"less than one validation row ({rows} rows: one row = {step:.4g}); only "
                   "candidates that lose no row net pass, and the validation set cannot tell "
                   "such a budget from zero: use more validation rows or a wider budget")
    if not metric.binary and rows < 20:
        out.append(f"{rows} validation rows are too few for a bootstrap bound of the {metric.name} "
                   "drop to mean much (with so few rows it is about the worst row's drop): use "
                   "more validation rows, each as long as the contexts you deploy (shorter rows "
                   "hide linear attention's error on long contexts)")
    if confidence is not None and step is not None and allowed_drop > 0:
        always = baseline == 1.0  # floors: search/confidence.py
        floor = bound_without_change(rows, confidence, original_always_right=always)
        if floor > allowed_drop:
            out.append(f"with --confidence {confidence:g} on {rows} rows, even a candidate that "
                       f"changes no row has a drop bound of {floor:.4g} > {allowed_drop:.4g}: "
                       f"no candidate can pass; it needs about "
                       f"{rows_for_bound(allowed_drop, confidence, original_always_right=always)} rows")
    return out


def ledger_inputs(config: CompileConfig, hashes: dict[str, str], candidates: list[str],
                  students: dict[str, torch.nn.Module], metric: Metric,
                  placement: Placement) -> dict[str, str]:
    """Everything an evaluation's metric (and its confidence bound) depends on, by name: what
    the ledger's fingerprint covers (``hashes``: :func:`input_hashes`)."""
    return {
        "model": hashes["model"],
        "data": hashes["data"],
        "students": hash_tensors({f"{sid}.{k}": v for sid in candidates
                                  for k, v in students[sid].state_dict().items()}),
        "metric": metric.identity or metric.name,
        "eval_batch": str(config.eval_batch),
        "confidence": f"{config.confidence or DEFAULT_CONFIDENCE}:{config.seed}:{DEFAULT_RESAMPLES}",
        "dtr_compile": __version__,
        "torch": torch.__version__,
        "runtime": placement.describe(),
    }


def _prefix_cache(config: CompileConfig, search_gm: torch.fx.GraphModule,
                  switches: dict[str, SiteSwitch], candidates: list[str], val: Dataset,
                  names: list[str], metric: Metric, group: Group,
                  placement: Placement) -> PrefixCache | None:
    """The prefix cache over this rank's run of whole validation batches; None when there is
    nothing to evaluate here (no candidate, or no rows for this rank)."""
    cache: PrefixCache | None = None
    start, stop = batch_rows(len(val), config.eval_batch, group)
    if candidates and stop > start:
        mine = Dataset({k: v[start:stop] for k, v in val.inputs.items()},
                       None if val.labels is None else val.labels[start:stop], val.source)
        probe = [val.inputs[n][:2].to(placement.device) for n in names]
        with placement.autocast():
            graph = SegmentedGraph(search_gm, switches, probe)
        cache = PrefixCache(graph, mine, names, config.eval_batch, metric,
                            capacity_bytes=config.cache_mb << 20, placement=placement)
    return cache


def _evaluation_line(ev: Evaluation, metric_name: str, bound_required: bool) -> str:
    """One evaluation's log line: its metric, its bound (if any) and ✓ / ✗ within budget."""
    mark = "✓" if ev.within_budget else "✗"
    how = "replayed" if ev.replayed else f"{ev.seconds:.1f} s"
    ci = "" if ev.interval is None else \
        f"drop <= {ev.interval['upper']:.4g} at {ev.interval['confidence']:g}"
    if bound_required:  # the mark judges the metric and the bound
        result = f"{ev.metric:.8g}{', ' + ci if ci else ''} {mark} ({how})"
    else:  # the mark judges the metric; the bound is for information
        result = f"{ev.metric:.8g} {mark} ({ci + ', not required; ' if ci else ''}{how})"
    return f"step {ev.step} ({ev.phase}): +{ev.candidate} → {metric_name} {result}"


def _search_info(config: CompileConfig, sched: ScheduleResult, time_limit_s: float | None,
                 ledger_path: Path, note: str, verified: dict[str, Any] | None, fp: str,
                 parts: dict[str, str], cache: PrefixCache | None,
                 group: Group) -> dict[str, Any]:
    """The report's ``search`` section."""
    return {
        "strategy": config.search,
        "evaluations": len(sched.evaluations),
        "evaluations_run": sched.evaluations_run,
        "evaluations_replayed": sched.evaluations_replayed,
        "seconds": round(sched.seconds, 3),
        "stop_reason": sched.stop_reason,
        "limits": {"max_linear": config.max_linear, "min_linear": config.min_linear,
                   "max_evals": config.max_evals, "time_limit_s": time_limit_s},
        "ledger": str(ledger_path),
        "resume": note,
        "resume_check": verified,
        "fingerprint": fp,
        "inputs": parts,
        "cache": cache.stats.to_dict() if cache is not None else None,
        "ranks": group.world,
    }


@dataclass
class Searched:
    """The search's outcome (:func:`search_stage`).

    Attributes:
        schedule: every evaluation and the committed sites.
        info: the report's ``search`` section.
        bound_of: ``bound_of(linear)``, the bound of a set's degradation (see :func:`search`).
        heal: the report's ``heal`` section when ``--heal`` reworked the outcome
            (:func:`dtr_compile.heal.stage.heal_stage`), else None.
    """

    schedule: ScheduleResult
    info: dict[str, Any]
    bound_of: Callable[[tuple[str, ...]], Bound | None]
    heal: dict[str, Any] | None = None


def search_stage(
    config: CompileConfig, inputs: Inputs, found: Sites, base: Baseline, distilled: Distilled,
    ledger_path: Path, students_path: Path, placement: Placement, group: Group, console: Console,
    stages: Stages, clock: RunClock,
) -> Searched:
    """The candidates (sites not kept whose distillation succeeded) switched in a copy of the
    original (:func:`~dtr_compile.passes.linearize.rewrite_sites`) and searched
    (:func:`search`), with the ledger at ``ledger_path``; ``students_path``: where the distill
    stage saved the students (for the report). ``clock``: the run's ``--time-limit`` clock; the
    search takes its share (:mod:`dtr_compile.timelimit`: what is left after the export's
    reserve, less the heal's part with ``--heal``)."""
    sites, plan, students = found.sites, distilled.plan, distilled.students
    candidates = search_order([s.id for s in sites if s.id not in found.kept
                               and distilled.results[s.id].ok],
                              distilled.results)  # lowest distillation error first, explosive last
    # students run in the search on the placement's device (copies: the exported hybrid takes
    # the CPU originals)
    on_device = students if placement.is_default else \
        {sid: copy.deepcopy(m).to(placement.device) for sid, m in students.items()}
    switches = {sid: plan.switch(base.run_gm, sid, on_device[sid]) for sid in candidates}
    search_gm = rewrite_sites(base.run_gm, sites, switches, class_name="SearchGraph",
                              blocks=plan.blocks)
    share = clock.share("search", heal=config.heal)
    if share is not None:
        console.log(f"--time-limit: the search may take {share:.0f} s"
                    + (" (the heal keeps the rest but the export's reserve)" if config.heal
                       else ""))
    sched, search_info, bound_of = search(
        config, input_hashes(config), search_gm, switches, candidates, students, inputs.val,
        inputs.names, inputs.metric, base.reference, base.metric, base.threshold,
        base.allowed_drop, ledger_path, console, stages, group=group, placement=placement,
        time_limit_s=share)
    clock.used("search", sched.seconds, stopped=sched.stop_reason.startswith(TIME_LIMIT_STOP))
    search_info["students"] = {"path": str(students_path), "reused": distilled.reused}
    console.log(f"committed {sched.committed or 'no site'}: {sched.stop_reason}")
    return Searched(sched, search_info, bound_of)


@dataclass
class Selection:
    """The hybrid ``-o`` gets (:func:`select`).

    Attributes:
        outputs: the report's ``outputs`` section (:func:`search_outputs`).
        delivered: its linear sites, in the order they were committed.
        fits: within budget (False: exit code 3).
        metric: its validation metric.
        metric_after: the validation metric after each of its sites was added.
        interval: the bound of its degradation, or None.
        warnings: budgets finer than the validation set resolves (:func:`resolution_warnings`).
    """

    outputs: dict[str, Any]
    delivered: tuple[str, ...]
    fits: bool
    metric: float
    metric_after: list[float]
    interval: Bound | None
    warnings: list[str]

    @property
    def exit_code(self) -> int:
        """0, or 3 when the delivered hybrid is not within budget."""
        return EXIT_OK if self.fits else EXIT_NO_REPLACEMENT

    def models(self) -> dict[str, tuple[str, ...]]:
        """Name → linear sites of the delivered hybrid, M_opt and M_best (where there is one)."""
        return {"delivered": self.delivered, **{
            k: tuple(v["linear"]) for k in ("m_opt", "m_best")
            if (v := self.outputs.get(k)) is not None}}


def select(config: CompileConfig, searched: Searched, metric: Metric, base: Baseline,
           budget: Budget, rows: int, console: Console) -> Selection:
    """M_opt or, with ``--select best``, M_best (:func:`search_outputs`); ``rows``: validation
    rows."""
    sched, bound_of = searched.schedule, searched.bound_of
    outputs = search_outputs(config, sched, bound_of)
    if searched.heal is not None and any(r["heal_kept"] for r in searched.heal["rounds"]):
        # no M_best: the search's other sets were measured with students a heal has retrained
        del outputs["m_best"]
    delivered = tuple(outputs[outputs["selected"]]["linear"]) if outputs[outputs["selected"]] \
        else tuple(sched.committed)
    fits = sched.fits if outputs["selected"] == "m_opt" else True
    delivered_metric = outputs[outputs["selected"]]["metric"] if delivered else sched.final_metric
    if outputs["selected"] != "m_opt":
        console.log(f"--select best: delivering M_best {list(delivered)} ({metric.name} "
                    f"{delivered_metric:.6g}) instead of M_opt {sched.committed}")
    warnings_ = resolution_warnings(metric, rows, base.allowed_drop, budget.text, base.metric,
                                    config.confidence)
    for w in warnings_:
        console.log(f"[yellow]warning[/yellow]: {w}")
    interval = bound_of(delivered) if delivered else None
    # M_best's sites are a prefix of the committed path plus one: their metrics are known
    metric_after = [*sched.metric_after_step[:len(delivered) - 1], delivered_metric] \
        if delivered else []
    return Selection(outputs, delivered, fits, delivered_metric, metric_after, interval,
                     warnings_)
