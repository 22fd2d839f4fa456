"""Benchmark: peak resident memory of one compile per stage, with the ONNX weights inside the
file vs beside it (``--external-data never`` / ``always``), and what an onnxruntime session of
the hybrid holds in each form.

The model is a random-weight ``LlamaForCausalLM`` written as a Hugging Face folder (fp32
safetensors, which transformers memory-maps), sized so that its weights dominate the process:
by default 4 layers, hidden 1024, vocabulary 32000 (116 M parameters, 442 MiB). Each compile runs
in its own process from an empty cache with few distillation steps (the memory, not the
hybrid's quality, is measured) and reports its peak RSS after each stage
(``runtime.peak_rss_by_stage_mib``). ``ru_maxrss`` counts file-backed pages too: weights the
kernel maps from a file are in it, though it can drop them under pressure and read them again.
So this script also samples the compile's anonymous and file-backed RSS (``/proc/PID/status``)
every 20 ms: the anonymous peak is what must fit in RAM. A third compile (``always``,
``--no-bench``) shows what the speed bench's two sessions add.

The session rows open the compiled hybrid in a fresh process each and report the resident memory
it added (``/proc/self/statm``) after creating the session and after one run at batch 4 × 64,
with onnxruntime's MatMul prepacking on (its default) and off (``session.disable_prepacking``).

Prints the tables and writes them into ``docs/benchmarks.md`` between this benchmark's markers::

    .venv/bin/python benchmarks/memory.py
    .venv/bin/python benchmarks/memory.py --hidden 512 --vocab 8000 --no-doc   # quick look
    .venv/bin/python benchmarks/memory.py --scaling 1024,2048   # what grows with the weights
    sudo .venv/bin/python benchmarks/memory.py --limit-ram 2048   # in a cgroup < 2× the weights
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import cpu_model, loadavg, publish

ROOT = Path(__file__).resolve().parent.parent
FORMS = ("never", "always")
SAMPLE_S = 0.02  # how often the compile's anonymous / file-backed RSS is sampled, s

MAKE_MODEL = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
out, hidden, vocab, layers = sys.argv[1], *map(int, sys.argv[2:5])
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                  num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                  max_position_embeddings=256, tie_word_embeddings=False)
model = LlamaForCausalLM(cfg).eval()
model.save_pretrained(out)
print(sum(p.numel() for p in model.parameters()))
g = torch.Generator().manual_seed(0)
ids = torch.randint(1, vocab, (16, 64), generator=g)
torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, out + "/val.pt")
"""

SESSION = """
import sys, numpy as np, onnxruntime as ort
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
r0 = rss()
so = ort.SessionOptions()
so.intra_op_num_threads = 1
if sys.argv[2] == "off":
    so.add_session_config_entry("session.disable_prepacking", "1")
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
r1 = rss()
ids = np.ones((4, 64), np.int64)
s.run(None, {"input_ids": ids, "attention_mask": ids})
print(round(r1 - r0, 1), round(rss() - r0, 1))
"""


IMPORTS = """
import resource
import onnxruntime, transformers, torch
import dtr_compile.pipeline
parts = {k: int(v.split()[0]) / 1024 for k, _, v in
         (ln.partition(":") for ln in open("/proc/self/status")) if k in ("RssAnon", "RssFile")}
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, parts["RssAnon"], parts["RssFile"])
"""
#: pipeline stages in the order they run (the report's JSON keys are sorted)
STAGES = ("load", "capture", "find_attention", "baseline", "distill", "schedule", "test",
          "export", "bench")


