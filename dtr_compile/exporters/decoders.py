"""The stateful decoders of a causal model, exported beside the prefill ONNX: the hybrid's (and,
with ``--export-original``, the KV-cached original's), each checked by a greedy continuation
against full recomputation, and the model's tokenizer copied beside them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

from dtr_compile.config import CompileConfig
from dtr_compile.data import Dataset
from dtr_compile.errors import DtrError
from dtr_compile.exporters.artifacts import external_weights
from dtr_compile.exporters.stateful import (
    check_decoder,
    decoder_metadata,
    decoder_paths,
    export_stateful_onnx,
    parity_prompts,
    split_phases,
)
from dtr_compile.fileio import data_path
from dtr_compile.passes.find_attention import AttentionScan
from dtr_compile.passes.stateful import StatefulGraph, make_stateful
from dtr_compile.progress import progress_bar


def decoder_artifacts(stateful: dict[str, Any] | None) -> dict[str, str]:
    st = stateful or {}
    return ({f"{k}_decoder_onnx": v["path"] for k, v in st.items()
             if isinstance(v, dict) and v.get("path")}
            | {f"{k}_decoder_onnx_data": v["data"] for k, v in st.items()
               if isinstance(v, dict) and v.get("data")})


def export_decoders(config: CompileConfig, gm: torch.fx.GraphModule, scan: AttentionScan,
              students: dict[str, Any], blocks: dict[str, Any], hybrid: torch.nn.Module,
              val: Dataset, names: list[str], out_path: Path, opset: int,
              console: Console, write_to: Callable[[Path], Path] = lambda p: p,
              fused: bool = False) -> dict[str, Any] | None:
    """The stateful decoders of a causal model (:mod:`dtr_compile.passes.stateful`): the hybrid
    (and the KV-cached original with ``--export-original``) written beside the prefill ONNX and
    checked by a greedy continuation against full recomputation. None for a model with no causal
    site (encoders: nothing written, no report section); a ``not_stateful`` record with the
    reasons when the pass cannot make the graph stateful (the prefill artifacts stand)."""
    if not config.decoder or not any(s.causal for s in scan.sites):
        return None
    block_sites = sorted(sid for sid in students if sid in blocks)
    if block_sites:
        return {"status": "not_stateful",
                "reasons": [f"{sid}: a whole-block student (--distill-target block) has no "
                            "stateful form yet" for sid in block_sites]}
    out: dict[str, Any] = {"status": "written"}
    paths = decoder_paths(out_path)
    todo = [("hybrid", students, hybrid)]
    if config.export_original:
        todo.append(("original", {}, gm))
    prompts = parity_prompts(val.inputs)
    # TensorRT imports no com.microsoft op: its decoders keep the KV cache in standard ops
    kv_cache = "concat" if config.target == "tensorrt" else "shared"
    for key, studs, prefill in todo:
        sg = make_stateful(gm, scan.sites, studs, rejected=scan.rejected)
        if not isinstance(sg, StatefulGraph):
            console.log(f"[yellow]no stateful decoder[/yellow]: {sg.describe()}")
            return {"status": "not_stateful", "reasons": list(sg.reasons)}
        t0 = time.perf_counter()
        phases = 8 if split_phases(sg, fused) else 6  # traces, conversions, optimizations, save, check, parity
        with progress_bar(console, config.progress) as prog:
            task = prog.add_task(f"{key} decoder", total=phases, info="")

            def phase(what: str, task: Any = task, prog: Progress = prog) -> None:
                done = prog.tasks[task].fields.get("info") != ""
                prog.update(task, advance=1 if done else 0, info=what)

            try:
                path = export_stateful_onnx(sg, write_to(paths[key]), opset=opset, fused=fused,
                                            external_data=external_weights(config.external_data),
                                            metadata=decoder_metadata(sg, scan.sites, list(studs),
                                                                      config.model),
                                            kv_cache=kv_cache, on_phase=phase)
            except DtrError as exc:  # the prefill artifacts stand; the report says why
                console.log(f"[yellow]no stateful decoder[/yellow] ({key}): {exc}")
                out[key] = {"status": "export_failed", "reason": str(exc)}
                continue
            phase(f"parity: {config.decode_steps} greedy tokens x {len(prompts)} rows")
            parity = check_decoder(path, sg, prefill, prompts, config.decode_steps,
                                   has_mask="attention_mask" in names)
            prog.update(task, completed=phases)
        out[key] = {"path": str(paths[key]), "kv_cache": kv_cache,
                    **({"data": str(data_path(paths[key]))} if data_path(path).exists() else {}),
                    "inputs": sg.input_names, "outputs": sg.output_names,
                    "layers": [{"layer": lay.layer, "site": lay.site, "kind": lay.kind,
                                "state": list(lay.names)} for lay in sg.layers],
                    "parity": parity.to_dict() | {"artifact": str(paths[key])},
                    "seconds": round(time.perf_counter() - t0, 3)}
        if config.target == "tensorrt":  # reported, not blocking: the prefill ONNX is the artifact
            from dtr_compile.exporters.tensorrt import lint_trt

            out[key]["tensorrt_lint"] = [f.to_dict() for f in lint_trt(path)]
        verdict = ("token for token" if parity.tokens_equal
                   else f"[red]differs from step {parity.first_mismatch}[/red]")
        console.log(f"wrote {paths[key].name}: {parity.steps} greedy tokens x {parity.batch} rows {verdict} "
                    f"(logits max-abs {parity.worst_max_abs:.2e}, rel-RMS {parity.worst_rel_rms:.2e})")
    return out
