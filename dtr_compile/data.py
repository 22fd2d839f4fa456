"""Datasets (validation / calibration) and running a captured graph over them.

A dataset file is a ``torch.save``'d dict of tensors loaded with ``weights_only=True`` (no
arbitrary unpickling): one entry per model input, named as the model's inputs
(``input_ids: [N, T]``, ``attention_mask: [N, T]``…), plus optional ``labels: [N]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterator, Sequence
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


def read_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a data file: a ``torch.save``'d dict of tensors, with ``weights_only=True``.

    Raises:
        InputError: missing, empty or unreadable file, a pickle that needs more than tensors
            (refused, never run), or not a dict of tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data file not found: {p}")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: the data file is empty (0 bytes); write it with "
                         "torch.save({'input_ids': ..., 'attention_mask': ..., 'labels': ...}, path)")
    try:
        obj = torch.load(p, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - EOFError (which click reports as "Aborted!"),
        # UnpicklingError (weights_only refusing a non-tensor object), …: a bad file
        text = str(exc).strip()
        raise InputError(f"{p}: not a torch.save'd dict of tensors readable with "
                         f"weights_only=True ({type(exc).__name__}: "
                         f"{text.splitlines()[0][:200] if text else ''})") from exc
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise InputError(f"{p}: expected a dict of named tensors (input names[, labels]), got "
                         f"{type(obj).__name__}")
    return obj


def integer_like(name: str) -> bool:
    """Inputs that by their name hold integers: token / type / position ids and masks."""
    low = name.lower()
    return low.endswith("_ids") or low == "ids" or "mask" in low


def _rows_where(bad: torch.Tensor) -> list[int]:
    """Row indices (dim 0) of a boolean ``[N, ...]`` tensor that hold any True."""
    return torch.nonzero(bad.reshape(bad.shape[0], -1).any(dim=1)).reshape(-1).tolist()


def _where(rows: list[int]) -> str:
    more = f" (and {len(rows) - 1} more row{'s' if len(rows) > 2 else ''})" if len(rows) > 1 else ""
    return f"row {rows[0]}{more}"


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Every floating-point tensor ``[N, ...]`` holds finite values only.

    Raises:
        InputError: naming the tensor, the first row holding NaN or ±inf, and how many rows do.
    """
    for name, t in tensors.items():
        if not t.is_floating_point() or t.dim() == 0:
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            rows = _rows_where(bad)
            first = t[rows[0]][bad[rows[0]]].reshape(-1)[0].item()
            raise InputError(f"{source}: tensor {name!r} holds {first} at {_where(rows)}; the "
                             "data must be finite (NaN/inf make every distillation and metric "
                             "meaningless): fix or drop those rows")


def check_integral(tensors: dict[str, torch.Tensor], names: Collection[str], source: str) -> None:
    """Inputs ``names`` (token ids, masks) hold integers: a floating-point tensor among them may
    only hold whole numbers, which are then exact after a cast.

    Raises:
        InputError: naming the input, the first row with a fractional value, or one beyond
            int64 (which a cast would wrap to another id), and the value.
    """
    for name in names:
        t = tensors.get(name)
        if t is None or not t.is_floating_point() or t.dim() == 0:
            continue
        bad = t != torch.round(t)
        if bool(bad.any()):
            rows = _rows_where(bad)
            first = t[rows[0]][bad[rows[0]]].reshape(-1)[0].item()
            raise InputError(f"{source}: input {name!r} is an integer input (token ids or a "
                             f"mask) but holds the non-integer value {first} at {_where(rows)}; "
                             f"save it as an integer tensor (torch.long) with whole values")
        # a cast to int64 would wrap these (1e30 becomes a negative id): name them as given
        huge = t.abs() >= 2.0**63
        if bool(huge.any()):
            rows = _rows_where(huge)
            first = t[rows[0]][huge[rows[0]]].reshape(-1)[0].item()
            raise InputError(f"{source}: input {name!r} is an integer input (token ids or a "
                             f"mask) but holds {first:g} at {_where(rows)}, beyond any id "
                             "(int64 cannot hold it); save it as an integer tensor (torch.long)")


def load_dataset(path: str | os.PathLike[str], input_names: Sequence[str],
                 integer_inputs: Collection[str] | None = None) -> Dataset:
    """Load a dataset file and check it against the model's inputs.

    ``integer_inputs`` names the inputs the model takes as integers (default: those whose names
    say so, see :func:`integer_like`): a float tensor given for one must hold whole numbers, and
    is cast to ``torch.long``.

    Raises:
        InputError: missing, empty or unreadable file, not a dict of tensors, names that do not
            match the model's inputs, row counts that disagree, NaN/inf in a float tensor, or
            fractional values for an integer input.
    """
    p = Path(path)
    obj = read_tensors(p)
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
    check_finite(inputs | ({} if labels is None else {LABELS: labels}), str(p))
    ints = [n for n in input_names if integer_like(n)] if integer_inputs is None \
        else [n for n in input_names if n in integer_inputs]
    check_integral(inputs, ints, str(p))
    if integer_inputs is not None:
        inputs = {n: t.to(torch.long) if n in ints and t.is_floating_point() else t
                  for n, t in inputs.items()}
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
            except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
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
