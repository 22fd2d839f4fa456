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
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from dtr_compile.capture import capture  # noqa: E402
from dtr_compile.data import load_dataset, run_model  # noqa: E402
from dtr_compile.load import load_model  # noqa: E402
from dtr_compile.runtime import bench, evaluate_onnx  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="build/fashion_mnist")
    ap.add_argument("--batch", default="1,32", help="bench batch sizes")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    d = Path(args.dir)
    console = Console()
    report = json.loads((d / "hybrid.report.json").read_text())
    task = json.loads((d / "task.json").read_text())
    tokens = task["tokens"]
    original_onnx, hybrid_onnx = d / "hybrid.original.onnx", d / "hybrid.onnx"

    cap = capture(load_model(d / "model.pt"))
    test = load_dataset(d / "test.pt", cap.input_names)
    logits = run_model(cap.gm, test, cap.input_names, 64)
    acc_pt = (logits.argmax(-1) == test.labels).float().mean().item()
    acc_orig = evaluate_onnx(original_onnx, d / "test.pt", metric="accuracy", batch_size=64).value
    acc_hyb = evaluate_onnx(hybrid_onnx, d / "test.pt", metric="accuracy", batch_size=64).value

    batches = [int(b) for b in args.batch.split(",")]
    res = {b: bench([original_onnx, hybrid_onnx], [tokens], batch=b, repeats=args.repeats,
                    memory=False) for b in batches}
    (d / "demo_bench.json").write_text(json.dumps({b: r.to_dict() for b, r in res.items()},
                                                  indent=2))

    t = Table(title=f"Fashion-MNIST, ViT {task['layers']} layers x {task['hidden']} "
                    f"({tokens} tokens), {len(test)} test images")
    t.add_column("model")
    t.add_column("runtime")
    t.add_column("test accuracy", justify="right")
    t.add_column("linear layers")
    for b in batches:
        t.add_column(f"latency B={b} (ms)", justify="right")
    lat = {m: [res[b].cell(str(m), tokens).latency_ms for b in batches]
           for m in (original_onnx, hybrid_onnx)}
    fmt = lambda x: "n/a" if x is None else f"{x:.1f}"  # noqa: E731
    t.add_row("original", "PyTorch", f"{acc_pt:.4f}", "-", *([""] * len(batches)))
    t.add_row("original", "onnxruntime", f"{acc_orig:.4f}", "0", *map(fmt, lat[original_onnx]))
    replaced = [r["module_path"] for r in report["replaced"]]
    t.add_row("hybrid", "onnxruntime", f"{acc_hyb:.4f}", f"{len(replaced)}/{len(report['sites'])}",
              *map(fmt, lat[hybrid_onnx]))
    console.print(t)
    console.print("linear layers: " + (", ".join(replaced) or "none"))
    console.print(f"validation accuracy: original {report['baseline_metric']:.4f}, hybrid "
                  f"{report['final_metric']:.4f}, threshold {report['threshold']:.4f} "
                  f"(budget {report['budget']['text']})")
    for b in batches:
        ratio = res[b].ratios(tokens)[str(hybrid_onnx)]["latency"]
        console.print(f"B={b}, T={tokens}: hybrid/original latency "
                      + ("n/a" if ratio is None else f"{ratio:.2f}"))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
