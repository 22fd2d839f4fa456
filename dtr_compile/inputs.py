"""What is compiled: the model's capture examples read from its data, and its attention sites
that the linear module can take.
"""

from __future__ import annotations

from typing import Any

import torch

from dtr_compile.capture import check_inputs
from dtr_compile.config import CompileConfig
from dtr_compile.data import (
    LABELS,
    Dataset,
    check_finite,
    check_integral,
    integer_like,
    load_dataset,
    read_tensors,
)
from dtr_compile.errors import InputError
from dtr_compile.metrics import Metric
from dtr_compile.passes.find_attention import AttentionScan, Rejected


def at_least_two(example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Capture / export examples with batch and sequence sizes >= 2 (torch.export specialises
    sizes 0 and 1): rows 0 and 1 of each input, repeating a lone row, and an integer input's
    lone position (``T = 1`` token ids, masks) repeated along dim 1. The repeated values are
    real data, so the example stays valid (token ids in the vocabulary, a mask of ones)."""
    out = {}
    for k, v in example.items():
        v = v[:2]
        if v.dim() and v.shape[0] == 1:
            v = torch.cat([v, v])
        if v.dim() >= 2 and not v.is_floating_point() and v.shape[1] == 1:
            v = torch.cat([v, v], dim=1)
        out[k] = v
    return out


def example_inputs(config: CompileConfig) -> dict[str, torch.Tensor] | None:
    """For eager (Hugging Face / pickle) models: two rows of the data, as capture examples.

    Raises:
        InputError: the data file is unreadable, or holds NaN/inf or fractional token ids.
    """
    if not config.data:
        return None
    obj = read_tensors(config.data)
    example = {k: v for k, v in obj.items() if k != LABELS and v.dim()}
    check_finite(example, str(config.data))
    ints = [k for k in example if integer_like(k)]
    check_integral(example, ints, str(config.data))
    example = {k: v.to(torch.long) if k in ints and v.is_floating_point() else v
               for k, v in example.items()}
    return at_least_two(example)


def linearizable(scan: AttentionScan) -> AttentionScan:
    """Move sites the linear module cannot take yet (the ``(BH)TD`` layout of
    ``nn.MultiheadAttention``'s bmm path) to the rejected list, with the reason."""
    ok = tuple(s for s in scan.sites if s.layout == "BHTD")
    moved = tuple(Rejected(s.output, s.module_path,
                           f"layout {s.layout}: the linear-attention module takes [B, H, T, D] "
                           "sites only (not yet supported)")
                  for s in scan.sites if s.layout != "BHTD")
    if not moved:
        return scan
    return AttentionScan(sites=ok, rejected=scan.rejected + moved)


def load_test(config: CompileConfig, captured: Any, names: list[str],
               metric: Metric) -> Dataset | None:
    """The ``--test`` set, checked against the model and the metric (never used by the search).

    Raises:
        InputError: the data does not fit the model, or the metric needs labels it lacks.
    """
    if config.test is None:
        return None
    test = load_dataset(config.test, names)
    check_inputs(captured, test.inputs, str(config.test))
    if metric.needs_labels and test.labels is None:
        raise InputError(f"test data {config.test}: metric {metric.name!r} needs a 'labels' "
                         "tensor, and the file has none")
    return test
