"""The whole compile, as its list of stages (:func:`_compile`):

    load → capture → find attention → baseline → distill → search (schedule) → heal → select
         → test → export (prefill ONNX, decoders) → bench → report

Each stage is one call into its family's package (:mod:`dtr_compile.inputs`,
:mod:`dtr_compile.search`, :mod:`dtr_compile.distill`, :mod:`dtr_compile.exporters`,
:mod:`dtr_compile.runtime`, :mod:`dtr_compile.report`) that takes what earlier stages produced
and returns its own result; nothing there imports this module. :func:`compile_model` is the one
library entry point; the CLI is a thin shell around it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from dtr_compile.config import Budget, CompileConfig
from dtr_compile.device import Placement, peak_memory
from dtr_compile.distill.plan import DistillResult
from dtr_compile.distill.stage import distill_stage
from dtr_compile.errors import EXIT_OK, ParityError
from dtr_compile.exporters.artifacts import ExportResult
from dtr_compile.exporters.stage import export_stage
from dtr_compile.fileio import Staging, clean_stale_temporaries, lock_artifacts, write_json_atomic
from dtr_compile.heal.stage import heal_stage
from dtr_compile.inputs import find_sites, load_inputs
from dtr_compile.parallel import Group, from_env, rank_device
from dtr_compile.passes.find_attention import AttentionSite
from dtr_compile.plan import artifact_paths, validate, write_plan
from dtr_compile.progress import Stages
from dtr_compile.report import build_report, report_paths, write_report
from dtr_compile.runtime.speed import speed_stage
from dtr_compile.search.baseline import measure_baseline
from dtr_compile.search.holdout import holdout_stage
from dtr_compile.search.quantized import quantize_stage
from dtr_compile.search.run import search_stage, select
from dtr_compile.search.schedule import ScheduleResult
from dtr_compile.timelimit import RunClock


@dataclass
class CompileResult:
    """What a compile produced. ``exit_code`` is 0, 3 (no site fits the budget) or 4 (parity)."""

    exit_code: int
    output: Path
    report_path: Path
    report: dict[str, Any]
    hybrid: torch.nn.Module | None = None
    sites: tuple[AttentionSite, ...] = ()
    schedule: ScheduleResult | None = None
    distill: dict[str, DistillResult] = field(default_factory=dict)


def compile_model(config: CompileConfig, console: Console | None = None) -> CompileResult:
    """Compile ``config.model`` into a hybrid within ``config.budget`` and export it.

    Returns a :class:`CompileResult`; its ``exit_code`` is 3 when no site fits the budget (the
    original is exported instead). Raises :class:`~dtr_compile.errors.DtrError` subclasses on bad
    input (exit 2) and :class:`ParityError` (exit 4) after writing the artifacts when onnxruntime
    disagrees with PyTorch.

    Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) every rank calls this; they share
    distillation and search (:mod:`dtr_compile.parallel`) and rank 0 alone writes. The other
    ranks return a result without a report (``report == {}``) and exit code 0 once the search is
    done (a non-zero one would make torchrun stop rank 0 before it writes); the run's exit code
    is rank 0's.
    """
    console = console or Console(stderr=True)
    budget = validate(config)
    placement = Placement.parse(config.device, config.dtype)
    plan = write_plan(config)  # every rank checks the paths: they fail alike, before any exchange
    group = from_env(placement.device)
    try:
        if not group.is_main:
            console = Console(stderr=True, quiet=True)
        placement = Placement(rank_device(placement.device, group), placement.dtype)
        if placement.device.type == "cuda":
            torch.cuda.set_device(placement.device)
            torch.cuda.reset_peak_memory_stats(placement.device)
        if not group.is_main:  # writes nothing beside the output: a private staging folder
            with tempfile.TemporaryDirectory(prefix="dtr-rank-") as tmp:
                return _compile(config, console, budget, Staging(Path(tmp) / "rank"),
                                placement, group)
        with lock_artifacts(plan):  # every artifact's path: another run may share the report
            for junk in clean_stale_temporaries(list(plan.values())):
                console.log(f"removed a stale temporary of an interrupted run: {junk}")
            staging = Staging(plan["output"])
            try:
                return _compile(config, console, budget, staging, placement, group)
            finally:
                staging.discard()
    finally:
        group.close()


def _compile(config: CompileConfig, console: Console, budget: Budget, staging: Staging,
             placement: Placement, group: Group) -> CompileResult:
    """:func:`compile_model` once its paths are checked and its output locked: the stages in
    order, each taking what earlier ones produced. The artifacts are written into ``staging``
    and moved into place together at the end (rank 0).

    Every rank runs the stages up to the search; a stage that reworks the search's outcome
    (e.g. healing the students and searching again) goes right after ``search_stage``, taking
    and returning ``distilled`` and ``searched``.
    """
    torch.manual_seed(config.seed)
    stages = Stages()
    clock = RunClock.of(config, group)  # --time-limit counts from here (dtr_compile.timelimit)
    if group.distributed:
        console.log(f"{group.world} ranks ({group.backend}); rank 0 writes the artifacts")
    if not placement.is_default:
        console.log(f"torch stages run on {placement.describe()}; capture and export on cpu/fp32")
    files = artifact_paths(config)
    out_path, report_path, _ = files
    paths = report_paths(report_path)

    inputs = load_inputs(config, budget, console, stages)
    found = find_sites(config, inputs.gm, console, stages)
    base = measure_baseline(config, inputs, budget, placement, group, console, stages)
    distilled = distill_stage(config, inputs, found.sites, base.run_gm, paths.students,
                              placement, group, console, stages, clock)
    searched = search_stage(config, inputs, found, base, distilled, paths.ledger, paths.students,
                            placement, group, console, stages, clock)
    distilled, searched = heal_stage(config, inputs, found, base, distilled, searched,
                                     report_path, placement, group, console, stages, clock)
    memory = group.exchange(lambda: peak_memory(placement.device))  # every rank's peaks
    if not group.is_main:
        # the other ranks are done: they leave without waiting for rank 0's export (which may
        # take longer than a collective's timeout), and with exit code 0 whatever the search
        # found: torchrun stops every rank as soon as one exits non-zero, which would kill rank
        # 0 mid-export. The run's exit code (3: nothing fits, 4: parity) is rank 0's.
        return CompileResult(EXIT_OK, out_path, report_path, {}, None, found.sites,
                             searched.schedule, distilled.results)
    chosen = select(config, searched, inputs.metric, base, budget, len(inputs.val), console)
    hybrid = distilled.hybrid(inputs.gm, chosen.delivered)
    test = holdout_stage(config, inputs, budget, distilled, chosen, hybrid, console, stages)
    exported = export_stage(config, inputs, found, distilled, chosen.delivered, hybrid, out_path,
                            staging.path, console, stages)
    quantized = quantize_stage(config, inputs, exported, test, staging, console, stages)
    speed = speed_stage(config, inputs, exported.result, console, stages,
                        locate=lambda p: str(staging.staged(p)))
    report = build_report(config, files, inputs, found, budget, base, distilled, searched, chosen,
                          test, exported, quantized, speed, stages, clock, placement, group,
                          memory, console)
    _write(config, report, files, exported.result, staging)
    return CompileResult(chosen.exit_code, out_path, report_path, report, hybrid, found.sites,
                         searched.schedule, distilled.results)


def _write(config: CompileConfig, report: dict[str, Any], files: tuple[Path, Path, Path],
           exported: ExportResult, staging: Staging) -> None:
    """The config and the report staged beside the artifacts, then every artifact of the run
    moved into place together.

    Raises:
        ParityError: an exported artifact failed verification (after the moves: the artifacts
            are kept for inspection).
    """
    out_path, report_path, config_path = files
    write_json_atomic(staging.path(config_path), config.to_dict())
    write_report(report, report_path, write_to=staging.path)
    try:
        staging.commit()  # every artifact of this run into place together
    except KeyboardInterrupt as exc:  # held during the moves: the set is whole
        exc.artifacts_written = True  # type: ignore[attr-defined]
        raise
    if not exported.ok:
        failures = exported.failures()
        raise ParityError(f"an exported artifact failed verification ({len(failures)} "
                          f"check{'s' if len(failures) > 1 else ''}; atol {config.atol:g}): "
                          f"{failures[0]}; artifacts kept for inspection ({out_path}, {report_path})")
