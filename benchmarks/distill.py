"""Benchmark: distillation of every attention site of the real MiniLM + BBC task.

Input: the demo task prepared by ``examples/bbc_news/prepare.py`` in ``build/bbc_news/``
(``model.pt``, ``train.pt``, ``val.pt``, ``test.pt``). For each feature map and target (default:
elu, hedgehog, taylor × site, block) the six sites are distilled exactly as ``make demo``'s
``dtr-compile --calib train.pt`` does with its default settings (calibration = the first 64 rows
of the train split, no cache), then ALL six sites are made linear and the hybrid's validation
and test accuracy are measured in PyTorch.

Columns: held-out relative error of each site after distillation (of the attention core's output
for ``site``, of the block's output after the output projection for ``block``; before → after
for the mean), validation and test accuracy of the all-linear hybrid and its share of the
original's test accuracy, and the wall time of the distillation (teacher pass included) with the
load average around it (the machine is shared: timings are upper bounds).

Prints the table and writes it into ``docs/benchmarks.md`` between this benchmark's markers,
leaving the rest of the file alone::

    .venv/bin/python benchmarks/distill.py               # ~45 min on 2 busy cores
    .venv/bin/python benchmarks/distill.py --maps hedgehog --targets site --no-doc
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from _common import cpu_model, loadavg, write_section

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


_EVAL: dict[str, Any] = {}


def _accuracy(split: str) -> float:
    """Accuracy of ``_EVAL['model']`` on ``_EVAL[split]`` at one thread (in a forked child)."""
    import torch

    from dtr_compile.data import run_model

    torch.set_num_threads(1)
    data = _EVAL[split]
    out = run_model(_EVAL["model"], data, _EVAL["names"], 32)
    return float((out.argmax(-1) == data.labels).float().mean())


def accuracies(model, val, test, names) -> tuple[float, float]:  # noqa: ANN001
    """Validation and test accuracy, measured in two processes at once."""
    _EVAL.update(model=model, val=val, test=test, names=names)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        v, t = pool.map(_accuracy, ["val", "test"])
    return v, t


def main(argv: list[str] | None = None) -> int:
    import torch

    from dtr_compile.capture import capture
    from dtr_compile.config import CompileConfig
    from dtr_compile.data import load_dataset
    from dtr_compile.distill.execute import default_workers
    from dtr_compile.distill.plan import plan_distillation
    from dtr_compile.distill.run import distill
    from dtr_compile.distill.stage import distill_settings
    from dtr_compile.load import load_model
    from dtr_compile.passes.find_attention import find_attention
    from dtr_compile.passes.linearize import linearize

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", type=Path, default=ROOT / "build" / "bbc_news")
    ap.add_argument("--calib", default="train.pt", help="calibration split in --task")
    ap.add_argument("--maps", default="elu,hedgehog,taylor")
    ap.add_argument("--targets", default="site,block")
    ap.add_argument("--workers", type=int, default=0, help="default: one per CPU")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a CompileConfig distillation field, e.g. distill_steps=100")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)

    defaults = CompileConfig(model="", output="x.onnx")
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        kind = type(getattr(defaults, key))
        overrides[key] = kind(value)
    loaded = load_model(str(args.task / "model.pt"))
    cap = capture(loaded)
    gm, names = cap.gm, cap.input_names
    sites = find_attention(gm).sites
    val = load_dataset(args.task / "val.pt", names)
    test = load_dataset(args.task / "test.pt", names)
    calib = load_dataset(args.task / args.calib, names).take(defaults.max_calib_samples)
    workers = args.workers or default_workers(len(sites))
    log(f"{len(sites)} sites, calibration {len(calib)} rows, {workers} workers, "
        f"torch threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    base_val, base_test = accuracies(gm, val, test, names)
    log(f"original: val {base_val:.4f} test {base_test:.4f} ({time.perf_counter() - t0:.0f} s)")

    rows = []
    for fmap in args.maps.split(","):
        for target in args.targets.split(","):
            config = dataclasses.replace(defaults, feature_map=fmap, distill_target=target,
                                         **overrides)
            settings = distill_settings(config)
            load_before = loadavg()
            t0 = time.perf_counter()
            plan = plan_distillation(gm, sites, settings, calib, config.eval_batch)
            students, results = distill(
                gm, plan, calib, names, record_batch=config.eval_batch,
                max_calib_tokens=config.max_calib_tokens, workers=workers, cache=None)
            seconds = time.perf_counter() - t0
            load_after = loadavg()
            errs = [results[s.id].final_error for s in sites]
            init = [results[s.id].init_error for s in sites]
            ok = all(results[s.id].ok for s in sites)
            hybrid = linearize(gm, sites, students, blocks=plan.blocks)
            acc_val, acc_test = accuracies(hybrid, val, test, names)
            steps = [results[s.id].steps for s in sites]
            rows.append(dict(fmap=fmap, target=target, errs=errs, init=init, ok=ok,
                             val=acc_val, test=acc_test, seconds=seconds, steps=steps,
                             load=f"{load_before} → {load_after}"))
            log(f"{fmap}/{target}: errors {[round(e, 3) for e in errs]} (init "
                f"{[round(e, 3) for e in init]}), steps {steps}, val {acc_val:.4f} "
                f"test {acc_test:.4f}, {seconds:.0f} s, load {load_before} → {load_after}")

    section = render(rows, defaults, overrides, base_val, base_test, len(calib), args.calib,
                     len(val), len(test), workers)
    print(section)
    if not args.no_doc:
        write_section(args.doc, "distill", section)
        log(f"wrote {args.doc}")
    return 0


def render(rows, defaults, overrides, base_val, base_test, n_calib, calib_name,  # noqa: ANN001
           n_val, n_test, workers) -> str:
    n_sites = len(rows[0]["errs"]) if rows else 0
    head = " | ".join(f"site{i}" for i in range(n_sites))
    lines = [
        "## Distillation (MiniLM-L6 + BBC News)",
        "",
        f"All six attention sites of the demo model distilled with `dtr-compile`'s defaults "
        f"({defaults.distill_steps} steps at most, lr {defaults.distill_lr:g} for feature maps "
        f"and {defaults.distill_block_lr:g} × RMS for a block's q/k/v/o weights, "
        f"{defaults.distill_batch} rows per step, {defaults.distill_queries} query positions "
        f"per row for `site`, early stopping on {max(1, min(16, n_calib // 8))} held-out "
        f"calibration rows; {n_calib} calibration rows of 256 tokens from `{calib_name}`, "
        f"{workers} worker processes at one thread each"
        + (f"; overrides {overrides}" if overrides else "") + "), then all six made linear. "
        f"Original model: validation accuracy {base_val:.4f}, test accuracy {base_test:.4f} "
        f"({n_val} / {n_test} rows). Per-site columns: held-out relative error after "
        "distillation (`site`: the attention core's output; `block`: the block's output after "
        "the output projection, so the two targets' errors are not comparable). `mean before` "
        "is the weight-transfer initialisation. Time: wall clock of the whole distillation "
        "(teacher pass included), with the 1-minute load average before → after on a machine "
        "shared with other jobs.",
        "",
        f"| feature map | target | {head} | mean before → after | val acc | test acc | "
        "test / original | steps (mean) | seconds | load |",
        "|---|---|" + "---|" * n_sites + "---|---|---|---|---|---|---|",
    ]
    for r in rows:
        errs = " | ".join(f"{e:.3f}" for e in r["errs"])
        mb, ma = sum(r["init"]) / len(r["init"]), sum(r["errs"]) / len(r["errs"])
        lines.append(f"| {r['fmap']} | {r['target']} | {errs} | {mb:.3f} → {ma:.3f} | "
                     f"{r['val']:.4f} | {r['test']:.4f} | {r['test'] / base_test:.1%} | "
                     f"{sum(r['steps']) / len(r['steps']):.0f} | {r['seconds']:.0f} | "
                     f"{r['load']} |")
    lines += ["", f"Machine: {cpu_model()}, {os.cpu_count()} CPUs, Python "
              f"{platform.python_version()}; `benchmarks/distill.py`, {time.strftime('%Y-%m-%d')}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