def make_model(model: Path, hidden: int, vocab: int, layers: int) -> int:
    """Write the random-weight Llama folder (with ``val.pt``) at ``model``; its parameters."""
    made = subprocess.run([sys.executable, "-c", MAKE_MODEL, str(model), str(hidden), str(vocab),
                           str(layers)], capture_output=True, text=True, check=True)
    return int(made.stdout.split()[-1])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def compile_once(model: Path, form: str, work: Path, *extra: str,
                 wrap: list[str] | None = None, check: bool = True,
                 timeout_s: float | None = None) -> dict[str, Any]:
    """One compile of ``model`` with ``--external-data form`` and ``extra`` flags, in its own
    process (started through ``wrap``, e.g. a shell that joins a cgroup): its report (``{}``
    when it wrote none), exit code, wall time and sampled peak RSS parts. ``check``: stop the
    benchmark when the compile fails (exit code other than 0 and 3). ``timeout_s``: kill it
    after so long (a process starved of memory may page its code in and out for ever)."""
    out = work / (form + "".join(extra)) / "hybrid.onnx"
    cmd = [sys.executable, "-m", "dtr_compile", str(model), "--data", str(model / "val.pt"),
           "--metric", "perplexity", "--budget", "90%", "--distill-steps", "5",
           "--max-calib-samples", "8", "--no-cache", "--no-progress", "--external-data", form,
           "-o", str(out), *extra]
    log(f"compile, --external-data {form} {' '.join(extra)}")
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([*(wrap or []), *cmd], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=err, env={**os.environ, "PYTHONPATH": str(ROOT)})
        peak = {"RssAnon": 0.0, "RssFile": 0.0}
        while proc.poll() is None:  # the kernel keeps no peak of either part: sample it
            for key, mib in rss_parts(proc.pid).items():
                peak[key] = max(peak[key], mib)
            if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                proc.kill()
            time.sleep(SAMPLE_S)
        err.seek(0)
        last = (err.read().strip().splitlines() or ["?"])[-1]
        if check and proc.returncode not in (0, 3):
            err.seek(0)
            raise SystemExit(f"compile failed ({proc.returncode}):\n{err.read()[-3000:]}")
    path = out.with_suffix(".report.json")
    report = json.loads(path.read_text()) if path.is_file() else {}
    return {"report": report, "out": out, "wall": time.perf_counter() - t0, "peak": peak,
            "returncode": proc.returncode, "last_line": last}


def rss_parts(pid: int) -> dict[str, float]:
    """Anonymous and file-backed resident memory of ``pid`` now, in MiB (``/proc/PID/status``);
    empty once the process has gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    parts = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            parts[key] = int(value.split()[0]) / 1024
    return parts


def session_memory(path: Path, prepack: str) -> tuple[float, float]:
    proc = subprocess.run([sys.executable, "-c", SESSION, str(path), prepack],
                          capture_output=True, text=True, check=True)
    created, ran = proc.stdout.split()
    return float(created), float(ran)


def imports_floor() -> tuple[float, float, float]:
    """Peak RSS, anonymous and file-backed RSS of a process that only imported, MiB."""
    out = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak, anon, file = map(float, out.stdout.split()[-3:])
    return peak, anon, file


def scaling(args: argparse.Namespace) -> int:
    """Peak anonymous RSS of a compile (``--external-data always``) with and without the speed
    bench, at each ``--scaling`` hidden size: which part grows with the weights."""
    rows = []
    _, anon_floor, _ = imports_floor()
    for hidden in args.scaling:
        work = Path(tempfile.mkdtemp(prefix="dtr-memory-"))
        try:
            model = work / "model"
            weights = make_model(model, hidden, args.vocab, args.layers) * 4 / 2**20
            plain = compile_once(model, "always", work, "--no-bench")
            full = compile_once(model, "always", work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows.append((hidden, weights, plain["peak"]["RssAnon"], full["peak"]["RssAnon"],
                     full["report"]["speed"].get("prepack")))
    lines = [
        "### What grows with the weights (`benchmarks/memory.py --scaling`)",
        "",
        f"Random-weight Llama, {args.layers} layers, vocabulary {args.vocab}, `--external-data "
        f"always`, the same 16 × 64 validation rows; peak anonymous RSS of the compile in MiB, "
        f"and above the imports' {anon_floor:.0f} MiB × the weights; "
        f"{len(os.sched_getaffinity(0))} CPUs.",
        "",
        "| hidden | fp32 weights MiB | peak anon, `--no-bench` | peak anon, with the speed bench "
        "| bench prepacking |",
        "|---|---|---|---|---|",
    ]
    for hidden, weights, plain_anon, full_anon, prepack in rows:
        lines.append(f"| {hidden} | {weights:.0f} | {plain_anon:.0f} "
                     f"({(plain_anon - anon_floor) / weights:.2f}×) | {full_anon:.0f} "
                     f"({(full_anon - anon_floor) / weights:.2f}×) | "
                     f"{'on' if prepack is not False else 'off'} |")
    publish(lines, None if args.no_doc else args.doc, "memory-scaling")
    return 0


def _make_cgroup(limit: int) -> tuple[Path, Path]:
    """A memory cgroup limited to ``limit`` bytes (v2 if mounted so, else v1; needs root):
    ``(its folder, its cgroup.procs)``."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.is_file() and "memory" in v2.read_text().split():
        d = Path(tempfile.mkdtemp(prefix="dtr-bench-", dir="/sys/fs/cgroup"))
        (d / "memory.max").write_text(str(limit))
        (d / "memory.swap.max").write_text("0")
    else:
        d = Path(tempfile.mkdtemp(prefix="dtr-bench-", dir="/sys/fs/cgroup/memory"))
        (d / "memory.limit_in_bytes").write_text(str(limit))
    return d, d / "cgroup.procs"


