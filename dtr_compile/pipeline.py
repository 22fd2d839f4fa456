"""The whole compile: load → capture → find attention → distill → schedule → linearize → export.

:func:`compile_model` is the one library entry point; the CLI is a thin shell around it.
"""

from __future__ import annotations

import copy
import math
import platform
import tempfile
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
from dtr_compile.capture import capture, check_index_ranges, check_inputs
from dtr_compile.config import Budget, CompileConfig, parse_duration
from dtr_compile.data import (
    LABELS,
    Dataset,
    check_finite,
    check_integral,
    integer_like,
    load_dataset,
    read_tensors,
    run_model,
)
from dtr_compile.device import OnDevice, Placement, peak_memory
from dtr_compile.distill.cache import DistillCache, cache_key
from dtr_compile.distill.execute import default_workers
from dtr_compile.distill.launch import ReadOnlyCache, distill_sharded, share
from dtr_compile.distill.plan import DistillPlan, DistillResult, DistillSettings, plan_distillation
from dtr_compile.distill.run import distill
from dtr_compile.errors import (
    EXIT_NO_REPLACEMENT,
    EXIT_OK,
    DtrError,
    InputError,
    ParityError,
)
from dtr_compile.exporters.artifacts import (
    ExportResult,
    check_export_options,
    export_artifacts,
    export_paths,
    external_weights,
)
from dtr_compile.exporters.onnx import parity_cases
from dtr_compile.exporters.stateful import (
    check_decoder,
    copy_tokenizer,
    decoder_paths,
    export_stateful_onnx,
    find_model_tokenizer,
    parity_prompts,
    split_phases,
)
from dtr_compile.fileio import (
    OutputLock,
    Staging,
    check_cache_dir,
    check_write_plan,
    clean_stale_temporaries,
    data_path,
    write_json_atomic,
)
from dtr_compile.linear import kinds_for_site
from dtr_compile.linear.feature_maps import FEATURE_MAPS
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
from dtr_compile.passes.stateful import StatefulGraph, make_stateful
from dtr_compile.report import REL_ERROR_MEANING, next_steps, report_paths, write_report
from dtr_compile.search.confidence import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    Bound,
    degradation_bound,
)
from dtr_compile.search.ledger import (
    Ledger,
    fingerprint,
    hash_path,
    hash_tensors,
    load_students,
    save_students,
)
from dtr_compile.search.prefix_cache import PrefixCache, SegmentedGraph
from dtr_compile.search.schedule import STRATEGIES, Evaluation, ScheduleResult, meets, schedule


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


def lock_path(config: CompileConfig) -> Path:
    """The output lock, ``<output>.lock`` (see :class:`dtr_compile.fileio.OutputLock`)."""
    return Path(str(config.output) + ".lock")


def write_plan(config: CompileConfig) -> dict[str, Path]:
    """Every path this run may write, by name, resolved before any work (see
    :func:`dtr_compile.fileio.check_write_plan`). ``ledger`` and ``students`` are written while
    the run goes (they are what ``--resume`` reads); the rest are staged and moved together. Each ``.onnx`` path comes with its
    ``NAME.data`` (external weights, :func:`dtr_compile.fileio.data_path`)."""
    out, report, config_path = artifact_paths(config)
    rp = report_paths(report)
    exp = export_paths(out)
    plan = {"output": out, "pt2": exp["pt2"], "report": report, "report_md": rp.markdown,
            "report_png": rp.plot, "config": config_path, "ledger": rp.ledger,
            "students": rp.students, "lock": lock_path(config)}
    if config.fp16:
        plan["fp16 ONNX"] = exp["onnx_fp16"]
    if config.export_original:
        plan["original ONNX"] = exp["original_onnx"]
    if config.engine:
        plan["engine"] = Path(config.engine)
    if config.decoder:  # written for causal models only; planned for all (the checks are cheap)
        dec = decoder_paths(out)
        plan["decoder ONNX"] = dec["hybrid"]
        if config.export_original:
            plan["original decoder ONNX"] = dec["original"]
    # an ONNX file's weights may go to NAME.data beside it (--external-data); a stale one is removed
    for name, path in list(plan.items()):
        if path.suffix == ".onnx":
            plan[f"{name} weights"] = data_path(path)
    return plan


