"""Validation metrics on model outputs.

A metric maps the model's first output over the validation set, ``outputs: [N, ...]``, the data's
``labels: [N, ...]`` or None, and the original model's first output ``reference: [N, ...]`` to a
float, and declares its direction (``higher_is_better``). Built in:

============  =====  ======================================================================
name          best   definition (rows are the ``N`` validation sequences)
============  =====  ======================================================================
accuracy      high   share of rows whose argmax over the last dim equals the label
macro_f1      high   unweighted mean over classes of ``2·TP / (2·TP + FP + FN)``
agreement     high   share of rows whose argmax equals the original model's (no labels)
cosine        high   mean cosine similarity of output and original embeddings over the last
                     dim (``[N, C]`` pooled embeddings; any ``[N, ..., C]`` is averaged over
                     every leading position, no labels)
mse           low    mean squared error against float ``labels`` (regression targets of the
                     outputs' shape) when the data has them, else against the original's outputs
perplexity    low    ``exp`` of the mean next-token negative log-likelihood: ``outputs`` are
                     causal-LM logits ``[N, T, V]``; the logits at position ``t`` predict token
                     ``t + 1`` (the Hugging Face shift). Targets are ``labels: [N, T]`` when the
                     data has them (``-100`` ignored), else ``input_ids`` with positions where
                     ``attention_mask == 0`` ignored. Each batch is reduced to a per-row
                     ``(sum of NLL, token count)`` as it is computed, so the ``[N, T, V]``
                     logits are never held for the whole set
============  =====  ======================================================================

Every built-in metric is computed from **row statistics**: ``stats(outputs, labels, reference)``
gives a float64 ``[N, K]`` tensor, one row per validation row, and ``combine`` maps their column
sums ``[..., K]`` to the metric (e.g. accuracy: rows ``(correct, 1)``, metric ``Σcorrect / Σ1``).
The metric of the whole set and of any bootstrap resample (:mod:`dtr_compile.search.confidence`) come
from the same two functions, and in float64: 190 right of 200 is exactly ``0.95`` (the nearest
double), not the float32 ``0.94999999``.

``--metric package.module:function`` imports a user metric, called as
``function(outputs, labels, reference) -> float`` with the whole validation set's tensors as
above. Its direction and needs come from optional attributes of the function:
``higher_is_better`` (default True), ``needs_labels`` (default False) and ``bounds`` (the
metric's ``(low, high)`` range, used to reject budgets wider than it). It may also be a
:class:`Metric` instance.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dtr_compile.errors import DtrError, InputError

MetricFn = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor], float]
#: ``stats(outputs, labels, reference) -> [N, K]`` float64 row statistics.
StatsFn = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]
#: ``combine(totals: [..., K]) -> [...]``: the metric from column sums of row statistics.
CombineFn = Callable[[torch.Tensor], torch.Tensor]
#: ``rows(outputs_batch, inputs_batch, labels_batch) -> [B, ...]``: a per-batch reduction.
RowsFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Metric:
    """A named metric, its direction and range.

    Attributes:
        name: registry name or the import path.
        fn: ``fn(outputs, labels, reference) -> float`` on the whole set (after ``rows``).
        higher_is_better: direction.
        needs_labels: the data must carry ``labels``.
        bounds: ``(low, high)`` range of the metric, or None if unknown or unbounded.
        rows: optional per-batch reduction applied to outputs and reference as they are
            computed (see :data:`RowsFn`); the identity when None.
        identity: what the metric's values depend on (for the search ledger's fingerprint).
        stats: row statistics ``[N, K]`` (float64) of a set, or None (user metrics).
        combine: the metric from the column sums of ``stats`` (``[..., K] -> [...]``).
        binary: ``stats`` rows are ``(outcome in {0, 1}, 1)`` and the metric is their mean (a
            share of rows): exact binomial bounds apply (:mod:`dtr_compile.search.confidence`).
    """

    name: str
    fn: MetricFn
    higher_is_better: bool
    needs_labels: bool
    bounds: tuple[float, float] | None = None
    rows: RowsFn | None = None
    identity: str = ""
    stats: StatsFn | None = None
    combine: CombineFn | None = None
    binary: bool = False

    def __call__(self, outputs: torch.Tensor, labels: torch.Tensor | None,
                 reference: torch.Tensor) -> float:
        """The metric's value, a finite float.

        Raises:
            InputError: the metric raised, returned something that is not a real number, or
                returned NaN / ±inf (``metric X failed: …``).
        """
        value = self.value(outputs, labels, reference)
        if not math.isfinite(value):
            raise InputError(f"metric {self.name!r} returned {value}, not a finite number: "
                             "a budget around it would accept or refuse every model. "
                             "Check the metric and that the model's outputs are finite")
        return value

    def value(self, outputs: torch.Tensor, labels: torch.Tensor | None,
              reference: torch.Tensor) -> float:
        """The metric's value as a float, which may be NaN or ±inf (see :meth:`__call__`);
        from the row statistics when the metric has them.

        Raises:
            InputError: the metric raised or returned something that is not a real number.
        """
        try:
            if self.stats is not None and self.combine is not None:
                result: object = self.combine(self.stats(outputs, labels, reference).sum(dim=0))
            else:
                result = self.fn(outputs, labels, reference)
        except DtrError:
            raise
        except Exception as exc:  # noqa: BLE001 - a user metric's bug is the user's to fix
            text = str(exc).strip()
            raise InputError(f"metric {self.name!r} failed: {type(exc).__name__}: "
                             f"{text.splitlines()[0][:300] if text else ''}") from exc
        return _as_float(result, self.name)

    def row_stats(self, outputs: torch.Tensor, labels: torch.Tensor | None,
                  reference: torch.Tensor) -> torch.Tensor | None:
        """Row statistics ``[N, K]`` (float64), or None for a metric without them."""
        if self.stats is None:
            return None
        return self.stats(outputs, labels, reference).to(torch.float64)

    def reduce(self, outputs: torch.Tensor, inputs: Mapping[str, torch.Tensor],
               labels: torch.Tensor | None) -> torch.Tensor:
        """One batch's outputs as this metric keeps them: ``rows`` of them, else them in fp32."""
        return self.rows(outputs, inputs, labels) if self.rows is not None else outputs.float()

    @property
    def is_share(self) -> bool:
        """A fraction in [0, 1], so that a budget in percentage points makes sense."""
        return self.bounds == (0.0, 1.0)

    def better(self, a: float, b: float) -> bool:
        """``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b


def _predictions(x: torch.Tensor) -> torch.Tensor:
    return x.argmax(dim=-1)


def _need_labels(labels: torch.Tensor | None, name: str) -> torch.Tensor:
    if labels is None:
        raise InputError(f"metric {name!r} needs a 'labels' tensor in the data")
    return labels


def _ratio(totals: torch.Tensor) -> torch.Tensor:
    """``totals[..., 0] / totals[..., 1]``: a mean over rows (or tokens) from column sums."""
    return totals[..., 0] / totals[..., 1]


def _with_count(values: torch.Tensor) -> torch.Tensor:
    """``[N]`` per-row values → ``[N, 2]`` rows ``(value, 1)`` in float64."""
    values = values.to(torch.float64)
    return torch.stack([values, torch.ones_like(values)], dim=1)


def _row_means(x: torch.Tensor) -> torch.Tensor:
    """``[N, ...]`` → ``[N]``: the mean over everything but the row dim (``[N]`` unchanged)."""
    return x.reshape(x.shape[0], -1).mean(dim=1) if x.dim() > 1 else x


def _as_float(result: object, name: str) -> float:
    """``result`` (a Python or numpy real, or a one-element tensor) as a float.

    Raises:
        InputError: anything else (bool, string, None, a tensor of several elements…).
    """
    if isinstance(result, torch.Tensor):
        if result.numel() != 1 or result.is_complex() or result.dtype == torch.bool:
            raise InputError(f"metric {name!r} returned a tensor of shape "
                             f"{list(result.shape)} ({result.dtype}), not one real number")
        return float(result.item())
    if isinstance(result, numbers.Real) and not isinstance(result, bool):
        try:
            return float(result)
        except OverflowError:  # an int or Fraction beyond a float (10**400): infinite
            big: Any = result
            return math.inf if big > 0 else -math.inf
    raise InputError(f"metric {name!r} returned {type(result).__name__} "
                     f"({str(result)[:60]!r}), not a float")


def _class_labels(outputs: torch.Tensor, labels: torch.Tensor | None, name: str) -> torch.Tensor:
    """``labels`` checked against class scores ``outputs: [N, ..., C]``: shaped as the
    predictions ``[N, ...]`` (a trailing size-1 dim is squeezed: ``[N, 1]`` → ``[N]``), whole
    numbers in ``[0, C)``.

    Raises:
        InputError: no labels, a shape that does not match the predictions (it would broadcast),
            fractional values, or a label outside ``[0, C)``, naming the row.
    """
    labels = _need_labels(labels, name)
    want = tuple(outputs.shape[:-1])
    if tuple(labels.shape) != want and tuple(labels.shape) == (*want, 1):
        labels = labels.squeeze(-1)
    if tuple(labels.shape) != want:
        raise InputError(f"metric {name!r}: labels have shape {list(labels.shape)} but the "
                         f"model's predictions have shape {list(want)} (outputs "
                         f"{list(outputs.shape)}); give one class index per row: labels [N]")
    if labels.is_floating_point():
        frac = labels != torch.round(labels)
        if bool(frac.any()):
            row = int(torch.nonzero(frac.reshape(frac.shape[0], -1).any(1))[0])
            raise InputError(f"metric {name!r}: labels must be class indices, but row {row} "
                             f"holds {labels[row].reshape(-1)[0].item()}")
    classes = outputs.shape[-1]
    bad = (labels < 0) | (labels >= classes)
    if bool(bad.any()):
        rows = torch.nonzero(bad.reshape(bad.shape[0], -1).any(1)).reshape(-1).tolist()
        value = labels[rows[0]].reshape(-1)[bad[rows[0]].reshape(-1)][0].item()
        more = f" (and {len(rows) - 1} more rows)" if len(rows) > 1 else ""
        raise InputError(f"metric {name!r}: label {value:g} at row {rows[0]}{more} is "
                         f"outside [0, {classes}): the model "
                         f"has {classes} classes (its outputs' last dim)")
    return labels.to(torch.long)


def accuracy_stats(outputs: torch.Tensor, labels: torch.Tensor | None,
                   reference: torch.Tensor) -> torch.Tensor:
    """Rows ``(1 if argmax == label else 0, 1)``: ``[N, 2]`` (a ``[N, ...]`` prediction is
    averaged over its positions)."""
    pred = _predictions(outputs)
    labels = _class_labels(outputs, labels, "accuracy")
    return _with_count(_row_means((pred == labels).to(torch.float64)))


def agreement_stats(outputs: torch.Tensor, labels: torch.Tensor | None,
                    reference: torch.Tensor) -> torch.Tensor:
    """Rows ``(1 if argmax == the original's argmax else 0, 1)``: ``[N, 2]``."""
    same = _predictions(outputs) == _predictions(reference)
    return _with_count(_row_means(same.to(torch.float64)))


def macro_f1_stats(outputs: torch.Tensor, labels: torch.Tensor | None,
                   reference: torch.Tensor) -> torch.Tensor:
    """Rows ``[N, 3·V]``: per class ``c < V`` (``V`` = the outputs' last dim), the row's
    ``(TP_c, FP_c, FN_c)`` indicators, class-major."""
    pred = _predictions(outputs)
    labels = _class_labels(outputs, labels, "macro_f1")
    classes = max(outputs.shape[-1], int(labels.max().item()) + 1 if labels.numel() else 0)
    p = F.one_hot(pred.reshape(pred.shape[0], -1), classes).to(torch.float64)  # [N, P, V]
    y = F.one_hot(labels.reshape(labels.shape[0], -1), classes).to(torch.float64)
    tp, fp, fn = (p * y).sum(1), (p * (1 - y)).sum(1), ((1 - p) * y).sum(1)  # [N, V] each
    return torch.stack([tp, fp, fn], dim=2).reshape(pred.shape[0], 3 * classes)


def macro_f1_combine(totals: torch.Tensor) -> torch.Tensor:
    """Mean over classes present (``TP + FP + FN > 0``) of ``2·TP / (2·TP + FP + FN)``."""
    t = totals.reshape(*totals.shape[:-1], -1, 3)
    tp, fp, fn = t[..., 0], t[..., 1], t[..., 2]
    denom = 2 * tp + fp + fn
    present = denom > 0
    f1 = torch.where(present, 2 * tp / denom.clamp(min=1e-300), torch.zeros_like(denom))
    return f1.sum(-1) / present.sum(-1).clamp(min=1)


def cosine_stats(outputs: torch.Tensor, labels: torch.Tensor | None,
                 reference: torch.Tensor) -> torch.Tensor:
    """Rows ``(mean cosine over the row's positions, 1)``: ``[N, 2]``."""
    cos = F.cosine_similarity(outputs.double(), reference.double(), dim=-1)
    return _with_count(_row_means(cos))


def mse_stats(outputs: torch.Tensor, labels: torch.Tensor | None,
              reference: torch.Tensor) -> torch.Tensor:
    """Rows ``(sum of squared errors, number of values)``: ``[N, 2]``; the target is float
    ``labels`` if given, else ``reference``."""
    target = labels if labels is not None and labels.is_floating_point() else reference
    if target.shape != outputs.shape and target.numel() == outputs.numel():
        target = target.reshape(outputs.shape)  # e.g. labels [N] for outputs [N, 1]
    if target.shape != outputs.shape:
        raise InputError(f"mse: outputs {tuple(outputs.shape)} and targets "
                         f"{tuple(target.shape)} differ in shape")
    sq = ((outputs.double() - target.double()) ** 2).reshape(outputs.shape[0], -1)
    return torch.stack([sq.sum(1), torch.full_like(sq[:, 0], sq.shape[1])], dim=1)


def _from_stats(stats: StatsFn, combine: CombineFn) -> MetricFn:
    def fn(outputs: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor) -> float:
        return float(combine(stats(outputs, labels, reference).sum(dim=0)))
    return fn


accuracy = _from_stats(accuracy_stats, _ratio)
accuracy.__doc__ = "Share of rows whose argmax equals the label, in [0, 1] (float64)."
agreement = _from_stats(agreement_stats, _ratio)
agreement.__doc__ = "Share of rows whose argmax equals the original model's, in [0, 1]."
macro_f1 = _from_stats(macro_f1_stats, macro_f1_combine)
macro_f1.__doc__ = "Unweighted mean over classes of F1 = 2·TP / (2·TP + FP + FN), in [0, 1]."
cosine = _from_stats(cosine_stats, _ratio)
cosine.__doc__ = "Mean cosine similarity of ``outputs`` and ``reference`` over the last dim."
mse = _from_stats(mse_stats, _ratio)
mse.__doc__ = "Mean squared error against float ``labels`` if given, else against ``reference``."


def perplexity_rows(outputs: torch.Tensor, inputs: Mapping[str, torch.Tensor],
                    labels: torch.Tensor | None) -> torch.Tensor:
    """Per-row ``(sum of next-token NLL, number of predicted tokens)``: ``[B, 2]``.

    Args:
        outputs: causal-LM logits ``[B, T, V]``.
        inputs: the batch's model inputs (``input_ids: [B, T]``, optional ``attention_mask``).
        labels: ``[B, T]`` token targets (``-100`` ignored), or None to use ``input_ids``.

    Raises:
        InputError: outputs are not ``[B, T, V]`` or no token targets are found.
    """
    if outputs.dim() != 3:
        raise InputError(f"perplexity needs causal-LM logits [N, T, V] as the model's first "
                         f"output, got shape {tuple(outputs.shape)}")
    if labels is not None and labels.dim() == 2:
        target = labels.clone()
    elif "input_ids" in inputs:
        target = inputs["input_ids"].clone()
        if "attention_mask" in inputs:
            target[inputs["attention_mask"] == 0] = -100
    else:
        raise InputError("perplexity needs token targets: 'labels' [N, T] in the data or an "
                         "'input_ids' model input")
    logits = outputs[:, :-1].float()  # [B, T-1, V] predicts tokens 1..T-1
    target = target[:, 1:].to(torch.long)  # [B, T-1]
    nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    count = (target != -100).sum(dim=1)
    return torch.stack([nll.double().sum(dim=1), count.double()], dim=1)


def perplexity_stats(outputs: torch.Tensor, labels: torch.Tensor | None,
                     reference: torch.Tensor) -> torch.Tensor:
    """The ``[N, 2]`` rows of :func:`perplexity_rows` ``(sum of NLL, tokens)``, checked."""
    if outputs.dim() != 2 or outputs.shape[1] != 2:
        raise InputError("perplexity expects the [N, 2] rows of perplexity_rows")
    return outputs.to(torch.float64)


def perplexity_combine(totals: torch.Tensor) -> torch.Tensor:
    """``exp(Σ NLL / Σ tokens)``.

    Raises:
        InputError: no target token at all (``Σ tokens == 0``).
    """
    if bool((totals[..., 1] <= 0).any()):
        raise InputError("perplexity: the data has no target token (all ignored or padding)")
    return torch.exp(totals[..., 0] / totals[..., 1])


perplexity = _from_stats(perplexity_stats, perplexity_combine)
perplexity.__doc__ = "``exp(Σ NLL / Σ tokens)`` from :func:`perplexity_rows`' ``[N, 2]`` rows."


def _builtin(name: str, fn: MetricFn, higher: bool, labels: bool,
             bounds: tuple[float, float] | None, stats: StatsFn, combine: CombineFn,
             rows: RowsFn | None = None, binary: bool = False) -> Metric:
    return Metric(name, fn, higher, labels, bounds, rows, identity=f"builtin:{name}",
                  stats=stats, combine=combine, binary=binary)


METRICS: dict[str, Metric] = {
    "accuracy": _builtin("accuracy", accuracy, True, True, (0.0, 1.0), accuracy_stats, _ratio,
                         binary=True),
    "agreement": _builtin("agreement", agreement, True, False, (0.0, 1.0), agreement_stats,
                          _ratio, binary=True),
    "macro_f1": _builtin("macro_f1", macro_f1, True, True, (0.0, 1.0), macro_f1_stats,
                         macro_f1_combine),
    "cosine": _builtin("cosine", cosine, True, False, (-1.0, 1.0), cosine_stats, _ratio),
    "mse": _builtin("mse", mse, False, False, (0.0, math.inf), mse_stats, _ratio),
    "perplexity": _builtin("perplexity", perplexity, False, False, (1.0, math.inf),
                           perplexity_stats, perplexity_combine, perplexity_rows),
}


def _import_metric(spec: str) -> Metric:
    """``package.module:function`` → a :class:`Metric` (see the module docstring)."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise InputError(f"metric {spec!r}: expected 'package.module:function'")
    try:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError:
            if "" in sys.path:
                raise
            sys.path.append("")  # the working directory, as `python -m` would have it
            module = importlib.import_module(mod_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise InputError(f"metric {spec!r}: cannot import {mod_name!r} ({type(exc).__name__}: "
                         f"{exc}); is it installed or in the working directory?") from exc
    obj: object = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise InputError(f"metric {spec!r}: {mod_name!r} has no attribute {attr!r}")
    try:
        src = inspect.getsource(module)
    except (OSError, TypeError):
        src = ""
    identity = f"import:{spec}:{hashlib.sha256(src.encode()).hexdigest()}"
    if isinstance(obj, Metric):
        return Metric(obj.name, obj.fn, obj.higher_is_better, obj.needs_labels, obj.bounds,
                      obj.rows, identity, obj.stats, obj.combine, obj.binary)
    if not callable(obj):
        raise InputError(f"metric {spec!r} is a {type(obj).__name__}, not a function")
    bounds = getattr(obj, "bounds", None)
    return Metric(spec, obj, bool(getattr(obj, "higher_is_better", True)),
                  bool(getattr(obj, "needs_labels", False)),
                  tuple(map(float, bounds)) if bounds is not None else None,  # type: ignore[arg-type]
                  None, identity)


def get_metric(name: str | None, has_labels: bool) -> Metric:
    """The metric ``name``; by default accuracy with labels, agreement without.

    ``name`` is a registry name (``-`` and ``_`` alike) or ``package.module:function``.

    Raises:
        InputError: unknown name, an import path that does not import, or a label metric on
            data without ``labels``.
    """
    if name is None:
        return METRICS["accuracy" if has_labels else "agreement"]
    if ":" in name:
        metric = _import_metric(name)
    else:
        key = name.replace("-", "_").lower()
        if key not in METRICS:
            raise InputError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}, "
                             "or 'package.module:function'")
        metric = METRICS[key]
    if metric.needs_labels and not has_labels:
        raise InputError(f"metric {name!r} needs a 'labels' tensor in the data; "
                         "use --metric agreement to compare with the original model instead")
    return metric
