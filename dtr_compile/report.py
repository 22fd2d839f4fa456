"""The report: ``report.json`` (everything), ``report.md`` (for people, e.g. a CI job summary) and
``report.png`` (validation metric vs number of linear layers, with the budget line).

Every file lies next to the report path and shares its stem: ``hybrid.report.json`` →
``hybrid.report.md``, ``hybrid.report.png``, the search ledger ``hybrid.report.ledger.jsonl``
and the distilled weights it was measured with, ``hybrid.report.students.pt``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtr_compile.fileio import atomic_path, write_json_atomic, write_text_atomic

EXIT_MEANING = {
    0: "the hybrid was written and verified",
    3: "the budget could not be met: the original model (or the best model under --min-linear) "
       "was written",
    4: "onnxruntime disagrees with PyTorch beyond --atol",
}


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
    if report.get("kept"):
        lines += [f"Kept as softmax (`--keep`): {', '.join(report['kept'])}", ""]

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
                  f"| # | step | phase | tried | on top of | {name} | ok | seconds |",
                  "|---|---|---|---|---|---|---|---|"]
        for ev in evals:
            base = ev["linear"][:-1]
            lines.append(f"| {ev.get('index', '')} | {ev['step']} | {ev.get('phase', '')} | "
                         f"{ev['candidate']} | {', '.join(base) or '—'} | {_fmt(ev['metric'])} | "
                         f"{'✓' if ev['within_budget'] else '✗'} | "
                         f"{_fmt(ev['seconds'], 3)}{' (replayed)' if ev.get('replayed') else ''} |")
        lines.append("")
    distill = report.get("distill") or {}
    if distill:
        lines += ["## Distillation", "", "| site | ok | rel. error before → after | seconds |",
                  "|---|---|---|---|"]
        for sid, r in distill.items():
            lines.append(f"| {sid} | {'yes' if r.get('ok') else 'no: ' + str(r.get('reason', ''))} "
                         f"| {_fmt(r.get('init_error'), 3)} → {_fmt(r.get('final_error'), 3)} | "
                         f"{_fmt(r.get('seconds'), 3)} |")
        lines.append("")
    lines += _stateful_section(report.get("stateful"))
    timings = report.get("timings_s") or {}
    if timings:
        lines += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v, 4)} |" for k, v in timings.items()]
        lines.append("")
    return "\n".join(lines)


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


def write_report(report: dict[str, Any], report_path: str | Path) -> ReportPaths:
    """Write ``report.json``, ``report.md`` and ``report.png`` beside each other (atomically)."""
    paths = report_paths(report_path)
    write_json_atomic(paths.json, report)
    plot_search(report, paths.plot)
    write_text_atomic(paths.markdown, render_markdown(report, paths.plot.name))
    return paths
