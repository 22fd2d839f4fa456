"""Stages 1–3, what is compiled: the model loaded and captured (:func:`load_inputs`), its
validation, calibration and test data checked against it, the metric, and the attention sites
that may be replaced (:func:`find_sites`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console

from dtr_compile.capture import CapturedModel, capture, check_index_ranges, check_inputs
from dtr_compile.config import Budget, CompileConfig
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
from dtr_compile.load import load_model
from dtr_compile.metrics import Metric, get_metric
from dtr_compile.passes.find_attention import AttentionScan, AttentionSite, Rejected, find_attention
from dtr_compile.progress import Stages


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


@dataclass
class Inputs:
    """The captured model and its data, checked against each other.

    Attributes:
        captured: the ``torch.export`` capture (:class:`~dtr_compile.capture.CapturedModel`).
        val: the validation set (``--data``): the search's measure.
        calib: the calibration set (``--calib``, else ``val``), its first
            ``--max-calib-samples`` rows: the students' training data.
        calib_rows: the rows the calibration file holds (before ``--max-calib-samples``).
        metric: the metric, resolved against the validation labels.
        test: the held-out ``--test`` set, or None.
    """

    captured: CapturedModel
    val: Dataset
    calib: Dataset
    calib_rows: int
    metric: Metric
    test: Dataset | None

    @property
    def gm(self) -> torch.fx.GraphModule:
        return self.captured.gm

    @property
    def names(self) -> list[str]:
        return self.captured.input_names


def load_inputs(config: CompileConfig, budget: Budget, console: Console,
                stages: Stages) -> Inputs:
    """Stages ``load`` and ``capture``: the model, captured, and every data file checked against
    it (shapes, integer inputs, index ranges) and the metric against the budget.

    Raises:
        InputError: a data file does not fit the model, or the metric and budget disagree.
    """
    with stages("load", console):
        loaded = load_model(config.model, trust_pickle=config.trust_pickle,
                            ignore_auto_map=config.ignore_auto_map)
    with stages("capture", console):
        captured = capture(loaded, example_inputs(config) if loaded.program is None else None)
    gm, names = captured.gm, captured.input_names
    # inputs the model takes as integers: whole-number float data is cast, fractions refused
    ints = {n.name for n in gm.graph.nodes if n.op == "placeholder"
            and isinstance(n.meta.get("val"), torch.Tensor)
            and not n.meta["val"].is_floating_point()}
    val = load_dataset(config.data, names, ints)  # type: ignore[arg-type]
    check_inputs(captured, val.inputs, str(config.data))
    check_index_ranges(captured, val.inputs, str(config.data))
    calib = load_dataset(config.calib, names, ints) if config.calib else val
    if config.calib:
        check_inputs(captured, calib.inputs, str(config.calib))
        check_index_ranges(captured, calib.inputs, str(config.calib))
    calib_rows = len(calib)
    calib = calib.take(config.max_calib_samples)
    metric = get_metric(config.metric, val.labels is not None)
    budget.check_metric(metric.name, metric.bounds)
    test = load_test(config, captured, names, metric)
    return Inputs(captured, val, calib, calib_rows, metric, test)


@dataclass
class Sites:
    """The attention sites found (:func:`find_sites`).

    Attributes:
        scan: the sites the linear module can take, and the rejected ones with their reasons.
        sites: ``scan.sites``, at least one.
        kept: ids of the sites ``--keep`` holds as softmax attention.
    """

    scan: AttentionScan
    sites: tuple[AttentionSite, ...]
    kept: set[str]


def find_sites(config: CompileConfig, gm: torch.fx.GraphModule, console: Console,
               stages: Stages) -> Sites:
    """Stage ``find_attention``: the attention sites of ``gm``, each logged, and ``--keep``.

    Raises:
        NoAttentionError: no site the linear module can take (each look-alike with its reason).
        InputError: ``--keep`` names an unknown site, or ``--min-linear`` exceeds the sites that
            may be replaced.
    """
    with stages("find_attention", console):
        scan = linearizable(find_attention(gm))
    sites = scan.require_sites()
    by_key = {s.id: s for s in sites} | {s.module_path: s for s in sites}
    unknown = [k for k in config.keep if k not in by_key]
    if unknown:
        raise InputError(f"--keep names unknown sites {unknown}; sites are "
                         f"{[s.id + '=' + s.module_path for s in sites]}")
    kept = {by_key[k].id for k in config.keep}
    if config.min_linear > len(sites) - len(kept):
        raise InputError(f"--min-linear {config.min_linear} exceeds the {len(sites) - len(kept)} "
                         f"sites that may be replaced ({len(sites)} found, {len(kept)} kept)")
    for s in sites:
        console.log(f"found {s.describe()}")
    for r in scan.rejected:
        console.log(f"[yellow]not rewritten[/yellow] {r.node} ({r.module_path}): {r.reason}")
    if config.window and not any(s.causal for s in sites):
        console.log(f"[yellow]--window {config.window} has no effect[/yellow]: it applies to "
                    "causal sites, and every site here is bidirectional")
    return Sites(scan, sites, kept)
