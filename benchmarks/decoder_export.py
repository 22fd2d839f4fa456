"""Benchmark: one stateful decoder export of SmolLM2 (issue 24): wall and CPU seconds, the nodes
a decode step runs (``If`` then-branches included), ``If`` count, and (``--parity``) the greedy
parity check of the compile (64 tokens, two left-padded rows).

The hybrid has ``--linear N`` sites (evenly spaced) as untrained hedgehog students with a
64-token window, as ``make demo-llm`` delivers 11; ``--original``: the KV-cached original. Prints
one JSON line and writes OUTDIR/result.json (no docs table yet). Compare two trees by running
it with each on ``PYTHONPATH`` (an older tree without ``on_phase`` is timed as one block)::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/decoder_export.py /tmp/dec --linear 11 --parity \
        [--assets build/smollm2]
"""
import inspect
import json
import sys
import time
from pathlib import Path

import onnx
import torch

from dtr_compile.capture import capture
from dtr_compile.exporters import stateful as S
from dtr_compile.linear import make_student
from dtr_compile.load import load_model
from dtr_compile.passes.find_attention import find_attention
from dtr_compile.passes.linearize import linearize
from dtr_compile.passes.stateful import StatefulGraph, make_stateful

A = Path(sys.argv[sys.argv.index("--assets") + 1] if "--assets" in sys.argv else "build/smollm2")
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
n_linear = int(sys.argv[sys.argv.index("--linear") + 1]) if "--linear" in sys.argv else 11
original = "--original" in sys.argv
torch.manual_seed(0)
t0 = time.perf_counter()
loaded = load_model(A / "model.pt", trust_pickle=True)
val = torch.load(A / "val.pt")
ex = {k: v[:2] for k, v in val.items() if k in ("input_ids", "attention_mask")}
cap = capture(loaded, ex if loaded.program is None else None)
gm = cap.gm
scan = find_attention(gm)
sites = [s for s in scan.sites]
print(f"capture {time.perf_counter() - t0:.1f}s, {len(sites)} sites", flush=True)
picked = [] if original else [sites[i] for i in range(0, len(sites), max(1, len(sites) // n_linear))][:n_linear]
students = {}
for s in picked:
    torch.manual_seed(10)
    students[s.id] = make_student("hedgehog", num_heads=s.num_heads, num_kv_heads=s.num_kv_heads,
                                  head_dim=s.head_dim, head_dim_v=s.head_dim_v,
                                  mask_kind=s.mask_kind, causal=True, scale=s.scale,
                                  window=64).eval()
sg = make_stateful(gm, scan.sites, students, rejected=scan.rejected)
assert isinstance(sg, StatefulGraph), sg
kw = {}
if "on_phase" in inspect.signature(S.export_stateful_onnx).parameters:
    t_last = [time.perf_counter()]

    def phase(what):
        now = time.perf_counter()
        print(f"  [{now - t_last[0]:6.1f}s] -> {what}", flush=True)
        t_last[0] = now
    kw["on_phase"] = phase
path = out / "decoder.onnx"
t0, c0 = time.perf_counter(), time.process_time()
S.export_stateful_onnx(sg, path, **kw)
export_s, export_cpu = time.perf_counter() - t0, time.process_time() - c0
print(f"export {export_s:.1f}s wall, {export_cpu:.1f}s cpu", flush=True)

m = onnx.load(str(path), load_external_data=False)


def sub(g):
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from sub(a.g)


def decode_path(g):
    """Nodes run at t = 1: every node, and of each If its then_branch (torch.cond's true: t == 1)."""
    c = 0
    for n in g.node:
        c += 1
        if n.op_type == "If":
            br = {a.name: a.g for a in n.attribute}
            c += decode_path(br["then_branch"])
    return c


total = sum(len(g.node) for g in sub(m.graph))
ifs = sum(n.op_type == "If" for g in sub(m.graph) for n in g.node)
ifs_dec = 0


def count_ifs(g):
    k = 0
    for n in g.node:
        if n.op_type == "If":
            k += 1 + count_ifs({a.name: a.g for a in n.attribute}["then_branch"])
    return k


ops = {}
for g in sub(m.graph):
    for n in g.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
size = sum(p.stat().st_size for p in out.iterdir())
res = {"linear": len(picked), "export_s": round(export_s, 1), "export_cpu_s": round(export_cpu, 1), "nodes_total": total, "if_total": ifs,
       "decode_path_nodes": decode_path(m.graph), "decode_path_ifs": count_ifs(m.graph),
       "bytes_on_disk": size,
       "kv": {p.key: p.value for p in m.metadata_props}.get("dtr_compile.kv_cache", "concat"),
       "ops_top": {k: v for k, v in sorted(ops.items(), key=lambda x: -x[1])[:12]}}
print(json.dumps(res), flush=True)
if "--parity" in sys.argv:
    prefill = linearize(gm, scan.sites, students) if students else gm
    prompts = S.parity_prompts(val)
    t0 = time.perf_counter()
    par = S.check_decoder(path, sg, prefill, prompts, 64, has_mask="attention_mask" in cap.input_names)
    res["parity_s"] = round(time.perf_counter() - t0, 1)
    res["parity"] = {"tokens_equal": par.tokens_equal, "worst_max_abs": par.worst_max_abs}
    print(json.dumps(res), flush=True)
(out / "result.json").write_text(json.dumps(res, indent=1))
