"""The vision demo's closing table: test accuracy of the original (PyTorch and ONNX) and of the
hybrid (ONNX), which layers became linear, and onnxruntime latency of both ONNX models.

Reads what ``make demo-vit`` produced in ``build/fashion_mnist/``: ``model.pt``, ``test.pt``,
``hybrid.onnx``, ``hybrid.original.onnx`` and ``hybrid.report.json``. Everything is measured
here, now, with the library's ``run_model``, ``evaluate_onnx`` and ``bench``.

The token count is fixed by the image size (28 x 28 at patch 2: 196 patches + CLS = 197), so
latency is measured at that one length for several batch sizes instead of several lengths.
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
from dtr_compile.runtime.bench import bench  # noqa: E402
from dtr_compile.runtime.evaluate import evaluate_onnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _demo import print_outcome, pytorch_accuracy, results_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="build/fashion_mnist")
    ap.add_argument("--batch", default="1,32", help="bench batch sizes")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    d = Path(args.dir)
    console = table_console()  # tables keep their columns in a pipe or CI log
    report = json.loads((d / "hybrid.report.json").read_text())
    task = json.loads((d / "task.json").read_text())
    tokens = task["tokens"]
    original_onnx, hybrid_onnx = d / "hybrid.original.onnx", d / "hybrid.onnx"

    acc_pt, rows = pytorch_accuracy(d, 64)
    acc_orig = evaluate_onnx(original_onnx, d / "test.pt", metric="accuracy", batch_size=64).value
    acc_hyb = evaluate_onnx(hybrid_onnx, d / "test.pt", metric="accuracy", batch_size=64).value

    batches = [int(b) for b in args.batch.split(",")]
    res = {b: bench([original_onnx, hybrid_onnx], [tokens], batch=b, repeats=args.repeats,
                    memory=False) for b in batches}
    (d / "demo_bench.json").write_text(json.dumps({b: r.to_dict() for b, r in res.items()},
                                                  indent=2))

    lat = {m: [res[b].cell(str(m), tokens).latency_ms for b in batches]
           for m in (original_onnx, hybrid_onnx)}
    fmt = lambda x: "n/a" if x is None else f"{x:.1f}"  # noqa: E731
    console.print(results_table(
        f"Fashion-MNIST, ViT {task['layers']} layers x {task['hidden']} ({tokens} tokens), "
        f"{rows} test images", "test accuracy", [f"latency B={b} (ms)" for b in batches], report,
        [("original", "PyTorch", f"{acc_pt:.4f}", [""] * len(batches)),
         ("original", "onnxruntime", f"{acc_orig:.4f}", [*map(fmt, lat[original_onnx])]),
         ("hybrid", "onnxruntime", f"{acc_hyb:.4f}", [*map(fmt, lat[hybrid_onnx])])]))
    print_outcome(console, report, "accuracy")
    for b in batches:
        ratio = res[b].ratios(tokens)[str(hybrid_onnx)]["latency"]
        console.print(f"B={b}, T={tokens}: hybrid/original latency "
                      + ("n/a" if ratio is None else f"{ratio:.2f}"))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
