"""Stage ``heal`` as a compile runs it (:func:`heal_stage`, ``--heal``): the teacher's targets
recorded once, then rounds of heal → search from the healed hybrid (:mod:`~dtr_compile.heal.
rounds`), each heal cached (:mod:`~dtr_compile.heal.cache`) and checkpointed for ``--resume``,
each later search with a ledger of its own; the search's outcome and the students replaced by
the rounds' final ones.

Files beside the report (planned by :func:`heal_paths`): round ``r >= 2``'s search ledger
``REPORT.round<r>.ledger.jsonl`` (round 1's is the search's own ``REPORT.ledger.jsonl``) and
round ``r``'s heal checkpoint ``REPORT.heal<r>.pt``, both written while the run goes and read by
``--resume``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from dtr_compile.config import CompileConfig, cache_dir
from dtr_compile.data import Dataset, run_model
from dtr_compile.device import OnDevice, Placement
from dtr_compile.distill.plan import search_order
from dtr_compile.distill.stage import Distilled
from dtr_compile.errors import InputError
from dtr_compile.heal.cache import HealCache, heal_key, heal_key_parts, students_digest
from dtr_compile.heal.loss import Targets, loss_kind, record_targets
from dtr_compile.heal.rounds import SearchOutcome, run_rounds
from dtr_compile.heal.train import Healed, HealRecord, HealSettings, heal, trainable_students
from dtr_compile.inputs import Inputs, Sites
from dtr_compile.parallel import Group, batch_rows, gather_rows
from dtr_compile.passes.linearize import linearize, rewrite_sites
from dtr_compile.progress import Stages, progress_bar
from dtr_compile.search.baseline import Baseline
from dtr_compile.search.confidence import DEFAULT_CONFIDENCE, Bound, degradation_bound
from dtr_compile.search.ledger import hash_tensors
from dtr_compile.search.run import Searched, input_hashes, search
from dtr_compile.search.schedule import Evaluation, ScheduleResult, meets
from dtr_compile.timelimit import TIME_LIMIT_STOP, RunClock


def heal_settings(config: CompileConfig) -> HealSettings:
    """The heal's settings from ``--heal-steps``, ``--heal-lr``, ``--heal-rank``,
    ``--heal-rows`` and ``--seed``."""
    return HealSettings(steps=config.heal_steps, rows_per_step=config.heal_rows,
                        lr=config.heal_lr, rank=config.heal_rank, seed=config.seed)


def check_heal(config: CompileConfig) -> None:
    """Raises :class:`InputError` for bad ``--heal*`` values (checked even without ``--heal``,
    so that a typo in a config file fails before a long run)."""
    heal_settings(config).check()
    if config.heal_rounds < 1:
        raise InputError(f"--heal-rounds {config.heal_rounds}: must be >= 1")
    if config.heal and config.select == "best":
        raise InputError("--select best picks the best set among the search's evaluations, "
                         "and --heal retrains the students those were measured with: use "
                         "--select most-linear (the default) with --heal")


def heal_paths(report: Path, rounds: int) -> dict[str, Path]:
    """The files rounds write beside ``report`` (a ``.json`` path), by name: ``round <r>
    ledger`` for ``r >= 2`` and ``heal <r> checkpoint`` for ``r >= 1``."""
    out = {f"round {r} ledger": round_ledger(report, r) for r in range(2, rounds + 1)}
    out |= {f"heal {r} checkpoint": report.with_suffix(f".heal{r}.pt")
            for r in range(1, rounds + 1)}
    return out


def round_ledger(report: Path, r: int) -> Path:
    """Round ``r``'s search ledger (round 1: the search's own, ``REPORT.ledger.jsonl``)."""
    return report.with_suffix(".ledger.jsonl" if r == 1 else f".round{r}.ledger.jsonl")


def _output_dims(gm: torch.fx.GraphModule) -> int:
    """Dims of the graph's first output (from its captured metadata; 0 when unknown)."""
    out = gm.graph.output_node().args[0]
    first = out[0] if isinstance(out, (tuple, list)) else out
    val = getattr(first, "meta", {}).get("val")
    return val.dim() if isinstance(val, torch.Tensor) else 0


def _pack(students: dict[str, nn.Module]) -> dict[str, bytes]:
    return {sid: safetensors_save({k: v.detach().cpu().contiguous()
                                   for k, v in m.state_dict().items()})
            for sid, m in students.items()}