def _input_paths(config: CompileConfig) -> dict[str, Path | None]:
    """The files a run reads, by flag (``--test`` where the config has it)."""
    test = getattr(config, "test", None)
    return {"model": Path(config.model), "--data": Path(config.data) if config.data else None,
            "--calib": Path(config.calib) if config.calib else None,
            "--test": Path(test) if test else None}


def _cache_dir(config: CompileConfig) -> Path:
    return Path(config.cache_dir) if config.cache_dir else \
        Path(config.output).parent / ".dtr-cache"


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                    console=console, transient=True, disable=not enabled)


SELECT = ("most-linear", "best")


def deploy_seqs(text: str | list[int] | None) -> list[int] | None:
    """``--deploy-seq``: the lengths to time, None for the default (validation length and 4×),
    ``[]`` for ``none``.

    Raises:
        InputError: not ``none`` nor comma-separated lengths >= 1.
    """
    if text is None:
        return None
    if isinstance(text, (list, tuple)):  # dtr.toml: deploy_seq = [512, 2048]
        text = ",".join(str(t) for t in text)
    if str(text).strip().lower() in ("none", "off", "no"):
        return []
    try:
        seqs = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        seqs = []
    if not seqs or any(t < 1 for t in seqs):
        raise InputError(f"--deploy-seq {text!r}: expected comma-separated lengths >= 1, e.g. "
                         "'256,1024', or 'none' to skip timing")
    return seqs


def _validate(config: CompileConfig) -> Budget:
    """Every check that needs no model: done before anything is loaded or written."""
    budget = Budget.parse(config.budget)
    check_model_path(config.model)
    if config.data is None:
        raise InputError("no validation data: pass --data VAL.pt or set `data = \"...\"` in "
                         "dtr.toml ([tool.dtr-compile] in pyproject.toml)")
    for what, p in (("data", config.data), ("calibration data", config.calib),
                    ("test data", config.test)):
        if p is not None and not Path(p).is_file():
            raise InputError(f"{what} file not found: {p}")
    if config.confidence is not None and not 0.5 <= config.confidence < 1.0:
        raise InputError(f"--confidence {config.confidence}: expected a probability in [0.5, 1), "
                         "e.g. 0.9 (the one-sided level of the bound on the metric drop)")
    if config.select not in SELECT:
        raise InputError(f"unknown --select {config.select!r}; choose one of {', '.join(SELECT)}")
    deploy_seqs(config.deploy_seq)
    if config.bench_repeats < 1:
        raise InputError("--bench-repeats must be >= 1")
    if Path(config.output).suffix != ".onnx":
        raise InputError(f"output {config.output!r} must end in .onnx")
    if config.report is not None and Path(config.report).suffix != ".json":
        raise InputError(f"--report {config.report!r} must end in .json (the .md, .png and "
                         "ledger go beside it)")
    if config.max_linear is not None and config.max_linear < 1:
        raise InputError(f"--max-linear {config.max_linear}: must be >= 1 (to export the "
                         "original model unchanged, compile nothing: use --export-original "
                         "with any run, or torch.onnx.export)")
    if config.eval_batch < 1:
        raise InputError(f"--eval-batch {config.eval_batch}: must be >= 1")
    if config.max_calib_samples < 1:
        raise InputError(f"--max-calib-samples {config.max_calib_samples}: must be >= 1")
    if not math.isfinite(config.atol) or config.atol < 0:
        raise InputError(f"--atol {config.atol}: must be a finite number >= 0 (default 1e-3)")
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
    check_export_options(target=config.target, opset=config.opset, engine=config.engine,
                         linear_attention=config.linear_attention,
                         external_data=config.external_data)
    _distill_settings(config).check()
    if config.max_calib_tokens < 1:
        raise InputError("--max-calib-tokens must be >= 1")
    if config.workers < 0:
        raise InputError("--workers must be >= 0 (0: one per CPU)")
    plan = write_plan(config)
    check_write_plan(plan, _input_paths(config))
    if not config.no_cache:
        check_cache_dir(_cache_dir(config), plan)
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


