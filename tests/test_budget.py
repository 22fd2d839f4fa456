"""Budget grammar: relative %, absolute, percentage points; rejections; resolved thresholds."""

from __future__ import annotations

import pytest

from dtr_compile.config import Budget
from dtr_compile.errors import InputError
from dtr_compile.metrics import METRICS


@pytest.mark.parametrize(
    "text, kind, value, unit",
    [
        ("0.5%", "relative", 0.005, "%"),
        (" 1 % ", "relative", 0.01, "%"),
        ("0%", "relative", 0.0, "%"),
        ("99.9%", "relative", 0.999, "%"),
        ("0.005", "absolute", 0.005, ""),
        (".01", "absolute", 0.01, ""),
        ("5e-3", "absolute", 0.005, ""),
        ("+0.02", "absolute", 0.02, ""),
        ("0.5pt", "absolute", 0.005, "pt"),
        ("2 pt", "absolute", 0.02, "pt"),
        ("0", "absolute", 0.0, ""),
    ],
)
def test_parse(text: str, kind: str, value: float, unit: str):
    b = Budget.parse(text)
    assert (b.kind, b.unit) == (kind, unit)
    assert b.value == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize(
    "text, message",
    [
        ("abc", "malformed budget 'abc'"),
        ("", "malformed budget ''"),
        ("%", "malformed"),
        ("0.5%%", "malformed"),
        ("1/2", "malformed"),
        ("0.5 percent", "malformed"),
        ("nan", "malformed"),
        ("inf", "malformed"),
        ("1e999", "not a finite number"),
        ("-1%", "is negative"),
        ("-0.01", "is negative"),
        ("150%", "below 100%"),
        ("100%", "below 100%"),
        ("100pt", "below 100pt"),
    ],
)
def test_rejected(text: str, message: str):
    with pytest.raises(InputError, match=message) as info:
        Budget.parse(text)
    assert "\n" not in str(info.value)  # one line on stderr


def test_negative_suggests_positive():
    with pytest.raises(InputError, match="e.g. '1%'"):
        Budget.parse("-1%")


def test_threshold_higher_is_better():
    assert Budget.parse("0.5%").threshold(0.9, True) == pytest.approx(0.8955)
    assert Budget.parse("0.005").threshold(0.9, True) == pytest.approx(0.895)
    assert Budget.parse("0.5pt").threshold(0.9, True) == pytest.approx(0.895)
    assert Budget.parse("0%").threshold(0.9, True) == 0.9


def test_threshold_lower_is_better():
    # perplexity 10 may rise by 0.5% to 10.05; an absolute budget adds
    assert Budget.parse("0.5%").threshold(10.0, False) == pytest.approx(10.05)
    assert Budget.parse("0.25").threshold(10.0, False) == pytest.approx(10.25)


def test_relative_uses_magnitude_of_negative_baseline():
    assert Budget.parse("10%").threshold(-0.5, True) == pytest.approx(-0.55)


def test_describe_and_dict():
    b = Budget.parse("0.5%")
    assert b.describe(0.9, True) == "budget 0.5% of 0.9 → threshold >= 0.8955"
    assert Budget.parse("0.5pt").describe(0.9, True).endswith("(percentage points) → threshold >= 0.895")
    d = b.to_dict(0.9, True)
    assert d["threshold"] == pytest.approx(0.8955) and d["allowed_drop"] == pytest.approx(0.0045)
    assert d["kind"] == "relative" and d["text"] == "0.5%"


def test_points_only_for_shares():
    Budget.parse("0.5pt").check_metric("accuracy", METRICS["accuracy"].bounds)
    with pytest.raises(InputError, match="percentage points, which only applies"):
        Budget.parse("0.5pt").check_metric("perplexity", METRICS["perplexity"].bounds)
    with pytest.raises(InputError, match="percentage points"):
        Budget.parse("1pt").check_metric("my.mod:fn", None)


def test_absolute_budget_wider_than_range():
    with pytest.raises(InputError, match=r"did you mean '1%' or '1pt'"):
        Budget.parse("1").check_metric("accuracy", METRICS["accuracy"].bounds)
    Budget.parse("0.99").check_metric("accuracy", METRICS["accuracy"].bounds)
    Budget.parse("1").check_metric("cosine", METRICS["cosine"].bounds)  # range 2
    Budget.parse("5").check_metric("perplexity", METRICS["perplexity"].bounds)  # unbounded
    Budget.parse("5").check_metric("custom", None)


def test_relative_budget_around_zero_baseline():
    with pytest.raises(InputError, match="use an absolute budget"):
        Budget.parse("1%").check_baseline("mse", 0.0)
    Budget.parse("0%").check_baseline("mse", 0.0)
    Budget.parse("0.01").check_baseline("mse", 0.0)
