"""Stage ``distill`` as a compile runs it (:func:`distill_stage`): the settings from the config,
the cache, the students of an interrupted run reused with ``--resume``, a progress bar and a log
line per site, the students saved for a later ``--resume``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from dtr_compile.config import CompileConfig, cache_dir
from dtr_compile.data import Dataset
from dtr_compile.device import Placement
from dtr_compile.distill.cache import DistillCache, cache_key
from dtr_compile.distill.execute import default_workers
from dtr_compile.distill.launch import ReadOnlyCache, distill_sharded, share
from dtr_compile.distill.plan import DistillPlan, DistillResult, DistillSettings, plan_distillation
from dtr_compile.distill.run import distill
from dtr_compile.errors import InputError
from dtr_compile.inputs import Inputs
from dtr_compile.linear.feature_maps import FEATURE_MAPS
from dtr_compile.parallel import Group
from dtr_compile.passes.find_attention import AttentionSite
from dtr_compile.passes.linearize import linearize
from dtr_compile.progress import Stages, progress_bar
from dtr_compile.report import REL_ERROR_MEANING
from dtr_compile.search.ledger import fingerprint, load_students, save_students
from dtr_compile.timelimit import RunClock


def distill_settings(config: CompileConfig) -> DistillSettings:
    """The distillation settings; ``--student`` naming a feature map is ``--feature-map``.

    Raises:
        InputError: ``--student`` and ``--feature-map`` name different feature maps.
    """
    feature_map, student = config.feature_map, config.student
    if student in FEATURE_MAPS:
        if feature_map not in ("hedgehog", student):
            raise InputError(f"--student {student} and --feature-map {feature_map} disagree; "
                             "give one of them")
        feature_map, student = student, None
    return DistillSettings(
        target=config.distill_target, feature_map=feature_map, student=student,
        steps=config.distill_steps,
        lr=config.distill_lr, block_lr=config.distill_block_lr, batch_rows=config.distill_batch,
        query_positions=config.distill_queries, loss=config.distill_loss, seed=config.seed,
        window=config.window, tokens=config.distill_tokens, window_dropout=config.window_dropout,
        init=config.student_init, step_tokens=config.distill_step_tokens)


def distill_cache(config: CompileConfig, group: Group, console: Console) -> DistillCache | None:
    """The distilled-weights cache (entries verified on load); read-only on ranks other than 0."""
    if config.no_cache:
        return None
    kind = DistillCache if group.is_main else ReadOnlyCache
    return kind(cache_dir(config), on_warning=lambda msg: console.log(f"[yellow]{msg}[/yellow]"))


def distill_with_progress(
    config: CompileConfig, plan: DistillPlan, gm: torch.fx.GraphModule, calib: Dataset,
    names: list[str], console: Console, *, cache: DistillCache | None = None,
    placement: Placement | None = None, teacher: torch.fx.GraphModule | None = None,
    ranks_here: int = 1, time_limit_s: float | None = None,
) -> tuple[dict[str, torch.nn.Module], dict[str, DistillResult]]:
    """Stage 5 with its cache and a progress bar per site (see :mod:`dtr_compile.distill`).

    ``ranks_here``: ranks sharing this machine; by default each takes its share of the CPUs.
    ``time_limit_s``: the distillation's share of ``--time-limit`` (:func:`~dtr_compile.
    distill.run.distill`).
    """
    workers = config.workers or max(1, default_workers(len(plan.sites)) // max(1, ranks_here))
    steps = plan.settings.steps
    console.log(REL_ERROR_MEANING)
    with progress_bar(console, config.progress) as prog:
        record = prog.add_task("teacher activations", total=len(calib), info="")
        tasks = {s.id: prog.add_task(f"distill {s.id} ({plan.targets[s.id]})", total=steps,
                                     info="") for s in plan.sites}

        def on_done(sid: str, res: DistillResult) -> None:
            prog.update(tasks[sid], completed=steps, info="cached" if res.cached else "done")
            log_distilled(console, sid, res)

        return distill(
            gm, plan, calib, names, record_batch=config.eval_batch,
            max_calib_tokens=config.max_calib_tokens, workers=workers, cache=cache,
            placement=placement, teacher=teacher, time_limit_s=time_limit_s,
            on_record=lambda k: prog.advance(record, k),
            on_step=lambda sid, step, loss: prog.update(tasks[sid], completed=step,
                                                        info=f"loss {loss:.3g}"),
            on_done=on_done)


def log_distilled(console: Console, sid: str, res: DistillResult, rank: int = 0) -> None:
    status = "ok" if res.ok else f"[red]failed[/red]: {res.reason} (kept as softmax)"
    how = "from the cache" if res.cached else f"in {res.seconds:.1f} s, {res.steps} steps"
    console.log(f"distilled {sid} ({res.target}){f' on rank {rank}' if rank else ''}: rel. error "
                f"{res.init_error:.3f} → {res.final_error:.3f} {how}, linear branch "
                f"{res.linear_contribution:.3f}, {status}"
                + (f" ({res.note})" if res.note else ""))


def reuse_students(
    path: Path, distill_fp: str, sites: tuple[AttentionSite, ...] | list[AttentionSite],
    config: CompileConfig, console: Console, build: Callable[[str], torch.nn.Module],
) -> tuple[dict[str, torch.nn.Module], dict[str, DistillResult]] | None:
    """With ``--resume``: the distilled modules of the interrupted run, if distilled from the
    same inputs and settings (see :func:`dtr_compile.search.ledger.save_students`); ``build`` makes
    a site's empty student. Students that run's ``--time-limit`` cut short are reused only
    under a ``--time-limit`` again: without one, every site is distilled again (the cut ones to
    their full budget, the others from the cache), and the ledger, whose fingerprint covers the
    weights, starts afresh."""
    if not config.resume:
        return None
    by_id = {s.id: s for s in sites}
    got = load_students(path, distill_fp, build)
    if isinstance(got, str) or set(got[0]) != set(by_id):
        console.log(f"distilling again: {got if isinstance(got, str) else 'other sites'}")
        return None
    modules, results = got
    cut = sorted(sid for sid, r in results.items() if r.get("time_limited"))
    if cut and config.time_limit is None:
        # the previous run's limit cut them short; this one has the time to train them fully
        # (the others come back from the cache, which never took the cut ones)
        console.log(f"distilling again: {', '.join(cut)} were cut short by the previous "
                    "run's --time-limit, and this run has none")
        return None
    console.log(f"resuming: distilled weights of {len(modules)} sites from {path}")
    return ({sid: m for sid, m in modules.items()},  # type: ignore[misc]
            {sid: DistillResult(**r) for sid, r in results.items()})


@dataclass
class Distilled:
    """Every site's student (:func:`distill_stage`).

    Attributes:
        plan: the distillation plan (targets, blocks, cache keys).
        students: site id → trained student (a linear-attention module, or a whole block's).
        results: site id → how its distillation went (``ok`` False: kept as softmax).
        reused: the students are those of an interrupted run (``--resume``).
    """

    plan: DistillPlan
    students: dict[str, torch.nn.Module]
    results: dict[str, DistillResult]
    reused: bool

    def hybrid(self, gm: torch.fx.GraphModule, linear: tuple[str, ...]) -> torch.nn.Module:
        """``gm`` with the sites ``linear`` replaced by their students
        (:func:`~dtr_compile.passes.linearize.linearize`)."""
        return linearize(gm, self.plan.sites, {sid: self.students[sid] for sid in linear},
                         blocks=self.plan.blocks)


def distill_stage(
    config: CompileConfig, inputs: Inputs, sites: tuple[AttentionSite, ...],
    teacher: torch.fx.GraphModule, students_path: Path, placement: Placement, group: Group,
    console: Console, stages: Stages, clock: RunClock,
) -> Distilled:
    """A student per site, trained on the calibration set against ``teacher`` (the original on
    the placement's device), shared out over the ranks (:mod:`dtr_compile.distill.launch`);
    with ``--resume`` the students saved at ``students_path`` by an interrupted run of the same
    inputs and settings, else from the cache; rank 0 saves them there for a later ``--resume``
    (students cut short by ``--time-limit`` too: the cache does not take them).

    ``clock``: the run's ``--time-limit`` clock; the distillation takes its share
    (:mod:`dtr_compile.timelimit`), each rank cutting its own sites' trainings.

    Raises:
        InputError: the distillation settings are invalid for a site (e.g. a causal-only kind on
            a bidirectional site).
    """
    gm, calib, names = inputs.gm, inputs.calib, inputs.names
    plan = plan_distillation(gm, sites, distill_settings(config), calib, config.eval_batch)
    if not placement.is_default:
        # the teacher's device and dtype change its activations, hence the students
        for sid in plan.keys:
            plan.key_parts[sid] = dict(plan.key_parts[sid], runtime=f"{placement.device.type}/"
                                       f"{placement.dtype_name}")
            plan.keys[sid] = cache_key(plan.key_parts[sid])
    for sid, note in plan.notes.items():
        console.log(f"[yellow]{sid}[/yellow]: {note}")
    # each site's cache key covers its teacher, settings, calibration rows and code
    distill_fp = fingerprint({sid: plan.keys[sid] for sid in sorted(plan.keys)})
    reused = share(group, lambda: reuse_students(students_path, distill_fp, sites, config,
                                                 console, lambda sid: plan.empty_student(gm, sid)),
                   plan, gm)
    with stages("distill", console):
        seconds, t0 = clock.share("distill"), clock.elapsed()
        if seconds is not None:
            console.log(f"--time-limit: the distillation may take {seconds:.0f} s")
        if reused is not None:
            students, results = reused
        else:
            cache = distill_cache(config, group, console)
            students, results = distill_sharded(
                group, plan, gm,
                lambda sub: distill_with_progress(config, sub, gm, calib, names, console,
                                                  cache=cache, placement=placement,
                                                  teacher=teacher, ranks_here=group.local_world,
                                                  time_limit_s=seconds),
                cache, on_other=lambda sid, rank, res: log_distilled(console, sid, res, rank))
            if group.is_main:
                save_students(students_path, distill_fp, students,
                              {sid: r.__dict__ for sid, r in results.items()})
        clock.used("distill", clock.elapsed() - t0,
                   stopped=any(r.time_limited for r in results.values()))
    return Distilled(plan, students, results, reused is not None)
