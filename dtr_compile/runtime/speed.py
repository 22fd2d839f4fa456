"""Stage ``bench``, speed (:func:`speed_stage`): the original and the hybrid ONNX timed in
onnxruntime after export, at the validation length and the ``--deploy-seq`` lengths (the report's
``speed`` section).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from dtr_compile.config import MAX_SEQ, CompileConfig
from dtr_compile.data import Dataset
from dtr_compile.errors import InputError
from dtr_compile.exporters.artifacts import ExportResult
from dtr_compile.inputs import Inputs, at_least_two
from dtr_compile.progress import Stages


def speed_verdict(ratio: float | None, low: float | None, high: float | None) -> str | None:
    """``"faster"`` / ``"slower"`` when the latency ratio (hybrid/original) and its range over
    the timed rounds are all below / at or above 1.0, ``"inconclusive"`` when the range spans
    1.0 (the machine's noise is larger than the difference); None when not timed. Without a
    range, the ratio alone decides."""
    if ratio is None:
        return None
    low = ratio if low is None else low
    high = ratio if high is None else high
    if high < 1.0:
        return "faster"
    return "slower" if low >= 1.0 else "inconclusive"


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
    if max(seqs) > MAX_SEQ:
        raise InputError(f"--deploy-seq {text!r}: {max(seqs)} tokens is beyond what can be "
                         f"timed ({MAX_SEQ} at most); give deployment lengths, e.g. "
                         "'256,1024', or 'none' to skip timing")
    return seqs


def seq_axis(captured: Any, names: list[str]) -> tuple[str, int] | None:
    """The first input with a dynamic dim other than the batch dim: ``(name, dim)``."""
    for n in names:
        for dim, axis in sorted(captured.dynamic_dims.get(n, {}).items()):
            if dim != 0 and axis != "batch":
                return n, dim
    return None


def bench_speed(
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

    axis = seq_axis(captured, names)
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
        low, high = res.latency_spread(t)[hybrid_path] or (None, None)
        rows.append({
            "seq": t if axis else None, "validation_length": t == t_val,
            "original_ms": o.latency_ms, "hybrid_ms": h.latency_ms,
            "original_peak_bytes": o.peak_bytes, "hybrid_peak_bytes": h.peak_bytes,
            "latency_ratio": ratio["latency"], "memory_ratio": ratio["peak_bytes"],
            "latency_ratio_min": low, "latency_ratio_max": high,
            "verdict": speed_verdict(ratio["latency"], low, high),
            "extended_positions": o.extended_positions or h.extended_positions,
            "faster": None if ratio["latency"] is None else ratio["latency"] < 1.0,
            "note": "; ".join(x for x in (o.note and f"original: {o.note}",
                                          h.note and f"hybrid: {h.note}") if x)})
        lat = "n/a" if ratio["latency"] is None else f"×{ratio['latency']:.2f}" + (
            f" (×{low:.2f}–×{high:.2f} over the rounds)" if low is not None else "")
        console.log(f"speed at {'T=' + str(t) if axis else 'the validation shape'}: hybrid/"
                    f"original latency {lat}")
    return {"batch": 1, "repeats": config.bench_repeats, "seq_axis": list(axis) if axis else None,
            "validation_length": t_val if axis else None,
            "original_onnx": exported.artifacts.get("original_onnx", "(temporary, timing only)"),
            "prepack": res.prepack, "prepack_note": res.prepack_note, "rows": rows}


def speed_stage(config: CompileConfig, inputs: Inputs, exported: ExportResult, console: Console,
                stages: Stages, locate: Callable[[str], str] = str) -> dict[str, Any] | None:
    """The report's ``speed`` section (:func:`bench_speed`), or None: with ``--no-bench``,
    ``--deploy-seq none``, or when an artifact failed its parity check. ``locate`` maps an
    artifact's final path to where it is now (the staging folder)."""
    seqs = deploy_seqs(config.deploy_seq)
    if not (config.bench and seqs != [] and exported.ok):
        return None
    with stages("bench", console):
        return bench_speed(config, inputs.gm, exported, at_least_two(inputs.val.inputs),
                           inputs.names, inputs.captured, inputs.val, seqs, console, locate=locate)