@dataclasses.dataclass
class _Round:
    """A round's search: its schedule (sets without the round's base), report section and
    ``bound_of`` (whole sets)."""

    schedule: ScheduleResult
    info: dict[str, Any]
    bound_of: Callable[[tuple[str, ...]], Bound | None]


def heal_stage(
    config: CompileConfig, inputs: Inputs, found: Sites, base: Baseline, distilled: Distilled,
    searched: Searched, report_path: Path, placement: Placement, group: Group, console: Console,
    stages: Stages, clock: RunClock,
) -> tuple[Distilled, Searched]:
    """With ``--heal``: heal the sites the search committed, search again from the healed
    hybrid, and so on (:func:`~dtr_compile.heal.rounds.run_rounds`); every rank runs it.

    ``clock``: the run's ``--time-limit`` clock; once the teacher's outputs are recorded, the
    rounds take their share (what is left but the export's reserve, :mod:`dtr_compile.
    timelimit`), timed on rank 0's clock so that every rank stops at the same step.

    Returns the students with the healed ones in place of the distilled ones, and the search's
    outcome over all rounds (committed sites in order; ``heal`` set to the report's section).
    Without ``--heal``, ``distilled`` and ``searched`` unchanged.
    """
    if not config.heal:
        return distilled, searched
    settings = heal_settings(config)
    gm, val, calib, names, metric = inputs.gm, inputs.val, inputs.calib, inputs.names, \
        inputs.metric
    sites, plan = found.sites, distilled.plan
    kind = loss_kind(metric, _output_dims(gm))
    with stages("heal targets", console):
        targets: Targets = record_targets(base.run_gm, calib, names, kind,
                                          batch_size=config.eval_batch, top_k=settings.top_k,
                                          placement=placement, group=group)
    console.log(f"heal: the original's outputs on {len(calib)} calibration rows recorded "
                f"({kind}, {targets.nbytes / 2**20:.1f} MiB)")
    hashes = input_hashes(config)
    calib_hash = hash_tensors(calib.inputs)
    cache = None if config.no_cache else HealCache(
        cache_dir(config), on_warning=lambda msg: console.log(f"[yellow]{msg}[/yellow]"))
    candidates = search_order([s.id for s in sites if s.id not in found.kept
                               and distilled.results[s.id].ok],
                              distilled.results)  # lowest distillation error first, explosive last
    level = config.confidence or DEFAULT_CONFIDENCE
    hib = metric.higher_is_better
    agreed = clock.agreed_clock()  # every rank stops the rounds and a heal at the same point
    rounds_seen: dict[int, _Round] = {1: _Round(searched.schedule, searched.info,
                                                searched.bound_of)}
    measured: dict[frozenset[str], tuple[float, Bound | None]] = {}

    def on_device(students: dict[str, nn.Module], ids: list[str]) -> dict[str, nn.Module]:
        if placement.is_default:
            return {sid: students[sid] for sid in ids}
        return {sid: copy.deepcopy(students[sid]).to(placement.device) for sid in ids}

    def search_fn(r: int, students: Any, base_linear: tuple[str, ...],
                  left: float | None) -> SearchOutcome:
        if r == 1:  # the search stage's own
            s = searched.schedule
            return SearchOutcome(tuple(s.committed), s.final_metric, s.stop_reason)
        remaining = [c for c in candidates if c not in base_linear]
        placed = on_device(students, candidates)
        switches = {sid: plan.switch(base.run_gm, sid, placed[sid]) for sid in candidates}
        search_gm = rewrite_sites(base.run_gm, sites, switches, class_name="SearchGraph",
                                  blocks=plan.blocks)
        for sid in base_linear:
            switches[sid].use_linear = True  # the base is linear in every evaluation
        start_metric = measured[frozenset(base_linear)][0]
        console.log(f"round {r}: searching {len(remaining)} sites on top of the healed "
                    f"{len(base_linear)}")
        sched, info, bound_of = search(
            config, hashes, search_gm, switches, remaining, dict(students), val, names, metric,
            base.reference, start_metric, base.threshold, base.allowed_drop,
            round_ledger(report_path, r), console, stages, group=group, placement=placement,
            base=base_linear, time_limit_s=0.0 if left is not None and left <= 0 else left,
            stage=f"schedule round {r}")
        rounds_seen[r] = _Round(sched, info, bound_of)
        console.log(f"round {r}: committed {sched.committed or 'no further site'}: "
                    f"{sched.stop_reason}")
        return SearchOutcome(base_linear + tuple(sched.committed),
                             sched.final_metric if sched.committed else start_metric,
                             sched.stop_reason)

    def heal_fn(r: int, students: Any, linear: tuple[str, ...], left: float | None) -> Healed:
        parts = heal_key_parts(teacher=hashes["model"], calib=calib_hash,
                               record_batch=config.eval_batch, linear=linear,
                               students=students_digest(students, linear),
                               settings=dataclasses.asdict(settings), loss=kind,
                               runtime=placement.describe())
        key = heal_key(parts)

        def cached() -> tuple[dict[str, bytes], dict[str, Any]] | None:
            if cache is None:
                return None
            got = cache.load(key, trainable_students(sites, students, linear, settings))
            return None if got is None else (_pack(got[0]), got[1])

        hit = group.broadcast(cached)
        if hit is not None:
            empty = trainable_students(sites, students, linear, settings)
            for sid, m in empty.items():
                m.load_state_dict(safetensors_load(hit[0][sid]), strict=True)
            rec = HealRecord(**hit[1])
            rec.cached = True
            console.log(f"heal round {r}: the healed students of {len(linear)} sites from the "
                        "cache")
            return Healed(empty, rec)
        with progress_bar(console, config.progress) as prog, stages(f"heal round {r}", console):
            task = prog.add_task(f"heal round {r} ({len(linear)} linear)", total=settings.steps,
                                 info="")
            healed = heal(
                base.run_gm, sites, students, linear, calib, names, targets, settings,
                blocks=plan.blocks, placement=placement, group=group,
                checkpoint=report_path.with_suffix(f".heal{r}.pt"), key=key,
                resume=config.resume, time_limit_s=left, clock=agreed,
                on_step=lambda step, loss: prog.update(task, completed=step,
                                                       info=f"loss {loss:.4g}"),
                on_eval=lambda step, loss: console.log(
                    f"heal round {r} step {step}: held-out {kind} {loss:.5g}"))
        rec = healed.record
        console.log(f"heal round {r}: held-out {kind} {rec.init_loss:.5g} → {rec.final_loss:.5g}"
                    f" in {rec.steps} steps ({rec.tokens} tokens, {rec.seconds:.1f} s"
                    + (f", resumed at step {rec.resumed_from_step}" if rec.resumed_from_step
                       else "") + f"); {rec.stop_reason}")
        if cache is not None and group.is_main and rec.ok and \
                not rec.stop_reason.startswith(TIME_LIMIT_STOP):  # the key has no time in it
            cache.save(key, healed.students, rec.to_dict(), parts)
        return healed

    def measure_fn(students: Any, linear: tuple[str, ...]) -> tuple[float, bool]:
        t0 = time.perf_counter()
        hybrid = linearize(base.run_gm, sites, on_device(students, list(linear)),
                           blocks=plan.blocks)
        runner = hybrid if placement.is_default else OnDevice(hybrid, placement)
        lo, hi = batch_rows(len(val), config.eval_batch, group)
        mine = Dataset({k: v[lo:hi] for k, v in val.inputs.items()},
                       None if val.labels is None else val.labels[lo:hi], val.source)
        out = gather_rows(lambda: run_model(runner, mine, names, config.eval_batch,
                                            reduce=metric.reduce) if hi > lo else None, group)
        value = group.guard(lambda: metric.value(out, val.labels, base.reference))
        value = value if math.isfinite(value) else math.nan
        bound = None
        if config.confidence is not None or metric.stats is not None:
            bound = group.guard(lambda: degradation_bound(metric, out, val.labels,
                                                          base.reference, level,
                                                          seed=config.seed))
        within = meets(value, base.threshold, hib)
        if config.confidence is not None and bound is not None:
            within = within and meets(bound.upper, base.allowed_drop, False)
        measured[frozenset(linear)] = (value, bound)
        console.log(f"healed hybrid ({len(linear)} linear): {metric.name} {value:.8g}"
                    + ("" if bound is None else f", drop <= {bound.upper:.4g} at {level:g}")
                    + f" {'✓' if within else '✗'} ({time.perf_counter() - t0:.1f} s)")
        return value, within

    share, t0 = clock.share("heal"), clock.elapsed()
    if share is not None:
        console.log(f"--time-limit: the heal rounds may take {share:.0f} s")
    res = run_rounds(distilled.students, search=search_fn, heal=heal_fn, measure=measure_fn,
                     higher_is_better=hib, max_rounds=config.heal_rounds, time_limit_s=share,
                     clock=agreed)
    stops = [res.stop_reason, *(r.search_stop for r in res.rounds[1:]),
             *((r.heal or {}).get("stop_reason", "") for r in res.rounds)]
    clock.used("heal", clock.elapsed() - t0,
               stopped=any(x.startswith(TIME_LIMIT_STOP) for x in stops))
    console.log(f"heal: {len(res.linear)} sites linear after {len(res.rounds)} round"
                f"{'s' if len(res.rounds) > 1 else ''}; {res.stop_reason}")
    section = {"loss": kind, "settings": dataclasses.asdict(settings),
               "top_k": targets.top_k, "targets_bytes": targets.nbytes,
               **res.to_dict(),
               "searches": {r: {"committed": list(x.schedule.committed),
                                "stop_reason": x.schedule.stop_reason,
                                "evaluations": len(x.schedule.evaluations),
                                "ledger": x.info.get("ledger"), "resume": x.info.get("resume")}
                            for r, x in rounds_seen.items()}}
    if not any(r.heal_kept for r in res.rounds):
        # nothing changed: round 1's search and the distilled students stand
        return distilled, dataclasses.replace(searched, heal=section)
    final = frozenset(res.linear)
    healed_last = any(r.heal_kept and frozenset(r.linear) == final for r in res.rounds)
    if healed_last:  # the final students were measured after their heal
        value, final_bound = measured[final]
    else:  # the last round's heal was not kept: its search's measurement stands
        value = res.metric
        final_bound = rounds_seen[max(rounds_seen)].bound_of(res.linear)
    merged = _merge(rounds_seen, res.linear, value, final_bound, healed_last, searched)

    def bound_of(linear: tuple[str, ...]) -> Bound | None:
        return final_bound if frozenset(linear) == final else None

    students = {**distilled.students, **{sid: res.students[sid] for sid in res.linear}}
    return (dataclasses.replace(distilled, students=students),
            Searched(merged, searched.info, bound_of, heal=section))


