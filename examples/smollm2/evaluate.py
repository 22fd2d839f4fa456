"""The decoder demo's closing table: test perplexity of the original and of the hybrid (both in
onnxruntime), which layers became linear, onnxruntime prefill latency at T = 1024 and 4096, and,
from the stateful decoders (KV cache / recurrent state), the greedy continuation of one fixed
prompt from each model and the decode benchmark: ms/token and state MiB per stream at contexts
1K, 4K and 16K, prefill ms at 1K and 4K.

Reads what ``make demo-llm`` produced in ``build/smollm2/``: ``test.pt``, ``hybrid.onnx``,
``hybrid.original.onnx``, ``hybrid.decoder.onnx``, ``hybrid.original.decoder.onnx``,
``hybrid.tokenizer/``, ``hybrid.report.json`` and ``task.json``. Perplexity and latency are
measured here, now, with the library's ``evaluate_onnx`` and ``bench``. Latency is one prefill
forward pass of batch 1 (no KV cache: the model is exported with ``use_cache=False``), with
random token ids; SmolLM2 uses RoPE, so there is no position table to extend at 4096.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from dtr_compile.report import table_console  # noqa: E402
from dtr_compile.runtime.bench import bench, bench_table  # noqa: E402
from dtr_compile.runtime.bench_decode import bench_decode, decode_table  # noqa: E402
from dtr_compile.runtime.evaluate import evaluate_onnx  # noqa: E402
from dtr_compile.runtime.generate import Generator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _demo import print_outcome, results_table  # noqa: E402

#: The fixed prompt of the continuation (a BBC-News-like opening; greedy, so deterministic).
PROMPT = ("The Bank of England has kept interest rates on hold for another month, saying that "
          "inflation")


def decode_section(d: Path, console: Console, contexts: list[int], prompt: str,
                   new_tokens: int) -> None:
    """The stateful decoders' continuation of ``prompt`` and their decode benchmark (skipped,
    saying why, when the compile wrote no decoder)."""
    dec = {"original": d / "hybrid.original.decoder.onnx", "hybrid": d / "hybrid.decoder.onnx"}
    missing = [str(p) for p in dec.values() if not p.exists()]
    if missing:
        console.print(f"[yellow]no decode benchmark[/yellow]: {', '.join(missing)} not written")
        return
    texts = {}
    for name, path in dec.items():
        out = Generator(path).generate(prompt, max_new_tokens=new_tokens)  # tokenizer beside
        texts[name] = out.to_dict()
        console.print(f"[bold]{name}[/bold] (greedy, {new_tokens} tokens): "
                      f"{prompt}[cyan]{(out.text or [''])[0]}[/cyan]")
    res = bench_decode(list(dec.values()), contexts, tokens=32, max_prefill=4096,
                       on_step=lambda m: console.log(m))
    (d / "demo_decode.json").write_text(json.dumps({"continuation": texts, "prompt": prompt,
                                                    "bench": res.to_dict()}, indent=2))
    console.print(decode_table(res, title="onnxruntime decode, batch 1 (A = original)"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="build/smollm2")
    ap.add_argument("--test", default="test.pt", help="test rows, in --dir")
    ap.add_argument("--seq", default="1024,4096", help="prefill lengths to time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--context", default="1024,4096,16384", help="decode contexts to time")
    ap.add_argument("--prompt", default=PROMPT, help="the fixed prompt both models continue")
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()
    d = Path(args.dir)
    console = table_console()  # tables keep their columns in a pipe or CI log
    report = json.loads((d / "hybrid.report.json").read_text())
    original_onnx, hybrid_onnx = d / "hybrid.original.onnx", d / "hybrid.onnx"
    test_path = d / args.test
    rows = list(torch.load(test_path, weights_only=True)["input_ids"].shape)

    ppl = {m: evaluate_onnx(m, test_path, metric="perplexity", batch_size=1)
           for m in (original_onnx, hybrid_onnx)}
    seqs = [int(s) for s in args.seq.split(",")]
    res = bench([original_onnx, hybrid_onnx], seqs, batch=1, repeats=args.repeats, warmup=1,
                memory=False)
    (d / "demo_bench.json").write_text(json.dumps(res.to_dict(), indent=2))
    (d / "demo_eval.json").write_text(json.dumps({str(m): r.to_dict() for m, r in ppl.items()},
                                                 indent=2))

    fmt = lambda x: "n/a" if x is None else f"{x:.0f}"  # noqa: E731
    lat = {m: [res.cell(str(m), s).latency_ms for s in seqs] for m in (original_onnx, hybrid_onnx)}
    console.print(results_table(
        f"SmolLM2-135M, BBC News test text ({rows[0]} x {rows[1]} tokens)", "test perplexity",
        [f"prefill T={s} (ms)" for s in seqs], report,
        [("original", "onnxruntime", f"{ppl[original_onnx].value:.3f}",
          [*map(fmt, lat[original_onnx])]),
         ("hybrid", "onnxruntime", f"{ppl[hybrid_onnx].value:.3f}",
          [*map(fmt, lat[hybrid_onnx])])]))
    print_outcome(console, report, "perplexity")
    for s in seqs:
        ratio = res.ratios(s)[str(hybrid_onnx)]["latency"]
        console.print(f"T={s}: hybrid/original prefill latency "
                      + ("n/a" if ratio is None else f"{ratio:.2f}"))
    console.print(bench_table(res, title="onnxruntime prefill latency, batch 1"))
    decode_section(d, console, [int(c) for c in args.context.split(",")], args.prompt,
                   args.new_tokens)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
