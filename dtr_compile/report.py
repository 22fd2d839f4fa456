"""The report: ``report.json`` (everything), ``report.md`` (for people, e.g. a CI job summary) and
``report.png`` (validation metric vs number of linear layers, with the budget line).

Every file lies next to the report path and shares its stem: ``hybrid.report.json`` →
``hybrid.report.md``, ``hybrid.report.png``, the search ledger ``hybrid.report.ledger.jsonl``
and the distilled weights it was measured with, ``hybrid.report.students.pt``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtr_compile.fileio import atomic_path, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from rich.console import Console

    from dtr_compile.config import Budget, CompileConfig
    from dtr_compile.device import Placement
    from dtr_compile.distill.stage import Distilled
    from dtr_compile.exporters.stage import Exported
    from dtr_compile.inputs import Inputs, Sites
    from dtr_compile.parallel import Group
    from dtr_compile.progress import Stages
    from dtr_compile.search.baseline import Baseline
    from dtr_compile.search.run import Searched, Selection
    from dtr_compile.timelimit import RunClock

EXIT_MEANING = {
    0: "the hybrid was written and verified",
    3: "the budget could not be met: the original model (or the best model under --min-linear) "
       "was written",
    4: "onnxruntime disagrees with PyTorch beyond --atol",
}


#: Columns of a table printed where output is not a terminal and COLUMNS is not set
WIDE_COLUMNS = 240


def table_console() -> Any:
    """The stdout console for tables: the terminal's width on a terminal; elsewhere (a pipe, a
    CI log) ``COLUMNS`` when set, else :data:`WIDE_COLUMNS` — rich's default of 80 would cut
    the tables' columns."""
    import os
    import sys

    from rich.console import Console

    if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit():
        return Console()
    return Console(width=WIDE_COLUMNS)

@dataclass(frozen=True)
class ReportPaths:
    """Where the report's files go."""

    json: Path
    markdown: Path
    plot: Path
    ledger: Path
    students: Path


def report_paths(report: str | Path) -> ReportPaths:
    """The report's files, beside ``report`` (a ``.json`` path)."""
    p = Path(report)
    return ReportPaths(p, p.with_suffix(".md"), p.with_suffix(".png"),
                       p.with_suffix(".ledger.jsonl"), p.with_suffix(".students.pt"))


def _fmt(x: Any, digits: int = 6) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}g}"
    return str(x)


def _path_of(report: dict[str, Any], site: str | None) -> str:
    for s in report.get("sites", []):
        if s.get("id") == site:
            return str(s.get("module_path", ""))
    return ""


#: What a site's distillation error is, for the console and report.md.
REL_ERROR_MEANING = (
    "rel. error = ‖y − ŷ‖₂ / ‖y‖₂: the relative RMS error of the linear student's output ŷ "
    "against the softmax teacher's y (the site's output, or the block's with --distill-target "
    "block) on held-out calibration rows; 0 is exact, 1 is as far off as outputting zeros. It "
    "guides the search; the budget is checked on the validation metric, not on it")


#: What the per-site "linear branch" column of report.md is.
LINEAR_BRANCH_MEANING = (
    "linear branch = ‖ŷ − ŷ₀‖₂ / ‖ŷ‖₂, ŷ₀ the student's output with its linear branch removed "
    "(the window's softmax alone) on the same held-out rows: how much the linear part adds; "
    "near 0 the student is its window and the linear part is unused, 1 or more it carries "
    "the output (always 1 without a window)")


def _tokens(n: object) -> str:
    """A token count as ``612k`` / ``1.2M`` (``–`` when unknown)."""
    if not isinstance(n, (int, float)) or not n:
        return "–"
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k" if n >= 1e3 else str(int(n))


def _budget_for(drop: float, baseline: float, unit: str) -> str:
    """The budget text, in ``unit`` (``%``, ``pt`` or absolute), that allows ``drop``."""
    if unit == "%":
        return f"{100 * drop / abs(baseline) * 1.05:.2g}%" if baseline else ""
    if unit == "pt":
        return f"{100 * drop * 1.05:.2g}pt"
    return f"{drop * 1.05:.3g}"


def time_limited(report: dict[str, Any]) -> str:
    """What ``--time-limit`` cut short in the run ``report`` describes (the search stopped by
    it, students whose distillation it cut), as one clause; empty when it cut nothing."""
    from dtr_compile.timelimit import TIME_LIMIT_STOP

    parts = []
    search = report.get("search") or {}
    if str(search.get("stop_reason") or "").startswith(TIME_LIMIT_STOP):
        parts.append(f"it stopped the search after {search.get('evaluations', 0)} evaluations")
    distill = report.get("distill") or {}
    cut = [sid for sid, r in distill.items() if r.get("time_limited")]
    if cut:
        parts.append(f"it cut the distillation of {len(cut)} of {len(distill)} sites short")
    return " and ".join(parts)


