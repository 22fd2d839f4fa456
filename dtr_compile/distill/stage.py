"""The distill stage as a compile runs it: the settings from the config, the cache, the students
of an interrupted run reused with ``--resume``, a progress bar and a log line per site.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

from dtr_compile.config import CompileConfig, cache_dir
from dtr_compile.data import Dataset
from dtr_compile.device import Placement
from dtr_compile.distill.cache import DistillCache
from dtr_compile.distill.execute import default_workers
from dtr_compile.distill.launch import ReadOnlyCache
from dtr_compile.distill.plan import DistillPlan, DistillResult, DistillSettings
from dtr_compile.distill.run import distill
from dtr_compile.errors import InputError
from dtr_compile.linear.feature_maps import FEATURE_MAPS
from dtr_compile.parallel import Group
from dtr_compile.passes.find_attention import AttentionSite
from dtr_compile.progress import progress_bar
from dtr_compile.report import REL_ERROR_MEANING
from dtr_compile.search.ledger import load_students


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
        window=config.window)


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
    ranks_here: int = 1,
) -> tuple[dict[str, torch.nn.Module], dict[str, DistillResult]]:
    """Stage 5 with its cache and a progress bar per site (see :mod:`dtr_compile.distill`).

    ``ranks_here``: ranks sharing this machine; by default each takes its share of the CPUs.
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
            placement=placement, teacher=teacher,
            on_record=lambda k: prog.advance(record, k),
            on_step=lambda sid, step, loss: prog.update(tasks[sid], completed=step,
                                                        info=f"loss {loss:.3g}"),
            on_done=on_done)


def log_distilled(console: Console, sid: str, res: DistillResult, rank: int = 0) -> None:
    status = "ok" if res.ok else f"[red]failed[/red]: {res.reason} (kept as softmax)"
    how = "from the cache" if res.cached else f"in {res.seconds:.1f} s, {res.steps} steps"
    console.log(f"distilled {sid} ({res.target}){f' on rank {rank}' if rank else ''}: rel. error "
                f"{res.init_error:.3f} → {res.final_error:.3f} {how}, {status}"
                + (f" ({res.note})" if res.note else ""))


def reuse_students(
    path: Path, distill_fp: str, sites: tuple[AttentionSite, ...] | list[AttentionSite],
    config: CompileConfig, console: Console, build: Callable[[str], torch.nn.Module],
) -> tuple[dict[str, torch.nn.Module], dict[str, DistillResult]] | None:
    """With ``--resume``: the distilled modules of the interrupted run, if distilled from the
    same inputs and settings (see :func:`dtr_compile.search.ledger.save_students`); ``build`` makes
    a site's empty student."""
    if not config.resume:
        return None
    by_id = {s.id: s for s in sites}
    got = load_students(path, distill_fp, build)
    if isinstance(got, str) or set(got[0]) != set(by_id):
        console.log(f"distilling again: {got if isinstance(got, str) else 'other sites'}")
        return None
    modules, results = got
    console.log(f"resuming: distilled weights of {len(modules)} sites from {path}")
    return ({sid: m for sid, m in modules.items()},  # type: ignore[misc]
            {sid: DistillResult(**r) for sid, r in results.items()})
