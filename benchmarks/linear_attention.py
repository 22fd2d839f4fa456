"""Benchmark: every linear-attention variant against softmax attention in onnxruntime (CPU).

Each variant (feature map × form; the chunked forms of gla, deltanet and gated-deltanet, causal
and with a window, and their fused forms: one ``LinearAttention`` node, onnxruntime's
``com.microsoft`` op at opset 23 or the standard op at opset 27)
and softmax attention (the site's SDPA, exported the same way)
is exported once with ``torch.onnx.export(dynamo=True)`` and a dynamic sequence length, then
measured side by side in one run at ``T ∈ {512, …, 8192}``, ``B = 1``, ``H = 12``, ``Dk = Dv = 32``,
no mask:

* latency: softmax attention and the variants compared with it (bidirectional; causal and
  window) are measured as one group: every (model, T) pair is warmed up, then ``--rounds``
  rounds run all pairs in a fresh random order (interleaved, so load from other processes hits
  every model and every length alike); one sample is the mean of enough back-to-back runs to
  last >= 20 ms; the table shows the median sample. Sessions use onnxruntime's defaults except
  for the memory pattern (see below).
* peak memory: one subprocess per (model, T); it builds its session (onnxruntime's defaults)
  and inputs, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), runs the model
  twice and reports ``VmHWM − VmRSS before the runs`` after the first run and after the second:
  every byte the runs touched (activations, arena growth, outputs), nothing the interpreter or
  the session already held. The second number is what a serving session keeps: with the default
  memory pattern on, the arena holds the first run's buffers next to the pattern's block, about
  twice the first. The latency phase turns the memory pattern off (no kernel changes) so that
  a group's sessions fit in memory together.

Prints the tables and writes them into ``docs/benchmarks.md`` between this benchmark's markers,
leaving the rest of the file alone::

    .venv/bin/python benchmarks/linear_attention.py            # full run, a few minutes
    .venv/bin/python benchmarks/linear_attention.py --quick    # T ∈ {512, 1024}, no doc update
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import cpu_model, loadavg, write_section

ROOT = Path(__file__).resolve().parent.parent
SEQ_LENS = (512, 1024, 2048, 4096, 8192)
B, H, DK, DV = 1, 12, 32, 32
WINDOW = 64
FORMS = ("bidirectional", "causal", f"window{WINDOW}")
MIN_SAMPLE_S = 0.02
# issue 4's targets
MAX_SCALING = 9.0  # latency(8192) / latency(1024), linear variants
MIN_SPEEDUP = 5.0  # softmax / linear latency at 8192, bidirectional variants


# the machine's own scaling: a graph that only streams q, k, v through memory once (q + k + v)
FLOOR = "memory-floor/q+k+v"


@dataclass(frozen=True)
class Variant:
    """``feature_map`` None is softmax attention; form ``"floor"`` is :data:`FLOOR`."""

    feature_map: str | None
    form: str

    @property
    def name(self) -> str:
        return FLOOR if self.form == "floor" else f"{self.feature_map or 'softmax'}/{self.form}"

    @property
    def causal(self) -> bool:
        return self.form != "bidirectional"


#: The matrix-state student kinds (issue 14), causal only: the chunked form in plain ops (plain
#: and with a window) and the fused form (:data:`FUSED`).
RECURRENT_KINDS = ("gla", "deltanet", "gated-deltanet")
#: The fused forms: the recurrence as one ``LinearAttention`` node, the standard op at opset 27
#: (``--opset 27``) and onnxruntime's ``com.microsoft`` op at opset 23 (``--linear-attention
#: fused``), ``{form: opset}``.
FUSED = {"causal-fused27": 27, "causal-fused-ms": 23}


def variants() -> list[Variant]:
    from dtr_compile.linear.feature_maps import FEATURE_MAPS

    out = [Variant(None, "bidirectional"), Variant(None, "causal"), Variant(None, "floor")]
    out += [Variant(fm, form) for form in FORMS for fm in FEATURE_MAPS]
    return out + [Variant(kind, form) for form in (*FORMS[1:], *FUSED) for kind in RECURRENT_KINDS]


def export(v: Variant, path: Path) -> None:
    """Export ``v`` with a dynamic sequence length (inputs q, k, v: ``[1, 12, T, 32]``)."""
    import warnings

    import torch
    from torch.export import Dim

    from dtr_compile.linear.kernel import LinearAttention, SoftmaxAttention

    torch.manual_seed(0)
    module: torch.nn.Module
    if v.form == "floor":

        class Stream(torch.nn.Module):
            def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return q + k + v

        module = Stream()
    elif v.feature_map is None:
        module = SoftmaxAttention(H, H, scale=DK**-0.5, causal=v.causal)
    elif v.feature_map in RECURRENT_KINDS:  # the chunked (prefill) form, as the hybrid exports it
        from dtr_compile.linear import make_student

        module = make_student(v.feature_map, num_heads=H, num_kv_heads=H, head_dim=DK,
                              head_dim_v=DV, causal=True,
                              window=WINDOW if v.form.startswith("window") else 0)
    else:
        module = LinearAttention(
            H,
            H,
            DK,
            causal=v.causal,
            feature_map=v.feature_map,
            window=WINDOW if v.form.startswith("window") else 0,
        )

    class SelfAttention(torch.nn.Module):
        """Tells the export ``S == T``, as in a captured self-attention graph, where q and k come
        from one sequence and share one length symbol."""

        def __init__(self) -> None:
            super().__init__()
            self.site = module

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            torch._check(k.shape[2] == q.shape[2])
            return self.site(q, k, v)

    example = tuple(torch.randn(B, H, 100, d) for d in (DK, DK, DV))
    if v.form in FUSED:  # dtr-compile's own exporter: it traces and writes the fused op
        from dtr_compile.exporters.onnx import export_onnx

        names = ["q", "k", "v"]
        export_onnx(SelfAttention().eval(), dict(zip(names, example, strict=True)), names,
                    {n: {2: "sequence"} for n in names}, path, opset=FUSED[v.form], fused=True)
        return
    t = Dim("T", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            SelfAttention().eval(),
            example,
            dynamo=True,
            verbose=False,
            input_names=["q", "k", "v"],
            dynamic_shapes=({2: t}, {2: t}, {2: t}),
        )
    assert prog is not None
    prog.save(str(path))


def inputs(T: int, seed: int = 0):  # noqa: ANN201
    import numpy as np

    rng = np.random.default_rng(seed)
    return {
        n: rng.standard_normal((B, H, T, d), dtype=np.float32)
        for n, d in (("q", DK), ("k", DK), ("v", DV))
    }


def session(path: Path, threads: int, *, mem_pattern: bool = True):  # noqa: ANN201
    """A CPU session with onnxruntime's defaults (memory arena on), ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.enable_mem_pattern = mem_pattern
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _group(name: str) -> str:
    """Models measured together: a teacher and the variants compared with it."""
    return "bidirectional" if name.endswith("bidirectional") or name == FLOOR else "causal"


