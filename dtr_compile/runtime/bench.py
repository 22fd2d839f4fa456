"""Latency and memory benchmarks of ONNX models in onnxruntime (``dtr-compile bench``).

* :func:`bench` — latency (median of interleaved runs) and peak memory of one or more ONNX models
  at several sequence lengths, with inputs synthesised from each model's input signature
  (:func:`~dtr_compile.runtime.evaluate.synthesize_inputs`); :func:`bench_table` renders the
  result, :meth:`BenchResult.to_dict` serialises it.

Memory: ``peak_bytes`` is the peak resident memory that creating an onnxruntime session and
running it once at the shape adds to a fresh Python process (weights + activations + allocator
arenas), measured in a child process so that runs do not share a high-water mark.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dtr_compile.errors import DtrError, InputError, first_line
from dtr_compile.fileio import onnx_weight_bytes, save_onnx
from dtr_compile.runtime.evaluate import (
    OnnxModel,
    extend_positions,
    load_proto,
    position_limit,
    synthesize_inputs,
)

# --- benchmark --------------------------------------------------------------------------------


@dataclass
class BenchCell:
    """One model at one sequence length. ``latency_ms`` is the median of ``runs_ms``."""

    model: str
    seq: int
    batch: int
    latency_ms: float | None
    runs_ms: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    extended_positions: bool = False
    note: str = ""


@dataclass
class BenchResult:
    """Latency and memory of ``models`` (paths) at each of ``seqs``."""

    models: list[str]
    seqs: list[int]
    batch: int
    repeats: int
    warmup: int
    threads: int | None
    cells: list[BenchCell]
    position_limits: dict[str, int | None] = field(default_factory=dict)
    #: onnxruntime's weight prepacking in the timed sessions, and why it was turned off
    prepack: bool = True
    prepack_note: str = ""

    def cell(self, model: str, seq: int) -> BenchCell:
        return next(c for c in self.cells if c.model == model and c.seq == seq)

    def ratios(self, seq: int) -> dict[str, dict[str, float | None]]:
        """``{model: {"latency": m/first, "peak_bytes": m/first}}`` at ``seq`` for every model
        after the first (None where a value is missing)."""
        base = self.cell(self.models[0], seq)
        out: dict[str, dict[str, float | None]] = {}
        for m in self.models[1:]:
            c = self.cell(m, seq)
            out[m] = {
                "latency": _ratio(c.latency_ms, base.latency_ms),
                "peak_bytes": _ratio(c.peak_bytes, base.peak_bytes),
            }
        return out

    def latency_spread(self, seq: int) -> dict[str, tuple[float, float] | None]:
        """``{model: (low, high)}``: the range over the timed rounds of each later model's
        latency ratio to the first at ``seq`` — the per-round ratios when both have one run per
        round, else the widest, ``(min m / max first, max m / min first)``; None without runs.
        Noise shows here: a range across 1.0 is no verdict."""
        base = self.cell(self.models[0], seq).runs_ms
        out: dict[str, tuple[float, float] | None] = {}
        for m in self.models[1:]:
            runs = self.cell(m, seq).runs_ms
            if not runs or not base or min(base) <= 0:
                out[m] = None
            elif len(runs) == len(base):
                per_round = [r / b for r, b in zip(runs, base, strict=True)]
                out[m] = (min(per_round), max(per_round))
            else:
                out[m] = (min(runs) / max(base), max(runs) / min(base))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": self.models, "seqs": self.seqs, "batch": self.batch,
            "repeats": self.repeats, "warmup": self.warmup, "threads": self.threads,
            "position_limits": self.position_limits,
            "prepack": self.prepack, "prepack_note": self.prepack_note,
            "cells": [asdict(c) for c in self.cells],
            "ratios": {str(t): self.ratios(t) for t in self.seqs} if len(self.models) > 1 else {},
            "latency_spread": {str(t): {m: None if v is None else list(v)
                                        for m, v in self.latency_spread(t).items()}
                               for t in self.seqs} if len(self.models) > 1 else {},
        }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


_MEMORY_PROBE = r"""
import resource, sys
import numpy as np
import onnxruntime as ort

