"""Decode benchmark of stateful decoder ONNX models (``dtr-compile bench --decode``).

For each context length C and model: the state bytes per stream after C tokens (KV caches +
recurrent states, from the declared shapes and dtypes), the prefill time of C tokens (P = 0,
t = C), and the per-token decode latency at context C: the median over ``tokens`` greedy decode
steps, each feeding the previous step's ``present.*`` back as the past (P = C, C + 1, …).

The decode steps start from the real state of the prefill when it was run (C ≤ ``max_prefill``),
else from a synthesised past of length C (random values of the right shapes; the cost of a step
does not depend on the values), and the cell says so. Models run interleaved: in each round every
model runs one step, the order rotating from round to round, as :func:`dtr_compile.runtime.bench.
bench` does.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dtr_compile.errors import InputError, first_line
from dtr_compile.runtime.generate import StatefulSession


@dataclass
class DecodeCell:
    """One model at one context length. ``state_bytes``: ``{"kv", "recurrent"}`` bytes of one
    stream's state after ``context`` tokens. Times in ms; ``decode_ms`` is the median of
    ``decode_runs_ms`` (one decode step = one token per stream), ``prefill_ms`` the median of
    ``prefill_runs_ms`` (None when not run: above ``max_prefill`` or failed, see ``note``)."""

    model: str
    context: int
    batch: int
    state_bytes: dict[str, int]
    decode_ms: float | None = None
    decode_runs_ms: list[float] = field(default_factory=list)
    decode_synthesised: bool = False
    prefill_ms: float | None = None
    prefill_runs_ms: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def total_state_bytes(self) -> int:
        return sum(self.state_bytes.values())


@dataclass
class DecodeBenchResult:
    """Decode latency, prefill time and state size of ``models`` at each of ``contexts``."""

    models: list[str]
    contexts: list[int]
    batch: int
    tokens: int
    prefill_repeats: int
    max_prefill: int
    threads: int | None
    cells: list[DecodeCell]

    def cell(self, model: str, context: int) -> DecodeCell:
        return next(c for c in self.cells if c.model == model and c.context == context)

    def ratios(self, context: int) -> dict[str, dict[str, float | None]]:
        """``{model: {"decode", "prefill", "state_bytes"}}``: each later model's value over the
        first model's at ``context`` (None where one is missing)."""
        base = self.cell(self.models[0], context)
        out: dict[str, dict[str, float | None]] = {}
        for m in self.models[1:]:
            c = self.cell(m, context)
            out[m] = {"decode": _ratio(c.decode_ms, base.decode_ms),
                      "prefill": _ratio(c.prefill_ms, base.prefill_ms),
                      "state_bytes": _ratio(c.total_state_bytes, base.total_state_bytes)}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": self.models, "contexts": self.contexts, "batch": self.batch,
            "tokens": self.tokens, "prefill_repeats": self.prefill_repeats,
            "max_prefill": self.max_prefill, "threads": self.threads,
            "cells": [asdict(c) for c in self.cells],
            "ratios": ({str(c): self.ratios(c) for c in self.contexts}
                       if len(self.models) > 1 else {}),
        }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _vocab(sess: StatefulSession) -> int:
    out = next(o for o in sess.session.get_outputs() if o.name == sess.sig.logits)
    v = out.shape[-1] if out.shape else None
    return v if isinstance(v, int) and v > 0 else 100


