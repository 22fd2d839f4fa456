"""The whole compile: load → capture → find attention → distill → schedule → linearize → export.

:func:`compile_model` is the one library entry point; the CLI is a thin shell around it.
"""

from __future__ import annotations

import copy
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from dtr_compile import __version__
from dtr_compile.capture import capture, check_index_ranges, check_inputs
from dtr_compile.config import Budget, CompileConfig
from dtr_compile.data import (
    Dataset,
    load_dataset,
    run_model,
)
from dtr_compile.device import OnDevice, Placement, peak_memory
from dtr_compile.distill.cache import cache_key
from dtr_compile.distill.launch import distill_sharded, share
from dtr_compile.distill.plan import DistillResult, plan_distillation
from dtr_compile.distill.stage import (
    distill_cache,
    distill_settings,
    distill_with_progress,
    log_distilled,
    reuse_students,
)
from dtr_compile.errors import (
    EXIT_NO_REPLACEMENT,
    EXIT_OK,
    InputError,
    ParityError,
)
from dtr_compile.exporters.artifacts import (
    ExportResult,
    export_artifacts,
)
from dtr_compile.exporters.decoders import decoder_artifacts, export_decoders
from dtr_compile.exporters.onnx import parity_cases
from dtr_compile.fileio import (
    OutputLock,
    Staging,
    clean_stale_temporaries,
    write_json_atomic,
)
from dtr_compile.inputs import at_least_two, example_inputs, linearizable, load_test
from dtr_compile.linear import kinds_for_site
from dtr_compile.load import load_model
from dtr_compile.metrics import get_metric
from dtr_compile.parallel import Group, batch_rows, from_env, gather_rows, rank_device
from dtr_compile.passes.find_attention import (
    AttentionSite,
    find_attention,
)
from dtr_compile.passes.linearize import linearize, rewrite_sites
from dtr_compile.plan import artifact_paths, validate, write_plan
from dtr_compile.progress import Stages, progress_bar
from dtr_compile.report import next_steps, report_paths, write_report
from dtr_compile.runtime.speed import bench_speed, deploy_seqs
from dtr_compile.search.holdout import evaluate_test
from dtr_compile.search.ledger import (
    fingerprint,
    save_students,
)
from dtr_compile.search.run import input_hashes, resolution_warnings, search, search_outputs
from dtr_compile.search.schedule import ScheduleResult


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
        with OutputLock(plan["lock"]):
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
    """:func:`compile_model` once its paths are checked and its output locked: the artifacts
    are written into ``staging`` and moved into place together at the end (rank 0)."""
    out_path, report_path, config_path = artifact_paths(config)
    torch.manual_seed(config.seed)
    stages = Stages()
    if group.distributed:
        console.log(f"{group.world} ranks ({group.backend}); rank 0 writes the artifacts")
    if not placement.is_default:
        console.log(f"torch stages run on {placement.describe()}; capture and export on cpu/fp32")

    with stages("load", console):
        loaded = load_model(config.model, trust_pickle=config.trust_pickle)
    with stages("capture", console):
        captured = capture(loaded, example_inputs(config) if loaded.program is None else None)
    gm, names = captured.gm, captured.input_names
    # inputs the model takes as integers: whole-number float data is cast, fractions refused
    ints = {n.name for n in gm.graph.nodes if n.op == "placeholder"
            and isinstance(n.meta.get("val"), torch.Tensor)
            and not n.meta["val"].is_floating_point()}
    val = load_dataset(config.data, names, ints)  # type: ignore[arg-type]
    check_inputs(captured, val.inputs, str(config.data))
    check_index_ranges(captured, val.inputs, str(config.data))
    calib = load_dataset(config.calib, names, ints) if config.calib else val
    if config.calib:
        check_inputs(captured, calib.inputs, str(config.calib))
        check_index_ranges(captured, calib.inputs, str(config.calib))
    calib_rows = len(calib)
    calib = calib.take(config.max_calib_samples)
    metric = get_metric(config.metric, val.labels is not None)
    budget.check_metric(metric.name, metric.bounds)
    test = load_test(config, captured, names, metric)

    with stages("find_attention", console):
        scan = linearizable(find_attention(gm))
    sites = scan.require_sites()
    by_key = {s.id: s for s in sites} | {s.module_path: s for s in sites}
    unknown = [k for k in config.keep if k not in by_key]
    if unknown:
        raise InputError(f"--keep names unknown sites {unknown}; sites are "
                         f"{[s.id + '=' + s.module_path for s in sites]}")
    kept = {by_key[k].id for k in config.keep}
    if config.min_linear > len(sites) - len(kept):
        raise InputError(f"--min-linear {config.min_linear} exceeds the {len(sites) - len(kept)} "
                         f"sites that may be replaced ({len(sites)} found, {len(kept)} kept)")
    for s in sites:
        console.log(f"found {s.describe()}")
    for r in scan.rejected:
        console.log(f"[yellow]not rewritten[/yellow] {r.node} ({r.module_path}): {r.reason}")
    if config.window and not any(s.causal for s in sites):
        console.log(f"[yellow]--window {config.window} has no effect[/yellow]: it applies to "
                    "causal sites, and every site here is bidirectional")

    # the graph the run-only stages use: gm itself on cpu/fp32, else a moved copy
    run_gm = placement.graph(gm)
    runner = run_gm if placement.is_default else OnDevice(run_gm, placement)
    with progress_bar(console, config.progress) as prog, stages("baseline", console):
        task = prog.add_task("baseline", total=len(val), info="")
        lo, hi = batch_rows(len(val), config.eval_batch, group)
        mine = Dataset({k: v[lo:hi] for k, v in val.inputs.items()},
                       None if val.labels is None else val.labels[lo:hi], val.source)
        reference = gather_rows(
            lambda: run_model(runner, mine, names, config.eval_batch,
                              lambda k: prog.advance(task, k), reduce=metric.reduce)
            if hi > lo else None, group)
    baseline = group.guard(lambda: metric(reference, val.labels, reference))
    budget.check_baseline(metric.name, baseline)
    threshold = budget.threshold(baseline, metric.higher_is_better)
    console.log(f"baseline {metric.name} = {baseline:.6g}; "
                f"{budget.describe(baseline, metric.higher_is_better)}")

    paths = report_paths(report_path)
    hashes = input_hashes(config)
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
    reused = share(group, lambda: reuse_students(paths.students, distill_fp, sites, config,
                                                  console, lambda sid: plan.empty_student(gm, sid)),
                   plan, gm)
    with stages("distill", console):
        if reused is not None:
            students, results = reused
        else:
            cache = distill_cache(config, group, console)
            students, results = distill_sharded(
                group, plan, gm,
                lambda sub: distill_with_progress(config, sub, gm, calib, names, console, cache=cache,
                                     placement=placement, teacher=run_gm,
                                     ranks_here=group.local_world),
                cache, on_other=lambda sid, rank, res: log_distilled(console, sid, res, rank))
            if group.is_main:
                save_students(paths.students, distill_fp, students,
                              {sid: r.__dict__ for sid, r in results.items()})

    candidates = [s.id for s in sites if s.id not in kept and results[s.id].ok]
    # students run in the search on the placement's device (copies: the exported hybrid takes
    # the CPU originals)
    on_device = students if placement.is_default else \
        {sid: copy.deepcopy(m).to(placement.device) for sid, m in students.items()}
    switches = {sid: plan.switch(run_gm, sid, on_device[sid]) for sid in candidates}
    search_gm = rewrite_sites(run_gm, sites, switches, class_name="SearchGraph",
                              blocks=plan.blocks)
    allowed_drop = budget.allowed_drop(baseline)
    sched, search_info, bound_of = search(
        config, hashes, search_gm, switches, candidates, students, val, names, metric, reference,
        baseline, threshold, allowed_drop, paths.ledger, console, stages, group=group,
        placement=placement)
    search_info["students"] = {"path": str(paths.students), "reused": reused is not None}
    console.log(f"committed {sched.committed or 'no site'}: {sched.stop_reason}")
    del search_gm, switches, on_device
    memory = group.exchange(lambda: peak_memory(placement.device))  # every rank's peaks
    if not group.is_main:
        # the other ranks are done: they leave without waiting for rank 0's export (which may
        # take longer than a collective's timeout), and with exit code 0 whatever the search
        # found: torchrun stops every rank as soon as one exits non-zero, which would kill rank
        # 0 mid-export. The run's exit code (3: nothing fits, 4: parity) is rank 0's.
        return CompileResult(EXIT_OK, out_path, report_path, {}, None, sites, sched, results)

    outputs = search_outputs(config, sched, bound_of)
    delivered = tuple(outputs[outputs["selected"]]["linear"]) if outputs[outputs["selected"]] \
        else tuple(sched.committed)
    fits = sched.fits if outputs["selected"] == "m_opt" else True
    delivered_metric = outputs[outputs["selected"]]["metric"] if delivered else sched.final_metric
    if outputs["selected"] != "m_opt":
        console.log(f"--select best: delivering M_best {list(delivered)} ({metric.name} "
                    f"{delivered_metric:.6g}) instead of M_opt {sched.committed}")
    warnings_ = resolution_warnings(metric, len(val), allowed_drop, budget.text, baseline,
                                     config.confidence)
    for w in warnings_:
        console.log(f"[yellow]warning[/yellow]: {w}")

    def build(linear: tuple[str, ...]) -> torch.nn.Module:
        return linearize(gm, sites, {sid: students[sid] for sid in linear}, blocks=plan.blocks)

    hybrid = build(delivered)
    test_info = None
    if test is not None:
        with stages("test", console):
            test_info = evaluate_test(config, test, gm, names, metric, budget, build,
                                       {"delivered": delivered, **{
                                           k: tuple(v["linear"]) for k in ("m_opt", "m_best")
                                           if (v := outputs[k]) is not None}}, hybrid, console)
    with stages("export", console):
        example = at_least_two(val.inputs)
        exported: ExportResult = export_artifacts(
            hybrid, gm, example, parity_cases(val.inputs, captured.dynamic_dims), names,
            captured.dynamic_dims, captured.axis_ranges, output=out_path, atol=config.atol,
            target=config.target, opset=config.opset, fp16=config.fp16,
            export_original=config.export_original, engine=config.engine, console=console,
            write_to=staging.path,
            output_names=captured.output_names, sites=[(s.id, s.module_path) for s in sites],
            linear=list(delivered), linear_attention=config.linear_attention,
            external_data=config.external_data)
        stateful = export_decoders(config, gm, scan, {sid: students[sid] for sid in delivered},
                             plan.blocks, hybrid, val, names, out_path, exported.opset, console,
                             write_to=staging.path, fused=exported.fused)
    parity = exported.parity
    parity_ok = exported.ok
    exit_code = EXIT_OK if fits else EXIT_NO_REPLACEMENT
    speed = None
    seqs = deploy_seqs(config.deploy_seq)
    if config.bench and seqs != [] and parity_ok:
        with stages("bench", console):
            speed = bench_speed(config, gm, exported, example, names, captured, val, seqs,
                                 console, locate=lambda p: str(staging.staged(p)))
    interval = bound_of(delivered) if delivered else None
    # M_best's sites are a prefix of the committed path plus one: their metrics are known
    metric_after = [*sched.metric_after_step[:len(delivered) - 1], delivered_metric] \
        if delivered else []

    report = {
        "tool": {"name": "dtr-compile", "version": __version__, "torch": torch.__version__,
                 "python": platform.python_version()},
        "model": config.model,
        "artifacts": {"onnx": str(out_path), "report": str(report_path), "config": str(config_path),
                      "report_md": str(paths.markdown), "plot": str(paths.plot),
                      "ledger": str(paths.ledger), "students": str(paths.students)}
                     | exported.artifacts | decoder_artifacts(stateful),
        "metric": {"name": metric.name, "higher_is_better": metric.higher_is_better,
                   "bounds": metric.bounds},
        "budget": budget.to_dict(baseline, metric.higher_is_better),
        "baseline_metric": baseline,
        "threshold": threshold,
        "final_metric": delivered_metric,
        "validation_rows": len(val),
        "confidence": {"level": config.confidence, "required": config.confidence is not None,
                       "allowed_drop": allowed_drop,
                       "interval": None if interval is None else interval.to_dict()},
        "outputs": outputs,
        "test": test_info,
        "speed": speed,
        "warnings": warnings_,
        "calibration_rows": len(calib),
        "student": distill_settings(config).kind,
        "sites": [s.__dict__ | {"internal": list(s.internal),
                                "students": list(kinds_for_site(s.causal))} for s in sites],
        "rejected": [r.__dict__ for r in scan.rejected],
        "kept": sorted(kept),
        "replaced": [{"site": sid, "module_path": next(s.module_path for s in sites if s.id == sid),
                      "metric_after": m} for sid, m in zip(delivered, metric_after, strict=True)],
        "schedule": sched.to_dict(),
        "search": search_info,
        "distill": {sid: r.__dict__ for sid, r in results.items()},
        "parity": [p.__dict__ for p in parity],
        "parity_ok": parity_ok,
        "export": exported.to_dict(),
        **({"stateful": stateful} if stateful is not None else {}),
        "timings_s": stages.seconds,
        "runtime": {"device": str(placement.device), "dtype": placement.dtype_name,
                    "ranks": group.world, "backend": group.backend or None,
                    # MiB, per rank (rank 0's taken after the export)
                    "memory": [peak_memory(placement.device)] + memory[1:],
                    "peak_rss_by_stage_mib": stages.peak_rss_mib},  # rank 0, after each stage
        "exit_code": exit_code if parity_ok else ParityError.exit_code,
    }
    if not sched.fits:
        steps = next_steps(report, distill_target=config.distill_target, window=config.window,
                           calib_available=calib_rows)
        report["next_steps"] = steps
        console.log("no site fits the budget; try: " + "; ".join(steps))
    write_json_atomic(staging.path(config_path), config.to_dict())
    write_report(report, report_path, write_to=staging.path)
    try:
        staging.commit()  # every artifact of this run into place together
    except KeyboardInterrupt as exc:  # held during the moves: the set is whole
        exc.artifacts_written = True  # type: ignore[attr-defined]
        raise
    if not parity_ok:
        failures = exported.failures()
        raise ParityError(f"an exported artifact failed verification ({len(failures)} "
                          f"check{'s' if len(failures) > 1 else ''}; atol {config.atol:g}): "
                          f"{failures[0]}; artifacts kept for inspection ({out_path}, {report_path})")
    return CompileResult(exit_code, out_path, report_path, report, hybrid, sites, sched, results)