def hwm():
    # VmHWM is per address space; ru_maxrss on Linux would carry the parent's peak across exec
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024

import json
path, feed_path, threads, prepack = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[5] == "1"
stored = np.load(feed_path)  # arr_0, arr_1, … in the order of the names in argv[4]
feed = {name: stored[f"arr_{i}"] for i, name in enumerate(json.loads(sys.argv[4]))}
base = hwm()
opts = ort.SessionOptions()
opts.log_severity_level = 3
if threads:
    opts.intra_op_num_threads = threads
if not prepack:
    opts.add_session_config_entry("session.disable_prepacking", "1")
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
sess.run(None, feed)
print(hwm() - base)
"""


def measure_peak_bytes(path: str | os.PathLike[str], feed: Mapping[str, np.ndarray],
                       threads: int | None = None, timeout_s: float = 600, *,
                       prepack: bool = True) -> int:
    """Peak resident memory a session of ``path`` adds when run once on ``feed``, measured in a
    fresh child process (see the module docstring), with onnxruntime's weight prepacking as the
    timed sessions have it.

    Raises:
        DtrError: the child failed.
    """
    with tempfile.TemporaryDirectory(prefix="dtr-bench-") as tmp:
        feed_path = Path(tmp) / "feed.npz"
        # positional arrays, names apart: an input named "file" or "allow_pickle" would
        # otherwise be taken for one of savez's own arguments
        np.savez(feed_path, *feed.values())
        proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path), str(feed_path),
                               str(threads or 0), json.dumps(list(feed)), str(int(prepack))],
                              capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise DtrError(f"memory probe of {path} failed: "
                       f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return int(proc.stdout.strip().splitlines()[-1])


def _without_float_weights(proto: Any) -> Any:  # noqa: ANN401 - onnx.ModelProto
    """``proto`` with its floating-point initializers' values dropped (shapes kept): the timing
    reads only shapes and integer tables (positions, :func:`position_limit`), and a model stored
    in one file would otherwise stay in memory twice beside its onnxruntime session."""
    import onnx

    ints = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
    for t in proto.graph.initializer:
        if t.data_type not in ints and t.data_location != onnx.TensorProto.EXTERNAL:
            t.ClearField("raw_data")
            for field in ("float_data", "double_data", "int32_data"):  # fp16 lives in int32_data
                t.ClearField(field)
    return proto


def available_memory_bytes() -> int | None:
    """Memory this process could still get without swapping, in bytes: the machine's
    ``MemAvailable`` (``/proc/meminfo``), or less where the process's cgroup (a container, a CI
    job) is limited to less (cgroup v2 ``memory.max`` − ``memory.current``, or v1's
    ``memory.limit_in_bytes`` − ``memory.usage_in_bytes``); None where neither is known."""
    found: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            found += [int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("MemAvailable:")]
    except (OSError, ValueError):
        pass
    found += _cgroup_room()
    return min(found) if found else None


def _inactive_file(stat_path: Path) -> int:
    """Bytes of inactive file cache in a cgroup's ``memory.stat`` (v1: ``total_inactive_file``,
    v2: ``inactive_file``); 0 when not found."""
    try:
        stats = dict(ln.split()[:2] for ln in stat_path.read_text().splitlines() if " " in ln)
    except OSError:
        return 0
    return int(stats.get("total_inactive_file", stats.get("inactive_file", 0)))


def _cgroup_room(membership: Path = Path("/proc/self/cgroup"),
                 root: Path = Path("/sys/fs/cgroup")) -> list[int]:
    """``limit − working set`` of this process's memory cgroup and of each cgroup above it
    (those with a limit), from ``/proc/self/cgroup``: v2 (``0::PATH``) and v1
    (``N:memory:PATH``). The working set is the usage less the inactive file cache, which the
    kernel reclaims first (as Kubernetes counts it)."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return []
    rooms = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            base, limit, usage = root, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit, usage = root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        d = base / path.strip("/")
        while True:
            try:
                cap = (d / limit).read_text().strip()
                if cap != "max" and int(cap) < 2**60:  # v1 writes a huge number for "none"
                    used = int((d / usage).read_text()) - _inactive_file(d / "memory.stat")
                    rooms.append(max(0, int(cap) - used))
            except (OSError, ValueError):
                pass
            if d == base or base not in d.parents:
                break
            d = d.parent
    return rooms


