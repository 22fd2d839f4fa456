"""How sure the budget is: a one-sided upper confidence bound of a candidate's degradation.

A candidate's *degradation* is how much worse its metric is than the original's on the same
rows, ``D = sign · (metric(original) − metric(candidate))`` (``sign = +1`` when higher is better,
``−1`` otherwise), in metric units. The validation rows are a sample, so ``D`` is an estimate;
:func:`degradation_bound` gives ``U`` such that the true degradation is at most ``U`` with
confidence ``P`` (one-sided), *paired* over rows: both models are scored on the same rows, which
removes the rows' difficulty from the comparison.

Methods, exact where one exists:

* **binary metrics** (accuracy, agreement: each row right or wrong). Let ``b`` be the rows the
  original gets right and the candidate wrong, ``c`` the reverse, ``n = b + c`` (discordant
  pairs) of ``N`` rows. Then ``D = (b − c) / N``.

  - When the original is right on every row (always for ``agreement``, which scores the
    original against itself), ``c = 0`` and ``b ~ Binomial(N, D)``: ``U`` is the exact
    one-sided Clopper-Pearson upper limit for ``b`` of ``N`` (Clopper & Pearson, Biometrika
    1934).
  - Otherwise, unconditionally over the ``N`` rows: ``D = p₁₀ − p₀₁ <= π₁₀ − λ₀₁`` whenever
    ``p₁₀ <= π₁₀`` and ``p₀₁ >= λ₀₁``, with ``π₁₀`` the exact Clopper-Pearson upper limit for
    ``b`` of ``N`` and ``λ₀₁`` the exact lower limit for ``c`` of ``N``, each at confidence
    ``1 − α/2`` (``α = 1 − P``). By Bonferroni's inequality both hold with probability at
    least ``P``, so ``U = π₁₀ − λ₀₁``. ``U`` grows with every row that flips against the
    candidate, and with no flip at all it is ``1 − (α/2)^(1/N) > 0``: thin evidence gives a
    cautious bound. (McNemar's exact test conditions on the discordant count ``n = b + c``
    and so says nothing when ``n`` is small: it gave ``U = 0`` for ``n = 0``.)

* **every other metric** (macro-F1, perplexity, cosine, mse, user metrics): the seeded paired
  percentile bootstrap (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13):
  ``R`` resamples of the ``N`` row indices with replacement, the same indices for both models;
  ``U`` is the ``P``-quantile of the resampled degradations (the higher order statistic).
  A metric with row statistics (:attr:`Metric.stats`) is recomputed from weighted column sums:
  perplexity resamples rows (sequences) with their NLL sums and token counts, macro-F1 rows with
  their per-class TP/FP/FN; a user metric without them is called on each resample.

A budget test at confidence ``P`` accepts a candidate when ``U <= allowed drop`` (and its point
metric is within the threshold). The allowed drop is fixed by the original's point metric, as the
threshold is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dtr_compile.metrics import Metric

DEFAULT_CONFIDENCE = 0.9
DEFAULT_RESAMPLES = 2000


@dataclass(frozen=True)
class Bound:
    """A one-sided upper confidence bound of a degradation (metric units; > 0 is worse).

    Attributes:
        confidence: ``P``, the one-sided confidence level.
        degradation: the point estimate ``D`` on these rows.
        upper: ``U``: the true degradation is at most this with confidence ``P``.
        method: ``"clopper-pearson"``, ``"paired-clopper-pearson"`` or ``"paired-bootstrap"``.
        rows: ``N``, the paired rows.
        detail: method specifics (``b``, ``c`` discordant counts; ``resamples``, ``seed``).
    """

    confidence: float
    degradation: float
    upper: float
    method: str
    rows: int
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- exact binomial bounds --------------------------------------------------------------------


def binom_cdf(k: int, n: int, p: float) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, p)``, summed exactly term by term in log space."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp
            + (n - i) * lq for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def clopper_pearson_upper(x: int, n: int, confidence: float) -> float:
    """Exact one-sided upper limit of a binomial proportion: the ``π`` with
    ``P(X <= x | n, π) = 1 − confidence`` (Clopper & Pearson 1934); 1 when ``x == n``, and 1 for
    ``n == 0`` (no information).

    Raises:
        ValueError: ``x`` outside ``[0, n]`` or ``confidence`` outside (0, 1).
    """
    if not 0 <= x <= n:
        raise ValueError(f"x = {x} outside [0, n = {n}]")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence {confidence} outside (0, 1)")
    if x == n:
        return 1.0
    alpha = 1.0 - confidence
    lo, hi = x / n, 1.0  # binom_cdf(x, n, ·) falls from >= 1 - ... to 0 on this interval
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if binom_cdf(x, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return hi


def clopper_pearson_lower(x: int, n: int, confidence: float) -> float:
    """Exact one-sided lower limit of a binomial proportion: the ``π`` with
    ``P(X >= x | n, π) = 1 − confidence`` (Clopper & Pearson 1934), i.e. one minus the upper limit
    for the ``n − x`` failures; 0 when ``x == 0``.

    Raises:
        ValueError: as :func:`clopper_pearson_upper`.
    """
    return 1.0 - clopper_pearson_upper(n - x, n, confidence)


def paired_binary_bound(original: torch.Tensor, candidate: torch.Tensor,
                        confidence: float) -> Bound:
    """Bound of ``mean(original) − mean(candidate)`` for 0/1 outcomes ``[N]`` on the same rows
    (see the module docstring: Clopper-Pearson of ``b`` over ``N`` when the original is always
    right, else the Bonferroni pair of Clopper-Pearson limits of ``b`` and ``c`` over ``N``).
    """
    o, c = original.to(torch.bool), candidate.to(torch.bool)
    n_rows = int(o.numel())
    b = int((o & ~c).sum())
    cc = int((~o & c).sum())
    point = (b - cc) / n_rows
    if bool(o.all()):
        upper = clopper_pearson_upper(b, n_rows, confidence)
        return Bound(confidence, point, upper, "clopper-pearson", n_rows, {"b": b, "c": cc})
    half = 1.0 - (1.0 - confidence) / 2.0
    upper = clopper_pearson_upper(b, n_rows, half) - clopper_pearson_lower(cc, n_rows, half)
    return Bound(confidence, point, upper, "paired-clopper-pearson", n_rows, {"b": b, "c": cc})


def bound_without_change(rows: int, confidence: float, *, original_always_right: bool) -> float:
    """The bound :func:`paired_binary_bound` gives a candidate that changes no row of ``rows``:
    ``1 − α^(1/N)`` when the original is right on every row (Clopper-Pearson of 0 of ``N``),
    else ``1 − (α/2)^(1/N)`` (``α = 1 − P``). No budget finer than this can be met at ``P``."""
    alpha = (1.0 - confidence) / (1.0 if original_always_right else 2.0)
    return 1.0 - alpha ** (1.0 / rows)


def rows_for_bound(allowed_drop: float, confidence: float, *,
                   original_always_right: bool) -> int:
    """The fewest rows for which :func:`bound_without_change` is within ``allowed_drop`` (> 0)."""
    alpha = (1.0 - confidence) / (1.0 if original_always_right else 2.0)
    return math.ceil(math.log(alpha) / math.log1p(-allowed_drop))


# --- bootstrap --------------------------------------------------------------------------------


def resample_indices(n: int, resamples: int, seed: int) -> torch.Tensor:
    """``[R, N]`` row indices: ``R`` resamples of ``N`` rows with replacement, seeded (the same
    on every machine)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(n, (resamples, n), generator=gen)


