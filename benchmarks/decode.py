"""Benchmark: decoding SmolLM2 with our stateful decoders against onnxruntime-genai's model
builder, **each model timed alone** (issue 24).

Models (batch 1, onnxruntime CPU, greedy):

* ours, from one compile ``-o COMPILED`` (``--export-original``): the original's decoder
  (``COMPILED.original.decoder.onnx``, KV cache), the hybrid's (``COMPILED.decoder.onnx``, KV
  cache + recurrent state), and their int4 copies (``--quantize int4``:
  ``COMPILED.original.int4.decoder.onnx``, ``COMPILED.int4.decoder.onnx``); a missing int4 copy
  is made here with the same quantizer and settings (:mod:`dtr_compile.exporters.quantize`) and
  the table says so;
* onnxruntime-genai's model builder run on the original (``-p fp32`` and ``-p int4 -e cpu``) from
  a Hugging Face folder of the same weights (``--hf-folder``; made from the GGUF by
  ``examples/smollm2/prepare.py --hf-folder`` when missing, with ``max_position_embeddings``
  raised to cover the longest context), built once into ``--work`` and reused; timed with genai's
  own ``Generator``: a real prefill through ``append_tokens`` at every context (chunked and not
  timed above ``--max-prefill``), then ``generate_next_token`` steps.

Per context: decode ms/token (median of ``--tokens`` steps over ``--rounds`` rounds; in each
round every model runs alone in a fresh process; the lowest–highest round median beside it),
each model's ratio to our original and to the builder's int4, prefill ms of C tokens, state MiB
per stream, the peak resident memory the model's process added, and the machine's load. Then the
issue's goals, met or missed by how much, and the export minutes of each model. All through
:func:`dtr_compile.runtime.bench_decode.bench_decode`.

Prints the tables and writes them into ``docs/benchmarks.md`` between the markers of
``--section`` (default ``decode``)::

    .venv/bin/python benchmarks/decode.py --compiled build/smollm2/hybrid.onnx \\
        --hf-folder build/smollm2/hf --work build/smollm2/bench
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort

from dtr_compile.exporters.quantize import quantize_onnx, quantized_path
from dtr_compile.report import table_console
from dtr_compile.runtime.bench_decode import bench_decode, decode_table, profile_decode
from dtr_compile.runtime.genai_baseline import builder_baselines

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, loadavg, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: the issue's goals: (model, against, context, at most)
GOALS = [("our hybrid", "our original", 4096, 0.8), ("our hybrid", "our original", 16384, 0.6),
         ("our int4 hybrid", "builder int4", 4096, 0.75)]


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def our_models(compiled: Path, work: Path, scheme: str, log: Any) -> tuple[dict[str, str], str]:  # noqa: ANN401
    """``{label: decoder path}`` of one compile, and a note on int4 copies made here."""
    dec = {"our original": compiled.with_suffix(".original.decoder.onnx"),
           "our hybrid": compiled.with_suffix(".decoder.onnx")}
    for p in dec.values():
        if not p.is_file():
            raise SystemExit(f"{p} not found: compile with --export-original (decoders are "
                             "written for causal models by default)")
    out = {k: str(v) for k, v in dec.items()}
    made = []
    for k, p in dec.items():
        q = quantized_path(p, scheme)
        if not q.is_file():
            q = work / quantized_path(p.name, scheme)
            if not q.is_file():
                log(f"quantizing {p.name} to {scheme} (the compile wrote no {q.name})")
                quantize_onnx(p, q, scheme)
            made.append(q.name)
        out[f"our {scheme} {k.removeprefix('our ')}"] = str(q)
    note = (f" {', '.join(made)} quantized by this script (the compile's quantizer and settings)."
            if made else "")
    return out, note


def hf_folder(path: Path, contexts: list[int], tokens: int, log: Any) -> Path:  # noqa: ANN401
    """The Hugging Face folder of the same weights, made from the GGUF when missing."""
    if (path / "config.json").is_file():
        need = max(contexts) + tokens + 64
        have = json.loads((path / "config.json").read_text()).get("max_position_embeddings", 0)
        if have < need:
            log(f"[yellow]{path}: max_position_embeddings {have} < {need}: the builder's exports "
                "cannot decode the longest context (remove the folder to remake it)[/yellow]")
        return path
    log(f"writing {path} from the GGUF (examples/smollm2/prepare.py --hf-folder)")
    subprocess.run([sys.executable, str(ROOT / "examples/smollm2/prepare.py"), "--hf-folder",
                    str(path), "--max-positions", str(max(32768, 2 * max(contexts)))], check=True)
    return path


def export_minutes(compiled: Path, builds: dict[str, Any], scheme: str) -> list[str]:
    """Markdown rows: minutes each model's export took (ours from the compile's report)."""
    rows = []
    report_path = compiled.with_suffix(".report.json")
    rep = json.loads(report_path.read_text()) if report_path.is_file() else {}
    st = rep.get("stateful") or {}
    qz = (rep.get("quantized") or {}).get("models") or {}
    for key, label in (("original", "our original"), ("hybrid", "our hybrid")):
        s = (st.get(key) or {}).get("seconds")
        q = (qz.get(f"{key}_decoder_onnx") or {}).get("seconds")
        rows.append(f"| {label} decoder | {_fmt(s / 60 if s else None, '.1f')} | "
                    + (f"+ {q / 60:.2f} for {scheme}" if q else "—") + " |")
    for p, b in builds.items():
        rows.append(f"| builder {p} | {b.seconds / 60:.1f} | (the whole builder run"
                    f"{', reused' if b.reused else ''}) |")
    return rows


def markdown(res: Any, labels: dict[str, str], header: str, title: str,  # noqa: ANN401
             minutes: list[str]) -> str:
    base = next(p for p, lab in labels.items() if lab == "our original")
    b4 = next((p for p, lab in labels.items() if lab == "builder int4"), None)
    lines = [f"## {title}", "", header, "",
             "| context | model | decode ms/token [round range] | × our original | × builder int4 "
             "| prefill ms | state MiB | peak MiB | load 1 min |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for ctx in res.contexts:
        for m in res.models:
            c = res.cell(m, ctx)
            sp = c.decode_spread_ms
            dec = (f"{c.decode_ms:.2f}{'*' if c.decode_synthesised else ''}"
                   + (f" [{sp[0]:.1f}–{sp[1]:.1f}]" if sp else "")) if c.decode_ms else "n/a"
            r0 = res.ratios(ctx, base).get(m, {}).get("decode") if m != base else 1.0
            r4 = (res.ratios(ctx, b4).get(m, {}).get("decode") if m != b4 else 1.0) if b4 \
                else None
            load = f"{statistics.mean(c.load_1m):.1f}" if c.load_1m else "n/a"
            lines.append(f"| {ctx} | {labels[m]} | {dec} | {_fmt(r0, '.2f')} | "
                         f"{_fmt(r4, '.2f')} | {_fmt(c.prefill_ms, ',.0f')} | "
                         f"{c.total_state_bytes / 2**20:.1f} | "
                         f"{_fmt(c.peak_bytes / 2**20 if c.peak_bytes else None, ',.0f')} | "
                         f"{load} |")
    lines += ["", f"`*` decode timed on a synthesised past of C tokens (our decoders above "
              f"{res.max_prefill}; the builder's always decode from their own real prefill). "
              f"Decode: median of {res.tokens} greedy steps over {res.rounds} rounds, each model "
              f"alone in a fresh process per round; prefill: median of {res.prefill_repeats} "
              "runs of C tokens (C ≤ "
              f"{res.max_prefill}); peak: resident memory the model's process added (model, "
              "prefill or past, decode steps); load: the machine's 1-minute load average at the "
              "end of the model's processes (2 cores).", ""]
    notes = [f"- {labels[c.model]} C={c.context}: {c.note}" for c in res.cells if c.note]
    lines += notes + ([""] if notes else [])
    by = {lab: p for p, lab in labels.items()}
    lines += ["Goals (issue 24, each model alone):", ""]
    for m, against, ctx, goal in GOALS:
        if m not in by or against not in by or ctx not in res.contexts:
            continue
        r = res.ratios(ctx, by[against]).get(by[m], {}).get("decode")
        verdict = ("not measured" if r is None else
                   f"×{r:.2f}: {'met' if r <= goal else f'**missed** by ×{r / goal:.2f}'}")
        lines.append(f"- {m} ≤ {goal}× {against} at {ctx}: {verdict}")
    slower = []
    for ctx in res.contexts:
        for m in ("our hybrid", "our int4 hybrid"):
            if m not in by or res.cell(by[m], ctx).decode_ms is None:
                continue
            for o in ("our original", "builder fp32", "builder int4"):
                if o in by and (r := res.ratios(ctx, by[o]).get(by[m], {}).get("decode")) \
                        is not None and r >= 1:
                    slower.append(f"{m} is **not faster** than {o} at {ctx} (×{r:.2f})")
    if slower:
        lines += ["", "Where the hybrid loses: " + "; ".join(slower) + "."]
    lines += ["", "Export minutes (2 cores, the compile's own timing of each decoder export):",
              "", "| model | minutes | |", "|---|---:|---|", *minutes]
    return "\n".join(lines)


def profile_markdown(profiles: dict[str, Any], context: int) -> str:  # noqa: ANN401
    lines = [f"Where a decode step's time goes at context {context} (onnxruntime profiler, top "
             "op types, ms per step):", "", "| model | op | ms/step | share |",
             "|---|---|---:|---:|"]
    for lab, ops in profiles.items():
        lines += [f"| {lab} | {o.op_type} | {o.ms:.2f} | {100 * o.share:.0f} % |" for o in ops[:6]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compiled", type=Path, default=ROOT / "build/smollm2/hybrid.onnx",
                    help="the -o of a compile with --export-original (its decoders beside it)")
    ap.add_argument("--hf-folder", type=Path, default=ROOT / "build/smollm2/hf")
    ap.add_argument("--work", type=Path, default=ROOT / "build/smollm2/bench",
                    help="where the builder's exports (and int4 copies made here) are kept")
    ap.add_argument("--builder", default="fp32,int4", help="builder precisions ('' for none)")
    ap.add_argument("--quantize", default="int4")
    ap.add_argument("--context", default="1024,4096,8192,16384")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prefill-repeats", type=int, default=3)
    ap.add_argument("--max-prefill", type=int, default=4096)
    ap.add_argument("--title", default="Decoding SmolLM2-135M: ours vs onnxruntime-genai's builder, "
                    "each model alone")
    ap.add_argument("--note", default="", help="a line under the title (what the models are)")
    ap.add_argument("--section", default="decode")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs/benchmarks.md")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--profile", type=int, default=None, metavar="C",
                    help="also profile 8 decode steps of each of our decoders at context C "
                         "(onnxruntime's profiler, per op type; one model at a time)")
    args = ap.parse_args()
    console = table_console()  # tables keep their columns in a pipe or CI log
    contexts = [int(c) for c in args.context.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    models, made = our_models(args.compiled, args.work, args.quantize, console.log)
    builds = {}
    if args.builder:
        hf = hf_folder(args.hf_folder, contexts, args.tokens, console.log)
        builds = builder_baselines(hf, args.work, args.builder.split(","), log=console.log)
        models |= {f"builder {p}": b.folder for p, b in builds.items()}
    labels = {path: label for label, path in models.items()}
    before, t0 = loadavg(), time.perf_counter()
    res = bench_decode(list(models.values()), contexts, tokens=args.tokens, rounds=args.rounds,
                       warmup=args.warmup, prefill_repeats=args.prefill_repeats,
                       max_prefill=args.max_prefill, on_step=console.log)
    console.print(decode_table(res))
    header = (f"Measured {dt.date.today()} on {platform.machine()}, {cpu_model()}, onnxruntime "
              f"{ort.__version__}, onnxruntime-genai "
              f"{next(iter(builds.values())).genai_version if builds else 'n/a'}, threads "
              f"default; load average {before} → {loadavg()}; {time.perf_counter() - t0:.0f} s. "
              f"{args.note}{made}\n\n"
              + "; ".join(f"{lab} = `{p}`" for lab, p in models.items()))
    md = markdown(res, labels, header, args.title,
                  export_minutes(args.compiled, builds, args.quantize))
    if args.profile:
        md += "\n\n" + profile_markdown(
            {lab: profile_decode(p, args.profile) for lab, p in models.items()
             if lab.startswith("our")}, args.profile)
    print(md)
    if args.json:
        args.json.write_text(json.dumps(res.to_dict() | {"labels": labels}, indent=1))
    if not args.no_doc:
        write_section(args.doc, args.section, md)
        console.print(f"wrote section {args.section!r} of {args.doc}")


if __name__ == "__main__":
    main()