#: the timed sessions prepack their weights while the models' weights, this many times over,
#: fit in the available memory (a prepacked session holds about 0.8× its weights more; the
#: weights themselves are read or mapped too)
PREPACK_HEADROOM = 2.0


def prepack_decision(protos: Mapping[str, Any], available: int | None) -> tuple[bool, str]:
    """Whether sessions of all ``protos`` (loaded without weights) may prepack side by side in
    ``available`` bytes: ``(prepack, why not)``."""
    weights = sum(onnx_weight_bytes(p) for p in protos.values())
    if available is None or weights * PREPACK_HEADROOM <= available:
        return True, ""
    return False, (f"onnxruntime weight prepacking off: the models' {weights / 2**30:.1f} GiB "
                   f"of weights, {PREPACK_HEADROOM:g}× over, exceed the "
                   f"{available / 2**30:.1f} GiB available")


def bench(
    paths: Sequence[str | os.PathLike[str]],
    seqs: Sequence[int],
    *,
    batch: int = 1,
    repeats: int = 10,
    warmup: int = 2,
    threads: int | None = None,
    extend: bool = False,
    memory: bool = True,
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
    prepack: bool | None = None,
) -> BenchResult:
    """Benchmark ONNX models with onnxruntime at each sequence length in ``seqs``.

    For each length, every model gets ``warmup`` runs, then ``repeats`` rounds in which each model
    runs once (the order rotates from round to round, so that no model always runs first);
    ``latency_ms`` is each model's median. With ``memory``, each model's peak memory at the length
    is measured in a child process (:func:`measure_peak_bytes`).

    A length beyond a model's position table (:func:`position_limit`) is not run, and its cell
    says so — unless ``extend``, which times a copy of the model with the table extended by
    random rows (:func:`extend_positions`; ``extended_positions`` is set on the cell). A model
    that fails at a length for another reason gets the error in its cell's ``note``.

    ``prepack``: onnxruntime's weight prepacking in the timed sessions (its default, faster
    MatMuls for a copy of their weights); None: on unless the models' weights, twice over,
    exceed the available memory (:func:`prepack_decision`; the result says why it was off).

    Raises:
        InputError: a path is missing or not loadable, or ``seqs`` is empty or has a length < 1.
    """
    if not seqs or any(t < 1 for t in seqs):
        raise InputError(f"--seq needs lengths >= 1, got {list(seqs)}")
    if batch < 1 or repeats < 1 or warmup < 0:
        raise InputError("--batch and --repeats must be >= 1 and --warmup >= 0")
    names = [str(p) for p in paths]
    protos = {n: _without_float_weights(load_proto(n)) for n in names}
    prepack_note = ""
    if prepack is None:
        prepack, prepack_note = prepack_decision(protos, available_memory_bytes())
    models = {n: OnnxModel(n, threads, prepack=prepack) for n in names}
    limits = {n: position_limit(protos[n], Path(n).parent) for n in names}
    longest = max(seqs)
    extended: dict[str, str] = {}
    cells: list[BenchCell] = []
    with tempfile.TemporaryDirectory(prefix="dtr-bench-") as tmp:
        if extend:
            for i, n in enumerate(names):
                limit = limits[n]
                if limit is not None and longest > limit:
                    proto = extend_positions(load_proto(n, with_data=True), longest, seed=seed)
                    ext_path = Path(tmp) / f"{i}-{Path(n).stem}.extended.onnx"
                    save_onnx(proto, ext_path)  # NAME.data beside it when large
                    extended[n] = str(ext_path)
        for seq in seqs:
            live: dict[str, tuple[OnnxModel, dict[str, np.ndarray], str]] = {}
            row: dict[str, BenchCell] = {}
            for n in names:
                limit = limits[n]
                use_ext = limit is not None and seq > limit
                if use_ext and n not in extended:
                    row[n] = BenchCell(n, seq, batch, None, note=(
                        f"T={seq} is beyond the model's {limit} positions "
                        "(--extend-positions times it with random extra position rows)"))
                    continue
                model, run_path = models[n], n
                if use_ext:
                    run_path = extended[n]
                    if run_path not in models:
                        models[run_path] = OnnxModel(run_path, threads, prepack=prepack)
                    model = models[run_path]
                feed = synthesize_inputs(model, batch, seq, seed=seed, proto=protos[n])
                try:
                    for _ in range(max(1, warmup)):
                        model.run(feed)
                except Exception as exc:  # noqa: BLE001
                    row[n] = BenchCell(n, seq, batch, None, note=f"fails at T={seq}: "
                                       f"{first_line(exc)[:200]}", extended_positions=use_ext)
                    continue
                row[n] = BenchCell(n, seq, batch, None, extended_positions=use_ext)
                live[n] = (model, feed, run_path)
            order = list(live)
            for r in range(repeats):
                k = r % max(1, len(order))
                for n in order[k:] + order[:k]:
                    model, feed, _ = live[n]
                    t0 = time.perf_counter()
                    model.run(feed)
                    row[n].runs_ms.append((time.perf_counter() - t0) * 1000.0)
            for n, (_model, feed, run_path) in live.items():
                row[n].latency_ms = statistics.median(row[n].runs_ms)
                if memory:
                    try:
                        row[n].peak_bytes = measure_peak_bytes(run_path, feed, threads,
                                                               prepack=prepack)
                    except (DtrError, subprocess.TimeoutExpired) as exc:
                        row[n].note = f"memory probe failed: {exc}"
                if on_step is not None:
                    on_step(f"{Path(n).name} T={seq}: {row[n].latency_ms:.2f} ms")
            cells.extend(row[n] for n in names)
    return BenchResult(names, list(seqs), batch, repeats, warmup, threads, cells, limits,
                       prepack, prepack_note)