def _mem_available_bytes() -> int:
    m = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return int(m.group(1)) * 1024 if m else 0


def measure_latency(
    paths: dict[str, Path],
    seq_lens: tuple[int, ...],
    rounds: int,
    threads: int,
    peak: dict[str, dict[int, dict[str, int]]],
    log,  # noqa: ANN001
) -> dict[str, dict[int, float]]:
    """Median latency in ms, ``{variant: {T: ms}}``, interleaved as the module docstring says.

    One group at a time (softmax/bidirectional with the bidirectional variants, softmax/causal
    with the causal and window ones): two 8192-token softmax sessions do not fit beside other
    work on a 23 GiB machine. Within a group every round runs every (model, T) pair in a fresh
    random order, so load that comes and goes during the run hits every T alike, and the
    ratios between lengths are measured under the same conditions. Before a group starts, its
    summed first-run peaks at the largest ``T`` (from ``peak``), plus 25 %, are checked against
    ``MemAvailable``: without the memory pattern a session keeps about one run's buffers.

    Raises:
        SystemExit: not enough memory for the next group; nothing else is started.
    """
    rng = random.Random(0)
    result: dict[str, dict[int, float]] = {name: {} for name in paths}
    feeds = {T: inputs(T) for T in seq_lens}
    for group in ("bidirectional", "causal"):
        members = [name for name in paths if _group(name) == group]
        if not members:  # --only picked none of this group
            continue
        need = sum(1.25 * peak[name][seq_lens[-1]]["first_bytes"] for name in members)
        if need + 2**30 > _mem_available_bytes():
            raise SystemExit(
                f"latency ({group}): the sessions need {need / 2**30:.1f} GiB, "
                f"{_mem_available_bytes() / 2**30:.1f} GiB is available; stopping here "
                "(rerun with smaller --seq-lens, or when the machine is quieter)"
            )
        sessions = {name: session(paths[name], threads, mem_pattern=False) for name in members}
        pairs = [(name, T) for name in members for T in seq_lens]
        reps: dict[tuple[str, int], int] = {}
        for name, T in pairs:
            t0 = time.perf_counter()
            sessions[name].run(None, feeds[T])  # warm-up, also sizes the sample
            elapsed = max(time.perf_counter() - t0, 1e-6)
            reps[name, T] = max(1, min(200, round(MIN_SAMPLE_S / elapsed)))
        samples: dict[tuple[str, int], list[float]] = {pair: [] for pair in pairs}
        for r in range(rounds):
            rng.shuffle(pairs)
            for name, T in pairs:
                sess, feed, n = sessions[name], feeds[T], reps[name, T]
                t0 = time.perf_counter()
                for _ in range(n):
                    sess.run(None, feed)
                samples[name, T].append((time.perf_counter() - t0) / n * 1e3)
            log(f"latency {group}: round {r + 1}/{rounds} done")
        del sess  # the last session run; with the dict, frees the group's arenas
        sessions.clear()
        for (name, T), times in samples.items():
            result[name][T] = statistics.median(times)
        for T in seq_lens:
            log(f"latency T={T}: " + ", ".join(f"{n} {result[n][T]:.2f}" for n in members))
    return result