def limited(args: argparse.Namespace) -> int:
    """One compile (``--external-data always``, speed bench included) of a model whose weights
    do not fit twice in the memory it is given: a cgroup limited to ``--limit-ratio`` × the
    weights (needs root)."""
    hidden = args.limit_ram
    work = Path(tempfile.mkdtemp(prefix="dtr-memory-"))
    cgroup = None
    try:
        model = work / "model"
        weights = make_model(model, hidden, args.vocab, args.layers) * 4
        limit = int(weights * args.limit_ratio)
        cgroup, procs = _make_cgroup(limit)
        # the model files were just written from outside the cgroup: drop their page cache, or
        # the pages stay charged elsewhere and the compile reads them for free
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        log(f"cgroup of {limit / 2**20:.0f} MiB ({args.limit_ratio}× the weights)")
        run = compile_once(model, "always", work, check=False, timeout_s=args.limit_timeout,
                           wrap=["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh"])
        peak_file = next((cgroup / f for f in ("memory.peak", "memory.max_usage_in_bytes")
                          if (cgroup / f).is_file()), None)
        cgroup_peak = int(peak_file.read_text()) if peak_file else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if cgroup is not None:
            with contextlib.suppress(OSError):
                cgroup.rmdir()
    report, code = run["report"], run["returncode"]
    speed = report.get("speed") or {}
    peaks = (report.get("runtime") or {}).get("peak_rss_by_stage_mib") or {}
    tail = "" if code == 0 else f" ({run['last_line'][:200]})"
    lines = [
        "### Weights that do not fit twice (`benchmarks/memory.py --limit-ram`)",
        "",
        f"Random-weight Llama, {args.layers} layers, hidden {hidden}, vocabulary {args.vocab}: "
        f"{weights / 2**20:.0f} MiB of fp32 weights. One compile, `--external-data always`, "
        f"speed bench included, in a memory cgroup limited to {limit / 2**20:.0f} MiB "
        f"({args.limit_ratio:g}× the weights: teacher and hybrid could not each hold a copy), "
        "page cache dropped before (the model's files are read, and charged, inside it); "
        f"no swap; {len(os.sched_getaffinity(0))} CPUs. RSS counts mapped file pages that "
        "the cgroup may have read more than once (dropped, then read again).",
        "",
        "| exit code | wall s | cgroup's peak charge (MiB) | highest RSS (MiB, file pages "
        "included) | bench prepacking |",
        "|---|---|---|---|---|",
        f"| {code}{tail} | {run['wall']:.0f} | {cgroup_peak / 2**20:.0f} | "
        f"{max(peaks.values(), default=0):.0f} | "
        f"{'–' if not speed else 'on' if speed.get('prepack', True) else 'off: ' + speed.get('prepack_note', '')} |",
    ]
    publish(lines, None if args.no_doc else args.doc, "memory-limited")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--scaling", type=lambda t: [int(x) for x in t.split(",")], default=None,
                    metavar="H1,H2", help="only the scaling table, at these hidden sizes")
    ap.add_argument("--limit-ram", type=int, default=None, metavar="HIDDEN",
                    help="only the compile in a memory cgroup, at this hidden size (root)")
    ap.add_argument("--limit-ratio", type=float, default=1.9,
                    help="the cgroup's limit, × the model's weights")
    ap.add_argument("--limit-timeout", type=float, default=1800,
                    help="seconds before the limited compile is killed (-9 in the table)")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--no-doc", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.scaling:
        return scaling(args)
    if args.limit_ram:
        return limited(args)
    work = Path(tempfile.mkdtemp(prefix="dtr-memory-"))
    try:
        model = work / "model"
        params = make_model(model, args.hidden, args.vocab, args.layers)
        weights_mib = params * 4 / 2**20
        floor, anon_floor, file_floor = imports_floor()
        runs = {form: compile_once(model, form, work) for form in FORMS}
        # the same compile without the speed bench (its two onnxruntime sessions side by side)
        no_bench = compile_once(model, "always", work, "--no-bench")
        sessions = {(form, pre): session_memory(runs[form]["out"], pre)
                    for form in FORMS for pre in ("on", "off")}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    stages = [st for st in STAGES if st in runs["never"]["report"]["timings_s"]]
    lines = [
        "## Memory: peak RSS per stage, ONNX weights inside vs beside the file "
        "(`benchmarks/memory.py`)",
        "",
        f"Random-weight Llama ({args.layers} layers, hidden {args.hidden}, vocabulary "
        f"{args.vocab}): {params / 1e6:.1f} M parameters, {weights_mib:.0f} MiB of fp32 weights "
        "in a Hugging Face folder (safetensors, memory-mapped by transformers). One compile per "
        "form, 16 validation rows × 64 tokens, 5 distillation steps, from an empty cache; "
        f"{cpu_model()}, {len(os.sched_getaffinity(0))} CPUs, load {loadavg()}, Python "
        f"{platform.python_version()}. Peak RSS of the compiling process (rank 0) once each "
        "stage ended, in MiB; it includes file-backed pages. In brackets: what it holds above "
        f"the {floor:.0f} MiB a process takes for its imports alone (torch, transformers, "
        "onnxruntime, dtr_compile), × the weights.",
        "",
        "| stage | " + " | ".join(f"s, `{f}`" for f in FORMS) + " | "
        + " | ".join(f"peak RSS, `--external-data {f}`" for f in FORMS) + " |",
        "|---|" + "---|" * (2 * len(FORMS)),
    ]
    for st in stages:
        secs = [runs[f]["report"]["timings_s"].get(st) for f in FORMS]
        peaks = [runs[f]["report"]["runtime"]["peak_rss_by_stage_mib"].get(st) for f in FORMS]
        lines.append(f"| {st} | " + " | ".join("–" if s is None else f"{s:.1f}" for s in secs)
                     + " | " + " | ".join("–" if p is None else
                                          f"{p:.0f} ({(p - floor) / weights_mib:.1f}×)"
                                          for p in peaks)
                     + " |")
    lines += [
        "",
        "What must fit in RAM is the anonymous part: file-backed pages (the safetensors that "
        "transformers maps, the `.data` files onnxruntime maps) can be dropped by the kernel and "
        f"read again. Sampled every {SAMPLE_S * 1000:.0f} ms over the whole compile, in MiB; "
        f"in brackets, above what the imports alone hold ({anon_floor:.0f} anonymous, "
        f"{file_floor:.0f} file-backed: mostly torch's libraries), × the weights:",
        "",
        "| ONNX weights | peak anonymous RSS | peak file-backed RSS |",
        "|---|---|---|",
    ]
    for form, run in [*((f, runs[f]) for f in FORMS), ("no-bench", no_bench)]:
        peak = run["peak"]
        where = {"never": "inside `hybrid.onnx`", "always": "in `hybrid.onnx.data`",
                 "no-bench": "in `hybrid.onnx.data`, `--no-bench`"}[form]
        lines.append(f"| {where} | {peak['RssAnon']:.0f} "
                     f"({(peak['RssAnon'] - anon_floor) / weights_mib:.1f}×) | "
                     f"{peak['RssFile']:.0f} ({(peak['RssFile'] - file_floor) / weights_mib:.1f}×) |")
    lines += [
        "",
        "onnxruntime CPU session of the compiled hybrid ONNX, fresh process each, resident "
        "memory it added in MiB (× the weights):",
        "",
        "| ONNX weights | MatMul prepacking | after creating the session | after one run (4 × 64) |",
        "|---|---|---|---|",
    ]
    for form in FORMS:
        for pre in ("on", "off"):
            created, ran = sessions[(form, pre)]
            where = "inside `hybrid.onnx`" if form == "never" else "in `hybrid.onnx.data`"
            lines.append(f"| {where} | {pre} | {created:.0f} ({created / weights_mib:.2f}×) | "
                         f"{ran:.0f} ({ran / weights_mib:.2f}×) |")
    publish(lines, None if args.no_doc else args.doc, "memory")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
