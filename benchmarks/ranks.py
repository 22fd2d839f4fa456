"""Benchmark: one compile with 1 vs N ranks (torchrun, gloo on the CPU), and the projected cost
of larger models from the measured per-site times.

Input: a task folder with a model (``model.pt``, a torch.export archive, or ``model/``, a Hugging
Face folder) and ``val.pt`` (and ``calib.pt`` if present). Each rank count compiles the same task
from an empty cache with ``torchrun --nproc-per-node N -m dtr_compile …`` (``--device cpu``,
``OMP_NUM_THREADS = CPUs // N`` per rank, so every run uses the whole machine) and reads rank 0's
report: the wall time of distillation and search, each site's training time and the evaluations.

Projection (stated, not measured): with ``P`` parameters, ``L`` attention sites, hidden size
``d``, ``R`` ranks and the same calibration set, steps and validation set as measured (``m``)::

    teacher(P)  = teacher_m · P / P_m             # one teacher pass per rank, FLOPs ∝ P·tokens
    site(d)     = site_m · d / d_m                # a site step is O(T·d·F), F the feature dim
    distill     = teacher(P) + ceil(L / R) · site(d)   # a rank trains its sites one by one
    eval(P)     = eval_m · P / P_m                # one validation pass, ∝ P·tokens
    search      = E(L) · eval(P) / R,  E(L) = L + k (lazy) … L(L+1)/2 (greedy, worst case)

``teacher_m`` is the 1-rank run's distillation time minus its trainings' wall share
(``ceil(L_m / w) · site_m`` with its ``w = min(CPUs, L_m)`` worker processes), ``site_m`` the mean
site training time, ``eval_m`` the mean evaluation time of the 1-rank run. The projection is only
as good as the measured model is large: on a toy model fixed overheads dominate. The search's prefix cache (which skips the layers before a candidate) and the GPU's speed are
left out: the projection is CPU time at this machine's speed, an upper bound for a GPU.

Prints the table and writes it into ``docs/benchmarks.md`` between this benchmark's markers::

    .venv/bin/python benchmarks/ranks.py --task build/smollm2 --ranks 1 2
    .venv/bin/python benchmarks/ranks.py --task build/bbc_news --no-doc
    .venv/bin/python benchmarks/ranks.py --task build/smollm2 --budget 5% --metric perplexity \
        --search ranked --window 64 --distill-steps 40 --max-calib-samples 8 --eval-batch 1 \
        --max-evals 40 --no-bench --no-decoder  # options it does not know go to dtr-compile
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import cpu_model, loadavg, publish

ROOT = Path(__file__).resolve().parent.parent
#: (name, parameters, attention layers, hidden size) of the projected models
TARGETS = (("Qwen2.5-1.5B", 1.54e9, 28, 1536), ("Llama-3.1-8B", 8.03e9, 32, 4096))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _model(task: Path) -> Path:
    for cand in (task / "model.pt", task / "model.pt2", task / "model"):
        if cand.exists():
            return cand
    raise SystemExit(f"{task}: no model.pt, model.pt2 or model/ folder")


def _parameters(model: Path) -> int:
    """Parameter count of the model file (weights and buffers of the floating dtypes), each
    storage once: tied weights (SmolLM2's embedding and LM head) count once."""
    import torch

    from dtr_compile.load import load_model

    loaded = load_model(model)
    if loaded.program is not None:
        tensors = list(loaded.program.state_dict.values())
    else:
        assert loaded.module is not None
        tensors = list(loaded.module.state_dict().values())
    unique = {(t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()): t.numel()
              for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return sum(unique.values())


def run(task: Path, ranks: int, extra: list[str], work: Path) -> dict[str, Any]:
    """One compile of ``task`` over ``ranks`` processes; rank 0's report and the wall time."""
    out = work / f"r{ranks}" / "hybrid.onnx"
    cpus = len(os.sched_getaffinity(0))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(max(1, cpus // ranks)),
               PYTHONPATH=str(ROOT))
    calib = ["--calib", str(task / "calib.pt")] if (task / "calib.pt").exists() else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(ranks), "-m", "dtr_compile", str(_model(task)),
           "--data", str(task / "val.pt"), *calib, "-o", str(out), "--device", "cpu",
           "--no-progress", "--cache-dir", str(out.parent / "cache"), *extra]
    log(" ".join(cmd[2:]))
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    # torchrun exits 1 whenever a rank exits non-zero; rank 0's own code is in its summary
    code = res.returncode
    if code and (m := re.search(r"exitcode\s*:\s*(-?\d+)", res.stderr)):
        code = int(m.group(1))
    if code not in (0, 3):  # 3: nothing fits the budget, still a timed compile with a report
        raise SystemExit(f"{ranks} ranks failed ({code}):\n{res.stderr[-3000:]}")
    report = json.loads(out.with_suffix(".report.json").read_text())
    return {"ranks": ranks, "wall": wall, "report": report}


def summarise(r: dict[str, Any]) -> dict[str, float]:
    rep = r["report"]
    t = rep["timings_s"]
    sites = [d["seconds"] for d in rep["distill"].values() if not d.get("cached")]
    evals = [e["seconds"] for e in rep["schedule"]["evaluations"] if not e.get("replayed")]
    return {"distill": t.get("distill", math.nan), "search": t.get("schedule", math.nan),
            "site": sum(sites) / len(sites) if sites else math.nan,
            "sites_here": len(sites), "eval": sum(evals) / len(evals) if evals else math.nan,
            "evals": len(rep["schedule"]["evaluations"]), "wall": r["wall"],
            "committed": len(rep["replaced"]), "metric": rep["final_metric"]}


def project(m: dict[str, float], rep: dict[str, Any], params_m: int, ranks: int, cpus: int,
            ) -> list[tuple[str, float, float, float]]:
    """``(model, distill s, search s lazy, search s greedy worst)`` per target (see the module
    docstring for the formula)."""
    sites = rep["sites"]
    d_m = sum(s["num_heads"] * s["head_dim"] for s in sites) / len(sites)
    # the 1-rank run's time outside the trainings, which ran in min(CPUs, L) worker processes
    workers = max(1, min(cpus, len(sites)))
    teacher_m = max(0.0, m["distill"] - m["site"] * math.ceil(len(sites) / workers))
    out = []
    for name, p, layers, d in TARGETS:
        teacher = teacher_m * p / params_m
        site = m["site"] * d / d_m
        distill = teacher + math.ceil(layers / ranks) * site
        ev = m["eval"] * p / params_m
        k = max(1, m["committed"] * layers // len(sites))
        out.append((name, distill, (layers + k) * ev / ranks,
                    layers * (layers + 1) / 2 * ev / ranks))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--task", type=Path, required=True, help="folder with the model and val.pt")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--budget", default="0.5%")
    ap.add_argument("--metric", default=None)
    ap.add_argument("--distill-steps", type=int, default=None)
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--no-doc", action="store_true", help="print only")
    args, passthrough = ap.parse_known_args(argv)  # other dtr-compile options go to every run
    extra = ["--budget", args.budget, *passthrough]
    if args.metric:
        extra += ["--metric", args.metric]
    if args.distill_steps:
        extra += ["--distill-steps", str(args.distill_steps)]
    sys.path.insert(0, str(ROOT))
    params = _parameters(_model(args.task))
    work = Path(tempfile.mkdtemp(prefix="dtr-ranks-"))
    try:
        runs = [run(args.task, n, extra, work) for n in args.ranks]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ms = [summarise(r) for r in runs]
    base = ms[0]["distill"] + ms[0]["search"]
    same = all(r["report"]["replaced"] == runs[0]["report"]["replaced"] for r in runs)
    lines = [
        "## Ranks: one compile over 1 vs N processes (`benchmarks/ranks.py`)",
        "",
        f"Task `{args.task.name}` ({params / 1e6:.3g} M parameters, "
        f"{len(runs[0]['report']['sites'])} sites), budget {args.budget}, `--device cpu`, "
        f"from an empty cache{', options ' + ' '.join(passthrough) if passthrough else ''}; "
        f"{cpu_model()}, {len(os.sched_getaffinity(0))} CPUs, load "
        f"{loadavg()}, Python {platform.python_version()}. Each run uses every CPU "
        "(`OMP_NUM_THREADS = CPUs / ranks`); rank 0's report.",
        "",
        "| ranks | distill s | search s | distill + search s | speed-up | evaluations | "
        "mean site s | mean eval s | sites | metric |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in zip(ms, runs, strict=True):
        tot = m["distill"] + m["search"]
        lines.append(f"| {r['ranks']} | {m['distill']:.1f} | {m['search']:.1f} | {tot:.1f} | "
                     f"{base / tot:.2f}× | {m['evals']} | {m['site']:.2f} | {m['eval']:.3f} | "
                     f"{m['committed']} | {m['metric']:.6g} |")
    lines += ["", "Same committed sites with every rank count: " + ("yes" if same else "**no**"),
              "", "Projected distillation + search (CPU time at this machine's speed, formula in "
              "`benchmarks/ranks.py`), from the 1-rank run:", "",
              "| model | ranks | distill h | search h (lazy) | search h (greedy, worst) |",
              "|---|---|---|---|---|"]
    for n in args.ranks:
        for name, dist, lazy, greedy in project(ms[0], runs[0]["report"], params, n,
                                                len(os.sched_getaffinity(0))):
            lines.append(f"| {name} | {n} | {dist / 3600:.2f} | {lazy / 3600:.2f} | "
                         f"{greedy / 3600:.2f} |")
    publish(lines, None if args.no_doc else args.doc, "ranks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
