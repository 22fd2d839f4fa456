"""Validation metrics on model outputs.

A metric maps ``outputs: [N, C]`` (the model's first output, e.g. logits), ``labels: [N]`` or
None, and ``reference: [N, C]`` (the original model's outputs) to a float. Each declares whether
higher is better.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dtr_compile.errors import InputError


@dataclass(frozen=True)
class Metric:
    """A named metric and its direction."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], float]
    higher_is_better: bool
    needs_labels: bool

    def __call__(self, outputs: torch.Tensor, labels: torch.Tensor | None,
                 reference: torch.Tensor) -> float:
        return float(self.fn(outputs, labels, reference))


def _predictions(x: torch.Tensor) -> torch.Tensor:
    return x.argmax(dim=-1)


def accuracy(outputs: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor) -> float:
    """Share of rows whose argmax equals the label, in [0, 1]."""
    assert labels is not None
    return (_predictions(outputs) == labels).float().mean().item()


def agreement(outputs: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor) -> float:
    """Share of rows whose argmax equals the original model's argmax, in [0, 1]."""
    return (_predictions(outputs) == _predictions(reference)).float().mean().item()


def macro_f1(outputs: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor) -> float:
    """Unweighted mean over classes of F1 = 2·TP / (2·TP + FP + FN), in [0, 1]."""
    assert labels is not None
    pred = _predictions(outputs)
    scores = []
    for c in torch.unique(torch.cat([labels, pred])):
        tp = ((pred == c) & (labels == c)).sum().item()
        fp = ((pred == c) & (labels != c)).sum().item()
        fn = ((pred != c) & (labels == c)).sum().item()
        scores.append(2 * tp / max(2 * tp + fp + fn, 1))
    return sum(scores) / max(len(scores), 1)


METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", accuracy, True, True),
    "agreement": Metric("agreement", agreement, True, False),
    "macro_f1": Metric("macro_f1", macro_f1, True, True),
}


def get_metric(name: str | None, has_labels: bool) -> Metric:
    """The metric ``name``; by default accuracy with labels, agreement without.

    Raises:
        InputError: unknown name, or a label metric on data without ``labels``.
    """
    if name is None:
        return METRICS["accuracy" if has_labels else "agreement"]
    key = name.replace("-", "_")
    if key not in METRICS:
        raise InputError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
    metric = METRICS[key]
    if metric.needs_labels and not has_labels:
        raise InputError(f"metric {name!r} needs a 'labels' tensor in the data; "
                         "use --metric agreement to compare with the original model instead")
    return metric