def next_steps(report: dict[str, Any], *, distill_target: str, window: int,
               calib_available: int) -> list[str]:
    """What to try when no site fits the budget (exit 3): one line per suggestion, from what the
    run measured (``report`` as :func:`dtr_compile.pipeline.compile_model` builds it).

    Args:
        distill_target: ``site`` or ``block`` (``--distill-target``).
        window: ``--window`` (0: off).
        calib_available: rows in the calibration file (before ``--max-calib-samples``).
    """
    out: list[str] = []
    distill = report.get("distill") or {}
    limited = time_limited(report)
    if limited:
        limit = (report.get("time_limit") or {}).get("limit_s")
        out.append(f"a longer --time-limit{f' than {limit:g} s' if limit else ''}: "
                   f"{limited} (a budget can only be met by sites the run had time to try)")
    failed = [sid for sid, r in distill.items() if not r.get("ok")]
    if distill and len(failed) == len(distill):
        reasons = sorted({str(distill[s].get("reason", "")) for s in failed} - {""})
        out.append(f"no site distilled successfully ({'; '.join(reasons)[:200] or 'see the report'})"
                   ": check the calibration data, or try --distill-lr smaller")
    metric = report.get("metric", {})
    hib = metric.get("higher_is_better", True)
    baseline = report.get("baseline_metric")
    evals = [e for e in (report.get("schedule") or {}).get("evaluations", [])
             if len(e.get("linear", ())) == 1 and isinstance(e.get("metric"), float)
             and math.isfinite(e["metric"])]
    budget = report.get("budget", {})
    if evals and isinstance(baseline, float):
        best = max(evals, key=lambda e: e["metric"] if hib else -e["metric"])
        drop = (baseline - best["metric"]) if hib else (best["metric"] - baseline)
        text = _budget_for(drop, baseline, budget.get("unit", "%")) if drop > 0 else ""
        out.append(f"a looser budget: the best single site, {best['candidate']}, gave "
                   f"{metric.get('name', 'metric')} {best['metric']:.6g} (original "
                   f"{baseline:.6g})" + (f"; --budget {text} would accept it" if text else ""))
    else:
        out.append(f"a looser budget than {budget.get('text', 'this one')}")
    if distill_target == "site":
        out.append("--distill-target block: also train each attention block's q/k/v/o weights "
                   "(slower, usually a much smaller error)")
    causal = any(s.get("causal") for s in report.get("sites", []))
    if causal and not window:
        out.append("--window 64: causal sites keep exact softmax over the last 64 tokens beside "
                   "linear attention (LoLCATs), at O(T·W) extra cost")
    used = report.get("calibration_rows", 0)
    if used < calib_available:
        out.append(f"more calibration rows: {used} of the {calib_available} available were "
                   f"used (--max-calib-samples {min(calib_available, max(2 * used, 1))})")
    else:
        out.append(f"more calibration rows (--calib FILE with more than {used} rows) or more "
                   "--distill-steps")
    return out
def _linear_text(linear: list[str] | None) -> str:
    return "none" if not linear else ", ".join(linear)


def _range(row: dict[str, Any]) -> str:
    low, high = row.get("latency_ratio_min"), row.get("latency_ratio_max")
    return "" if low is None or high is None else f" ({_fmt(low, 3)}–{_fmt(high, 3)})"


