"""Benchmark: the student kinds (``--student``, ``--window``) on one causal-LM task, side by side.

For each ``NAME="FLAGS"`` run (for example ``hedgehog-w64="--window 64"``, ``gla="--student
gla"``) the task is compiled with ``dtr-compile`` in ``--out/NAME`` with the common options (the
ones this script does not know, passed on unchanged) plus the run's flags, unless that folder
already holds a report from an earlier invocation (``--reuse``; the report's student kind must
match the flags). From each report: linear layers, validation and test perplexity, distillation
and search wall time, the prefill latency ratio at the longest benchmarked length (the report's
speed stage). Then the stateful decoders are timed side by side in one run
(:func:`dtr_compile.runtime.bench_decode.bench_decode`, each model alone in rounds, a synthesised past of
``--context`` tokens): the KV-cached original (from the first run) and every run's hybrid.

Prints the table and writes it into ``docs/benchmarks.md`` between this benchmark's markers::

    .venv/bin/python benchmarks/students.py --task build/smollm2 --out build/students \\
        hedgehog-w64="--window 64" gla="--student gla" gla-w64="--student gla --window 64" \\
        -- --budget 5% --metric perplexity --search ranked --distill-steps 40 \\
        --max-calib-samples 8 --eval-batch 2 --confidence 0.9 --export-original --test test.pt
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort
from rich.console import Console

from dtr_compile.report import table_console
from dtr_compile.runtime.bench_decode import bench_decode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, loadavg, write_section  # noqa: E402

SECTION = "students"
TASK_FILES = ("model.pt", "model.tokenizer", "val.pt", "calib.pt", "test.pt", "task.json")


def compile_run(task: Path, folder: Path, flags: list[str], common: list[str],
                console: Console) -> None:
    """``dtr-compile`` of ``task`` in ``folder`` (task files linked or copied in first)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in TASK_FILES:
        src, dst = task / name, folder / name
        if src.exists() and not dst.exists():
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    cmd = [sys.executable, "-m", "dtr_compile", "model.pt", "--data", "val.pt", "-o",
           "hybrid.onnx", *(["--calib", "calib.pt"] if (folder / "calib.pt").exists() else []),
           *common, *flags]
    console.log(f"{folder.name}: {shlex.join(cmd[2:])}")
    with open(folder / "compile.log", "w") as log:
        rc = subprocess.run(cmd, cwd=folder, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc not in (0, 3):
        raise SystemExit(f"{folder.name}: dtr-compile exited {rc}; see {folder / 'compile.log'}")


def layer_of(module_path: str) -> str:
    m = re.search(r"layers\.(\d+)\.", module_path)
    return m.group(1) if m else module_path


def summarise(name: str, flags: list[str], rep: dict[str, Any]) -> dict[str, Any]:
    test = rep.get("test") or {}
    delivered = (test.get("models") or {}).get("delivered") or {}
    speed = rep.get("speed") or {}
    rows = speed.get("rows") or []
    longest = max(rows, key=lambda r: r["seq"]) if rows else None
    errors = [d["final_error"] for d in rep["distill"].values() if d.get("final_error") is not None]
    return {
        "name": name, "flags": shlex.join(flags), "student": rep.get("student"),
        "linear": [layer_of(r["module_path"]) for r in rep["replaced"]],
        "sites": len(rep["sites"]), "val": rep["final_metric"], "val_original": rep["baseline_metric"],
        "test": delivered.get("metric"), "test_original": test.get("original"),
        "test_within": delivered.get("within_budget"),
        "distill_s": rep["timings_s"].get("distill"), "search_s": rep["timings_s"].get("schedule"),
        "mean_error": sum(errors) / len(errors) if errors else None,
        "prefill_seq": longest["seq"] if longest else None,
        "prefill_ratio": longest["latency_ratio"] if longest else None,
    }


def _f(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(rows: list[dict[str, Any]], decode: dict[str, Any], header: str) -> str:
    ctx = decode["context"]
    lines = ["## Student kinds on SmolLM2-135M (`benchmarks/students.py`, issue 14)", "", header, "",
             f"| run | flags | linear layers | val ppl | test ppl (change) | test within budget | "
             f"mean distill rel. error | distill s | search s | prefill × original | decode ms/token "
             f"at {ctx} (× original) | state MiB at {ctx} |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    orig = decode["original"]
    lines.append(f"| original | | 0/{rows[0]['sites']} | {rows[0]['val_original']:.4f} | "
                 f"{_f(rows[0]['test_original'], '.4f')} | | | | | 1 | "
                 f"{_f(orig['ms'], '.2f')} (1) | {orig['mib']:.1f} |")
    for r in rows:
        d = decode["runs"].get(r["name"], {})
        change = (None if r["test"] is None or not r["test_original"]
                  else 100 * (r["test"] / r["test_original"] - 1))
        pre = ("n/a" if r["prefill_ratio"] is None
               else f"{r['prefill_ratio']:.2f} at {r['prefill_seq']}")
        ms = d.get("ms")
        dec = "n/a" if ms is None else f"{ms:.2f} ({ms / orig['ms']:.2f})"
        lines.append(
            f"| {r['name']} | `{r['flags']}` | {len(r['linear'])}/{r['sites']}: "
            f"{', '.join(r['linear']) or '—'} | {r['val']:.4f} | {_f(r['test'], '.4f')} "
            f"({_f(change, '+.2f')} %) | {'yes' if r['test_within'] else 'no'} | "
            f"{_f(r['mean_error'], '.3f')} | {_f(r['distill_s'], '.0f')} | "
            f"{_f(r['search_s'], '.0f')} | {pre} | {dec} | {_f(d.get('mib'), '.1f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help='NAME="FLAGS" (the flags of this run)')
    ap.add_argument("--task", type=Path, required=True, help="prepared task folder (model.pt, val.pt…)")
    ap.add_argument("--out", type=Path, required=True, help="one sub-folder per run")
    ap.add_argument("--reuse", action="store_true", help="keep a run whose report exists")
    ap.add_argument("--context", type=int, default=16384, help="decode context (synthesised past)")
    ap.add_argument("--tokens", type=int, default=16, help="timed decode steps per model")
    ap.add_argument("--note", default="")
    ap.add_argument("--doc", default="docs/benchmarks.md")
    ap.add_argument("--section", default=SECTION, help="the docs section (markers) to write")
    ap.add_argument("--no-doc", action="store_true")
    argv = sys.argv[1:] if argv is None else list(argv)
    tail: list[str] = []
    if "--" in argv:  # everything after "--" goes to dtr-compile
        argv, tail = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args, common = ap.parse_known_args(argv)
    common += tail
    bad = [r for r in args.runs if "=" not in r or r.startswith("-")]
    if bad:
        ap.error(f"runs are NAME=\"FLAGS\", got {bad}")
    console = table_console()  # tables keep their columns in a pipe or CI log
    before, t0 = loadavg(), time.perf_counter()
    rows = []
    for spec in args.runs:
        name, _, flags_s = spec.partition("=")
        flags = shlex.split(flags_s)
        folder = args.out / name
        report = folder / "hybrid.report.json"
        if not (args.reuse and report.exists()):
            compile_run(args.task, folder, flags, common, console)
        rep = json.loads(report.read_text())
        kind = flags[flags.index("--student") + 1] if "--student" in flags else "hedgehog"
        if rep.get("student") != kind:
            raise SystemExit(f"{report}: student {rep.get('student')!r}, the flags say {kind!r}")
        rows.append(summarise(name, flags, rep))
    first = args.out / rows[0]["name"]
    paths = {"original": first / "hybrid.original.decoder.onnx",
             **{r["name"]: args.out / r["name"] / "hybrid.decoder.onnx" for r in rows}}
    present = {k: p for k, p in paths.items() if p.exists()}
    res = bench_decode([str(p) for p in present.values()], [args.context], tokens=args.tokens,
                       max_prefill=0, on_step=console.log)
    decode: dict[str, Any] = {"context": args.context, "runs": {}}
    for key, p in present.items():
        c = res.cell(str(p), args.context)
        entry = {"ms": c.decode_ms, "mib": c.total_state_bytes / 2**20}
        if key == "original":
            decode["original"] = entry
        else:
            decode["runs"][key] = entry
    header = (f"Measured {dt.date.today()} on {platform.machine()}, {cpu_model()}, onnxruntime "
              f"{ort.__version__}; load average {before} → {loadavg()}; {time.perf_counter() - t0:.0f} s "
              f"in this invocation. Common options: `{shlex.join(common)}`. {args.note} "
              f"Decode: median of {args.tokens} steps of batch 1, each model alone (3 rounds, a fresh "
              f"process per model and round), after a synthesised "
              f"past of {args.context} tokens (the values do not change the cost). Prefill: the "
              "compile's own speed stage (hybrid.onnx vs hybrid.original.onnx), at the longest "
              "length it measured.")
    md = markdown(rows, decode, header)
    print(md)
    if not args.no_doc:
        write_section(Path(args.doc), args.section, md)
        console.print(f"wrote section {args.section!r} of {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
