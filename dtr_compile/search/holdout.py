"""Stage ``test``, the held-out test set (:func:`holdout_stage`): the ``--test`` set, loaded and
checked with the other inputs (:func:`dtr_compile.inputs.load_test`) and never seen by the search,
on which the original, M_opt, M_best and the delivered hybrid are measured once the search is done
(metric, drop, its one-sided bound, the budget on test).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console

from dtr_compile.config import Budget, CompileConfig
from dtr_compile.data import Dataset, run_model
from dtr_compile.distill.stage import Distilled
from dtr_compile.inputs import Inputs
from dtr_compile.metrics import Metric
from dtr_compile.progress import Stages
from dtr_compile.search.confidence import DEFAULT_CONFIDENCE, degradation_bound
from dtr_compile.search.run import Selection
from dtr_compile.search.schedule import meets


def evaluate_test(
    config: CompileConfig, test: Dataset, gm: torch.fx.GraphModule, names: list[str],
    metric: Metric, budget: Budget, build: Callable[[tuple[str, ...]], torch.nn.Module],
    models: dict[str, tuple[str, ...]], hybrid: torch.nn.Module, console: Console,
) -> dict[str, Any]:
    """The original and each of ``models`` (name → linear sites) on the held-out test set.

    Each model's test metric, its drop against the original on the same rows, the one-sided
    bound of that drop (:func:`degradation_bound`, at ``--confidence`` or 0.9) and whether the
    budget, resolved against the original's test metric, holds on test.
    """
    level = config.confidence or DEFAULT_CONFIDENCE
    reference = run_model(gm, test, names, config.eval_batch, reduce=metric.reduce)
    base = metric(reference, test.labels, reference)
    t_threshold = budget.threshold(base, metric.higher_is_better)
    sign = 1.0 if metric.higher_is_better else -1.0
    done: dict[frozenset[str], dict[str, Any]] = {}
    out: dict[str, Any] = {"rows": len(test), "original": base, "threshold": t_threshold,
                           "confidence": level, "models": {}}
    for name, linear in models.items():
        key = frozenset(linear)
        if key in done:  # the same hybrid under another name (e.g. M_opt = M_best = delivered)
            first = next(n for n, m in out["models"].items() if frozenset(m["linear"]) == key)
            out["models"][first].setdefault("also", []).append(name)
            continue
        if key not in done:
            if not linear:
                res: dict[str, Any] = {"metric": base, "drop": 0.0, "interval": None}
            else:
                model = hybrid if name == "delivered" else build(linear)
                o = run_model(model, test, names, config.eval_batch, reduce=metric.reduce)
                m = metric(o, test.labels, reference)
                b = degradation_bound(metric, o, test.labels, reference, level, seed=config.seed)
                res = {"metric": m, "drop": sign * (base - m), "interval": b.to_dict()}
            res["within_budget"] = meets(res["metric"], t_threshold, metric.higher_is_better)
            done[key] = res
        out["models"][name] = {"linear": list(linear), **done[key]}
        r = done[key]
        console.log(f"test ({len(test)} rows): {name} {metric.name} {r['metric']:.6g} vs original "
                    f"{base:.6g} ({'within' if r['within_budget'] else 'BEYOND'} the budget "
                    "on test)")
    return out


def holdout_stage(config: CompileConfig, inputs: Inputs, budget: Budget, distilled: Distilled,
               chosen: Selection, hybrid: torch.nn.Module, console: Console,
               stages: Stages) -> dict[str, Any] | None:
    """The report's ``test`` section (:func:`evaluate_test` of the delivered hybrid, M_opt and
    M_best), or None without ``--test``."""
    if inputs.test is None:
        return None
    with stages("test", console):
        return evaluate_test(config, inputs.test, inputs.gm, inputs.names, inputs.metric, budget,
                             lambda linear: distilled.hybrid(inputs.gm, linear), chosen.models(),
                             hybrid, console)
