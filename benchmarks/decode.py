"""Benchmark: decoding with the stateful decoders (KV cache for softmax layers, recurrent state for
linear ones) of compiled decoder models, side by side in one run.

For each ``LABEL=PATH`` decoder (the first is the baseline, normally the KV-cached original,
``hybrid.original.decoder.onnx``): decode ms/token (median of ``--tokens`` interleaved greedy
steps after a context of C tokens), prefill ms of C tokens (C <= ``--max-prefill``; above it the
decode steps start from a synthesised past of length C, marked ``*``), and state MiB per stream,
with each model's ratio to the baseline; then where a decode step's time goes at the longest
context (onnxruntime's profiler, per op type). All through
:func:`dtr_compile.runtime.bench_decode.bench_decode` and ``profile_decode``.

Prints the tables and writes them into ``docs/benchmarks.md`` between the markers of
``--section`` (default ``decode``)::

    .venv/bin/python benchmarks/decode.py original=build/smollm2/hybrid.original.decoder.onnx \\
        hybrid=build/smollm2/hybrid.decoder.onnx --context 1024,4096,16384
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

import onnxruntime as ort

from dtr_compile.report import table_console
from dtr_compile.runtime.bench_decode import (
    bench_decode,
    decode_table,
    profile_decode,
    profile_table,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, loadavg, write_section  # noqa: E402


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(res, labels: dict[str, str], profiles, prof_ctx: int, title: str,  # noqa: ANN001
             header: str) -> str:
    base = res.models[0]
    lines = [f"## {title}", "", header, "",
             "| context | model | decode ms/token | prefill ms | state MiB | decode ×"
             f"{labels[base]} | prefill × | state × |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for ctx in res.contexts:
        ratios = res.ratios(ctx)
        for m in res.models:
            c = res.cell(m, ctx)
            r = ratios.get(m, {})
            star = "*" if c.decode_synthesised else ""
            lines.append(
                f"| {ctx} | {labels[m]} | {_fmt(c.decode_ms, '.2f')}{star} | "
                f"{_fmt(c.prefill_ms, ',.0f')} | {c.total_state_bytes / 2**20:.1f} | "
                f"{_fmt(r.get('decode'), '.2f') if r else '1'} | "
                f"{_fmt(r.get('prefill'), '.2f') if r else '1'} | "
                f"{_fmt(r.get('state_bytes'), '.2f') if r else '1'} |")
    lines += ["", f"`*` decode timed on a synthesised past of C tokens (prefill above "
              f"{res.max_prefill} skipped). Batch 1; decode: median of {res.tokens} interleaved "
              f"steps; prefill: median of {res.prefill_repeats} runs.", ""]
    if profiles:
        lines += [f"Where a decode step's time goes at context {prof_ctx} (onnxruntime profiler, "
                  "top op types, ms per step):", "", "| model | op | ms/step | share |",
                  "|---|---|---:|---:|"]
        for m, ops in profiles.items():
            lines += [f"| {labels[m]} | {o.op_type} | {o.ms:.2f} | {100 * o.share:.0f} % |"
                      for o in ops[:6]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="LABEL=PATH of a stateful decoder ONNX; first = "
                    "baseline")
    ap.add_argument("--context", default="1024,4096,16384")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--max-prefill", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--title", default="Decoding with stateful decoders")
    ap.add_argument("--note", default="", help="a line under the title (what the models are)")
    ap.add_argument("--section", default="decode")
    ap.add_argument("--doc", default="docs/benchmarks.md")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    pairs = [m.split("=", 1) if "=" in m else (Path(m).name, m) for m in args.models]
    labels = {path: label for label, path in pairs}
    paths = [path for _, path in pairs]
    contexts = [int(c) for c in args.context.split(",")]
    console = table_console()  # tables keep their columns in a pipe or CI log
    before, t0 = loadavg(), time.perf_counter()
    res = bench_decode(paths, contexts, tokens=args.tokens, max_prefill=args.max_prefill,
                       threads=args.threads, on_step=console.log)
    console.print(decode_table(res))
    profiles = {}
    if not args.no_profile:
        profiles = {p: profile_decode(p, max(contexts), threads=args.threads) for p in paths}
        console.print(profile_table(profiles, max(contexts)))
    header = (f"Measured {dt.date.today()} on {platform.machine()}, {cpu_model()}, onnxruntime "
              f"{ort.__version__}, threads {args.threads or 'default'}; load average {before} → "
              f"{loadavg()}; {time.perf_counter() - t0:.0f} s. {args.note}\n\n"
              + "; ".join(f"{labels[p]} = `{p}`" for p in paths))
    md = markdown(res, labels, profiles, max(contexts), args.title, header)
    if not args.no_doc:
        write_section(Path(args.doc), args.section, md)
        console.print(f"wrote section {args.section!r} of {args.doc}")


if __name__ == "__main__":
    main()
