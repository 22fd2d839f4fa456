"""The whole compile: load → capture → find attention → distill → schedule → linearize → export.

:func:`compile_model` is the one library entry point; the CLI is a thin shell around it.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dtr_compile import __version__
from dtr_compile.capture import capture
from dtr_compile.config import Budget, CompileConfig
from dtr_compile.data import load_dataset, run_model
from dtr_compile.distill import DistillResult, distill_site, record_sites
from dtr_compile.errors import (
    EXIT_NO_REPLACEMENT,
    EXIT_OK,
    InputError,
    NoAttentionError,
    ParityError,
)
from dtr_compile.exporters.artifacts import ExportResult, check_export_options, export_artifacts
from dtr_compile.exporters.onnx import parity_cases
from dtr_compile.fileio import write_json_atomic
from dtr_compile.linear_attention import LinearAttention, SiteSwitch, SoftmaxAttention
from dtr_compile.load import load_model
from dtr_compile.metrics import get_metric
from dtr_compile.passes.find_attention import AttentionSite, find_attention
from dtr_compile.passes.linearize import linearize, rewrite_sites
from dtr_compile.schedule import Evaluation, ScheduleResult, greedy_schedule


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
    if not Path(config.model).exists():
        raise InputError(f"model not found: {config.model}")
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
    check_export_options(target=config.target, opset=config.opset, engine=config.engine)
    return budget


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
    calib = load_dataset(config.calib, names) if config.calib else val
    calib = calib.take(config.max_calib_samples)
    metric = get_metric(config.metric, val.labels is not None)

    with _stage(timings, "find_attention", console):
        scan = find_attention(gm)
    if not scan.sites:
        why = "; ".join(f"{r.node} ({r.module_path}): {r.reason}" for r in scan.rejected)
        raise NoAttentionError(
            "no rewritable attention site in the model: searched for "
            "aten.scaled_dot_product_attention and matmul → softmax → matmul"
            + (f"; rejected: {why}" if why else "")
        )
    sites = scan.sites
    by_key = {s.id: s for s in sites} | {s.module_path: s for s in sites}
    unknown = [k for k in config.keep if k not in by_key]
    if unknown:
        raise InputError(f"--keep names unknown sites {unknown}; sites are "
                         f"{[s.id + '=' + s.module_path for s in sites]}")
    kept = {by_key[k].id for k in config.keep}
    for s in sites:
        console.log(f"found {s.describe()}")
    for r in scan.rejected:
        console.log(f"[yellow]not rewritten[/yellow] {r.node} ({r.module_path}): {r.reason}")

    with _progress(console, config.progress) as prog, _stage(timings, "baseline", console):
        task = prog.add_task("baseline", total=len(val), info="")
        reference = run_model(gm, val, names, config.eval_batch, lambda k: prog.advance(task, k))
    baseline = metric(reference, val.labels, reference)
    threshold = budget.threshold(baseline, metric.higher_is_better)
    console.log(f"baseline {metric.name} = {baseline:.6g}; budget {budget.text} → threshold "
                f"{'>=' if metric.higher_is_better else '<='} {threshold:.6g}")

    students: dict[str, LinearAttention] = {}
    results: dict[str, DistillResult] = {}
    with _stage(timings, "distill", console):
        records = record_sites(gm, sites, calib, names, config.eval_batch)
        with _progress(console, config.progress) as prog:
            for s in sites:
                task = prog.add_task(f"distill {s.id}", total=config.distill_steps, info="")
                module, res = distill_site(
                    s, records[s.id], feature_map=config.feature_map, steps=config.distill_steps,
                    lr=config.distill_lr, batch_size=config.distill_batch, seed=config.seed,
                    on_step=lambda i, loss, t=task: prog.update(t, completed=i + 1, info=f"loss {loss:.3g}"),
                )
                module.eval()
                students[s.id], results[s.id] = module, res
                status = "ok" if res.ok else f"[red]failed[/red]: {res.reason} (kept as softmax)"
                console.log(f"distilled {s.id}: rel. error {res.init_error:.3f} → "
                            f"{res.final_error:.3f} in {res.seconds:.1f} s, {status}")
        del records

    candidates = [s.id for s in sites if s.id not in kept and results[s.id].ok]
    switches = {
        s.id: SiteSwitch(SoftmaxAttention(s.num_heads, s.num_kv_heads, scale=s.scale, causal=s.causal),
                         students[s.id])
        for s in sites if s.id in candidates
    }
    search_gm = rewrite_sites(gm, sites, switches, class_name="SearchGraph")

    def evaluate(linear: tuple[str, ...]) -> float:
        for sid, sw in switches.items():
            sw.use_linear = sid in linear
        try:
            outs = run_model(search_gm, val, names, config.eval_batch)
        finally:
            for sw in switches.values():
                sw.use_linear = False
        return metric(outs, val.labels, reference)

    def on_eval(ev: Evaluation) -> None:
        mark = "✓" if ev.within_budget else "✗"
        console.log(f"step {ev.step}: +{ev.candidate} → {metric.name} {ev.metric:.6g} {mark} "
                    f"({ev.seconds:.1f} s)")

    with _stage(timings, "schedule", console):
        sched = greedy_schedule(candidates, evaluate, baseline=baseline, threshold=threshold,
                                higher_is_better=metric.higher_is_better,
                                max_linear=config.max_linear, on_eval=on_eval)
    console.log(f"committed {sched.committed or 'no site'}: {sched.stop_reason}")

    hybrid = linearize(gm, sites, {sid: students[sid] for sid in sched.committed})
    with _stage(timings, "export", console):
        example = {k: v[: max(2, min(len(val), 2))] for k, v in val.inputs.items()}
        exported: ExportResult = export_artifacts(
            hybrid, gm, example, parity_cases(val.inputs, captured.dynamic_dims), names,
            captured.dynamic_dims, captured.axis_ranges, output=out_path, atol=config.atol,
            target=config.target, opset=config.opset, fp16=config.fp16,
            export_original=config.export_original, engine=config.engine, console=console)
    parity = exported.parity
    parity_ok = exported.ok
    exit_code = EXIT_OK if sched.committed else EXIT_NO_REPLACEMENT

    report = {
        "tool": {"name": "dtr-compile", "version": __version__, "torch": torch.__version__,
                 "python": platform.python_version()},
        "model": config.model,
        "artifacts": {"onnx": str(out_path), "report": str(report_path), "config": str(config_path)}
                     | exported.artifacts,
        "metric": {"name": metric.name, "higher_is_better": metric.higher_is_better},
        "budget": {"text": budget.text, "kind": budget.kind, "value": budget.value},
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
        "distill": {sid: r.__dict__ for sid, r in results.items()},
        "parity": [p.__dict__ for p in parity],
        "parity_ok": parity_ok,
        "export": exported.to_dict(),
        "timings_s": timings,
        "exit_code": exit_code if parity_ok else ParityError.exit_code,
    }
    write_json_atomic(config_path, config.to_dict())
    write_json_atomic(report_path, report)
    if not parity_ok:
        failures = exported.failures()
        raise ParityError(f"an exported artifact failed verification ({len(failures)} "
                          f"check{'s' if len(failures) > 1 else ''}; atol {config.atol:g}): "
                          f"{failures[0]}; artifacts kept for inspection ({out_path}, {report_path})")
    return CompileResult(exit_code, out_path, report_path, report, hybrid, sites, sched, results)