def _labels(models: Sequence[str]) -> dict[str, str]:
    return {m: chr(ord("A") + i) if i < 26 else f"M{i}" for i, m in enumerate(models)}


def bench_table(result: BenchResult, title: str | None = None):  # noqa: ANN201
    """A rich renderable of ``result``: a table with, per length, each model's latency and peak
    memory and each later model's ratio to the first (``B/A`` < 1: B is faster or smaller),
    followed by the legend and the notes of cells that could not be measured."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    labels = _labels(result.models)
    legend = [f"{labels[m]} = {m}" for m in result.models]
    with_memory = any(c.peak_bytes is not None for c in result.cells)  # bench(memory=False): none
    legend.append(f"batch {result.batch}; latency: median of {result.repeats} interleaved runs"
                  + ("; memory: peak RSS a session adds" if with_memory else ""))
    if any(c.extended_positions for c in result.cells):
        legend.append("* beyond the model's position table: timed with random extra "
                      "position rows (latency and memory only)")
    table = Table(title=title or "onnxruntime benchmark")
    table.add_column("T", justify="right")
    first = labels[result.models[0]]
    for m in result.models:
        table.add_column(f"{labels[m]} ms", justify="right")
    for m in result.models[1:]:
        table.add_column(f"{labels[m]}/{first} time", justify="right")
    if with_memory:
        for m in result.models:
            table.add_column(f"{labels[m]} MiB", justify="right")
        for m in result.models[1:]:
            table.add_column(f"{labels[m]}/{first} mem", justify="right")
    notes: list[str] = []
    for seq in result.seqs:
        cells = [result.cell(m, seq) for m in result.models]
        ratios = result.ratios(seq)
        row = [str(seq)]
        for c in cells:
            mark = "*" if c.extended_positions else ""
            row.append(f"{c.latency_ms:.2f}{mark}" if c.latency_ms is not None else "n/a")
            if c.note:
                notes.append(f"{labels[c.model]} T={seq}: {c.note}")
        row += [_fmt_ratio(ratios[m]["latency"]) for m in result.models[1:]]
        if with_memory:
            row += [f"{c.peak_bytes / 2**20:.0f}" if c.peak_bytes is not None else "n/a"
                    for c in cells]
            row += [_fmt_ratio(ratios[m]["peak_bytes"]) for m in result.models[1:]]
        table.add_row(*row)
    return Group(table, Text("\n".join(legend + notes)))


def _fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}×"