def resample_counts(n: int, resamples: int, seed: int) -> torch.Tensor:
    """``[R, N]`` how often each row is drawn in each resample of :func:`resample_indices`
    (each row of the result sums to ``N``)."""
    idx = resample_indices(n, resamples, seed)
    offsets = (torch.arange(resamples) * n).unsqueeze(1)
    return torch.bincount((idx + offsets).reshape(-1), minlength=resamples * n) \
        .reshape(resamples, n).to(torch.float64)


def _quantile_high(x: torch.Tensor, q: float) -> float:
    """The ``q``-quantile of ``x`` as the higher order statistic (conservative for a bound)."""
    x = x[~torch.isnan(x)]
    if x.numel() == 0:
        return math.nan
    return float(torch.quantile(x, q, interpolation="higher"))


def bootstrap_bound(metric: Metric, outputs: torch.Tensor, labels: torch.Tensor | None,
                    reference: torch.Tensor, confidence: float, *, seed: int = 0,
                    resamples: int = DEFAULT_RESAMPLES) -> Bound:
    """Paired percentile bootstrap of the degradation (see the module docstring).

    Args:
        outputs: the candidate's (metric-reduced) outputs ``[N, ...]``.
        labels: the data's labels ``[N, ...]`` or None.
        reference: the original's outputs ``[N, ...]``, paired row by row with ``outputs``.
    """
    sign = 1.0 if metric.higher_is_better else -1.0
    n = int(outputs.shape[0])
    point = sign * (metric(reference, labels, reference) - metric(outputs, labels, reference))
    so = metric.row_stats(reference, labels, reference)
    sc = metric.row_stats(outputs, labels, reference)
    if so is not None and sc is not None and metric.combine is not None:
        w = resample_counts(n, resamples, seed)  # [R, N]
        deg = sign * (metric.combine(w @ so) - metric.combine(w @ sc))  # [R]
    else:
        vals = []
        for i in resample_indices(n, resamples, seed):
            lab = None if labels is None else labels[i]
            vals.append(sign * (metric(reference[i], lab, reference[i])
                                - metric(outputs[i], lab, reference[i])))
        deg = torch.tensor(vals, dtype=torch.float64)
    upper = _quantile_high(deg, confidence)
    return Bound(confidence, point, upper, "paired-bootstrap", n,
                 {"resamples": resamples, "seed": seed})


def degradation_bound(metric: Metric, outputs: torch.Tensor, labels: torch.Tensor | None,
                      reference: torch.Tensor, confidence: float = DEFAULT_CONFIDENCE, *,
                      seed: int = 0, resamples: int = DEFAULT_RESAMPLES) -> Bound:
    """The one-sided ``confidence`` upper bound of the candidate's degradation vs the original.

    Exact for binary metrics (:attr:`Metric.binary`), the paired bootstrap otherwise.

    Args:
        outputs: the candidate's (metric-reduced) outputs ``[N, ...]``.
        labels: the data's labels ``[N, ...]`` or None.
        reference: the original's outputs on the same rows ``[N, ...]``.
    """
    if metric.binary and metric.stats is not None:
        so = metric.stats(reference, labels, reference)[:, 0]
        sc = metric.stats(outputs, labels, reference)[:, 0]
        if bool(((so == 0) | (so == 1)).all()) and bool(((sc == 0) | (sc == 1)).all()):
            sign = 1.0 if metric.higher_is_better else -1.0
            if sign > 0:
                return paired_binary_bound(so, sc, confidence)
            return paired_binary_bound(1 - so, 1 - sc, confidence)
    return bootstrap_bound(metric, outputs, labels, reference, confidence, seed=seed,
                           resamples=resamples)


def resolution(metric: Metric, rows: int) -> float | None:
    """The smallest change of a binary metric that ``rows`` rows can show (one row, ``1/N``);
    None for other metrics."""
    return 1.0 / rows if metric.binary and rows > 0 else None
