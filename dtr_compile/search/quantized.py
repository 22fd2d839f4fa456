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

from dtr_compile.data import Dataset
from dtr_compile.metrics import Metric
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
