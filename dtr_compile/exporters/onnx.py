"""Exporter: the hybrid as ONNX (``torch.onnx.export(dynamo=True)``), with named dynamic axes and
a parity check in onnxruntime.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.export import Dim

from dtr_compile.errors import DtrError
from dtr_compile.fileio import atomic_path

DEFAULT_OPSET = 18


@dataclass(frozen=True)
class ParityCase:
    """onnxruntime vs PyTorch at one input shape. ``rel_rms = ‖ort − pt‖₂ / ‖pt‖₂``."""

    shape: dict[str, list[int]]
    max_abs: float
    rel_rms: float
    ok: bool


def _dynamic_shapes(
    input_names: Sequence[str],
    dynamic_dims: Mapping[str, Mapping[int, str]],
    ranges: Mapping[str, tuple[int, int | None]],
) -> tuple[dict[int, Dim], ...]:
    dims: dict[str, Dim] = {}
    for name, (lo, hi) in ranges.items():
        dims[name] = Dim(name, min=lo, max=hi) if hi is not None else Dim(name, min=lo)
    return tuple({i: dims[axis] for i, axis in dynamic_dims.get(n, {}).items()} for n in input_names)


def export_onnx(
    model: torch.nn.Module,
    example: Mapping[str, torch.Tensor],
    input_names: Sequence[str],
    dynamic_dims: Mapping[str, Mapping[int, str]],
    path: str | os.PathLike[str],
    *,
    axis_ranges: Mapping[str, tuple[int, int | None]] | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``model`` (flat positional inputs ``input_names``) to ONNX at ``path``, atomically.

    Dynamic axes carry the names in ``dynamic_dims`` (``batch``, ``sequence``). The file is
    checked with the ONNX checker before it is renamed into place.

    Raises:
        DtrError: torch.onnx failed or the checker rejected the model.
    """
    import onnx

    ranges = dict(axis_ranges or {})
    for dims in dynamic_dims.values():
        for axis in dims.values():
            ranges.setdefault(axis, (2, None))
    args = tuple(example[n] for n in input_names)
    target = Path(path)
    with atomic_path(target) as tmp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prog = torch.onnx.export(
                    model, args, dynamo=True, opset_version=opset, input_names=list(input_names),
                    dynamic_shapes=_dynamic_shapes(input_names, dynamic_dims, ranges),
                    verbose=False,
                )
        except Exception as exc:  # noqa: BLE001
            raise DtrError(f"ONNX export failed: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        assert prog is not None
        prog.save(str(tmp))
        onnx.checker.check_model(str(tmp), full_check=False)
    return target


def ort_session(path: str | os.PathLike[str], threads: int | None = None):  # noqa: ANN201
    """A CPU onnxruntime InferenceSession for ``path``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_run(sess, inputs: Mapping[str, torch.Tensor]) -> np.ndarray:  # noqa: ANN001
    """Run ``sess`` on torch inputs (by name); return its first output."""
    feed = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
    return sess.run(None, feed)[0]


def check_parity(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    cases: Sequence[Mapping[str, torch.Tensor]],
    input_names: Sequence[str],
    *,
    atol: float,
) -> list[ParityCase]:
    """Compare onnxruntime with PyTorch on each input case (first output only)."""
    sess = ort_session(path)
    out: list[ParityCase] = []
    for case in cases:
        with torch.inference_mode():
            ref = model(*(case[n] for n in input_names))
        ref_t = ref[0] if isinstance(ref, (tuple, list)) else ref
        ref_np = ref_t.float().numpy()
        got = ort_run(sess, case).astype(np.float32)
        if got.shape != ref_np.shape:
            out.append(ParityCase({k: list(v.shape) for k, v in case.items()}, math.inf, math.inf, False))
            continue
        diff = got - ref_np
        max_abs = float(np.abs(diff).max()) if diff.size else 0.0
        rel = float(np.linalg.norm(diff) / max(np.linalg.norm(ref_np), 1e-30))
        ok = bool(np.isfinite(got).all()) and max_abs <= atol
        out.append(ParityCase({k: list(v.shape) for k, v in case.items()}, max_abs, rel, ok))
    return out
