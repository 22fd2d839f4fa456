"""What the three demos' closing tables share (``examples/*/evaluate.py`` import it by path):
the task model's accuracy in PyTorch, the original-vs-hybrid table and the lines under it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dtr_compile.capture import capture
from dtr_compile.data import load_dataset, run_model
from dtr_compile.load import load_model


def pytorch_accuracy(d: Path, batch_size: int) -> tuple[float, int]:
    """``(accuracy, rows)`` of ``d/model.pt`` (the original, captured as the CLI captures it)
    on ``d/test.pt``, in PyTorch."""
    cap = capture(load_model(d / "model.pt"))
    test = load_dataset(d / "test.pt", cap.input_names)
    if test.labels is None:
        raise SystemExit(f"{d / 'test.pt'} has no labels: accuracy needs them")
    logits = run_model(cap.gm, test, cap.input_names, batch_size)
    return logits.argmax(-1).eq(test.labels).float().mean().item(), len(test)


def results_table(title: str, metric: str, columns: list[str], report: dict[str, Any],
                  rows: list[tuple[str, str, str, list[str]]]) -> Table:
    """One row per ``(model, runtime, metric value, latency cells)``; the linear-layers column
    comes from ``report`` (``-`` for PyTorch, ``0`` for the original ONNX, ``k/n`` for the
    hybrid)."""
    t = Table(title=title)
    t.add_column("model")
    t.add_column("runtime")
    t.add_column(metric, justify="right")
    t.add_column("linear layers")
    for c in columns:
        t.add_column(c, justify="right")
    linear = f"{len(report['replaced'])}/{len(report['sites'])}"
    for model, runtime, value, cells in rows:
        layers = linear if model == "hybrid" else ("-" if runtime == "PyTorch" else "0")
        t.add_row(model, runtime, value, layers, *cells)
    return t


def print_outcome(console: Console, report: dict[str, Any], metric: str) -> None:
    """The linear layers, and the validation metric against the budget's threshold."""
    replaced = [r["module_path"] for r in report["replaced"]]
    console.print("linear layers: " + (", ".join(replaced) or "none"))
    console.print(f"validation {metric}: original {report['baseline_metric']:.4f}, hybrid "
                  f"{report['final_metric']:.4f}, threshold {report['threshold']:.4f} "
                  f"(budget {report['budget']['text']})")
