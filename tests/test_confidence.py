"""dtr_compile.search.confidence against closed forms, brute force and simulation on small cases."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from dtr_compile.metrics import METRICS, Metric
from dtr_compile.search.confidence import (
    binom_cdf,
    bootstrap_bound,
    clopper_pearson_upper,
    degradation_bound,
    paired_binary_bound,
    resample_counts,
    resample_indices,
)


def _cdf_exact(k: int, n: int, p: Fraction) -> Fraction:
    return sum((Fraction(math.comb(n, i)) * p**i * (1 - p) ** (n - i) for i in range(k + 1)),
               Fraction(0))


@pytest.mark.parametrize("n", [1, 5, 12, 30])
def test_binom_cdf_matches_exact_rational_sum(n: int):
    for k in range(n + 1):
        for p in (Fraction(1, 7), Fraction(1, 2), Fraction(9, 10)):
            assert binom_cdf(k, n, float(p)) == pytest.approx(float(_cdf_exact(k, n, p)),
                                                              rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("n", [1, 10, 200, 445])
@pytest.mark.parametrize("conf", [0.8, 0.9, 0.95])
def test_clopper_pearson_closed_forms(n: int, conf: float):
    # x = 0: (1 - π)^n = 1 - P;  x = n - 1: 1 - π^n = 1 - P
    assert clopper_pearson_upper(0, n, conf) == pytest.approx(1 - (1 - conf) ** (1 / n), rel=1e-9)
    assert clopper_pearson_upper(n - 1, n, conf) == pytest.approx(conf ** (1 / n), rel=1e-9)
    assert clopper_pearson_upper(n, n, conf) == 1.0


def test_clopper_pearson_is_the_smallest_pi_with_tail_below_alpha():
    n, conf = 17, 0.9
    for x in range(n):
        u = clopper_pearson_upper(x, n, conf)
        assert binom_cdf(x, n, u) <= 1 - conf + 1e-9
        assert binom_cdf(x, n, u - 1e-6) > 1 - conf
        assert u >= x / n


def test_paired_binary_counts_and_methods():
    orig = torch.tensor([1, 1, 1, 0, 0, 1, 1, 1, 0, 1], dtype=torch.float64)
    cand = torch.tensor([1, 0, 0, 1, 0, 1, 1, 0, 0, 1], dtype=torch.float64)
    b = paired_binary_bound(orig, cand, 0.9)
    assert b.method == "paired-clopper-pearson" and b.detail == {"b": 3, "c": 1}
    assert b.degradation == pytest.approx(0.2)
    # U = CP upper of p10 (3 of 10) − CP lower of p01 (1 of 10), each at 1 − 0.1/2; the lower
    # limit for 1 of n solves 1 − (1 − π)^n = 0.05
    assert b.upper == pytest.approx(clopper_pearson_upper(3, 10, 0.95) - (1 - 0.95 ** 0.1),
                                    rel=1e-9)
    always = paired_binary_bound(torch.ones(10), cand, 0.9)
    assert always.method == "clopper-pearson" and always.detail["b"] == 5
    assert always.upper == pytest.approx(clopper_pearson_upper(5, 10, 0.9))


@pytest.mark.parametrize("n", [10, 40, 500])
def test_paired_binary_bound_without_flips_is_positive_by_hand(n: int):
    """Issue 25 item 8: no row flips is not proof of no drop. With b = c = 0 the bound is the CP
    upper limit for 0 of N at 1 − α/2: 1 − (α/2)^(1/N); one flip in favour lowers it by the CP
    lower limit for 1 of N, 1 − (1 − α/2)^(1/N)."""
    orig = torch.tensor([1, 0] * (n // 2))
    none = paired_binary_bound(orig, orig, 0.9)
    assert none.degradation == 0.0
    assert none.upper == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-9) and none.upper > 0
    better = orig.clone()
    better[1] = 1  # the candidate gets one row right that the original got wrong
    one_up = paired_binary_bound(orig, better, 0.9)
    assert one_up.upper == pytest.approx(0.95 ** (1 / n) - 0.05 ** (1 / n), rel=1e-9)


def test_paired_binary_bound_grows_with_each_flip_against():
    """The bound never falls as rows flip against the candidate, whatever the flips in favour."""
    n = 60
    orig = torch.tensor([1, 1, 0] * (n // 3))
    right, wrong = (orig == 1).nonzero().flatten(), (orig == 0).nonzero().flatten()
    for favour in (0, 1, 3):
        cand = orig.clone()
        cand[wrong[:favour]] = 1
        uppers = []
        for against in range(12):
            bd = paired_binary_bound(orig, cand, 0.9)
            assert bd.detail == {"b": against, "c": favour}
            uppers.append(bd.upper)
            cand[right[against]] = 0
        assert all(b > a for a, b in zip(uppers, uppers[1:], strict=False)), (favour, uppers)
        assert uppers[0] > 0 or favour > 0


def test_binary_bound_covers_the_true_degradation_at_least_P_of_the_time():
    """Simulation: rows right/wrong with known rates; the 0.9 bound holds in >= ~90 % of draws."""
    rng = random.Random(0)
    p10, p01, n, trials = 0.06, 0.02, 150, 400
    true = p10 - p01
    covered = 0
    for _ in range(trials):
        o, c = [], []
        for _ in range(n):
            u = rng.random()
            a = rng.random() < 0.8
            if u < p10:
                o.append(1), c.append(0)
            elif u < p10 + p01:
                o.append(0), c.append(1)
            else:
                o.append(int(a)), c.append(int(a))
        bd = paired_binary_bound(torch.tensor(o), torch.tensor(c), 0.9)
        covered += bd.upper >= true
    assert covered / trials >= 0.86


def test_accuracy_and_agreement_use_the_exact_bounds():
    labels = torch.arange(40) % 4
    ref = torch.nn.functional.one_hot(labels, 4).float()
    ref[:5] = torch.nn.functional.one_hot((labels[:5] + 1) % 4, 4).float()  # original: 35/40
    out = ref.clone()
    out[5:9] = torch.nn.functional.one_hot((labels[5:9] + 1) % 4, 4).float()  # 4 more wrong
    acc = degradation_bound(METRICS["accuracy"], out, labels, ref, 0.9)
    assert acc.method == "paired-clopper-pearson" and acc.detail == {"b": 4, "c": 0}
    assert acc.degradation == pytest.approx(4 / 40)
    agr = degradation_bound(METRICS["agreement"], out, None, ref, 0.9)
    assert agr.method == "clopper-pearson" and agr.upper == pytest.approx(
        clopper_pearson_upper(4, 40, 0.9))


def test_resample_counts_match_indices():
    idx = resample_indices(7, 5, seed=3)
    w = resample_counts(7, 5, seed=3)
    assert torch.equal(w.sum(1), torch.full((5,), 7.0))
    for r in range(5):
        assert torch.equal(w[r], torch.bincount(idx[r], minlength=7).double())


def _user(metric: Metric) -> Metric:
    """The same metric without row statistics: the bootstrap must call it on each resample."""
    return Metric("user", metric.fn, metric.higher_is_better, metric.needs_labels, metric.bounds,
                  metric.rows)


@pytest.mark.parametrize("name", ["macro_f1", "perplexity", "cosine", "mse"])
def test_bootstrap_from_row_stats_equals_calling_the_metric_on_resampled_rows(name: str):
    g = torch.Generator().manual_seed(1)
    n = 30
    if name == "perplexity":
        ref = torch.stack([torch.rand(n, generator=g) * 20 + 5, torch.randint(5, 9, (n,), generator=g)
                           .double()], 1)
        out = ref.clone()
        out[:, 0] += torch.rand(n, generator=g) * 2
        labels = None
    else:
        ref = torch.randn(n, 5, generator=g)
        out = ref + 0.7 * torch.randn(n, 5, generator=g)
        labels = torch.randint(0, 5, (n,), generator=g) if name == "macro_f1" else None
    metric = METRICS[name]
    fast = bootstrap_bound(metric, out, labels, ref, 0.9, seed=5, resamples=300)
    slow = bootstrap_bound(_user(metric), out, labels, ref, 0.9, seed=5, resamples=300)
    assert fast.upper == pytest.approx(slow.upper, rel=1e-9, abs=1e-12)
    assert fast.degradation == pytest.approx(slow.degradation, rel=1e-12, abs=1e-15)
    assert fast.upper >= fast.degradation - 1e-12 or name == "mse"
    again = bootstrap_bound(metric, out, labels, ref, 0.9, seed=5, resamples=300)
    assert again == fast  # seeded: the same bound every time


def test_bootstrap_of_identical_outputs_is_zero_and_perplexity_sign():
    ref = torch.tensor([[10.0, 4.0], [8.0, 4.0], [12.0, 5.0]], dtype=torch.float64)
    same = degradation_bound(METRICS["perplexity"], ref, None, ref, 0.9, resamples=200)
    assert same.upper == 0.0 and same.method == "paired-bootstrap"
    worse = ref.clone()
    worse[:, 0] += 1.0  # higher NLL: perplexity rises, a positive degradation
    b = degradation_bound(METRICS["perplexity"], worse, None, ref, 0.9, resamples=200)
    assert b.degradation > 0 and b.upper >= b.degradation


def test_floor_warning_counts_the_unconditional_bound_for_accuracy_below_one():
    """An accuracy original below 1 now has a floor too: a candidate that changes no row has the
    bound 1 − (α/2)^(1/N); the compile says so before the search."""
    from dtr_compile.search.confidence import bound_without_change
    from dtr_compile.search.run import resolution_warnings

    assert bound_without_change(40, 0.9, original_always_right=True) == pytest.approx(
        1 - 0.1 ** (1 / 40))
    assert bound_without_change(40, 0.9, original_always_right=False) == pytest.approx(
        1 - 0.05 ** (1 / 40))
    (w,) = resolution_warnings(METRICS["accuracy"], 40, 0.05, "5pt", 0.9, 0.9)
    assert "changes no row has a drop bound of 0.07216" in w and "about 59 rows" in w
    assert resolution_warnings(METRICS["accuracy"], 40, 0.05, "5pt", 0.9, None) == []