def _merge(rounds: dict[int, _Round], linear: tuple[str, ...], value: float,
           bound: Bound | None, healed_last: bool, searched: Searched) -> ScheduleResult:
    """The search over all rounds as one :class:`ScheduleResult`: the committed sites in order
    with the metric each round measured after them, every round's evaluations (renumbered, sets
    whole, phase ``<phase> (round r)`` after round 1) and, when the final students were healed
    after the last search, their measurement as an evaluation of phase ``heal``, which is also
    the last site's metric."""
    first = searched.schedule
    out = ScheduleResult(first.baseline, first.threshold, first.higher_is_better,
                         strategy=first.strategy, min_linear=first.min_linear)
    for r in sorted(rounds):
        s, base = rounds[r].schedule, tuple(out.committed)
        offset = len(out.evaluations)
        for ev in s.evaluations:
            out.evaluations.append(dataclasses.replace(
                ev, linear=base + ev.linear, step=ev.step + len(base), index=offset + ev.index,
                phase=f"{ev.phase} (round {r})" if r > 1 else ev.phase))
        out.committed += s.committed
        out.metric_after_step += s.metric_after_step
        out.committed_within_budget += s.committed_within_budget
        out.evaluations_at_commit += [offset + n for n in s.evaluations_at_commit]
        out.seconds += s.seconds
        out.stop_reason = s.stop_reason
    if tuple(out.committed) != tuple(linear):
        raise AssertionError(f"the rounds committed {out.committed}, not {list(linear)}")
    if healed_last:
        out.metric_after_step[-1] = value
        out.committed_within_budget[-1] = True  # a heal is kept only within the budget
        out.evaluations.append(Evaluation(
            len(linear), None, tuple(linear), value, 0.0, True, index=len(out.evaluations),
            phase="heal", interval=None if bound is None else bound.to_dict()))
    return out
