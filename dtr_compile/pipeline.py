"""The whole compile: load → capture → find attention → distill → schedule → linearize → export.

:func:`compile_model` is the one library entry point; the CLI is a thin shell around it.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dtr_compile import __version__
from dtr_compile.capture import capture, check_inputs
from dtr_compile.config import Budget, CompileConfig, parse_duration
from dtr_compile.data import Dataset, load_dataset, run_model
from dtr_compile.distill.cache import DistillCache
from dtr_compile.distill.execute import default_workers
from dtr_compile.distill.plan import DistillPlan, DistillResult, DistillSettings, plan_distillation
from dtr_compile.distill.run import distill
from dtr_compile.errors import (
    EXIT_NO_REPLACEMENT,
    EXIT_OK,
    InputError,
    ParityError,
)
from dtr_compile.exporters.artifacts import ExportResult, check_export_options, export_artifacts
from dtr_compile.exporters.onnx import parity_cases
from dtr_compile.fileio import write_json_atomic
from dtr_compile.linear import kinds_for_site
from dtr_compile.linear.feature_maps import FEATURE_MAPS
from dtr_compile.linear.kernel import SiteSwitch
from dtr_compile.load import check_model_path, load_model
from dtr_compile.metrics import Metric, get_metric
from dtr_compile.passes.find_attention import (
    AttentionScan,
    AttentionSite,
    Rejected,
    find_attention,
)
from dtr_compile.passes.linearize import linearize, rewrite_sites
from dtr_compile.report import report_paths, write_report
from dtr_compile.search.ledger import (
    Ledger,
    fingerprint,
    hash_path,
    hash_tensors,
    load_students,
    save_students,
)
from dtr_compile.search.prefix_cache import PrefixCache, SegmentedGraph
from dtr_compile.search.schedule import STRATEGIES, Evaluation, ScheduleResult, schedule


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


def artifact_paths(config: CompileConfig) -> tuple[Path, Path, Path]:
    """``(onnx, report, config)`` paths: the report defaults to ``<output>.report.json``."""
    out = Path(config.output)
    report = Path(config.report) if config.report else out.with_suffix(".report.json")
    return out, report, out.with_suffix(".config.json")


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                    console=console, transient=True, disable=not enabled)


def _validate(config: CompileConfig) -> Budget:
    """Every check that needs no model: done before anything is loaded or written."""
    budget = Budget.parse(config.budget)
    check_model_path(config.model)
    if config.data is None:
        raise InputError("no validation data: pass --data VAL.pt or set `data = \"...\"` in "
                         "dtr.toml ([tool.dtr-compile] in pyproject.toml)")
    for what, p in (("data", config.data), ("calibration data", config.calib)):
        if p is not None and not Path(p).is_file():
            raise InputError(f"{what} file not found: {p}")
    if Path(config.output).suffix != ".onnx":
        raise InputError(f"output {config.output!r} must end in .onnx")
    if config.max_linear is not None and config.max_linear < 0:
        raise InputError("--max-linear must be >= 0")
    if config.min_linear < 0:
        raise InputError("--min-linear must be >= 0")
    if config.max_linear is not None and config.min_linear > config.max_linear:
        raise InputError(f"--min-linear {config.min_linear} exceeds --max-linear "
                         f"{config.max_linear}")
    if config.search not in STRATEGIES:
        raise InputError(f"unknown --search {config.search!r}; choose one of "
                         f"{', '.join(STRATEGIES)}")
    if config.max_evals is not None and config.max_evals < 1:
        raise InputError("--max-evals must be >= 1")
    if config.time_limit is not None:
        parse_duration(config.time_limit)
    if config.cache_mb < 0:
        raise InputError("--cache-mb must be >= 0 (0 turns the prefix cache off)")
    check_export_options(target=config.target, opset=config.opset, engine=config.engine)
    _distill_settings(config).check()
    if config.max_calib_tokens < 1:
        raise InputError("--max-calib-tokens must be >= 1")
    if config.workers < 0:
        raise InputError("--workers must be >= 0 (0: one per CPU)")
    return budget


def _distill_settings(config: CompileConfig) -> DistillSettings:
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


def _distill(
    config: CompileConfig, plan: DistillPlan, gm: torch.fx.GraphModule, calib: Dataset,
    names: list[str], console: Console,
) -> tuple[dict[str, torch.nn.Module], dict[str, DistillResult]]:
    """Stage 5 with its cache and a progress bar per site (see :mod:`dtr_compile.distill.run`)."""
    cache_dir = Path(config.cache_dir) if config.cache_dir else \
        Path(config.output).parent / ".dtr-cache"
    cache = None if config.no_cache else DistillCache(cache_dir)
    workers = config.workers or default_workers(len(plan.sites))
    steps = plan.settings.steps
    with _progress(console, config.progress) as prog:
        record = prog.add_task("teacher activations", total=len(calib), info="")
        tasks = {s.id: prog.add_task(f"distill {s.id} ({plan.targets[s.id]})", total=steps,
                                     info="") for s in plan.sites}

        def on_done(sid: str, res: DistillResult) -> None:
            prog.update(tasks[sid], completed=steps, info="cached" if res.cached else "done")
            status = "ok" if res.ok else f"[red]failed[/red]: {res.reason} (kept as softmax)"
            how = "from the cache" if res.cached else f"in {res.seconds:.1f} s, {res.steps} steps"
            console.log(f"distilled {sid} ({res.target}): rel. error {res.init_error:.3f} → "
                        f"{res.final_error:.3f} {how}, {status}"
                        + (f" ({res.note})" if res.note else ""))

        return distill(
            gm, plan, calib, names, record_batch=config.eval_batch,
            max_calib_tokens=config.max_calib_tokens, workers=workers, cache=cache,
            on_record=lambda k: prog.advance(record, k),
            on_step=lambda sid, step, loss: prog.update(tasks[sid], completed=step,
                                                        info=f"loss {loss:.3g}"),
            on_done=on_done)


def _example_inputs(config: CompileConfig) -> dict[str, torch.Tensor] | None:
    """For eager (Hugging Face / pickle) models: two rows of the data, as capture examples."""
    obj = torch.load(config.data, weights_only=True, map_location="cpu") if config.data else None
    if not isinstance(obj, dict):
        return None
    return {k: v[:2] for k, v in obj.items() if k != "labels" and isinstance(v, torch.Tensor)}


@contextmanager
def _stage(timings: dict[str, float], name: str, console: Console) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 3)
    console.log(f"[bold]{name}[/bold] done in {timings[name]:.1f} s")


def _input_hashes(config: CompileConfig) -> dict[str, str]:
    """SHA-256 of the model and of the validation and calibration files."""
    data = hash_path(config.data)  # type: ignore[arg-type]
    return {"model": hash_path(config.model), "data": data,
            "calib": hash_path(config.calib) if config.calib else data}


def _reuse_students(
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


def _search(
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
    ledger_path: Path,
    console: Console,
    timings: dict[str, float],
) -> tuple[ScheduleResult, dict[str, Any]]:
    """Stage 6: the search, evaluated through the prefix cache and recorded in the ledger.

    The ledger's fingerprint covers everything an evaluation's metric depends on, so
    ``--resume`` replays only measurements of these exact inputs. Ctrl-C propagates after the
    ledger is closed: every finished evaluation is on disk.
    """
    parts = {
        "model": hashes["model"],
        "data": hashes["data"],
        "students": hash_tensors({f"{sid}.{k}": v for sid in candidates
                                  for k, v in students[sid].state_dict().items()}),
        "metric": metric.identity or metric.name,
        "eval_batch": str(config.eval_batch),
        "dtr_compile": __version__,
        "torch": torch.__version__,
    }
    fp = fingerprint(parts)
    ledger, known, note = Ledger.open(ledger_path, fp, resume=config.resume, inputs=parts)
    console.log(note)
    cache: PrefixCache | None = None
    if candidates:
        graph = SegmentedGraph(search_gm, switches, [val.inputs[n][:2] for n in names])
        cache = PrefixCache(graph, val, names, config.eval_batch, metric,
                            capacity_bytes=config.cache_mb << 20)

    def evaluate(linear: tuple[str, ...]) -> float:
        assert cache is not None
        return metric(cache.outputs(linear, base=linear[:-1]), val.labels, reference)

    def on_eval(ev: Evaluation) -> None:
        if not ev.replayed:
            ledger.append(ev, strategy=config.search)
        mark = "✓" if ev.within_budget else "✗"
        how = "replayed" if ev.replayed else f"{ev.seconds:.1f} s"
        console.log(f"step {ev.step} ({ev.phase}): +{ev.candidate} → {metric.name} "
                    f"{ev.metric:.8g} {mark} ({how})")

    min_linear = min(config.min_linear, len(candidates))
    if min_linear < config.min_linear:
        console.log(f"[yellow]--min-linear {config.min_linear}: only {len(candidates)} sites "
                    "distilled successfully[/yellow]")
    time_limit_s = parse_duration(config.time_limit) if config.time_limit is not None else None
    try:
        with _stage(timings, "schedule", console):
            sched = schedule(
                candidates, evaluate, baseline=baseline, threshold=threshold,
                higher_is_better=metric.higher_is_better, strategy=config.search,
                max_linear=config.max_linear, min_linear=min_linear, max_evals=config.max_evals,
                time_limit_s=time_limit_s, known=known, on_eval=on_eval)
    except KeyboardInterrupt:
        console.log(f"interrupted: the finished evaluations are in {ledger_path}; rerun with "
                    "--resume to continue from them")
        raise
    finally:
        ledger.close()
    if len(sched.committed) < config.min_linear:
        sched.min_linear = config.min_linear  # not met: `fits` is False, exit 3
    info = {
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
        "fingerprint": fp,
        "inputs": parts,
        "cache": cache.stats.to_dict() if cache is not None else None,
    }
    if cache is not None:
        st = cache.stats
        console.log(f"prefix cache: {st.segments_run}/{st.segments_full} segment runs "
                    f"({100 * st.saved:.0f}% saved), peak {st.peak_bytes / 2**20:.0f} MiB")
    return sched, info


def _linearizable(scan: AttentionScan) -> AttentionScan:
    """Move sites the linear module cannot take yet (the ``(BH)TD`` layout of
    ``nn.MultiheadAttention``'s bmm path) to the rejected list, with the reason."""
    ok = tuple(s for s in scan.sites if s.layout == "BHTD")
    moved = tuple(Rejected(s.output, s.module_path,
                           f"layout {s.layout}: the linear-attention module takes [B, H, T, D] "
                           "sites only (not yet supported)")
                  for s in scan.sites if s.layout != "BHTD")
    if not moved:
        return scan
    return AttentionScan(sites=ok, rejected=scan.rejected + moved)


def compile_model(config: CompileConfig, console: Console | None = None) -> CompileResult:
    """Compile ``config.model`` into a hybrid within ``config.budget`` and export it.

    Returns a :class:`CompileResult`; its ``exit_code`` is 3 when no site fits the budget (the
    original is exported instead). Raises :class:`~dtr_compile.errors.DtrError` subclasses on bad
    input (exit 2) and :class:`ParityError` (exit 4) after writing the artifacts when onnxruntime
    disagrees with PyTorch.
    """
    console = console or Console(stderr=True)
    budget = _validate(config)
    out_path, report_path, config_path = artifact_paths(config)
    torch.manual_seed(config.seed)
    timings: dict[str, float] = {}

    with _stage(timings, "load", console):
        loaded = load_model(config.model, trust_pickle=config.trust_pickle)
    with _stage(timings, "capture", console):
        captured = capture(loaded, _example_inputs(config) if loaded.program is None else None)
    gm, names = captured.gm, captured.input_names
    val = load_dataset(config.data, names)  # type: ignore[arg-type]
    check_inputs(captured, val.inputs, str(config.data))
    calib = load_dataset(config.calib, names) if config.calib else val
    if config.calib:
        check_inputs(captured, calib.inputs, str(config.calib))
    calib = calib.take(config.max_calib_samples)
    metric = get_metric(config.metric, val.labels is not None)
    budget.check_metric(metric.name, metric.bounds)

    with _stage(timings, "find_attention", console):
        scan = _linearizable(find_attention(gm))
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

    with _progress(console, config.progress) as prog, _stage(timings, "baseline", console):
        task = prog.add_task("baseline", total=len(val), info="")
        reference = run_model(gm, val, names, config.eval_batch, lambda k: prog.advance(task, k),
                              reduce=metric.reduce)
    baseline = metric(reference, val.labels, reference)
    budget.check_baseline(metric.name, baseline)
    threshold = budget.threshold(baseline, metric.higher_is_better)
    console.log(f"baseline {metric.name} = {baseline:.6g}; "
                f"{budget.describe(baseline, metric.higher_is_better)}")

    paths = report_paths(report_path)
    hashes = _input_hashes(config)
    plan = plan_distillation(gm, sites, _distill_settings(config), calib, config.eval_batch)
    for sid, note in plan.notes.items():
        console.log(f"[yellow]{sid}[/yellow]: {note}")
    # each site's cache key covers its teacher, settings, calibration rows and code
    distill_fp = fingerprint({sid: plan.keys[sid] for sid in sorted(plan.keys)})
    reused = _reuse_students(paths.students, distill_fp, sites, config, console,
                             lambda sid: plan.empty_student(gm, sid))
    with _stage(timings, "distill", console):
        if reused is not None:
            students, results = reused
        else:
            students, results = _distill(config, plan, gm, calib, names, console)
            save_students(paths.students, distill_fp, students,
                          {sid: r.__dict__ for sid, r in results.items()})

    candidates = [s.id for s in sites if s.id not in kept and results[s.id].ok]
    switches = {sid: plan.switch(gm, sid, students[sid]) for sid in candidates}
    search_gm = rewrite_sites(gm, sites, switches, class_name="SearchGraph", blocks=plan.blocks)
    sched, search_info = _search(config, hashes, search_gm, switches, candidates, students, val,
                                 names, metric, reference, baseline, threshold, paths.ledger,
                                 console, timings)
    search_info["students"] = {"path": str(paths.students), "reused": reused is not None}
    console.log(f"committed {sched.committed or 'no site'}: {sched.stop_reason}")

    hybrid = linearize(gm, sites, {sid: students[sid] for sid in sched.committed},
                       blocks=plan.blocks)
    with _stage(timings, "export", console):
        example = {k: v[: max(2, min(len(val), 2))] for k, v in val.inputs.items()}
        exported: ExportResult = export_artifacts(
            hybrid, gm, example, parity_cases(val.inputs, captured.dynamic_dims), names,
            captured.dynamic_dims, captured.axis_ranges, output=out_path, atol=config.atol,
            target=config.target, opset=config.opset, fp16=config.fp16,
            export_original=config.export_original, engine=config.engine, console=console)
    parity = exported.parity
    parity_ok = exported.ok
    exit_code = EXIT_OK if sched.fits else EXIT_NO_REPLACEMENT

    report = {
        "tool": {"name": "dtr-compile", "version": __version__, "torch": torch.__version__,
                 "python": platform.python_version()},
        "model": config.model,
        "artifacts": {"onnx": str(out_path), "report": str(report_path), "config": str(config_path),
                      "report_md": str(paths.markdown), "plot": str(paths.plot),
                      "ledger": str(paths.ledger), "students": str(paths.students)}
                     | exported.artifacts,
        "metric": {"name": metric.name, "higher_is_better": metric.higher_is_better,
                   "bounds": metric.bounds},
        "budget": budget.to_dict(baseline, metric.higher_is_better),
        "baseline_metric": baseline,
        "threshold": threshold,
        "final_metric": sched.final_metric,
        "validation_rows": len(val),
        "calibration_rows": len(calib),
        "student": _distill_settings(config).kind,
        "sites": [s.__dict__ | {"internal": list(s.internal),
                                "students": list(kinds_for_site(s.causal))} for s in sites],
        "rejected": [r.__dict__ for r in scan.rejected],
        "kept": sorted(kept),
        "replaced": [{"site": sid, "module_path": next(s.module_path for s in sites if s.id == sid),
                      "metric_after": m} for sid, m in zip(sched.committed, sched.metric_after_step, strict=True)],
        "schedule": sched.to_dict(),
        "search": search_info,
        "distill": {sid: r.__dict__ for sid, r in results.items()},
        "parity": [p.__dict__ for p in parity],
        "parity_ok": parity_ok,
        "export": exported.to_dict(),
        "timings_s": timings,
        "exit_code": exit_code if parity_ok else ParityError.exit_code,
    }
    write_json_atomic(config_path, config.to_dict())
    write_report(report, report_path)
    if not parity_ok:
        failures = exported.failures()
        raise ParityError(f"an exported artifact failed verification ({len(failures)} "
                          f"check{'s' if len(failures) > 1 else ''}; atol {config.atol:g}): "
                          f"{failures[0]}; artifacts kept for inspection ({out_path}, {report_path})")
    return CompileResult(exit_code, out_path, report_path, report, hybrid, sites, sched, results)
