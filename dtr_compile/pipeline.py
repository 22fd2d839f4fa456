"""The whole compile: load → capture → find attention → distill → schedule → linearize → export.

:func:`compile_model` is the one library entry point; the CLI is a thin shell around it.
"""

from __future__ import annotations

import copy
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
from dtr_compile.device import OnDevice, Placement, peak_memory
from dtr_compile.distill.cache import DistillCache, cache_key
from dtr_compile.distill.execute import default_workers
from dtr_compile.distill.launch import ReadOnlyCache, distill_sharded, share
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
from dtr_compile.linear.kernel import SiteSwitch
from dtr_compile.load import check_model_path, load_model
from dtr_compile.metrics import Metric, get_metric
from dtr_compile.parallel import Group, batch_rows, from_env, gather_rows, rank_device
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
    return DistillSettings(
        target=config.distill_target, feature_map=config.feature_map, steps=config.distill_steps,
        lr=config.distill_lr, block_lr=config.distill_block_lr, batch_rows=config.distill_batch,
        query_positions=config.distill_queries, loss=config.distill_loss, seed=config.seed,
        window=config.window)


def _distill_cache(config: CompileConfig, group: Group) -> DistillCache | None:
    """The distilled-weights cache; read-only on ranks other than 0."""
    cache_dir = Path(config.cache_dir) if config.cache_dir else \
        Path(config.output).parent / ".dtr-cache"
    if config.no_cache:
        return None
    return DistillCache(cache_dir) if group.is_main else ReadOnlyCache(cache_dir)