def synthesise_past(sess: StatefulSession, batch: int, context: int,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A past of ``context`` tokens for ``batch`` streams with random values: N(0, 1) keys and
    values, |N(0, 1)| float recurrent states (a sum of non-negative features stays positive),
    ones for integer / boolean states (window validity)."""
    past: dict[str, np.ndarray] = {}
    for s in sess.sig.states:
        shape = s.at(batch, context)
        if np.issubdtype(np.dtype(s.dtype), np.floating):
            x = rng.standard_normal(shape, dtype=np.float32)
            past[s.past] = (np.abs(x) if s.kind == "recurrent" else x).astype(s.dtype)
        else:
            past[s.past] = np.ones(shape, dtype=s.dtype)
    return past


def bench_decode(
    paths: Sequence[str | os.PathLike[str]],
    contexts: Sequence[int],
    *,
    batch: int = 1,
    tokens: int = 32,
    prefill_repeats: int = 3,
    max_prefill: int = 4096,
    warmup: int = 2,
    threads: int | None = None,
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
) -> DecodeBenchResult:
    """Benchmark stateful decoders (see the module docstring).

    Raises:
        InputError: a path is missing, not loadable or not a stateful decoder (a prefill-only
            model); an empty ``contexts`` or a context < 1; ``tokens`` < 1; ``batch`` < 1.
    """
    if not contexts or any(c < 1 for c in contexts):
        raise InputError(f"--context needs lengths >= 1, got {list(contexts)}")
    if tokens < 1 or batch < 1 or prefill_repeats < 1 or warmup < 0:
        raise InputError("--tokens, --batch and --prefill-repeats must be >= 1, --warmup >= 0")
    names = [str(p) for p in paths]
    sessions = {n: StatefulSession(n, threads) for n in names}
    rng = np.random.default_rng(seed)
    cells: list[DecodeCell] = []
    for ctx in contexts:
        row = {n: DecodeCell(n, ctx, batch, sessions[n].sig.state_bytes(1, ctx))
               for n in names}
        ids = {n: rng.integers(0, _vocab(sessions[n]), (batch, ctx)) for n in names}
        mask = np.ones((batch, ctx), dtype=np.int64)
        # prefill: the first run gives the state decoding starts from; then timed rounds
        states: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
        if ctx <= max_prefill:
            for n in names:
                s = sessions[n]
                try:
                    states[n] = s.step(ids[n], mask, s.empty_state(batch))
                except Exception as exc:  # noqa: BLE001
                    row[n].note = f"prefill fails at C={ctx}: {first_line(exc)[:200]}"
            live = list(states)
            for r in range(prefill_repeats):
                k = r % max(1, len(live))
                for n in live[k:] + live[:k]:
                    s = sessions[n]
                    t0 = time.perf_counter()
                    s.step(ids[n], mask, s.empty_state(batch))
                    row[n].prefill_runs_ms.append((time.perf_counter() - t0) * 1000.0)
            for n in live:
                row[n].prefill_ms = statistics.median(row[n].prefill_runs_ms)
        for n in names:
            if n not in states:
                s = sessions[n]
                past = synthesise_past(s, batch, ctx, rng)
                logits = np.zeros((batch, 1, 1), dtype=np.float32)
                states[n] = (logits, past)
                row[n].decode_synthesised = True
        # decode: every model one step per round, interleaved; state and mask grow by one
        cur = dict(states)
        masks = {n: mask for n in names}
        live = []
        for n in names:
            try:
                for _ in range(max(1, warmup)):
                    cur[n], masks[n] = _decode_step(sessions[n], cur[n], masks[n])
                live.append(n)
            except Exception as exc:  # noqa: BLE001
                row[n].note = (row[n].note + "; " if row[n].note else "") + \
                    f"decode fails at C={ctx}: {first_line(exc)[:200]}"
        # warm-up steps grew the past: restart the timed steps from context ctx
        cur = {n: states[n] for n in live}
        masks = {n: mask for n in live}
        for r in range(tokens):
            k = r % max(1, len(live))
            for n in live[k:] + live[:k]:
                t0 = time.perf_counter()
                cur[n], masks[n] = _decode_step(sessions[n], cur[n], masks[n])
                row[n].decode_runs_ms.append((time.perf_counter() - t0) * 1000.0)
        for n in live:
            row[n].decode_ms = statistics.median(row[n].decode_runs_ms)
            if on_step is not None:
                pre = f", prefill {row[n].prefill_ms:.1f} ms" if row[n].prefill_ms else ""
                on_step(f"{Path(n).name} C={ctx}: decode {row[n].decode_ms:.2f} ms/token{pre}")
        cells.extend(row[n] for n in names)
    return DecodeBenchResult(names, list(contexts), batch, tokens, prefill_repeats, max_prefill,
                             threads, cells)


def _decode_step(sess: StatefulSession, state: tuple[np.ndarray, dict[str, Any]],
                 mask: np.ndarray) -> tuple[tuple[np.ndarray, dict[str, Any]], np.ndarray]:
    """One greedy decode step (the timed unit, runner overhead included)."""
    logits, past = state
    nxt = logits[:, -1, :].argmax(-1)[:, None].astype(np.int64)
    mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=mask.dtype)], axis=1)
    return sess.step(nxt, mask, past), mask


def _labels(models: Sequence[str]) -> dict[str, str]:
    return {m: chr(ord("A") + i) if i < 26 else f"M{i}" for i, m in enumerate(models)}


def _fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}×"


def decode_table(result: DecodeBenchResult, title: str | None = None):  # noqa: ANN201
    """A rich renderable of ``result``: per context a row per model with its decode ms/token,
    prefill ms and state MiB per stream, and for each later model its ratios to the first
    (``×A`` < 1: faster or smaller than A); then the legend and the notes of cells that could
    not be measured."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    labels = _labels(result.models)
    first = labels[result.models[0]]
    later = result.models[1:]
    table = Table(title=title or "onnxruntime decode benchmark")
    for col in ("context", "model", "decode ms/tok", "prefill ms", "state MiB"):
        table.add_column(col, justify="left" if col == "model" else "right")
    if later:
        for col in ("decode", "prefill", "state"):
            table.add_column(f"{col} ×{first}", justify="right")
    notes: list[str] = []
    for ctx in result.contexts:
        ratios = result.ratios(ctx)
        for i, m in enumerate(result.models):
            c = result.cell(m, ctx)
            row = [str(ctx) if i == 0 else "", labels[m],
                   f"{c.decode_ms:.2f}{'*' if c.decode_synthesised else ''}"
                   if c.decode_ms is not None else "n/a",
                   f"{c.prefill_ms:.1f}" if c.prefill_ms is not None
                   else ("skipped" if ctx > result.max_prefill else "n/a"),
                   f"{c.total_state_bytes / 2**20:.2f}"]
            if later:
                r = ratios.get(m)
                row += ([_fmt_ratio(r["decode"]), _fmt_ratio(r["prefill"]),
                         _fmt_ratio(r["state_bytes"])] if r else ["", "", ""])
            table.add_row(*row, end_section=i == len(result.models) - 1)
            if c.note:
                notes.append(f"{labels[m]} C={ctx}: {c.note}")
    legend = [f"{labels[m]} = {m}" for m in result.models]
    legend.append(f"batch {result.batch}; decode: median of {result.tokens} interleaved greedy "
                  f"steps from context C; prefill: median of {result.prefill_repeats} runs of C "
                  f"tokens; state: KV caches + recurrent states of one stream at context C")
    if any(c.decode_synthesised for c in result.cells):
        legend.append(f"* decode timed on a synthesised past of length C (random values; "
                      f"prefill skipped above --max-prefill {result.max_prefill} or failed)")
    return Group(table, Text("\n".join(legend + notes)))


@dataclass
class OpShare:
    """One op type's share of a decode step: ``ms`` per step (summed over its nodes)."""

    op_type: str
    ms: float
    share: float
    nodes: int


def profile_decode(path: str | os.PathLike[str], context: int, *, steps: int = 8,
                   threads: int | None = None, seed: int = 0) -> list[OpShare]:
    """Where a decode step's time goes: onnxruntime's profiler over ``steps`` decode steps from
    a synthesised past of ``context`` tokens (batch 1), summed per op type, largest first.

    Raises:
        InputError: as :class:`~dtr_compile.runtime.generate.StatefulSession`.
    """
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dtr-profile-") as tmp:
        prof = StatefulSession(path, threads, profile_prefix=str(Path(tmp) / "decode"))
        rng = np.random.default_rng(seed)
        state: tuple[np.ndarray, dict[str, Any]] = (
            np.zeros((1, 1, 1), dtype=np.float32), synthesise_past(prof, 1, context, rng))
        mask = np.ones((1, context), dtype=np.int64)
        for _ in range(steps):
            state, mask = _decode_step(prof, state, mask)
        trace = json.loads(Path(prof.session.end_profiling()).read_text())
    per: dict[str, list[float]] = {}
    for ev in trace:
        if ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            per.setdefault(op, []).append(ev.get("dur", 0) / 1000.0)
    total = sum(sum(v) for v in per.values()) or 1.0
    out = [OpShare(op, sum(v) / steps, sum(v) / total, len(v) // steps) for op, v in per.items()]
    return sorted(out, key=lambda o: -o.ms)


def profile_table(profiles: dict[str, list[OpShare]], context: int, top: int = 8):  # noqa: ANN201
    """A rich table of :func:`profile_decode` results: per model its ``top`` op types by time
    per decode step at ``context``."""
    from rich.table import Table

    labels = _labels(list(profiles))
    table = Table(title=f"decode step profile at context {context} (onnxruntime, per op type)")
    for col in ("model", "op", "ms/step", "share", "nodes"):
        table.add_column(col, justify="left" if col in ("model", "op") else "right")
    for m, ops in profiles.items():
        for i, o in enumerate(ops[:top]):
            table.add_row(labels[m] if i == 0 else "", o.op_type, f"{o.ms:.2f}",
                          f"{100 * o.share:.1f}%", str(o.nodes),
                          end_section=i == min(top, len(ops)) - 1)
    return table
