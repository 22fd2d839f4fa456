"""Decode benchmark of stateful decoders (``dtr-compile bench --decode``), each model timed alone.

For each context length C and model: the state bytes per stream after C tokens (KV caches +
recurrent states, from the declared shapes and dtypes), the prefill time of C tokens (P = 0,
t = C), the per-token decode latency at context C: the median of greedy decode steps, each
feeding the previous step's ``present.*`` back as the past (P = C, C + 1, …), and the peak
resident memory that loading the model, its prefill and its decode steps added to the process.

**Each model is timed alone** (issue 24): ``rounds`` rounds, and in each round every model in
turn (the order rotating) runs in a fresh process of its own
(:func:`~dtr_compile.runtime.alone.run_alone`) that loads only it, warms it up (one untimed
prefill of C tokens, ``warmup`` untimed decode steps) and times its share of the ``tokens``
decode steps and ``prefill_repeats`` prefills (:func:`~dtr_compile.runtime.bench.split_repeats`).
No two models are ever loaded at once. A figure is the median of all its timed runs; each cell
also keeps every round's median, whose spread is the machine's drift between processes.

The decode steps start from the real state of the prefill when it was run (C ≤ ``max_prefill``),
else from a synthesised past of length C (random values of the right shapes; the cost of a step
does not depend on the values), and the cell says so.

A folder holding ``genai_config.json`` is an onnxruntime-genai model (e.g. the model builder's
export of the original, :mod:`dtr_compile.runtime.genai_baseline`): it is timed with genai's own
``Generator`` (:func:`~dtr_compile.runtime.genai_baseline.time_genai`), with a real prefill at
every context (genai has no way to start from a given past).
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

from dtr_compile.errors import DtrError, InputError, first_line
from dtr_compile.runtime.generate import StatefulSession, read_signature


@dataclass
class DecodeCell:
    """One model at one context length. ``state_bytes``: ``{"kv", "recurrent"}`` bytes of one
    stream's state after ``context`` tokens. Times in ms; ``decode_ms`` is the median of
    ``decode_runs_ms`` (one decode step = one token per stream, every timed step of every
    round), ``decode_round_ms`` each round's median; ``prefill_ms`` the median of
    ``prefill_runs_ms`` (None when not run: above ``max_prefill`` or failed, see ``note``).
    ``peak_bytes``: the largest peak resident memory a round's process added (the model, its
    prefill or synthesised past, its decode steps)."""

    model: str
    context: int
    batch: int
    state_bytes: dict[str, int]
    decode_ms: float | None = None
    decode_runs_ms: list[float] = field(default_factory=list)
    decode_round_ms: list[float] = field(default_factory=list)
    decode_synthesised: bool = False
    prefill_ms: float | None = None
    prefill_runs_ms: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    runtime: str = "onnxruntime"
    note: str = ""
    #: the machine's 1-minute load average at the end of each round's process
    load_1m: list[float] = field(default_factory=list)

    @property
    def total_state_bytes(self) -> int:
        return sum(self.state_bytes.values())

    @property
    def decode_spread_ms(self) -> tuple[float, float] | None:
        """``(lowest, highest)`` round median of the decode step, None when not measured."""
        r = self.decode_round_ms
        return (min(r), max(r)) if r else None


@dataclass
class DecodeBenchResult:
    """Decode latency, prefill time, state size and peak memory of ``models`` at ``contexts``."""

    models: list[str]
    contexts: list[int]
    batch: int
    tokens: int
    prefill_repeats: int
    max_prefill: int
    threads: int | None
    cells: list[DecodeCell]
    rounds: int = 1
    warmup: int = 2

    def cell(self, model: str, context: int) -> DecodeCell:
        return next(c for c in self.cells if c.model == model and c.context == context)

    def ratios(self, context: int, base: str | None = None) -> dict[str, dict[str, float | None]]:
        """``{model: {"decode", "prefill", "state_bytes", "peak_bytes"}}``: each other model's
        value over ``base``'s (default the first model) at ``context`` (None where one is
        missing)."""
        base = base or self.models[0]
        b = self.cell(base, context)
        out: dict[str, dict[str, float | None]] = {}
        for m in self.models:
            if m == base:
                continue
            c = self.cell(m, context)
            out[m] = {"decode": _ratio(c.decode_ms, b.decode_ms),
                      "prefill": _ratio(c.prefill_ms, b.prefill_ms),
                      "state_bytes": _ratio(c.total_state_bytes, b.total_state_bytes),
                      "peak_bytes": _ratio(c.peak_bytes, b.peak_bytes)}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": self.models, "contexts": self.contexts, "batch": self.batch,
            "tokens": self.tokens, "prefill_repeats": self.prefill_repeats,
            "max_prefill": self.max_prefill, "threads": self.threads, "rounds": self.rounds,
            "warmup": self.warmup, "method": "alone",
            "cells": [asdict(c) for c in self.cells],
            "ratios": ({str(c): self.ratios(c) for c in self.contexts}
                       if len(self.models) > 1 else {}),
        }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def is_genai_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an onnxruntime-genai model folder (holds ``genai_config.json``)."""
    return (Path(path) / "genai_config.json").is_file()