def speed_lines(report: dict[str, Any]) -> list[str]:
    """One line on the hybrid's speed vs the original (median latency ratio and its range over
    the timed rounds), one per length where it is plainly not faster, and one per length where
    the range spans 1.0 (inconclusive), from ``report["speed"]``; empty when nothing was timed."""
    from dtr_compile.runtime.speed import speed_verdict

    speed = report.get("speed") or {}
    rows = speed.get("rows") or []
    if not rows:
        return []
    parts, slower, unsure = [], [], []
    for r in rows:
        where = f"T={r['seq']}" if r.get("seq") is not None else "validation shape"
        lat, mem = r.get("latency_ratio"), r.get("memory_ratio")
        if lat is None:
            parts.append(f"{where}: not timed ({r.get('note') or 'no measurement'})")
            continue
        low, high = r.get("latency_ratio_min"), r.get("latency_ratio_max")
        verdict = speed_verdict(lat, low, high)
        text = f"{where}: latency ×{lat:.2f}"
        if low is not None and high is not None:
            span = f"×{low:.2f}–×{high:.2f}"
            text += f" ({span} over the rounds{', inconclusive' if verdict == 'inconclusive' else ''})"
            if verdict == "inconclusive":
                unsure.append(f"inconclusive at {where}: the rounds' hybrid/original ratios span "
                              f"1.0 ({span}); time it on a quiet machine or with more "
                              "--bench-repeats")
        if mem is not None:
            text += f", memory ×{mem:.2f}"
        parts.append(text + (" *" if r.get("extended_positions") else ""))
        if verdict == "slower":
            slower.append(f"the hybrid is NOT faster than the original at {where} "
                          f"({r['hybrid_ms']:.3g} ms vs {r['original_ms']:.3g} ms)")
    lines = ["speed (hybrid/original, onnxruntime, batch 1): " + "; ".join(parts)]
    if any(r.get("extended_positions") for r in rows):
        lines.append("  * position table extended with random rows to time this length")
    if speed.get("prepack") is False:
        lines.append(f"  {speed.get('prepack_note') or 'onnxruntime weight prepacking off'}")
    return lines + slower + unsure


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The console summary: metric, interval, both outputs, test set and speed."""
    name = report.get("metric", {}).get("name", "metric")
    lines = [f"{name}: original {_fmt(report.get('baseline_metric'), 4)} → hybrid "
             f"{_fmt(report.get('final_metric'), 4)} (threshold {_fmt(report.get('threshold'), 4)}"
             f", budget {report.get('budget', {}).get('text', '')})"]
    conf = report.get("confidence") or {}
    iv = conf.get("interval")
    if iv:
        req = " (required)" if conf.get("required") else ""
        lines.append(f"validation drop {_fmt(iv['degradation'], 4)}, at most "
                     f"{_fmt(iv['upper'], 4)} with confidence {iv['confidence']:g}{req} "
                     f"({iv['method']}, {iv['rows']} rows); allowed {_fmt(conf.get('allowed_drop'), 4)}")
    outs = report.get("outputs") or {}
    for key, label in (("m_opt", "M_opt (most linear)"), ("m_best", "M_best (best metric)")):
        if key in outs:
            o = outs[key]
            mark = " ← -o" if outs.get("selected") == key else ""
            lines.append(f"{label}: " + ("none within budget" if o is None else
                         f"{len(o['linear'])} sites [{_linear_text(o['linear'])}], {name} "
                         f"{_fmt(o['metric'], 6)}{mark}"))
    test = report.get("test")
    if test:
        for key, m in test.get("models", {}).items():
            iv = m.get("interval") or {}
            bound = f", drop <= {_fmt(iv['upper'], 4)} at {iv['confidence']:g}" if iv else ""
            key = " = ".join([key, *m.get("also", [])])
            lines.append(f"test ({test['rows']} rows) {key}: {name} {_fmt(m['metric'], 4)} vs "
                         f"original {_fmt(test['original'], 4)} (drop {_fmt(m['drop'], 4)}{bound}; "
                         f"{'within' if m['within_budget'] else 'BEYOND'} the budget on test)")
    lines += speed_lines(report)
    lines += quantized_lines(report)
    lines += [f"warning: {w}" for w in report.get("warnings") or []]
    return lines


_QUANTIZED_LABELS = {"onnx": "hybrid", "original_onnx": "original",
                     "hybrid_decoder_onnx": "hybrid decoder",
                     "original_decoder_onnx": "original decoder"}


def quantized_lines(report: dict[str, Any]) -> list[str]:
    """One line per quantized model evaluated on the test rows (``--quantize`` with ``--test``):
    its metric, the fp32 original's and the change, and whether the budget holds; one line per
    model the quantizer failed on."""
    q = report.get("quantized") or {}
    if not q:
        return []
    name = report.get("metric", {}).get("name", "metric")
    lines = []
    test = q.get("test") or {}
    for label, m in (test.get("models") or {}).items():
        rel = m.get("relative_change")
        lines.append(f"{q['scheme']} {label} on the test rows ({test['rows']}): {name} "
                     f"{_fmt(m['metric'], 4)} vs fp32 original {_fmt(test['original'], 4)} "
                     f"(change {m['change']:+.4g}"
                     + (f", {100 * rel:+.2f} %" if rel is not None else "") + "; "
                     f"{'within' if m['within_budget'] else 'BEYOND'} the budget on test)")
    for key, m in (q.get("models") or {}).items():
        if "error" in m:
            lines.append(f"{q['scheme']} {_QUANTIZED_LABELS.get(key, key)} not written: "
                         f"{m['error']}")
    return lines


def _quantized_section(report: dict[str, Any]) -> list[str]:
    """The ``--quantize`` artifacts: files, MatMuls quantized, weight sizes, test quality."""
    q = report.get("quantized") or {}
    if not q:
        return []
    name = report.get("metric", {}).get("name", "metric")
    test = (q.get("test") or {}).get("models") or {}
    lines = [f"## Quantized weights ({q['scheme']})", "",
             f"Every constant-weight MatMul → onnxruntime `MatMulNBits` ({q['scheme']}, block "
             f"{q['block_size']}, symmetric, accuracy level {q['accuracy_level']}), as "
             "onnxruntime-genai's model builder quantizes for the CPU. Test quality: the "
             "quantized prefill model in onnxruntime on the test rows, against the fp32 "
             "original in PyTorch.", "",
             f"| model | file | MatMuls quantized | weights MiB | test {name} | change vs fp32 "
             "original | drop bound | within budget |", "|---|---|---|---|---|---|---|---|"]
    for key, m in (q.get("models") or {}).items():
        label = _QUANTIZED_LABELS.get(key, key)
        if "error" in m:
            lines.append(f"| {label} | not written: {m['error']} | | | | | | |")
            continue
        t = test.get(label) if key in ("onnx", "original_onnx") else None
        rel = (t or {}).get("relative_change")
        iv = (t or {}).get("interval") or {}
        lines.append(
            f"| {label} | {Path(m['path']).name} | {m['matmuls']} of {m['matmuls_total']} | "
            f"{m['weight_bytes_before'] / 2**20:.0f} → {m['weight_bytes_after'] / 2**20:.0f} | "
            + (f"{_fmt(t['metric'])} | {t['change']:+.4g}"
               + (f" ({100 * rel:+.2f} %)" if rel is not None else "")
               + f" | {_fmt(iv.get('upper')) if iv else '—'} | "
               f"{'yes' if t['within_budget'] else '**no**'} |" if t else "— | — | — | — |"))
    lines.append("")
    lines += [f"- {x}" for x in quantized_lines(report)] + [""]
    return lines


def render_markdown(report: dict[str, Any], plot_name: str | None = None) -> str:
    """The report as Markdown: outcome, budget, search trajectory, every evaluation."""
    metric = report.get("metric", {})
    name = metric.get("name", "metric")
    hib = metric.get("higher_is_better", True)
    sched = report.get("schedule", {})
    search = report.get("search", {})
    budget = report.get("budget", {})
    code = report.get("exit_code")
    meaning = EXIT_MEANING.get(code, "") if code is not None else ""
    sites = report.get("sites", [])
    replaced = report.get("replaced", [])
    lines = ["# dtr-compile report", ""]
    lines += [f"- model: `{report.get('model', '')}`",
              f"- output: `{report.get('artifacts', {}).get('onnx', '')}`",
              f"- exit code: **{code}** — {meaning or 'see dtr-compile --help'}",
              f"- linear sites: **{len(replaced)} of {len(sites)}**"
              + (": " + ", ".join(f"`{r['module_path'] or r['site']}`" for r in replaced)
                 if replaced else ""),
              ""]
    op = ">=" if hib else "<="
    lines += ["## Budget", "",
              f"| {name} ({'higher' if hib else 'lower'} is better) | value |", "|---|---|",
              f"| original | {_fmt(report.get('baseline_metric'))} |",
              f"| budget | {budget.get('text', '')} ({budget.get('kind', '')}) |",
              f"| threshold | {op} {_fmt(report.get('threshold'))} |",
              f"| hybrid | {_fmt(report.get('final_metric'))} |", ""]
    conf = report.get("confidence") or {}
    iv = conf.get("interval")
    if iv:
        lines += [f"Validation drop of the hybrid: {_fmt(iv['degradation'])}; one-sided "
                  f"{iv['confidence']:g} upper bound {_fmt(iv['upper'])} ({iv['method']}, paired "
                  f"over {iv['rows']} rows); allowed {_fmt(conf.get('allowed_drop'))}"
                  + (" — required by `--confidence`" if conf.get("required") else "") + ".", ""]
    for w in report.get("warnings") or []:
        lines += [f"**Warning:** {w}", ""]
    if report.get("kept"):
        lines += [f"Kept as softmax (`--keep`): {', '.join(report['kept'])}", ""]
    if report.get("next_steps"):
        lines += ["## What to try next", "", "No site fits the budget. Try:", ""]
        lines += [f"- {step}" for step in report["next_steps"]]
        lines.append("")
    interface = (report.get("export") or {}).get("interface") or {}
    if interface:
        lines += ["## ONNX interface", "", "| | name | dtype | shape |", "|---|---|---|---|"]
        for kind in ("inputs", "outputs"):
            for v in interface.get(kind, []):
                shape = ", ".join(str(d) for d in v.get("shape", []))
                lines.append(f"| {kind[:-1]} | `{v.get('name')}` | {v.get('dtype')} | "
                             f"[{shape}] |")
        lines += ["", "Named axes (`batch`, `sequence`) are dynamic; numbers are fixed sizes.", ""]
        exp = report.get("export") or {}
        fused = (exp.get("linear_attention") or {}).get("nodes", 0)
        if "opset" in exp:
            lines += [f"Opset {exp['opset']}; linear attention "
                      + (f"fused: {fused} ONNX `LinearAttention` node(s) (onnxruntime, not "
                         "TensorRT)." if fused else "in plain ops (every runtime)."), ""]
    outs = report.get("outputs") or {}
    if outs:
        lines += ["## Outputs", "", f"`--select {outs.get('select')}`: `-o` gets "
                  f"**{'M_best' if outs.get('selected') == 'm_best' else 'M_opt'}**.", "",
                  f"| output | linear sites | {name} | drop bound |", "|---|---|---|---|"]
        for key, label in (("m_opt", "M_opt: most linear sites within budget"),
                           ("m_best", "M_best: best metric within budget")):
            if key not in outs:  # --heal: the other sets' students were retrained
                continue
            o = outs.get(key)
            if o is None:
                lines.append(f"| {label} | none within budget | — | — |")
                continue
            ob = o.get("interval") or {}
            lines.append(f"| {label} | {len(o['linear'])}: {_linear_text(o['linear'])} | "
                         f"{_fmt(o['metric'])} | {_fmt(ob.get('upper')) if ob else '—'} |")
        lines.append("")
    test = report.get("test")
    if test:
        lines += ["## Test set (held out: never seen by distillation or search)", "",
                  f"{test['rows']} rows; original {name} {_fmt(test['original'])}; the budget on "
                  f"test: {op} {_fmt(test['threshold'])}.", "",
                  f"| model | linear sites | {name} | drop | {test['confidence']:g} bound | "
                  "within budget |", "|---|---|---|---|---|---|"]
        for key, m in test.get("models", {}).items():
            ib = m.get("interval") or {}
            key = " = ".join([key, *m.get("also", [])])
            lines.append(f"| {key} | {_linear_text(m['linear'])} | {_fmt(m['metric'])} | "
                         f"{_fmt(m['drop'])} | {_fmt(ib.get('upper')) if ib else '—'} | "
                         f"{'yes' if m['within_budget'] else '**no**'} |")
        lines.append("")
    speed = report.get("speed") or {}
    if speed.get("rows"):
        rounds = speed.get("rounds")
        how = (f"each model alone: {rounds} rounds, each a fresh process per model; median of "
               f"{speed.get('repeats')} runs" if rounds else "median of interleaved runs")
        lines += [f"## Speed (onnxruntime, batch 1, {how})", "",
                  "| length | original ms | hybrid ms | latency ratio (range over the rounds) "
                  "| original MiB | hybrid MiB | memory ratio |", "|---|---|---|---|---|---|---|"]
        for r in speed["rows"]:
            def mib(b: Any) -> str:
                return "—" if b is None else f"{b / 2**20:.0f}"
            where = "validation shape" if r.get("seq") is None else str(r["seq"])
            lines.append(f"| {where}{' *' if r.get('extended_positions') else ''} | "
                         f"{_fmt(r['original_ms'], 4)} | {_fmt(r['hybrid_ms'], 4)} | "
                         f"{_fmt(r['latency_ratio'], 3)}{_range(r)} | {mib(r['original_peak_bytes'])} | "
                         f"{mib(r['hybrid_peak_bytes'])} | {_fmt(r['memory_ratio'], 3)} |")
        lines.append("")
        lines += [f"- {x}" for x in speed_lines(report)[1:]] + [""]

    evals = sched.get("evaluations", [])
    lines += ["## Search", "",
              f"Strategy **{sched.get('strategy', search.get('strategy', 'greedy'))}**: "
              f"{len(evals)} evaluations ({sched.get('evaluations_replayed', 0)} replayed from the "
              f"ledger) in {_fmt(sched.get('seconds', 0.0), 4)} s. "
              f"Stopped: {sched.get('stop_reason', '')}.", ""]
    cache = search.get("cache")
    if cache:
        lines += [f"Prefix cache: {cache.get('segments_run')} of {cache.get('segments_full')} "
                  f"segment runs ({100 * cache.get('saved', 0):.0f}% saved), peak "
                  f"{cache.get('peak_bytes', 0) / 2**20:.0f} MiB.", ""]
    if search.get("resume"):
        lines += [f"Ledger: {search['resume']}", ""]
    lines += ["### Trajectory", "", f"| step | site | module path | {name} | within budget | "
              "evaluations so far |", "|---|---|---|---|---|---|",
              f"| 0 | — | original | {_fmt(report.get('baseline_metric'))} | yes | 0 |"]
    committed = sched.get("committed", [])
    for i, site in enumerate(committed):
        ok = sched.get("committed_within_budget", [True] * len(committed))[i]
        n = sched.get("evaluations_at_commit", [""] * len(committed))[i]
        lines.append(f"| {i + 1} | {site} | {_path_of(report, site)} | "
                     f"{_fmt(sched['metric_after_step'][i])} | "
                     f"{'yes' if ok else 'no (forced by --min-linear)'} | {n} |")
    lines.append("")
    if plot_name:
        lines += [f"![{name} vs linear layers]({plot_name})", ""]
    if evals:
        lines += ["### Evaluations", "",
                  f"| # | step | phase | tried | on top of | {name} | drop bound | ok | seconds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for ev in evals:
            base = ev["linear"][:-1]
            ib = ev.get("interval") or {}
            lines.append(f"| {ev.get('index', '')} | {ev['step']} | {ev.get('phase', '')} | "
                         f"{ev['candidate']} | {', '.join(base) or '—'} | {_fmt(ev['metric'])} | "
                         f"{_fmt(ib.get('upper')) if ib else '—'} | "
                         f"{'✓' if ev['within_budget'] else '✗'} | "
                         f"{_fmt(ev['seconds'], 3)}{' (replayed)' if ev.get('replayed') else ''} |")
        lines.append("")
    distill = report.get("distill") or {}
    if distill:
        lines += ["## Distillation", "", REL_ERROR_MEANING + ". " + LINEAR_BRANCH_MEANING
                  + ".", "",
                  "| site | ok | rel. error before → after | linear branch | steps | tokens | "
                  "seconds |", "|---|---|---|---|---|---|---|"]
        for sid, r in distill.items():
            lines.append(f"| {sid} | {'yes' if r.get('ok') else 'no: ' + str(r.get('reason', ''))} "
                         f"| {_fmt(r.get('init_error'), 3)} → {_fmt(r.get('final_error'), 3)} | "
                         f"{_fmt(r.get('linear_contribution'), 3)} | {r.get('steps', '–')}"
                         f"{' (cut by --time-limit)' if r.get('time_limited') else ''} | "
                         f"{_tokens(r.get('tokens'))} | {_fmt(r.get('seconds'), 3)} |")
        lines.append("")
    lines += heal_section(report.get("heal"), name)
    lines += _stateful_section(report.get("stateful"))
    lines += _quantized_section(report)
    lines += time_limit_section(report.get("time_limit"))
    timings = report.get("timings_s") or {}
    if timings:
        rss = (report.get("runtime") or {}).get("peak_rss_by_stage_mib") or {}
        lines += ["## Time and memory per stage", "", *_runtime_lines(report.get("runtime")),
                  "Peak RSS is this process's (rank 0's) highest resident memory once the stage "
                  "ended; the first stage that reaches the run's peak set it.", "",
                  "| stage | seconds | peak RSS after (MiB) |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(v, 4)} | {_fmt(rss[k], 5) if k in rss else '–'} |"
                  for k, v in timings.items()]
        lines.append("")
    return "\n".join(lines)


def time_limit_section(tl: dict[str, Any] | None) -> list[str]:
    """``--time-limit``'s split (:mod:`dtr_compile.timelimit`) as a table: each stoppable
    stage's start, share and use, and whether the limit stopped it."""
    if not tl:
        return []
    split = tl.get("split") or {}
    lines = ["## Time limit", "",
             f"--time-limit {_fmt(tl.get('limit_s'), 6)} s for the whole run, "
             f"{_fmt(tl.get('elapsed_s'), 6)} s elapsed when the report was built. "
             f"{100 * split.get('export_reserve', 0):.0f} % "
             f"({_fmt(tl.get('export_reserve_s'), 6)} s) is kept for the export and what follows "
             "it; each stage below gets, when it starts, a share of what is left after that "
             f"reserve (distillation at most {100 * split.get('distill_at_most', 0):.0f} % of "
             "the limit; the search leaves the heal at least "
             f"{100 * split.get('heal_at_least', 0):.0f} % of it with --heal).", "",
             "| stage | started at s | share s | used s | stopped by the limit |",
             "|---|---|---|---|---|"]
    for name, st in (tl.get("stages") or {}).items():
        lines.append(f"| {name} | {_fmt(st.get('started_s'), 6)} | {_fmt(st.get('share_s'), 6)} "
                     f"| {'—' if st.get('used_s') is None else _fmt(st['used_s'], 6)} | "
                     f"{'yes' if st.get('stopped_by_limit') else 'no'} |")
    return [*lines, ""]


