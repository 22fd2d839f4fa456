"""Benchmark: one stateful decoder export of SmolLM2 (issue 24): wall and CPU seconds (the
exporting process and its children), the nodes a decode step runs (``If`` then-branches
included), ``If`` count, and (``--parity``) the greedy parity check of the compile (64 tokens,
two left-padded rows).

The hybrid has ``--linear N`` sites (evenly spaced) as untrained hedgehog students with a
64-token window; ``--original``: the KV-cached original. One export prints one JSON line and
writes OUTDIR/result.json::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/decoder_export.py /tmp/dec --linear 13 --parity \
        [--assets build/smollm2]

``--table``: the driver. Exports the original and the ``--linear N`` hybrid, each alone in a
fresh process, with this tree and (``--compare REV``) with the tree of git revision REV (checked
out in a temporary worktree), prints the table and writes it into ``docs/benchmarks.md``
between the ``decoder-export`` markers::

    .venv/bin/python benchmarks/decoder_export.py /tmp/dec --table --linear 13 --compare 2881107
"""
import inspect
import json
import os
import resource
import subprocess
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


def _table(out: Path) -> None:
    """The driver (module docstring)."""
    import datetime as dt
    import platform
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import cpu_model, loadavg, publish

    root = Path(__file__).resolve().parents[1]
    n = sys.argv[sys.argv.index("--linear") + 1] if "--linear" in sys.argv else "13"
    rev = sys.argv[sys.argv.index("--compare") + 1] if "--compare" in sys.argv else None
    assets = sys.argv[sys.argv.index("--assets") + 1] if "--assets" in sys.argv else "build/smollm2"
    trees = [("this tree", root, subprocess.run(["git", "-C", str(root), "rev-parse", "--short",
                                                 "HEAD"], capture_output=True, text=True).stdout.strip())]
    tmp = None
    if rev:
        tmp = Path(tempfile.mkdtemp(prefix="dec-export-"))
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(tmp / "tree"), rev],
                       check=True, capture_output=True)
        trees.append((f"{rev}", tmp / "tree", rev))
    load0, t_start = loadavg(), time.perf_counter()
    rows = []
    try:
        for label, tree, sha in trees:
            for model, flags in (("original", ["--original"]), (f"hybrid ({n} linear)", ["--linear", n])):
                folder = out / f"{sha}-{model.split()[0]}"
                cmd = [sys.executable, str(root / "benchmarks" / "decoder_export.py"), str(folder),
                       *flags, "--parity", "--assets", str(Path(assets).resolve())]
                env = dict(os.environ, PYTHONPATH=str(tree))
                print(f"{label} {sha}: {model}", flush=True)
                subprocess.run(cmd, cwd=tree, env=env, check=True)
                res = json.loads((folder / "result.json").read_text())
                rows.append((label, sha, model, res))
    finally:
        if tmp is not None:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tmp / "tree")],
                           capture_output=True)
    lines = ["## Decoder export time: SmolLM2-135M (`benchmarks/decoder_export.py --table`, issue 24)", "",
             f"Measured {dt.date.today()} on {platform.machine()}, {cpu_model()}, {os.cpu_count()} cores; "
             f"load average {load0} → {loadavg()}; {time.perf_counter() - t_start:.0f} s. Each export "
             "alone in a fresh process (loading the model not counted); the hybrid's students are "
             "untrained hedgehog + window 64 at evenly spaced sites (the export does not depend on "
             "their weights). CPU s: the exporting process and its children (the one-token graph "
             "is traced in a forked child when a second core is usable).", "",
             "| tree | decoder | export wall s (min) | CPU s | nodes a decode step runs | parity (64 tokens × 2 rows) |",
             "|---|---|---:|---:|---:|---|"]
    for label, sha, model, res in rows:
        par = res.get("parity") or {}
        verdict = ("token for token" if par.get("tokens_equal") else "**differs**") + \
            (f", max-abs {par['worst_max_abs']:.1e}" if par else "")
        lines.append(f"| {label} ({sha}) | {model} | {res['export_s']:.0f} ({res['export_s'] / 60:.1f}) | "
                     f"{res['export_cpu_s']:.0f} | {res['decode_path_nodes']} | {verdict} |")
    publish(lines, None if "--no-doc" in sys.argv else root / "docs" / "benchmarks.md", "decoder-export")


if "--table" in sys.argv:
    _table(Path(sys.argv[1]))
    sys.exit(0)


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
def _cpu():
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


t0, c0 = time.perf_counter(), _cpu()
S.export_stateful_onnx(sg, path, **kw)
export_s, export_cpu = time.perf_counter() - t0, _cpu() - c0
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