class _ProtoIO:
    """An ONNX file's graph inputs and outputs as an onnxruntime session lists them (name,
    ``tensor(float)``-style type, shape), read without its weights: the parent process learns a
    decoder's interface without loading it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from types import SimpleNamespace

        from onnx import helper

        from dtr_compile.fileio import read_onnx

        proto = read_onnx(path)
        inits = {t.name for t in proto.graph.initializer}

        def arg(v: Any) -> Any:  # noqa: ANN401
            tt = v.type.tensor_type
            kind = helper.tensor_dtype_to_string(tt.elem_type).removeprefix("TensorProto.")
            name = {"FLOAT": "float", "FLOAT16": "float16", "DOUBLE": "double", "INT64": "int64",
                    "INT32": "int32", "BOOL": "bool", "INT8": "int8", "UINT8": "uint8",
                    "BFLOAT16": "bfloat16"}.get(kind, kind.lower())
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in tt.shape.dim]
            return SimpleNamespace(name=v.name, type=f"tensor({name})", shape=shape)

        self._inputs = [arg(v) for v in proto.graph.input if v.name not in inits]
        self._outputs = [arg(v) for v in proto.graph.output]

    def get_inputs(self) -> list[Any]:
        return self._inputs

    def get_outputs(self) -> list[Any]:
        return self._outputs


def state_bytes(path: str | os.PathLike[str], batch: int, context: int) -> dict[str, int]:
    """``{"kv", "recurrent"}`` bytes of ``batch`` streams' state after ``context`` tokens: from
    a stateful decoder's declared shapes, or a genai folder's ``genai_config.json`` (KV caches
    of its ``num_hidden_layers``, ``num_key_value_heads`` × ``head_size``, in the dtype of the
    decoder's past inputs).

    Raises:
        InputError: not a stateful decoder (a prefill-only model) or not loadable.
    """
    if is_genai_folder(path):
        from dtr_compile.runtime.genai_baseline import genai_state_bytes

        return genai_state_bytes(path, batch, context)
    return read_signature(_ProtoIO(path), path).state_bytes(batch, context)


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


def time_decode(path: str, context: int, batch: int, tokens: int, prefill_repeats: int,
                max_prefill: int, warmup: int, threads: int, seed: int) -> dict[str, Any]:
    """One round of one stateful decoder alone (in its own process, see the module docstring):
    an untimed prefill of ``context`` random tokens (or a synthesised past above
    ``max_prefill``), ``prefill_repeats`` timed prefills, ``warmup`` untimed decode steps, then
    ``tokens`` timed decode steps from context ``context``.

    Returns:
        ``{"decode_runs_ms", "prefill_runs_ms", "synthesised"}``, with ``"note"`` when the
        prefill failed (decoding then starts from a synthesised past) and ``"error"`` when
        decoding failed.
    """
    out: dict[str, Any] = {"decode_runs_ms": [], "prefill_runs_ms": [], "synthesised": False}
    sess = StatefulSession(path, threads or None)
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, context), dtype=np.int64)
    state: tuple[np.ndarray, dict[str, Any]] | None = None
    if context <= max_prefill:
        ids = rng.integers(0, _vocab(sess), (batch, context))
        try:
            state = sess.step(ids, mask, sess.empty_state(batch))  # warm: arenas grow here
            for _ in range(prefill_repeats):
                t0 = time.perf_counter()
                state = sess.step(ids, mask, sess.empty_state(batch))
                out["prefill_runs_ms"].append((time.perf_counter() - t0) * 1000.0)
        except Exception as exc:  # noqa: BLE001
            out["note"] = f"prefill fails at C={context}: {first_line(exc)[:200]}"
            state, out["prefill_runs_ms"] = None, []
    if state is None:
        state = (np.zeros((batch, 1, 1), dtype=np.float32),
                 synthesise_past(sess, batch, context, rng))
        out["synthesised"] = True
    try:
        cur, m = state, mask
        for _ in range(warmup):
            cur, m = _decode_step(sess, cur, m)
        # the warm-up steps grew the past: the timed steps restart from context C
        cur, m = state, mask
        for _ in range(tokens):
            t0 = time.perf_counter()
            cur, m = _decode_step(sess, cur, m)
            out["decode_runs_ms"].append((time.perf_counter() - t0) * 1000.0)
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"decode fails at C={context}: {first_line(exc)[:200]}"
    return out


def bench_decode(
    paths: Sequence[str | os.PathLike[str]],
    contexts: Sequence[int],
    *,
    batch: int = 1,
    tokens: int = 48,
    prefill_repeats: int = 3,
    max_prefill: int = 4096,
    warmup: int = 2,
    rounds: int = 3,
    threads: int | None = None,
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
) -> DecodeBenchResult:
    """Benchmark stateful decoders and onnxruntime-genai folders, each alone (see the module
    docstring). ``tokens`` and ``prefill_repeats`` are timed runs in all, spread over the
    ``rounds``; ``warmup`` decode steps are run in every round.

    Raises:
        InputError: a path is missing, not loadable or not a stateful decoder (a prefill-only
            model); an empty ``contexts`` or a context < 1; ``tokens`` < 1; ``batch`` < 1; a
            genai folder with ``batch`` > 1 or without onnxruntime-genai installed.
    """
    from dtr_compile.runtime.alone import run_alone
    from dtr_compile.runtime.bench import split_repeats

    if not contexts or any(c < 1 for c in contexts):
        raise InputError(f"--context needs lengths >= 1, got {list(contexts)}")
    if tokens < 1 or batch < 1 or prefill_repeats < 1 or warmup < 0 or rounds < 1:
        raise InputError("--tokens, --batch, --rounds and --prefill-repeats must be >= 1, "
                         "--warmup >= 0")
    names = [str(p) for p in paths]
    for n in names:
        if is_genai_folder(n):
            from dtr_compile.runtime.genai_baseline import require_genai

            require_genai()
            if batch != 1:
                raise InputError(f"{n}: onnxruntime-genai models are timed at batch 1 only "
                                 "(genai attends left padding, docs/exporters.md)")
        elif not Path(n).is_file():
            raise InputError(f"ONNX file not found: {n}")
    states = {n: {c: state_bytes(n, 1, c) for c in contexts} for n in names}
    token_shares = split_repeats(tokens, rounds)
    prefill_shares = split_repeats(prefill_repeats, rounds)
    n_rounds = max(len(token_shares), len(prefill_shares))
    cells: list[DecodeCell] = []
    for ctx in contexts:
        row = {n: DecodeCell(n, ctx, batch, states[n][ctx],
                             runtime="onnxruntime-genai" if is_genai_folder(n) else "onnxruntime")
               for n in names}
        peaks: dict[str, list[int]] = {n: [] for n in names}
        failed: set[str] = set()
        for r in range(n_rounds):
            order = [n for n in names if n not in failed]
            k = r % max(1, len(order))
            for n in order[k:] + order[:k]:
                args: dict[str, Any] = {"context": ctx, "tokens": token_shares[r] if r < len(token_shares) else 0,
                        "prefill_repeats": prefill_shares[r] if r < len(prefill_shares) else 0,
                        "max_prefill": max_prefill, "warmup": warmup, "seed": seed}
                if is_genai_folder(n):
                    target, args = "dtr_compile.runtime.genai_baseline:time_genai", \
                        args | {"folder": n}
                else:
                    target, args = "dtr_compile.runtime.bench_decode:time_decode", \
                        args | {"path": n, "batch": batch, "threads": threads or 0}
                try:
                    got = run_alone(target, args)
                except DtrError as exc:
                    got = {"error": str(exc)}
                c = row[n]
                if got.get("note") and got["note"] not in c.note:
                    c.note = (c.note + "; " if c.note else "") + got["note"]
                if "error" in got:
                    c.note = (c.note + "; " if c.note else "") + got["error"]
                    failed.add(n)
                    continue
                c.decode_runs_ms += got["decode_runs_ms"]
                c.prefill_runs_ms += got["prefill_runs_ms"]
                c.decode_synthesised = c.decode_synthesised or got["synthesised"]
                if got["decode_runs_ms"]:
                    c.decode_round_ms.append(statistics.median(got["decode_runs_ms"]))
                peaks[n].append(int(got["peak_bytes_added"]))
                if got.get("load_1m") is not None:
                    c.load_1m.append(round(float(got["load_1m"]), 2))
        for n in names:
            c = row[n]
            if n in failed:
                c.decode_runs_ms, c.decode_round_ms, c.prefill_runs_ms = [], [], []
            if c.decode_runs_ms:
                c.decode_ms = statistics.median(c.decode_runs_ms)
            if c.prefill_runs_ms:
                c.prefill_ms = statistics.median(c.prefill_runs_ms)
            if peaks[n] and n not in failed:
                c.peak_bytes = max(peaks[n])
            if on_step is not None and c.decode_ms is not None:
                pre = f", prefill {c.prefill_ms:.1f} ms" if c.prefill_ms else ""
                on_step(f"{Path(n).name} C={ctx}: decode {c.decode_ms:.2f} ms/token "
                        f"(rounds {_spread(c.decode_spread_ms)}){pre}")
        cells.extend(row[n] for n in names)
    return DecodeBenchResult(names, list(contexts), batch, tokens, prefill_repeats, max_prefill,
                             threads, cells, rounds=n_rounds, warmup=warmup)


def _spread(spread: tuple[float, float] | None) -> str:
    if spread is None:
        return "n/a"
    lo, hi = spread
    return f"{lo:.2f}" if lo == hi else f"{lo:.2f}–{hi:.2f}"


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


def verdicts(result: DecodeBenchResult, labels: dict[str, str] | None = None) -> list[str]:
    """Plain statements of who decodes faster, per context: every later model that is not a
    genai folder (ours: the hybrid, a quantized decoder) against the first model and against
    each onnxruntime-genai model, saying **not faster** where it is not (ratio ≥ 1)."""
    labels = labels or _labels(result.models)
    ours = [m for m in result.models[1:] if not is_genai_folder(m)]
    others = [result.models[0]] + [m for m in result.models if is_genai_folder(m)]
    lines = []
    for ctx in result.contexts:
        for m in ours:
            c = result.cell(m, ctx)
            if c.decode_ms is None:
                continue
            parts = []
            for o in others:
                r = _ratio(c.decode_ms, result.cell(o, ctx).decode_ms)
                if o == m or r is None:
                    continue
                word = "faster than" if r < 1 else "NOT faster than"
                parts.append(f"{word} {labels[o]} ({result.cell(o, ctx).decode_ms:.2f} ms, "
                             f"×{r:.2f})")
            if parts:
                lines.append(f"C={ctx}: {labels[m]} decodes at {c.decode_ms:.2f} ms/token, "
                             + "; ".join(parts))
    return lines


def decode_table(result: DecodeBenchResult, title: str | None = None):  # noqa: ANN201
    """A rich renderable of ``result``: per context a row per model with its decode ms/token
    (median [lowest–highest round median]), prefill ms, state MiB per stream and peak MiB, and
    for each later model its ratios to the first (``×A`` < 1: faster or smaller than A); then
    the legend, :func:`verdicts` and the notes of cells that could not be measured."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    labels = _labels(result.models)
    first = labels[result.models[0]]
    later = result.models[1:]
    table = Table(title=title or "onnxruntime decode benchmark, each model alone")
    for col in ("context", "model", "decode ms/tok", "prefill ms", "state MiB", "peak MiB"):
        table.add_column(col, justify="left" if col == "model" else "right")
    if later:
        for col in ("decode", "prefill", "state", "peak"):
            table.add_column(f"{col} ×{first}", justify="right")
    notes: list[str] = []
    for ctx in result.contexts:
        ratios = result.ratios(ctx)
        for i, m in enumerate(result.models):
            c = result.cell(m, ctx)
            spread = c.decode_spread_ms
            row = [str(ctx) if i == 0 else "", labels[m],
                   f"{c.decode_ms:.2f}{'*' if c.decode_synthesised else ''}"
                   + (f" [{_spread(spread)}]" if spread and spread[0] != spread[1] else "")
                   if c.decode_ms is not None else "n/a",
                   f"{c.prefill_ms:.1f}" if c.prefill_ms is not None
                   else ("skipped" if ctx > result.max_prefill else "n/a"),
                   f"{c.total_state_bytes / 2**20:.2f}",
                   f"{c.peak_bytes / 2**20:.0f}" if c.peak_bytes is not None else "n/a"]
            if later:
                r = ratios.get(m)
                row += ([_fmt_ratio(r["decode"]), _fmt_ratio(r["prefill"]),
                         _fmt_ratio(r["state_bytes"]), _fmt_ratio(r["peak_bytes"])]
                        if r else ["", "", "", ""])
            table.add_row(*row, end_section=i == len(result.models) - 1)
            if c.note:
                notes.append(f"{labels[m]} C={ctx}: {c.note}")
    legend = [f"{labels[m]} = {m}" + (" (onnxruntime-genai)" if is_genai_folder(m) else "")
              for m in result.models]
    legend.append(f"batch {result.batch}; each model alone: {result.rounds} rounds, each a fresh "
                  f"process per model; decode: median of {result.tokens} greedy steps from "
                  f"context C [lowest–highest round median]; prefill: median of "
                  f"{result.prefill_repeats} runs of C tokens; state: KV caches + recurrent "
                  "states of one stream at context C; peak: resident memory the model's process "
                  "added")
    if any(c.decode_synthesised for c in result.cells):
        legend.append(f"* decode timed on a synthesised past of length C (random values; "
                      f"prefill skipped above --max-prefill {result.max_prefill} or failed)")
    return Group(table, Text("\n".join(legend + verdicts(result, labels) + notes)))


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
