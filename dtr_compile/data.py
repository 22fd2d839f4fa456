"""Datasets (validation / calibration) and running a captured graph over them.

A dataset file is a ``torch.save``'d dict of tensors loaded with ``weights_only=True`` (no
arbitrary unpickling): one entry per model input, named as the model's inputs
(``input_ids: [N, T]``, ``attention_mask: [N, T]``…), plus optional ``labels: [N]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.fx import GraphModule, Interpreter, Node

from dtr_compile.errors import InputError

LABELS = "labels"


@dataclass
class Dataset:
    """Model inputs (all ``[N, ...]``) and optional ``labels: [N]``."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None
    source: str = ""

    def __len__(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    def take(self, n: int) -> Dataset:
        """The first ``n`` rows."""
        return Dataset({k: v[:n] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[:n], self.source)

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Consecutive batches of the inputs, in order."""
        for i in range(0, len(self), batch_size):
            # clones, not views: a program exported from a view may guard on its `_base`
            yield {k: v[i : i + batch_size].clone() for k, v in self.inputs.items()}


def load_dataset(path: str | os.PathLike[str], input_names: Sequence[str]) -> Dataset:
    """Load a dataset file and check it against the model's inputs.

    Raises:
        InputError: missing file, not a dict of tensors, names that do not match the model's
            inputs, or row counts that disagree.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data file not found: {p}")
    try:
        obj = torch.load(p, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{p}: not a torch.save'd dict of tensors ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{p}: expected a dict of tensors ({', '.join(input_names)}[, labels])")
    labels = obj.get(LABELS)
    missing = [n for n in input_names if n not in obj]
    extra = [k for k in obj if k not in input_names and k != LABELS]
    if missing:
        raise InputError(f"{p}: the model takes inputs {list(input_names)} but the data lacks "
                         f"{missing} (it has {sorted(obj)}); name the tensors as the model's inputs")
    if extra:
        raise InputError(f"{p}: tensors {extra} are not inputs of the model "
                         f"({list(input_names)}); remove them or rename them")
    inputs = {n: obj[n] for n in input_names}
    rows = {n: t.shape[0] if t.dim() else 0 for n, t in inputs.items()}
    if labels is not None:
        rows[LABELS] = labels.shape[0] if labels.dim() else 0
    if len(set(rows.values())) != 1 or 0 in rows.values():
        raise InputError(f"{p}: every tensor needs the same non-zero row count, got {rows}")
    return Dataset(inputs, labels, str(p))


def _first_tensor(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    raise InputError(f"the model's first output is {type(out).__name__}, not a tensor")


def run_model(
    gm: torch.nn.Module,
    data: Dataset,
    input_names: Sequence[str],
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
    reduce: Callable[[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None], torch.Tensor]
    | None = None,
) -> torch.Tensor:
    """Run ``gm`` over ``data`` in batches; return its first output concatenated, ``[N, ...]``.

    ``reduce(output, batch inputs, batch labels)`` (e.g. :meth:`Metric.reduce`) maps each batch's
    first output to what is kept, so that large outputs (LM logits) are never all held at once.

    Raises:
        InputError: the data's shapes do not fit the model.
    """
    outs = []
    with torch.inference_mode():
        for i, batch in enumerate(data.batches(batch_size)):
            try:
                out = gm(*(batch[n] for n in input_names))
            except (RuntimeError, ValueError, AssertionError) as exc:
                shapes = {k: tuple(v.shape) for k, v in batch.items()}
                raise InputError(f"the data does not fit the model (batch shapes {shapes}): "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
            if reduce is None:
                outs.append(_first_tensor(out).float())
            else:
                labels = None if data.labels is None else \
                    data.labels[i * batch_size:(i + 1) * batch_size]
                outs.append(reduce(_first_tensor(out), batch, labels))
            if on_batch is not None:
                on_batch(next(iter(batch.values())).shape[0])
    return torch.cat(outs)


class _Recorder(Interpreter):
    def __init__(self, gm: GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names = names
        self.record: dict[str, torch.Tensor] = {}

    def run_node(self, n: Node) -> object:
        result = super().run_node(n)
        if n.name in self.names:
            self.record[n.name] = result.detach().clone() if isinstance(result, torch.Tensor) else result
        return result


def record_nodes(
    gm: GraphModule, batch: Sequence[torch.Tensor], names: set[str]
) -> dict[str, torch.Tensor]:
    """Run ``gm`` on one batch of positional inputs and return the values of nodes ``names``."""
    rec = _Recorder(gm, names)
    with torch.no_grad():  # not inference_mode: the records are used as training targets
        rec.run(*batch)
    return rec.record