def heal_section(heal: dict[str, Any] | None, metric_name: str) -> list[str]:
    """The ``--heal`` rounds as a table: each round's search (sites committed, added, seconds)
    and heal (validation metric before → after, kept or not, steps, tokens, seconds, held-out
    loss before → after)."""
    if not heal:
        return []
    s = heal.get("settings") or {}
    lines = ["## Heal (search → heal rounds)", "",
             f"Each heal trains the committed sites' students end to end against the original's "
             f"outputs on the calibration set ({heal.get('loss', '')} loss; "
             f"{s.get('steps')} steps at most, {s.get('rows_per_step')} rows a step, lr "
             f"{s.get('lr')}, adapters of rank {s.get('rank')}), then the search continues from "
             f"the healed hybrid. Stopped: {heal.get('stop_reason', '')}.", "",
             f"| round | linear | added | {metric_name} before heal | after heal | kept | steps "
             "| tokens | held-out loss before → after | search s | heal s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in heal.get("rounds", []):
        h = r.get("heal") or {}
        after = r.get("metric_after_heal")
        lines.append(
            f"| {r['round']} | {len(r['linear'])} | {', '.join(r['added']) or '—'} | "
            f"{_fmt(r['metric_before_heal'])} | {'—' if after is None else _fmt(after)} | "
            f"{'—' if not h else ('yes' if r.get('heal_kept') else 'no')} | "
            f"{h.get('steps', '—')} | {r.get('tokens', 0)} | "
            f"{(_fmt(h.get('init_loss'), 4) + ' → ' + _fmt(h.get('final_loss'), 4)) if h else '—'}"
            f" | {_fmt(r.get('search_seconds'), 4)} | {_fmt(r.get('heal_seconds'), 4)} |")
    lines.append("")
    return lines


def _runtime_lines(rt: dict[str, Any] | None) -> list[str]:
    """Where the torch stages ran, and each rank's peak memory (``report["runtime"]``)."""
    if not rt or "device" not in rt:
        return []
    ranks = rt.get("ranks", 1)
    where = f"Torch stages on **{rt['device']}** in **{rt.get('dtype', 'fp32')}**, " + (
        f"**{ranks} ranks** ({rt.get('backend')})." if ranks > 1 else "one process.")
    lines = [where, ""]
    mem = rt.get("memory") or []
    if mem:
        lines += ["| rank | peak RSS (MiB) | largest finished worker process (MiB) | peak GPU (MiB) |",
                  "|---|---|---|---|"]
        def mib(x: Any) -> str:  # noqa: ANN401
            return f"{x:.0f}" if isinstance(x, (int, float)) and x else "–"

        lines += [f"| {i} | {mib(m.get('peak_rss_mib'))} | {mib(m.get('peak_rss_children_mib'))} "
                  f"| {mib(m.get('peak_gpu_mib'))} |" for i, m in enumerate(mem)]
        lines.append("")
    return lines


def _stateful_section(st: dict[str, Any] | None) -> list[str]:
    """The stateful decoders: files, layer kinds and the greedy decode parity (or why not)."""
    if not st:
        return []
    lines = ["## Stateful decoder", ""]
    if st.get("status") != "written":
        lines += ["No stateful decoder: " + "; ".join(st.get("reasons", [])), ""]
        return lines
    lines += ["| model | file | layers (softmax / linear) | greedy tokens × rows | token for token "
              "| logits max-abs | logits rel-RMS |", "|---|---|---|---|---|---|---|"]
    for key in ("hybrid", "original"):
        d = st.get(key)
        if not d:
            continue
        if d.get("status") == "export_failed":
            lines.append(f"| {key} | not written: {d.get('reason')} | | | | | |")
            continue
        kinds = [lay["kind"] for lay in d.get("layers", [])]
        p = d.get("parity", {})
        same = "yes" if p.get("tokens_equal") else f"no (from step {p.get('first_mismatch')})"
        lines.append(f"| {key} | {Path(d['path']).name} | {kinds.count('softmax')} / "
                     f"{kinds.count('linear')} | {p.get('steps')} × {p.get('batch')} | {same} | "
                     f"{_fmt(p.get('worst_max_abs'), 3)} | {_fmt(p.get('worst_rel_rms'), 3)} |")
    lines.append("")
    return lines


def plot_search(report: dict[str, Any], path: str | Path) -> None:
    """PNG: every evaluation's metric at its number of linear layers, the committed path, the
    original's metric and the budget threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sched = report.get("schedule", {})
    metric = report.get("metric", {})
    name = metric.get("name", "metric")
    baseline = report.get("baseline_metric")
    threshold = report.get("threshold")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    evals = sched.get("evaluations", [])
    if evals:
        ax.scatter([len(e["linear"]) for e in evals], [e["metric"] for e in evals], s=14,
                   color="0.65", label="evaluated candidates", zorder=2)
    xs = list(range(len(sched.get("committed", [])) + 1))
    ys = [baseline, *sched.get("metric_after_step", [])]
    ax.plot(xs, ys, "o-", color="C0", label="committed", zorder=3)
    for x, y, site in zip(xs[1:], ys[1:], sched.get("committed", []), strict=False):
        ax.annotate(site, (x, y), textcoords="offset points", xytext=(4, 5), fontsize=7)
    outs = report.get("outputs") or {}
    best = outs.get("m_best")
    if best:
        ax.scatter([len(best["linear"])], [best["metric"]], marker="*", s=140, color="C2",
                   label="M_best", zorder=4)
    test = report.get("test") or {}
    if test.get("models"):
        tx = [0] + [len(m["linear"]) for m in test["models"].values()]
        ty = [test["original"]] + [m["metric"] for m in test["models"].values()]
        ax.scatter(tx, ty, marker="D", s=30, facecolors="none", edgecolors="C1",
                   label=f"test set ({test['rows']} rows)", zorder=4)
    speed = speed_lines(report)
    if speed:
        ax.text(0.01, 0.01, speed[0].replace("; ", "\n").replace(": ", ":\n", 1), fontsize=6.5,
                transform=ax.transAxes, va="bottom", ha="left", color="0.25")
    if baseline is not None:
        ax.axhline(baseline, color="0.3", linestyle=":", linewidth=1, label="original")
    if threshold is not None:
        ax.axhline(threshold, color="C3", linestyle="--", linewidth=1.2,
                   label=f"budget {report.get('budget', {}).get('text', '')}")
    n_sites = len(report.get("sites", [])) or max(xs)
    ax.set_xlim(-0.3, max(n_sites, 1) + 0.3)
    ax.set_xticks(range(max(n_sites, 1) + 1))
    ax.set_xlabel("linear attention layers")
    ax.set_ylabel(f"validation {name}")
    ax.set_title(f"{sched.get('strategy', 'greedy')} search: {len(evals)} evaluations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def build_report(
    config: CompileConfig, files: tuple[Path, Path, Path], inputs: Inputs, found: Sites,
    budget: Budget, base: Baseline, distilled: Distilled, searched: Searched, chosen: Selection,
    test: dict[str, Any] | None, exported: Exported, quantized: dict[str, Any] | None,
    speed: dict[str, Any] | None, stages: Stages, clock: RunClock, placement: Placement,
    group: Group, memory: list[Any], console: Console,
) -> dict[str, Any]:
    """The report of a compile (``report.json``), from what each stage produced; with
    ``next_steps`` (logged too) when no site fits the budget.

    Args:
        files: the ``(onnx, report, config)`` paths (:func:`dtr_compile.plan.artifact_paths`).
        test: the ``test`` section (:func:`dtr_compile.search.holdout.holdout_stage`), or None.
        quantized: the ``quantized`` section (:func:`dtr_compile.search.quantized.quantize_stage`),
            or None.
        speed: the ``speed`` section (:func:`dtr_compile.runtime.speed.speed_stage`), or None.
        clock: the run's ``--time-limit`` clock: the ``time_limit`` section (each stoppable
            stage's share and use), with ``--time-limit``.
        memory: every rank's peak memory (MiB) after the search; rank 0's is taken again now.
    """
    import platform

    import torch

    from dtr_compile import __version__
    from dtr_compile.device import peak_memory
    from dtr_compile.errors import ParityError
    from dtr_compile.exporters.decoders import decoder_artifacts
    from dtr_compile.linear import kinds_for_site

    out_path, report_path, config_path = files
    paths = report_paths(report_path)
    metric, baseline, sites = inputs.metric, base.metric, found.sites
    sched, delivered, interval = searched.schedule, chosen.delivered, chosen.interval
    exported_, stateful = exported.result, exported.decoders
    report = {
        "tool": {"name": "dtr-compile", "version": __version__, "torch": torch.__version__,
                 "python": platform.python_version()},
        "model": config.model,
        "artifacts": {"onnx": str(out_path), "report": str(report_path), "config": str(config_path),
                      "report_md": str(paths.markdown), "plot": str(paths.plot),
                      "ledger": str(paths.ledger), "students": str(paths.students)}
                     | exported_.artifacts | decoder_artifacts(stateful) | exported.tokenizer
                     | (quantized or {}).get("artifacts", {}),
        "metric": {"name": metric.name, "higher_is_better": metric.higher_is_better,
                   "bounds": metric.bounds},
        "budget": budget.to_dict(baseline, metric.higher_is_better),
        "baseline_metric": baseline,
        "threshold": base.threshold,
        "final_metric": chosen.metric,
        "validation_rows": len(inputs.val),
        "confidence": {"level": config.confidence, "required": config.confidence is not None,
                       "allowed_drop": base.allowed_drop,
                       "interval": None if interval is None else interval.to_dict()},
        "outputs": chosen.outputs,
        "test": test,
        "speed": speed,
        "quantized": quantized,
        "warnings": chosen.warnings,
        "calibration_rows": len(inputs.calib),
        "student": distilled.plan.settings.kind,
        "sites": [s.__dict__ | {"internal": list(s.internal),
                                "students": list(kinds_for_site(s.causal))} for s in sites],
        "rejected": [r.__dict__ for r in found.scan.rejected],
        "kept": sorted(found.kept),
        "replaced": [{"site": sid, "module_path": next(s.module_path for s in sites if s.id == sid),
                      "metric_after": m}
                     for sid, m in zip(delivered, chosen.metric_after, strict=True)],
        "schedule": sched.to_dict(),
        "search": searched.info,
        **({"heal": searched.heal} if searched.heal is not None else {}),
        "distill": {sid: r.__dict__ for sid, r in distilled.results.items()},
        "parity": [p.__dict__ for p in exported_.parity],
        "parity_ok": exported_.ok,
        "export": exported_.to_dict(),
        **({"stateful": stateful} if stateful is not None else {}),
        "timings_s": stages.seconds,
        **({"time_limit": clock.to_dict()} if clock.limit_s is not None else {}),
        "runtime": {"device": str(placement.device), "dtype": placement.dtype_name,
                    "ranks": group.world, "backend": group.backend or None,
                    # MiB, per rank (rank 0's taken after the export)
                    "memory": [peak_memory(placement.device)] + memory[1:],
                    "peak_rss_by_stage_mib": stages.peak_rss_mib},  # rank 0, after each stage
        "exit_code": chosen.exit_code if exported_.ok else ParityError.exit_code,
    }
    if not sched.fits:
        steps = next_steps(report, distill_target=config.distill_target, window=config.window,
                           calib_available=inputs.calib_rows)
        report["next_steps"] = steps
        console.log(("no site was shown to fit the budget before --time-limit"
                     if time_limited(report) else "no site fits the budget")
                    + "; try: " + "; ".join(steps))
    return report


def write_report(report: dict[str, Any], report_path: str | Path,
                 write_to: Callable[[Path], Path] | None = None) -> ReportPaths:
    """Write ``report.json``, ``report.md`` and ``report.png`` beside each other (atomically).

    ``write_to`` maps each file's final path to the path to write now (a staging folder; see
    :class:`dtr_compile.fileio.Staging`); default: the final path.
    """
    paths = report_paths(report_path)
    where = write_to or (lambda p: p)
    write_json_atomic(where(paths.json), report)
    plot_search(report, where(paths.plot))
    write_text_atomic(where(paths.markdown), render_markdown(report, paths.plot.name))
    return paths
