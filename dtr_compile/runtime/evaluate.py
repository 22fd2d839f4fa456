"""Running exported ONNX models with onnxruntime: evaluation (``dtr-compile run``) and what the
benchmarks (:mod:`dtr_compile.runtime.bench`) build on.

Library entry points (the CLI and ``examples/bbc_news/evaluate.py`` call these):

* :func:`evaluate_onnx` — a metric of an ONNX model on a dataset file (``.pt`` dict of input
  tensors [+ labels], as ``--data``), in batches, with an optional progress callback;
* :func:`synthesize_inputs` — token ids / masks / pixel values of a given ``(B, T)`` for a model;
* :func:`position_limit` and :func:`extend_positions` — the longest sequence a model's learned
  position table allows, and a copy of the model whose position table is extended with random
  rows so that longer sequences can be timed (``bench --extend-positions``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dtr_compile.errors import InputError, first_line
from dtr_compile.fileio import read_onnx

#: Metrics that compare with the original model's outputs: ``run`` needs ``--reference`` for them.
REFERENCE_METRICS = frozenset({"agreement", "cosine"})

_NP_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


# --- models ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype, dims (int static, str named dynamic, None unnamed)."""

    name: str
    dtype: Any
    dims: tuple[int | str | None, ...]


class OnnxModel:
    """An ONNX file in a CPU onnxruntime session, with its input signature.

    Raises:
        InputError: the file is missing or onnxruntime cannot load it.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None, *,
                 prepack: bool = True) -> None:
        from dtr_compile.runtime.generate import open_session

        self.path = Path(path)
        self.session = open_session(self.path, threads or None, prepack=prepack)
        self.inputs = [InputSpec(i.name, _NP_DTYPES.get(i.type, np.float32),
                                 tuple(d if isinstance(d, int) else (d or None) for d in i.shape))
                       for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    def run(self, feed: Mapping[str, Any]) -> np.ndarray:
        """Run on inputs by name (numpy or torch, cast to the declared types); first output.

        Raises:
            InputError: a float array with fractional or non-finite values for an integer input
                (a cast would silently change it).
        """
        arrays = {}
        for spec in self.inputs:
            x = feed[spec.name]
            arr = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
            if (np.issubdtype(spec.dtype, np.integer) and np.issubdtype(arr.dtype, np.floating)
                    and not np.array_equal(arr, np.round(arr))):
                raise InputError(f"input {spec.name!r} of {self.path.name} is an integer input "
                                 "but the data holds non-integer values; pass whole numbers "
                                 "(token ids, 0/1 masks) as an integer tensor")
            arrays[spec.name] = arr.astype(spec.dtype, copy=False)
        return self.session.run(self.output_names[:1], arrays)[0]


# --- evaluation -------------------------------------------------------------------------------


@dataclass
class RunResult:
    """A metric of an ONNX model on a dataset."""

    model: str
    data: str
    metric: str
    value: float
    higher_is_better: bool
    rows: int
    batch_size: int
    seconds: float
    reference: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def predict_onnx(
    model: OnnxModel,
    dataset: Any,
    *,
    batch_size: int = 32,
    reduce: Callable[[Any, Mapping[str, Any], Any], Any] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Any:
    """First outputs of ``model`` over ``dataset`` (a :class:`dtr_compile.data.Dataset`), as one
    torch tensor ``[N, ...]``; ``reduce(outputs, inputs, labels)`` is applied per batch.

    Raises:
        InputError: the data does not fit the model.
    """
    import torch

    outs = []
    for start in range(0, len(dataset), batch_size):
        batch = {k: v[start : start + batch_size] for k, v in dataset.inputs.items()}
        labels = None if dataset.labels is None else dataset.labels[start : start + batch_size]
        try:
            out = torch.from_numpy(np.ascontiguousarray(model.run(batch))).float()
        except Exception as exc:  # noqa: BLE001
            shapes = {k: tuple(v.shape) for k, v in batch.items()}
            raise InputError(f"{model.path}: the data does not fit the model (batch shapes "
                             f"{shapes}): {first_line(exc)}") from exc
        outs.append(reduce(out, batch, labels) if reduce is not None else out)
        if on_batch is not None:
            on_batch(len(next(iter(batch.values()))))
    return torch.cat(outs)


def evaluate_onnx(
    path: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    metric: str | None = None,
    reference: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    threads: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> RunResult:
    """Evaluate the ONNX model at ``path`` on the dataset file ``data`` with onnxruntime.

    Args:
        metric: a metric name (see :mod:`dtr_compile.metrics`); default accuracy with labels,
            else agreement (which needs ``reference``).
        reference: an ONNX model whose outputs are the metric's ``reference`` (the original
            model, for ``agreement`` / ``cosine``). Without it, the model's own outputs are.
        on_batch: called with each batch's row count (twice per row with ``reference``).

    Raises:
        InputError: missing files, data that does not fit, or a metric that needs ``reference``
            without one.
    """
    from dtr_compile.data import load_dataset
    from dtr_compile.metrics import get_metric

    model = OnnxModel(path, threads)
    ints = {i.name for i in model.inputs
            if np.issubdtype(i.dtype, np.integer) or i.dtype == np.bool_}
    # whole-number floats for integer inputs are cast exactly; fractions are refused
    dataset = load_dataset(data, model.input_names, integer_inputs=ints)
    _check_ids(model, dataset, str(data))
    chosen = get_metric(metric, dataset.labels is not None)
    if reference is None and chosen.name in REFERENCE_METRICS:
        raise InputError(f"metric {chosen.name!r} compares with the original model's outputs: "
                         "pass --reference ORIGINAL.onnx"
                         + ("" if dataset.labels is None else ", or use --metric accuracy"))
    t0 = time.perf_counter()
    outputs = predict_onnx(model, dataset, batch_size=batch_size, reduce=chosen.reduce,
                           on_batch=on_batch)
    ref = outputs
    if reference is not None:
        ref_model = OnnxModel(reference, threads)
        ref = predict_onnx(ref_model, dataset, batch_size=batch_size, reduce=chosen.reduce,
                           on_batch=on_batch)
    value = chosen(outputs, dataset.labels, ref)
    return RunResult(str(path), str(data), chosen.name, value, chosen.higher_is_better,
                     len(dataset), batch_size, round(time.perf_counter() - t0, 3),
                     None if reference is None else str(reference))


def _check_ids(model: OnnxModel, dataset: Any, source: str) -> None:
    """Token ids within the embedding table they index (:func:`_index_bound`).

    Raises:
        InputError: naming the input, the first bad row, the id and the vocabulary size.
    """
    proto = load_proto(model.path)
    for name, t in dataset.inputs.items():
        vocab = _index_bound(proto, name)
        if vocab is None or t.is_floating_point() or not t.dim():
            continue
        bad = (t < 0) | (t >= vocab)
        if bool(bad.any()):
            row = int(bad.reshape(bad.shape[0], -1).any(1).nonzero()[0])
            value = int(t[row][bad[row]].reshape(-1)[0])
            raise InputError(f"{source}: input {name!r} holds the id {value} at row {row}, "
                             f"outside the model's vocabulary [0, {vocab}) (the rows of its "
                             "embedding table): tokenize with the model's own tokenizer")


# --- synthetic inputs and position tables -----------------------------------------------------


def load_proto(path: str | os.PathLike[str], *, with_data: bool = False) -> Any:
    """The ONNX model at ``path`` (see :func:`dtr_compile.fileio.read_onnx`).

    Raises:
        InputError: the file is missing, empty or not an ONNX model.
    """
    return read_onnx(path, with_data=with_data)


def _index_bound(proto: Any, input_name: str) -> int | None:
    """Rows of the embedding table that ``input_name`` indexes (through at most one Cast)."""
    inits = {i.name: i for i in proto.graph.initializer}
    names = {input_name}
    for n in proto.graph.node:
        if n.op_type == "Cast" and n.input and n.input[0] == input_name:
            names.add(n.output[0])
    for n in proto.graph.node:
        if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] in names and n.input[0] in inits:
            return int(inits[n.input[0]].dims[0])
    return None


def synthesize_inputs(
    model: OnnxModel,
    batch: int,
    seq: int,
    *,
    seed: int = 0,
    proto: Any = None,
) -> dict[str, np.ndarray]:
    """Inputs for ``model`` at ``(batch, seq)``, from its input signature.

    Dims named ``batch`` (or the first dim when unnamed) get ``batch``, other dynamic dims get
    ``seq``, static dims keep their size. Integer inputs: ``*mask*`` all ones, ``*type*`` zeros,
    ``*position*`` ``0..T−1``, others (token ids) uniform in ``[1, V)`` with ``V`` the rows of the
    embedding table they index. Float inputs: ``*mask*`` ones, others (pixel values, embeddings)
    standard normal. Bool inputs: True.
    """
    rng = np.random.default_rng(seed)
    proto = proto if proto is not None else load_proto(model.path)
    feed: dict[str, np.ndarray] = {}
    for spec in model.inputs:
        shape = []
        for i, d in enumerate(spec.dims):
            if isinstance(d, int):
                shape.append(d)
            elif d == "batch" or (d is None and i == 0):
                shape.append(batch)
            else:
                shape.append(seq)
        name = spec.name.lower()
        if spec.dtype == np.bool_:
            arr = np.ones(shape, dtype=np.bool_)
        elif np.issubdtype(spec.dtype, np.integer):
            if "mask" in name:
                arr = np.ones(shape, dtype=spec.dtype)
            elif "type" in name:
                arr = np.zeros(shape, dtype=spec.dtype)
            elif "position" in name:
                arr = np.broadcast_to(np.arange(shape[-1]), shape).astype(spec.dtype)
            else:
                vocab = _index_bound(proto, spec.name) or 2
                arr = rng.integers(1, max(2, vocab), size=shape).astype(spec.dtype)
        elif "mask" in name:
            arr = np.ones(shape, dtype=spec.dtype)
        else:
            arr = rng.standard_normal(shape).astype(spec.dtype)
        feed[spec.name] = arr
    return feed


def _int_values(t: Any, base_dir: str = "") -> np.ndarray | None:
    """An integer initializer's values (read from its external-data file in ``base_dir`` when it
    has one), or None for other types or a file that cannot be read."""
    import onnx
    from onnx import numpy_helper

    if t.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
        return None
    try:
        return numpy_helper.to_array(t, base_dir)
    except Exception:  # noqa: BLE001 - external data missing or unreadable
        return None


def position_limit(proto: Any, base_dir: str | os.PathLike[str] = "") -> int | None:
    """The longest sequence a model's learned positions allow, or None if it has no such limit.

    Found as the length ``P >= 16`` of an integer ``arange(P)`` initializer of shape ``[P]`` or
    ``[1, P]`` (Hugging Face models keep ``position_ids`` so). ``base_dir``: the model's folder,
    where a model loaded without its external data (``NAME.data``) has that table's values.
    """
    best = None
    for t in proto.graph.initializer:
        dims = list(t.dims)
        if not dims or len(dims) > 2 or (len(dims) == 2 and dims[0] != 1) or dims[-1] < 16:
            continue
        vals = _int_values(t, str(base_dir))
        if vals is not None and np.array_equal(vals.reshape(-1), np.arange(dims[-1])):
            best = max(best or 0, dims[-1])
    return best


def extend_positions(proto: Any, length: int, *, seed: int = 0) -> Any:
    """A copy of ``proto`` whose position tables hold ``length`` positions, for timing only.

    With ``P`` = :func:`position_limit`: integer ``[1, P]`` / ``[P]`` initializers that are
    ``arange(P)`` become ``arange(length)``, constant ones (``token_type_ids`` buffers) are
    extended with their value, and float Gather tables of ``P`` rows get ``length − P`` random
    rows drawn from a normal with the table's mean and standard deviation. Everything else,
    including every other weight, is kept.

    Raises:
        InputError: the model has no learned position table to extend.
    """
    import copy

    from onnx import numpy_helper

    limit = position_limit(proto)
    if limit is None:
        raise InputError("the model has no learned position table (arange position_ids buffer) "
                         "to extend")
    if length <= limit:
        return proto
    out = copy.deepcopy(proto)
    gather_tables = {n.input[0] for n in out.graph.node if n.op_type == "Gather" and n.input}
    rng = np.random.default_rng(seed)
    for i, t in enumerate(out.graph.initializer):
        dims = list(t.dims)
        ints = _int_values(t)
        if ints is not None and dims and dims[-1] == limit and (len(dims) == 1 or dims[0] == 1):
            flat = ints.reshape(-1)
            if np.array_equal(flat, np.arange(limit)):
                new = np.arange(length, dtype=ints.dtype)
            elif (flat == flat[0]).all():
                new = np.full(length, flat[0], dtype=ints.dtype)
            else:
                continue
            arr = new.reshape([1, length] if len(dims) == 2 else [length])
        elif t.name in gather_tables and dims and dims[0] == limit and ints is None:
            table = numpy_helper.to_array(t)
            extra = rng.normal(float(table.mean()), float(table.std()),
                               size=(length - limit, *table.shape[1:])).astype(table.dtype)
            arr = np.concatenate([table, extra])
        else:
            continue
        out.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, t.name))
    return out


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` (a result's ``to_dict()``) as JSON, atomically, holding the file's artifact
    lock (a compile writing the same file makes this exit 2 instead of racing it).

    Raises:
        InputError: another run holds the lock.
    """
    from dtr_compile.fileio import OutputLock, artifact_lock_path, json_text, write_text_atomic

    with OutputLock(artifact_lock_path(Path(path))):
        write_text_atomic(path, json_text(obj))