def _rss_kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    assert m is not None, field
    return int(m.group(1))


def peak_child(path: str, T: int, threads: int) -> None:
    """Subprocess entry: print ``{"first_bytes": ..., "steady_bytes": ...}``, the peak RSS growth
    over the first run of ``path`` at length ``T`` and over the first two."""
    sess = session(Path(path), threads)
    feed = inputs(T)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    peaks = []
    for _ in range(2):
        sess.run(None, feed)
        peaks.append((_rss_kib("VmHWM") - before) * 1024)
    print(json.dumps({"first_bytes": peaks[0], "steady_bytes": peaks[1]}))


def measure_peak(
    paths: dict[str, Path],
    seq_lens: tuple[int, ...],
    threads: int,
    log,  # noqa: ANN001
) -> dict[str, dict[int, dict[str, int]]]:
    """``{variant: {T: {"first_bytes": ..., "steady_bytes": ...}}}``, one subprocess each.

    Raises:
        SystemExit: a run would not fit in ``MemAvailable`` (guessed from the previous ``T``
            as if memory grew quadratically, the most attention memory grows).
    """
    result: dict[str, dict[int, dict[str, int]]] = {name: {} for name in paths}
    for i, T in enumerate(seq_lens):
        for name, p in paths.items():
            if i:
                prev = result[name][seq_lens[i - 1]]["steady_bytes"]
                guess = prev * (T / seq_lens[i - 1]) ** 2
                if guess + 2**30 > _mem_available_bytes():
                    raise SystemExit(
                        f"peak memory of {name} at T={T} may reach {guess / 2**30:.1f} GiB, "
                        f"{_mem_available_bytes() / 2**30:.1f} GiB is available; stopping here"
                    )
            proc = subprocess.run(
                [sys.executable, __file__, "--peak-child", str(p), str(T), str(threads)],
                capture_output=True,
                text=True,
                check=True,
            )
            result[name][T] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(
            f"peak memory T={T}: "
            + ", ".join(
                f"{n} {result[n][T]['first_bytes'] / 2**20:.1f}/"
                f"{result[n][T]['steady_bytes'] / 2**20:.1f} MiB"
                for n in paths
            )
        )
    return result


