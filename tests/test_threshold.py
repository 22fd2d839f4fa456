"""A metric exactly at the budget threshold is within budget (issue 12 item 13 / issue 16).

Before: accuracy was a float32 mean (190/200 → 0.949999988) compared with a float64 threshold
(0.95), and the candidate was rejected.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from dtr_compile.config import Budget
from dtr_compile.metrics import METRICS
from dtr_compile.search.schedule import meets, schedule


def _logits_with(correct: int, n: int, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(n) % classes
    pred = labels.clone()
    pred[correct:] = (labels[correct:] + 1) % classes
    return torch.nn.functional.one_hot(pred, classes).float(), labels


def test_accuracy_190_of_200_is_exactly_0_95_and_within_a_5pt_budget():
    logits, labels = _logits_with(190, 200)
    acc = METRICS["accuracy"](logits, labels, logits)
    assert acc == 190 / 200 == 0.95
    threshold = Budget.parse("5pt").threshold(1.0, True)
    assert meets(acc, threshold, True)
    res = schedule(["s0"], lambda linear: acc, baseline=1.0, threshold=threshold)
    assert res.committed == ["s0"] and res.fits
    below, _ = _logits_with(189, 200)
    assert not meets(METRICS["accuracy"](below, labels, below), threshold, True)


@pytest.mark.parametrize("n", [7, 200, 445, 1000])
def test_every_exactly_at_threshold_share_is_within_and_one_row_less_is_not(n: int):
    """Brute force over baselines k/n and budgets 1..39pt / 1..39%: whenever the threshold is
    exactly a share j/n in real numbers, j/n meets it and (j−1)/n does not."""
    checked = 0
    for k in range(n // 2, n + 1):
        base = k / n
        for b in range(1, 40):
            for text, exact in ((f"{b}pt", Fraction(k, n) - Fraction(b, 100)),
                                (f"{b}%", Fraction(k, n) * (1 - Fraction(b, 100)))):
                j = exact * n
                if j.denominator != 1 or j < 1:
                    continue
                t = Budget.parse(text).threshold(base, True)
                assert meets(int(j) / n, t, True), (k, n, text)
                assert not meets((int(j) - 1) / n, t, True), (k, n, text)
                checked += 1
    assert checked > 0


def test_lower_is_better_at_threshold_and_nan():
    t = Budget.parse("10%").threshold(10.5, False)  # 11.55, not exact in binary
    assert meets(11.55, t, False) and not meets(11.56, t, False)
    assert not meets(float("nan"), t, False)


def test_m_best_is_the_best_within_budget_set_with_at_least_one_site():
    values = {("a",): 0.90, ("b",): 0.95, ("c",): 0.80, ("b", "a"): 0.95, ("b", "c"): 0.85,
              ("b", "a", "c"): 0.70}
    res = schedule(["a", "b", "c"], lambda linear: values[linear], baseline=0.96, threshold=0.85)
    assert res.committed == ["b", "a"]  # M_opt: the most linear within budget
    best = res.best()
    # M_best: 0.95 twice; the tie goes to the set with more linear sites
    assert best is not None and best.linear == ("b", "a") and best.metric == 0.95
    values[("b", "a")] = 0.93
    best = schedule(["a", "b", "c"], lambda linear: values[linear], baseline=0.96,
                    threshold=0.85).best()
    assert best is not None and best.linear == ("b",)
    none = schedule(["a"], lambda linear: 0.5, baseline=0.96, threshold=0.85)
    assert none.best() is None and none.committed == []
