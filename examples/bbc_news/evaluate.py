"""The demo's closing table: test accuracy of the original (PyTorch and ONNX) and of the hybrid
(ONNX), which layers became linear, and onnxruntime latency of both ONNX models.

Reads what ``make demo`` produced in ``build/bbc_news/``: ``model.pt``, ``test.pt``,
``hybrid.onnx``, ``hybrid.original.onnx`` and ``hybrid.report.json``. Accuracy and latency are
measured here, now, with the library's ``run`` and ``bench`` functions; nothing is copied from a
file of expected results. Writes ``demo_bench.json`` (latency) and ``demo_eval.json`` (test
accuracies, linear layers) beside them, for CI to keep.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from dtr_compile.report import table_console  # noqa: E402
from dtr_compile.runtime.bench import bench, bench_table  # noqa: E402
from dtr_compile.runtime.evaluate import evaluate_onnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _demo import print_outcome, pytorch_accuracy, results_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="build/bbc_news")
    ap.add_argument("--seq", default="256,2048", help="bench lengths (demo length first)")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    d = Path(args.dir)
    console = table_console()  # tables keep their columns in a pipe or CI log
    report = json.loads((d / "hybrid.report.json").read_text())
    original_onnx, hybrid_onnx = d / "hybrid.original.onnx", d / "hybrid.onnx"

    acc_pt, rows = pytorch_accuracy(d, 32)
    acc_orig = evaluate_onnx(original_onnx, d / "test.pt", metric="accuracy").value
    acc_hyb = evaluate_onnx(hybrid_onnx, d / "test.pt", metric="accuracy").value

    seqs = [int(s) for s in args.seq.split(",")]
    res = bench([original_onnx, hybrid_onnx], seqs, batch=1, repeats=args.repeats, extend=True,
                memory=False)
    (d / "demo_bench.json").write_text(json.dumps(res.to_dict(), indent=2))
    (d / "demo_eval.json").write_text(json.dumps({
        "test_rows": rows, "test_accuracy": {"original_pytorch": acc_pt,
                                                  "original_onnx": acc_orig, "hybrid_onnx": acc_hyb},
        "linear": [r["module_path"] for r in report["replaced"]]}, indent=2))

    lat = {m: [res.cell(str(m), s).latency_ms for s in seqs] for m in (original_onnx, hybrid_onnx)}
    fmt = lambda x: "n/a" if x is None else f"{x:.1f}"  # noqa: E731
    console.print(results_table(
        f"BBC News topics, all-MiniLM-L6-v2, {rows} test articles", "test accuracy",
        [f"latency T={s} (ms)" for s in seqs], report,
        [("original", "PyTorch", f"{acc_pt:.4f}", [""] * len(seqs)),
         ("original", "onnxruntime", f"{acc_orig:.4f}", [*map(fmt, lat[original_onnx])]),
         ("hybrid", "onnxruntime", f"{acc_hyb:.4f}", [*map(fmt, lat[hybrid_onnx])])]))
    print_outcome(console, report, "accuracy")
    for s in seqs:
        ratio = res.ratios(s)[str(hybrid_onnx)]["latency"]
        ext = any(res.cell(str(m), s).extended_positions for m in (original_onnx, hybrid_onnx))
        console.print(f"T={s}: hybrid/original latency {fmt(ratio) if ratio is None else f'{ratio:.2f}'}"
                      + (" (position table extended with random rows beyond 512: latency only)"
                         if ext else ""))
    console.print(bench_table(res, title="onnxruntime latency, batch 1"))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
