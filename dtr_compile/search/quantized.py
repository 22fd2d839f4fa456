"""The quantized artifacts (``--quantize``) on the held-out test rows.

Quantizing the weights (:mod:`dtr_compile.exporters.quantize`) changes the outputs by design, so
its cost is measured like the hybrid's: the test metric of each quantized prefill model, run in
onnxruntime over the ``--test`` rows, against the fp32 original's in PyTorch on the same rows
(the test stage's ``original``): its change, the one-sided bound of that change (paired over
rows, as the test stage's) and whether the budget, resolved on the test rows, still holds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from rich.console import Console

from dtr_compile.config import CompileConfig
from dtr_compile.data import Dataset, run_model
from dtr_compile.exporters.artifacts import external_weights
from dtr_compile.exporters.decoders import decoder_artifacts
from dtr_compile.exporters.quantize import quantize_artifacts
from dtr_compile.exporters.stage import Exported
from dtr_compile.fileio import Staging
from dtr_compile.inputs import Inputs
from dtr_compile.metrics import Metric
from dtr_compile.progress import Stages
from dtr_compile.search.confidence import degradation_bound
from dtr_compile.search.schedule import meets

#: the quantized prefill models evaluated, by artifact name, and how the report calls them
PREFILL_MODELS = {"onnx": "hybrid", "original_onnx": "original"}


def evaluate_quantized(
    models: Mapping[str, str], test: Dataset, metric: Metric, reference: torch.Tensor,
    original: float, threshold: float, *, confidence: float, batch_size: int, seed: int = 0,
    locate: Callable[[str], str] = str, log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Each quantized prefill model of ``models`` (``{artifact name: path}``, only
    :data:`PREFILL_MODELS` are run) on the test rows.

    Args:
        reference: the fp32 original's outputs on ``test`` (reduced by ``metric``), ``[N, ...]``.
        original: the fp32 original's test metric; ``threshold``: the budget on the test rows.
        locate: where a model's file is now (a staging folder) given its final path.

    Returns:
        ``{"rows", "original", "threshold", "confidence", "models": {label: {"path", "metric",
        "change", "relative_change", "interval", "within_budget"}}}``; ``change`` is the metric
        minus the original's (signed: for perplexity a positive change is worse).

    Raises:
        InputError: the test rows do not fit a model.
    """
    from dtr_compile.runtime.evaluate import OnnxModel, predict_onnx

    out: dict[str, Any] = {"rows": len(test), "original": original, "threshold": threshold,
                           "confidence": confidence, "models": {}}
    for key, label in PREFILL_MODELS.items():
        if key not in models:
            continue
        model = OnnxModel(locate(models[key]))
        outputs = predict_onnx(model, test, batch_size=batch_size, reduce=metric.reduce)
        value = metric(outputs, test.labels, reference)
        bound = degradation_bound(metric, outputs, test.labels, reference, confidence, seed=seed)
        out["models"][label] = {
            "path": models[key], "metric": value, "change": value - original,
            "relative_change": (value - original) / abs(original) if original else None,
            "interval": bound.to_dict(),
            "within_budget": meets(value, threshold, metric.higher_is_better)}
        if log is not None:
            log(f"test ({len(test)} rows): {label} quantized {metric.name} {value:.6g} vs fp32 "
                f"original {original:.6g} ({value - original:+.4g})")
    return out


def quantize_stage(config: CompileConfig, inputs: Inputs, exported: Exported,
                   test: dict[str, Any] | None, staging: Staging, console: Console,
                   stages: Stages) -> dict[str, Any] | None:
    """Stage ``quantize`` (``--quantize int4|int8``): MatMulNBits copies of every exported ONNX
    model (:func:`dtr_compile.exporters.quantize.quantize_artifacts`, written into ``staging``)
    and, with ``--test``, their test metric (:func:`evaluate_quantized`). The report's
    ``quantized`` section, or None without ``--quantize``."""
    if not config.quantize:
        return None
    with stages("quantize", console):
        quantized = quantize_artifacts(
            exported.result.artifacts | decoder_artifacts(exported.decoders), config.quantize,
            block_size=config.quantize_block_size, write_to=staging.path,
            locate=lambda p: str(staging.staged(p)), log=console.log,
            external=external_weights(config.external_data))
        if test is not None and inputs.test is not None:
            reference = run_model(inputs.gm, inputs.test, inputs.names, config.eval_batch,
                                  reduce=inputs.metric.reduce)
            quantized["test"] = evaluate_quantized(
                {k: v["path"] for k, v in quantized["models"].items() if "error" not in v},
                inputs.test, inputs.metric, reference, test["original"], test["threshold"],
                confidence=test["confidence"], batch_size=config.eval_batch, seed=config.seed,
                locate=lambda p: str(staging.staged(p)), log=console.log)
    return quantized