def render(
    latency: dict[str, dict[int, float]],
    peak: dict[str, dict[int, dict[str, int]]],
    seq_lens: tuple[int, ...],
    meta: dict[str, str],
) -> str:
    """The markdown section: latency and peak memory tables, ratios, targets, how it was measured."""
    lo, hi = (1024, 8192) if {1024, 8192} <= set(seq_lens) else (seq_lens[0], seq_lens[-1])
    head = "| variant | " + " | ".join(f"T={T}" for T in seq_lens)
    sep = "|---|" + "---:|" * len(seq_lens)

    lines = [
        "## Linear attention operators vs softmax attention (onnxruntime CPU)",
        "",
        f"B = {B}, H = {H}, Dk = Dv = {DK}, no mask, fp32; window form: W = {WINDOW}. "
        f"Generated by `benchmarks/linear_attention.py` on {meta['date']}.",
        "",
        "Latency (ms, median of samples; every model and length interleaved within a group: "
        "softmax/bidirectional with the bidirectional variants, softmax/causal with the causal "
        "and window ones):",
        "",
        f"{head} | {hi}/{lo} | softmax/variant at {hi} |",
        sep + "---:|---:|",
    ]
    targets = []
    for name, row in latency.items():
        scaling = row[hi] / row[lo]
        teacher = "softmax/bidirectional" if name.endswith("bidirectional") else "softmax/causal"
        speedup = latency[teacher][hi] / row[hi] if teacher in latency else math.nan
        cells = " | ".join(f"{row[T]:.2f}" for T in seq_lens)
        if name == FLOOR:
            lines.append(f"| {name} (reference) | {cells} | {scaling:.2f} | – |")
            continue
        lines.append(f"| {name} | {cells} | {scaling:.2f} | {speedup:.1f}× |")
        if not name.startswith("softmax"):
            targets.append((name, scaling, speedup))
    lines += [
        "",
        "Peak memory, first run / after a second run (MiB; `VmHWM − VmRSS` before the runs, one "
        "process each, onnxruntime's defaults; the second number is what a serving session keeps: "
        "the arena holds the first run's buffers beside the memory pattern's block):",
        "",
        head + " |",
        sep,
    ]
    for name, mem in peak.items():
        cells = " | ".join(
            f"{mem[T]['first_bytes'] / 2**20:.1f} / {mem[T]['steady_bytes'] / 2**20:.1f}"
            for T in seq_lens
        )
        lines.append(f"| {name} | {cells} |")

    bad_scaling = [n for n, s, _ in targets if s > MAX_SCALING]
    bad_speedup = [n for n, _, x in targets
                   if n.endswith("bidirectional") and math.isfinite(x) and x < MIN_SPEEDUP]
    lines += [
        "",
        f"Targets (issue 4): latency({hi}) / latency({lo}) ≤ {MAX_SCALING:g} for every linear "
        f"variant: {'met' if not bad_scaling else 'missed by ' + ', '.join(bad_scaling)}; "
        f"every bidirectional variant ≥ {MIN_SPEEDUP:g}× faster than softmax at {hi}: "
        f"{'met' if not bad_speedup else 'missed by ' + ', '.join(bad_speedup)}.",
        "",
        *_floor_note(latency, lo, hi),
        f"Machine: {meta['machine']}; onnxruntime {meta['onnxruntime']}, torch {meta['torch']}; "
        f"{meta['threads']} intra-op thread(s), {meta['rounds']} rounds; load average "
        f"{meta['load_before']} before, {meta['load_after']} after (the machine is shared, so "
        "compare rows within one run rather than across runs).",
    ]
    return "\n".join(lines)


def _floor_note(latency: dict[str, dict[int, float]], lo: int, hi: int) -> list[str]:
    """What the memory hierarchy alone does to the scaling, from the :data:`FLOOR` row."""
    if FLOOR not in latency:
        return []
    floor = latency[FLOOR][hi] / latency[FLOOR][lo]
    return [
        f"`{FLOOR}` is not attention: it reads q, k, v once and writes their sum, the least any "
        f"operator on these inputs must do. Its {hi}/{lo} ratio, {floor:.1f}, is this machine's "
        f"memory hierarchy alone: at T = {lo} the inputs ({3 * B * H * lo * DK * 4 / 2**20:.1f} "
        f"MiB) and intermediates stay in the caches between runs, at T = {hi} "
        f"({3 * B * H * hi * DK * 4 / 2**20:.0f} MiB of inputs) they stream from DRAM. A linear "
        "variant's ratio above 8 is that effect diluted by its compute, not a superlinear "
        "algorithm: every operator here is O(T) in FLOPs and in memory (table above).",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=list(SEQ_LENS))
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (>= 1)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="onnxruntime intra-op threads (default 1: the machine is shared)",
    )
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (default all)")
    ap.add_argument("--quick", action="store_true", help="T ∈ {512, 1024}, 3 rounds, no doc update")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--no-doc", action="store_true", help="print only")
    ap.add_argument(
        "--peak-child", nargs=3, metavar=("ONNX", "T", "THREADS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)
    if args.peak_child:
        peak_child(args.peak_child[0], int(args.peak_child[1]), int(args.peak_child[2]))
        return 0
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.quick:
        args.seq_lens, args.rounds, args.no_doc = [512, 1024], 3, True
    seq_lens = tuple(sorted(args.seq_lens))

    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "threads": str(args.threads),
        "rounds": str(args.rounds),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"({cpu_model()})",
        "load_before": loadavg(),
    }
    chosen = [v for v in variants() if args.only is None or v.name in args.only]
    with tempfile.TemporaryDirectory(prefix="dtr-bench-") as tmp:
        paths: dict[str, Path] = {}
        for v in chosen:
            paths[v.name] = Path(tmp) / (v.name.replace("/", "-") + ".onnx")
            t0 = time.perf_counter()
            export(v, paths[v.name])
            log(f"exported {v.name} in {time.perf_counter() - t0:.1f} s")
        # memory first: it sizes the latency phase's memory check
        peak = measure_peak(paths, seq_lens, args.threads, log)
        latency = measure_latency(paths, seq_lens, args.rounds, args.threads, peak, log)
    meta["load_after"] = loadavg()
    section = render(latency, peak, seq_lens, meta)
    print(section)
    if not args.no_doc:
        write_section(args.doc, "linear_attention", section)
        log(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