def _distill_cache(config: CompileConfig, group: Group, console: Console) -> DistillCache | None:
    """The distilled-weights cache (entries verified on load); read-only on ranks other than 0."""
    if config.no_cache:
        return None
    kind = DistillCache if group.is_main else ReadOnlyCache
    return kind(_cache_dir(config), on_warning=lambda msg: console.log(f"[yellow]{msg}[/yellow]"))


def _distill(
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
    with _progress(console, config.progress) as prog:
        record = prog.add_task("teacher activations", total=len(calib), info="")
        tasks = {s.id: prog.add_task(f"distill {s.id} ({plan.targets[s.id]})", total=steps,
                                     info="") for s in plan.sites}

        def on_done(sid: str, res: DistillResult) -> None:
            prog.update(tasks[sid], completed=steps, info="cached" if res.cached else "done")
            _log_distilled(console, sid, res)

        return distill(
            gm, plan, calib, names, record_batch=config.eval_batch,
            max_calib_tokens=config.max_calib_tokens, workers=workers, cache=cache,
            placement=placement, teacher=teacher,
            on_record=lambda k: prog.advance(record, k),
            on_step=lambda sid, step, loss: prog.update(tasks[sid], completed=step,
                                                        info=f"loss {loss:.3g}"),
            on_done=on_done)


def _log_distilled(console: Console, sid: str, res: DistillResult, rank: int = 0) -> None:
    status = "ok" if res.ok else f"[red]failed[/red]: {res.reason} (kept as softmax)"
    how = "from the cache" if res.cached else f"in {res.seconds:.1f} s, {res.steps} steps"
    console.log(f"distilled {sid} ({res.target}){f' on rank {rank}' if rank else ''}: rel. error "
                f"{res.init_error:.3f} → {res.final_error:.3f} {how}, {status}"
                + (f" ({res.note})" if res.note else ""))


def _at_least_two(example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Capture / export examples with batch and sequence sizes >= 2 (torch.export specialises
    sizes 0 and 1): rows 0 and 1 of each input, repeating a lone row, and an integer input's
    lone position (``T = 1`` token ids, masks) repeated along dim 1. The repeated values are
    real data, so the example stays valid (token ids in the vocabulary, a mask of ones)."""
    out = {}
    for k, v in example.items():
        v = v[:2]
        if v.dim() and v.shape[0] == 1:
            v = torch.cat([v, v])
        if v.dim() >= 2 and not v.is_floating_point() and v.shape[1] == 1:
            v = torch.cat([v, v], dim=1)
        out[k] = v
    return out


def _example_inputs(config: CompileConfig) -> dict[str, torch.Tensor] | None:
    """For eager (Hugging Face / pickle) models: two rows of the data, as capture examples.

    Raises:
        InputError: the data file is unreadable, or holds NaN/inf or fractional token ids.
    """
    if not config.data:
        return None
    obj = read_tensors(config.data)
    example = {k: v for k, v in obj.items() if k != LABELS and v.dim()}
    check_finite(example, str(config.data))
    ints = [k for k in example if integer_like(k)]
    check_integral(example, ints, str(config.data))
    example = {k: v.to(torch.long) if k in ints and v.is_floating_point() else v
               for k, v in example.items()}
    return _at_least_two(example)


@dataclass
class Stages:
    """Wall time (s) of each pipeline stage and this process's peak RSS (MiB) once it ended.

    ``ru_maxrss`` only grows, so the first stage whose ``peak_rss_mib`` reaches the run's peak is
    the one that set it.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str, console: Console) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 3)
        self.peak_rss_mib[name] = peak_memory()["peak_rss_mib"]  # type: ignore[assignment]
        console.log(f"[bold]{name}[/bold] done in {self.seconds[name]:.1f} s "
                    f"(peak RSS {self.peak_rss_mib[name] / 1024:.2f} GiB)")


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
    allowed_drop: float,
    ledger_path: Path,
    console: Console,
    stages: Stages,
    *,
    group: Group | None = None,
    placement: Placement | None = None,
) -> tuple[ScheduleResult, dict[str, Any], Callable[[tuple[str, ...]], Bound | None]]:
    """Stage 6: the search, evaluated through the prefix cache and recorded in the ledger.

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
    parts = {
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

    def evaluate(linear: tuple[str, ...]) -> float:
        out = outputs(linear, base=linear[:-1])
        if every:
            bounds[frozenset(linear)] = group.guard(lambda: bound(out))
        value = group.guard(lambda: metric.value(out, val.labels, reference))
        # NaN / ±inf (a diverged student, a metric's overflow) never fits: NaN is the
        # schedule's worst value, whereas +inf would pass any higher-is-better threshold
        return value if math.isfinite(value) else math.nan

    def bound_of(linear: tuple[str, ...]) -> Bound | None:
        key = frozenset(linear)
        if key not in bounds and linear and (searching[0] or not group.distributed):
            bounds[key] = bound(outputs(linear))
        return bounds.get(key)

    def judge(linear: tuple[str, ...], m: float) -> tuple[bool, dict[str, Any] | None]:
        within = meets(m, threshold, metric.higher_is_better)
        b = bound_of(linear) if config.confidence is not None else bounds.get(frozenset(linear))
        if config.confidence is not None and b is not None:
            within = within and meets(b.upper, allowed_drop, False)
        return within, None if b is None else b.to_dict()

    def on_eval(ev: Evaluation) -> None:
        if not ev.replayed and opened:
            opened[0].append(ev, strategy=config.search, interval=ev.interval)
        mark = "✓" if ev.within_budget else "✗"
        how = "replayed" if ev.replayed else f"{ev.seconds:.1f} s"
        ci = "" if ev.interval is None else \
            f"drop <= {ev.interval['upper']:.4g} at {ev.interval['confidence']:g}"
        if config.confidence is not None:  # the mark judges the metric and the bound
            result = f"{ev.metric:.8g}{', ' + ci if ci else ''} {mark} ({how})"
        else:  # the mark judges the metric; the bound is for information
            result = f"{ev.metric:.8g} {mark} ({ci + ', not required; ' if ci else ''}{how})"
        console.log(f"step {ev.step} ({ev.phase}): +{ev.candidate} → {metric.name} {result}")

    min_linear = min(config.min_linear, len(candidates))
    if min_linear < config.min_linear:
        console.log(f"[yellow]--min-linear {config.min_linear}: only {len(candidates)} sites "
                    "distilled successfully[/yellow]")
    time_limit_s = parse_duration(config.time_limit) if config.time_limit is not None else None

    def run(known: dict[frozenset[str], tuple[float, float]]) -> ScheduleResult:
        try:
            with stages("schedule", console):
                return schedule(
                    candidates, evaluate, baseline=baseline, threshold=threshold,
                    higher_is_better=metric.higher_is_better, strategy=config.search,
                    max_linear=config.max_linear, min_linear=min_linear,
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
        "resume_check": verified,
        "fingerprint": fp,
        "inputs": parts,
        "cache": cache.stats.to_dict() if cache is not None else None,
        "ranks": group.world,
    }
    if cache is not None:
        st = cache.stats
        console.log(f"prefix cache: {st.segments_run}/{st.segments_full} segment runs "
                    f"({100 * st.saved:.0f}% saved), peak {st.peak_bytes / 2**20:.0f} MiB")
    return sched, info, bound_of


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


def _decoder_artifacts(stateful: dict[str, Any] | None) -> dict[str, str]:
    st = stateful or {}
    return ({f"{k}_decoder_onnx": v["path"] for k, v in st.items()
             if isinstance(v, dict) and v.get("path")}
            | {f"{k}_decoder_onnx_data": v["data"] for k, v in st.items()
               if isinstance(v, dict) and v.get("data")}
            | ({"tokenizer": st["tokenizer"]} if "tokenizer" in st else {}))


def _decoders(config: CompileConfig, gm: torch.fx.GraphModule, scan: AttentionScan,
              students: dict[str, Any], blocks: dict[str, Any], hybrid: torch.nn.Module,
              val: Dataset, names: list[str], out_path: Path, opset: int,
              console: Console, write_to: Callable[[Path], Path] = lambda p: p,
              fused: bool = False) -> dict[str, Any] | None:
    """The stateful decoders of a causal model (:mod:`dtr_compile.passes.stateful`): the hybrid
    (and the KV-cached original with ``--export-original``) written beside the prefill ONNX and
    checked by a greedy continuation against full recomputation. None for a model with no causal
    site (encoders: nothing written, no report section); a ``not_stateful`` record with the
    reasons when the pass cannot make the graph stateful (the prefill artifacts stand)."""
    if not config.decoder or not any(s.causal for s in scan.sites):
        return None
    block_sites = sorted(sid for sid in students if sid in blocks)
    if block_sites:
        return {"status": "not_stateful",
                "reasons": [f"{sid}: a whole-block student (--distill-target block) has no "
                            "stateful form yet" for sid in block_sites]}
    out: dict[str, Any] = {"status": "written"}
    paths = decoder_paths(out_path)
    todo = [("hybrid", students, hybrid)]
    if config.export_original:
        todo.append(("original", {}, gm))
    prompts = parity_prompts(val.inputs)
    # TensorRT imports no com.microsoft op: its decoders keep the KV cache in standard ops
    kv_cache = "concat" if config.target == "tensorrt" else "shared"
    for key, studs, prefill in todo:
        sg = make_stateful(gm, scan.sites, studs, rejected=scan.rejected)
        if not isinstance(sg, StatefulGraph):
            console.log(f"[yellow]no stateful decoder[/yellow]: {sg.describe()}")
            return {"status": "not_stateful", "reasons": list(sg.reasons)}
        t0 = time.perf_counter()
        phases = 7 if split_phases(sg, fused) else 5  # traces and conversions, save, check, parity
        with _progress(console, config.progress) as prog:
            task = prog.add_task(f"{key} decoder", total=phases, info="")

            def phase(what: str, task: Any = task, prog: Progress = prog) -> None:
                done = prog.tasks[task].fields.get("info") != ""
                prog.update(task, advance=1 if done else 0, info=what)

            try:
                path = export_stateful_onnx(sg, write_to(paths[key]), opset=opset, fused=fused,
                                            external_data=external_weights(config.external_data),
                                            kv_cache=kv_cache, on_phase=phase)
            except DtrError as exc:  # the prefill artifacts stand; the report says why
                console.log(f"[yellow]no stateful decoder[/yellow] ({key}): {exc}")
                out[key] = {"status": "export_failed", "reason": str(exc)}
                continue
            phase(f"parity: {config.decode_steps} greedy tokens x {len(prompts)} rows")
            parity = check_decoder(path, sg, prefill, prompts, config.decode_steps,
                                   has_mask="attention_mask" in names)
            prog.update(task, completed=phases)
        out[key] = {"path": str(paths[key]), "kv_cache": kv_cache,
                    **({"data": str(data_path(paths[key]))} if data_path(path).exists() else {}),
                    "inputs": sg.input_names, "outputs": sg.output_names,
                    "layers": [{"layer": lay.layer, "site": lay.site, "kind": lay.kind,
                                "state": list(lay.names)} for lay in sg.layers],
                    "parity": parity.to_dict(), "seconds": round(time.perf_counter() - t0, 3)}
        if config.target == "tensorrt":  # reported, not blocking: the prefill ONNX is the artifact
            from dtr_compile.exporters.tensorrt import lint_trt

            out[key]["tensorrt_lint"] = [f.to_dict() for f in lint_trt(path)]
        verdict = ("token for token" if parity.tokens_equal
                   else f"[red]differs from step {parity.first_mismatch}[/red]")
        console.log(f"wrote {paths[key].name}: {parity.steps} greedy tokens x {parity.batch} rows {verdict} "
                    f"(logits max-abs {parity.worst_max_abs:.2e}, rel-RMS {parity.worst_rel_rms:.2e})")
    source = find_model_tokenizer(config.model)
    if source is not None:
        out["tokenizer"] = str(copy_tokenizer(source, out_path))
        console.log(f"wrote {out['tokenizer']} (the tokenizer of {source})")
    return out


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
    budget = _validate(config)
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
        captured = capture(loaded, _example_inputs(config) if loaded.program is None else None)
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
    test = _load_test(config, captured, names, metric)

    with stages("find_attention", console):
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
    with _progress(console, config.progress) as prog, stages("baseline", console):
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
    with stages("distill", console):
        if reused is not None:
            students, results = reused
        else:
            cache = _distill_cache(config, group, console)
            students, results = distill_sharded(
                group, plan, gm,
                lambda sub: _distill(config, sub, gm, calib, names, console, cache=cache,
                                     placement=placement, teacher=run_gm,
                                     ranks_here=group.local_world),
                cache, on_other=lambda sid, rank, res: _log_distilled(console, sid, res, rank))
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
    sched, search_info, bound_of = _search(
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

    outputs = _outputs(config, sched, bound_of)
    delivered = tuple(outputs[outputs["selected"]]["linear"]) if outputs[outputs["selected"]] \
        else tuple(sched.committed)
    fits = sched.fits if outputs["selected"] == "m_opt" else True
    delivered_metric = outputs[outputs["selected"]]["metric"] if delivered else sched.final_metric
    if outputs["selected"] != "m_opt":
        console.log(f"--select best: delivering M_best {list(delivered)} ({metric.name} "
                    f"{delivered_metric:.6g}) instead of M_opt {sched.committed}")
    warnings_ = _resolution_warnings(metric, len(val), allowed_drop, budget.text, baseline,
                                     config.confidence)
    for w in warnings_:
        console.log(f"[yellow]warning[/yellow]: {w}")

    def build(linear: tuple[str, ...]) -> torch.nn.Module:
        return linearize(gm, sites, {sid: students[sid] for sid in linear}, blocks=plan.blocks)

    hybrid = build(delivered)
    test_info = None
    if test is not None:
        with stages("test", console):
            test_info = _evaluate_test(config, test, gm, names, metric, budget, build,
                                       {"delivered": delivered, **{
                                           k: tuple(v["linear"]) for k in ("m_opt", "m_best")
                                           if (v := outputs[k]) is not None}}, hybrid, console)
    with stages("export", console):
        example = _at_least_two(val.inputs)
        exported: ExportResult = export_artifacts(
            hybrid, gm, example, parity_cases(val.inputs, captured.dynamic_dims), names,
            captured.dynamic_dims, captured.axis_ranges, output=out_path, atol=config.atol,
            target=config.target, opset=config.opset, fp16=config.fp16,
            export_original=config.export_original, engine=config.engine, console=console,
            write_to=staging.path,
            output_names=captured.output_names, sites=[(s.id, s.module_path) for s in sites],
            linear=list(delivered), linear_attention=config.linear_attention,
            external_data=config.external_data)
        stateful = _decoders(config, gm, scan, {sid: students[sid] for sid in delivered},
                             plan.blocks, hybrid, val, names, out_path, exported.opset, console,
                             write_to=staging.path, fused=exported.fused)
    parity = exported.parity
    parity_ok = exported.ok
    exit_code = EXIT_OK if fits else EXIT_NO_REPLACEMENT
    speed = None
    seqs = deploy_seqs(config.deploy_seq)
    if config.bench and seqs != [] and parity_ok:
        with stages("bench", console):
            speed = _bench_speed(config, gm, exported, example, names, captured, val, seqs,
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
                     | exported.artifacts | _decoder_artifacts(stateful),
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
        "student": _distill_settings(config).kind,
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


def _load_test(config: CompileConfig, captured: Any, names: list[str],
               metric: Metric) -> Dataset | None:
    """The ``--test`` set, checked against the model and the metric (never used by the search).

    Raises:
        InputError: the data does not fit the model, or the metric needs labels it lacks.
    """
    if config.test is None:
        return None
    test = load_dataset(config.test, names)
    check_inputs(captured, test.inputs, str(config.test))
    if metric.needs_labels and test.labels is None:
        raise InputError(f"test data {config.test}: metric {metric.name!r} needs a 'labels' "
                         "tensor, and the file has none")
    return test


def _outputs(config: CompileConfig, sched: ScheduleResult,
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


def _resolution_warnings(metric: Metric, rows: int, allowed_drop: float, budget_text: str,
                         baseline: float, confidence: float | None) -> list[str]:
    """Warnings when the budget is finer than the validation set can resolve: one row of a
    share metric is ``1/N``; with ``--confidence`` and an original right on every row, even a
    candidate that changes no row has the bound ``1 − (1 − P)^(1/N)`` (Clopper-Pearson)."""
    from dtr_compile.search.confidence import clopper_pearson_upper, resolution

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
                   "more validation rows (e.g. more, shorter sequences)")
    if confidence is not None and step is not None and baseline == 1.0:
        floor = clopper_pearson_upper(0, rows, confidence)
        if floor > allowed_drop:
            out.append(f"with --confidence {confidence:g} on {rows} rows, even a candidate that "
                       f"changes no row has a drop bound of {floor:.4g} > {allowed_drop:.4g}: "
                       f"no candidate can pass; it needs about "
                       f"{math.ceil(math.log(1 - confidence) / math.log1p(-allowed_drop))} rows")
    return out


def _evaluate_test(
    config: CompileConfig, test: Dataset, gm: torch.fx.GraphModule, names: list[str],
    metric: Metric, budget: Budget, build: Callable[[tuple[str, ...]], torch.nn.Module],
    models: dict[str, tuple[str, ...]], hybrid: torch.nn.Module, console: Console,
) -> dict[str, Any]:
    """The original and each of ``models`` (name → linear sites) on the held-out test set.

    Each model's test metric, its drop against the original on the same rows, the one-sided
    bound of that drop (:func:`degradation_bound`, at ``--confidence`` or 0.9) and whether the
    budget, resolved against the original's test metric, holds on test.
    """
    level = config.confidence or DEFAULT_CONFIDENCE
    reference = run_model(gm, test, names, config.eval_batch, reduce=metric.reduce)
    base = metric(reference, test.labels, reference)
    t_threshold = budget.threshold(base, metric.higher_is_better)
    sign = 1.0 if metric.higher_is_better else -1.0
    done: dict[frozenset[str], dict[str, Any]] = {}
    out: dict[str, Any] = {"rows": len(test), "original": base, "threshold": t_threshold,
                           "confidence": level, "models": {}}
    for name, linear in models.items():
        key = frozenset(linear)
        if key in done:  # the same hybrid under another name (e.g. M_opt = M_best = delivered)
            first = next(n for n, m in out["models"].items() if frozenset(m["linear"]) == key)
            out["models"][first].setdefault("also", []).append(name)
            continue
        if key not in done:
            if not linear:
                res: dict[str, Any] = {"metric": base, "drop": 0.0, "interval": None}
            else:
                model = hybrid if name == "delivered" else build(linear)
                o = run_model(model, test, names, config.eval_batch, reduce=metric.reduce)
                m = metric(o, test.labels, reference)
                b = degradation_bound(metric, o, test.labels, reference, level, seed=config.seed)
                res = {"metric": m, "drop": sign * (base - m), "interval": b.to_dict()}
            res["within_budget"] = meets(res["metric"], t_threshold, metric.higher_is_better)
            done[key] = res
        out["models"][name] = {"linear": list(linear), **done[key]}
        r = done[key]
        console.log(f"test ({len(test)} rows): {name} {metric.name} {r['metric']:.6g} vs original "
                    f"{base:.6g} ({'within' if r['within_budget'] else 'BEYOND'} the budget "
                    "on test)")
    return out


def _seq_axis(captured: Any, names: list[str]) -> tuple[str, int] | None:
    """The first input with a dynamic dim other than the batch dim: ``(name, dim)``."""
    for n in names:
        for dim, axis in sorted(captured.dynamic_dims.get(n, {}).items()):
            if dim != 0 and axis != "batch":
                return n, dim
    return None


def _bench_speed(
    config: CompileConfig, gm: torch.fx.GraphModule, exported: ExportResult,
    example: dict[str, torch.Tensor], names: list[str], captured: Any, val: Dataset,
    seqs: list[int] | None, console: Console, locate: Callable[[str], str] = str,
) -> dict[str, Any]:
    """Time the original and the hybrid ONNX in onnxruntime (:func:`dtr_compile.runtime.bench`:
    interleaved rounds, medians, peak memory per child process, position tables extended past
    their length) at the validation length and ``seqs`` (default: it and 4×), batch 1.

    The original ONNX is the one ``--export-original`` wrote, else exported to a temporary file
    for the timing only. A model without a sequence axis (fixed-size images) is timed at its
    validation shape.
    """
    import tempfile

    from dtr_compile.exporters.onnx import export_onnx
    from dtr_compile.runtime.bench import bench

    axis = _seq_axis(captured, names)
    t_val = int(val.inputs[axis[0]].shape[axis[1]]) if axis else 1
    lengths = [t_val] if axis is None else (seqs if seqs is not None else [t_val, 4 * t_val])
    lengths = list(dict.fromkeys(lengths))
    hybrid_path = locate(exported.artifacts["onnx"])
    with tempfile.TemporaryDirectory(prefix="dtr-speed-") as tmp:
        original_path = exported.artifacts.get("original_onnx")
        if original_path is not None:
            original_path = locate(original_path)
        else:
            original_path = str(Path(tmp) / "original.onnx")
            # weights in original.onnx.data: onnxruntime maps them instead of copying them
            export_onnx(gm, example, names, captured.dynamic_dims, original_path,
                        opset=exported.opset, axis_ranges=captured.axis_ranges,
                        external_data=True)
        res = bench([original_path, hybrid_path], lengths, batch=1, repeats=config.bench_repeats,
                    warmup=1, extend=axis is not None, memory=True, seed=config.seed)
    if not res.prepack:
        console.log(f"[yellow]{res.prepack_note}[/yellow] (timing both models side by side)")
    rows = []
    for t in lengths:
        o, h = res.cell(original_path, t), res.cell(hybrid_path, t)
        ratio = res.ratios(t)[hybrid_path]
        rows.append({
            "seq": t if axis else None, "validation_length": t == t_val,
            "original_ms": o.latency_ms, "hybrid_ms": h.latency_ms,
            "original_peak_bytes": o.peak_bytes, "hybrid_peak_bytes": h.peak_bytes,
            "latency_ratio": ratio["latency"], "memory_ratio": ratio["peak_bytes"],
            "extended_positions": o.extended_positions or h.extended_positions,
            "faster": None if ratio["latency"] is None else ratio["latency"] < 1.0,
            "note": "; ".join(x for x in (o.note and f"original: {o.note}",
                                          h.note and f"hybrid: {h.note}") if x)})
        lat = "n/a" if ratio["latency"] is None else f"×{ratio['latency']:.2f}"
        console.log(f"speed at {'T=' + str(t) if axis else 'the validation shape'}: hybrid/"
                    f"original latency {lat}")
    return {"batch": 1, "repeats": config.bench_repeats, "seq_axis": list(axis) if axis else None,
            "validation_length": t_val if axis else None,
            "original_onnx": exported.artifacts.get("original_onnx", "(temporary, timing only)"),
            "prepack": res.prepack, "prepack_note": res.prepack_note, "rows": rows}
