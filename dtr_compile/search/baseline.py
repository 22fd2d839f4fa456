"""Stage ``baseline``: the original model on the validation set, the reference every candidate of
the search is measured against (its outputs, its metric, the budget's threshold).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.console import Console

from dtr_compile.config import Budget, CompileConfig
from dtr_compile.data import Dataset, run_model
from dtr_compile.device import OnDevice, Placement
from dtr_compile.inputs import Inputs
from dtr_compile.parallel import Group, batch_rows, gather_rows
from dtr_compile.progress import Stages, progress_bar


@dataclass
class Baseline:
    """The original on the validation set.

    Attributes:
        run_gm: the original as the run-only stages (distill, search) run it: ``gm`` itself on
            cpu/fp32, else a copy on the placement's device.
        reference: the original's outputs on the validation set, reduced by the metric
            (``metric.reduce``), gathered from every rank.
        metric: the original's validation metric.
        threshold: the worst metric value still within budget.
        allowed_drop: how far the metric may move, in metric units.
    """

    run_gm: torch.fx.GraphModule
    reference: torch.Tensor
    metric: float
    threshold: float
    allowed_drop: float


def measure_baseline(config: CompileConfig, inputs: Inputs, budget: Budget, placement: Placement,
                     group: Group, console: Console, stages: Stages) -> Baseline:
    """The original's reduced outputs and metric on the validation set, each rank running its
    share of whole batches (:func:`dtr_compile.parallel.batch_rows`).

    Raises:
        InputError: a relative budget around an original metric of 0
            (:meth:`~dtr_compile.config.Budget.check_baseline`).
    """
    val, names, metric = inputs.val, inputs.names, inputs.metric
    # the graph the run-only stages use: gm itself on cpu/fp32, else a moved copy
    run_gm = placement.graph(inputs.gm)
    runner = run_gm if placement.is_default else OnDevice(run_gm, placement)
    with progress_bar(console, config.progress) as prog, stages("baseline", console):
        task = prog.add_task("baseline", total=len(val), info="")
        lo, hi = batch_rows(len(val), config.eval_batch, group)
        mine = Dataset({k: v[lo:hi] for k, v in val.inputs.items()},
                       None if val.labels is None else val.labels[lo:hi], val.source)
        reference = gather_rows(
            lambda: run_model(runner, mine, names, config.eval_batch,
                              lambda k: prog.advance(task, k), reduce=metric.reduce)
            if hi > lo else None, group)
    baseline = group.guard(lambda: metric(reference, val.labels, reference))
    budget.check_baseline(metric.name, baseline)
    threshold = budget.threshold(baseline, metric.higher_is_better)
    console.log(f"baseline {metric.name} = {baseline:.6g}; "
                f"{budget.describe(baseline, metric.higher_is_better)}")
    return Baseline(run_gm, reference, baseline, threshold, budget.allowed_drop(baseline))