def _distill(
    config: CompileConfig, plan: DistillPlan, gm: torch.fx.GraphModule, calib: Dataset,
    names: list[str], console: Console, *, cache: DistillCache | None = None,
    placement: Placement | None = None, teacher: torch.fx.GraphModule | None = None,
    ranks_here: int = 1,
) -> tuple[dict[str, torch.nn.Module], dict[str, DistillResult]]:
    """Stage 5 with its cache and a progress bar per site (see :mod:`dtr_compile.distill.run`).

    ``ranks_here``: ranks sharing this machine; by default each takes its share of the CPUs.
    """
    workers = config.workers or max(1, default_workers(len(plan.sites)) // max(1, ranks_here))
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
            placement=placement, teacher=teacher,
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
    *,
    group: Group | None = None,
    placement: Placement | None = None,
) -> tuple[ScheduleResult, dict[str, Any]]:
    """Stage 6: the search, evaluated through the prefix cache and recorded in the ledger.

    The ledger's fingerprint covers everything an evaluation's metric depends on, so
    ``--resume`` replays only measurements of these exact inputs. Ctrl-C propagates after the
    ledger is closed: every finished evaluation is on disk.

    Over several ranks (``group``), each evaluates its run of whole validation batches and the
    reduced rows are gathered before the metric (see :mod:`dtr_compile.parallel`): every rank
    makes the same decisions; rank 0 alone reads and writes the ledger.
    """
    group = group or Group()
    placement = placement or Placement()
    parts = {
        "model": hashes["model"],
        "data": hashes["data"],
        "students": hash_tensors({f"{sid}.{k}": v for sid in candidates
                                  for k, v in students[sid].state_dict().items()}),
        "metric": metric.identity or metric.name,
        "eval_batch": str(config.eval_batch),
        "dtr_compile": __version__,
        "torch": torch.__version__,
        "runtime": placement.describe(),
    }
    fp = fingerprint(parts)
    opened: list[Ledger] = []

    def open_ledger() -> tuple[dict[frozenset[str], tuple[float, float]], str]:
        ledger, known, note = Ledger.open(ledger_path, fp, resume=config.resume, inputs=parts)
        opened.append(ledger)
        return known, note

    known, note = group.broadcast(open_ledger)
    console.log(note)
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

    def evaluate(linear: tuple[str, ...]) -> float:
        rows = gather_rows(lambda: None if cache is None else
                           cache.outputs(linear, base=linear[:-1]), group)
        return group.guard(lambda: metric(rows, val.labels, reference))

    def on_eval(ev: Evaluation) -> None:
        if not ev.replayed and opened:
            opened[0].append(ev, strategy=config.search)
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
                time_limit_s=time_limit_s, known=known, on_eval=on_eval,
                clock=(lambda: group.broadcast(time.perf_counter)) if group.distributed
                else time.perf_counter)
    except KeyboardInterrupt:
        console.log(f"interrupted: the finished evaluations are in {ledger_path}; rerun with "
                    "--resume to continue from them")
        raise
    finally:
        for ledger in opened:
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
        "ranks": group.world,
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

    Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) every rank calls this; they share
    distillation and search (:mod:`dtr_compile.parallel`) and rank 0 alone writes. The other
    ranks return a result without a report (``report == {}``) and the same exit code.
    """
    console = console or Console(stderr=True)
    budget = _validate(config)
    placement = Placement.parse(config.device, config.dtype)
    group = from_env(placement.device)
    try:
        if not group.is_main:
            console = Console(stderr=True, quiet=True)
        placement = Placement(rank_device(placement.device, group), placement.dtype)
        if placement.device.type == "cuda":
            torch.cuda.set_device(placement.device)
            torch.cuda.reset_peak_memory_stats(placement.device)
        return _compile(config, console, budget, placement, group)
    finally:
        group.close()


def _compile(config: CompileConfig, console: Console, budget: Budget, placement: Placement,
             group: Group) -> CompileResult:
    out_path, report_path, config_path = artifact_paths(config)
    torch.manual_seed(config.seed)
    timings: dict[str, float] = {}
    if group.distributed:
        console.log(f"{group.world} ranks ({group.backend}); rank 0 writes the artifacts")
    if not placement.is_default:
        console.log(f"torch stages run on {placement.describe()}; capture and export on cpu/fp32")

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

    # the graph the run-only stages use: gm itself on cpu/fp32, else a moved copy
    run_gm = placement.graph(gm)
    runner = run_gm if placement.is_default else OnDevice(run_gm, placement)
    with _progress(console, config.progress) as prog, _stage(timings, "baseline", console):
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
    hashes = _input_hashes(config)
    plan = plan_distillation(gm, sites, _distill_settings(config), calib, config.eval_batch)
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
    reused = share(group, lambda: _reuse_students(paths.students, distill_fp, sites, config,
                                                  console, lambda sid: plan.empty_student(gm, sid)),
                   plan, gm)
    with _stage(timings, "distill", console):
        if reused is not None:
            students, results = reused
        else:
            cache = _distill_cache(config, group)
            students, results = distill_sharded(
                group, plan, gm,
                lambda sub: _distill(config, sub, gm, calib, names, console, cache=cache,
                                     placement=placement, teacher=run_gm,
                                     ranks_here=group.local_world),
                cache)
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
    sched, search_info = _search(config, hashes, search_gm, switches, candidates, students, val,
                                 names, metric, reference, baseline, threshold, paths.ledger,
                                 console, timings, group=group, placement=placement)
    search_info["students"] = {"path": str(paths.students), "reused": reused is not None}
    console.log(f"committed {sched.committed or 'no site'}: {sched.stop_reason}")
    del search_gm, switches, on_device
    memory = group.exchange(lambda: peak_memory(placement.device))  # every rank's peaks
    if not group.is_main:
        # the other ranks are done: they leave with the search's exit code, without waiting for
        # rank 0's export (which may take longer than a collective's timeout); a parity failure
        # is rank 0's exit code, which torchrun reports
        code = EXIT_OK if sched.fits else EXIT_NO_REPLACEMENT
        return CompileResult(code, out_path, report_path, {}, None, sites, sched, results)

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
        "sites": [s.__dict__ | {"internal": list(s.internal)} for s in sites],
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
        "runtime": {"device": str(placement.device), "dtype": placement.dtype_name,
                    "ranks": group.world, "backend": group.backend or None,
                    # MiB, per rank (rank 0's taken after the export)
                    "memory": [peak_memory(placement.device)] + memory[1:]},
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
