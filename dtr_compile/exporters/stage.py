"""Stage ``export`` as a compile runs it (:func:`export_stage`): the prefill artifacts of the
delivered hybrid (:mod:`~dtr_compile.exporters.artifacts`), then a causal model's stateful
decoders (:mod:`~dtr_compile.exporters.decoders`), all written through the run's staging folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from dtr_compile.config import CompileConfig
from dtr_compile.distill.stage import Distilled
from dtr_compile.exporters.artifacts import ExportResult, export_artifacts
from dtr_compile.exporters.decoders import export_decoders
from dtr_compile.exporters.onnx import parity_cases
from dtr_compile.exporters.stateful import copy_model_tokenizer
from dtr_compile.inputs import Inputs, Sites, at_least_two
from dtr_compile.progress import Stages


@dataclass
class Exported:
    """What the export stage wrote.

    Attributes:
        result: the prefill artifacts and their parity checks.
        decoders: the report's ``stateful`` section (:func:`export_decoders`), or None.
        tokenizer: ``{"tokenizer": path}`` when the input model came with a tokenizer (copied
            beside the hybrid for every model, encoders too), else ``{}``.
    """

    result: ExportResult
    decoders: dict[str, Any] | None
    tokenizer: dict[str, str]


def export_stage(config: CompileConfig, inputs: Inputs, found: Sites, distilled: Distilled,
                 delivered: tuple[str, ...], hybrid: torch.nn.Module, out_path: Path,
                 write_to: Callable[[Path], Path], console: Console, stages: Stages) -> Exported:
    """The hybrid ``delivered`` (sites replaced, in commit order) exported to ``out_path`` and
    beside it, each file written at ``write_to(path)``; checked against PyTorch (a parity miss
    is recorded in ``result``, not raised)."""
    gm, val, names, captured = inputs.gm, inputs.val, inputs.names, inputs.captured
    sites = found.sites
    with stages("export", console):
        example = at_least_two(val.inputs)
        exported: ExportResult = export_artifacts(
            hybrid, gm, example, parity_cases(val.inputs, captured.dynamic_dims), names,
            captured.dynamic_dims, captured.axis_ranges, output=out_path, atol=config.atol,
            target=config.target, opset=config.opset, fp16=config.fp16,
            export_original=config.export_original, engine=config.engine, console=console,
            write_to=write_to,
            output_names=captured.output_names, sites=[(s.id, s.module_path) for s in sites],
            linear=list(delivered), linear_attention=config.linear_attention,
            external_data=config.external_data)
        stateful = export_decoders(config, gm, found.scan,
                                   {sid: distilled.students[sid] for sid in delivered},
                                   distilled.plan.blocks, hybrid, val, names, out_path,
                                   exported.opset, console, write_to=write_to,
                                   fused=exported.fused)
        tokenizer = copy_model_tokenizer(config.model, out_path, console.log, write_to=write_to)
    return Exported(exported, stateful, tokenizer)
