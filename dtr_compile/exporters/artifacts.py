"""The export stage: every artifact of a compile, each written atomically and verified.

For ``-o hybrid.onnx``:

=========================  =====================================================  ============
file                       what                                                   verified by
=========================  =====================================================  ============
``hybrid.onnx``            the hybrid, fp32, named dynamic axes                   parity
``hybrid.pt2``             the hybrid as a ``torch.export`` archive (dynamic)     —
``hybrid.fp16.onnx``       ``--fp16``: the hybrid in fp16 (linear attention       parity (fp16
                           state and normaliser stay fp32)                        tolerance)
``hybrid.original.onnx``   ``--export-original``: the original model              parity
``ENGINE``                 ``--engine ENGINE``: a TensorRT engine of the hybrid   TensorRT
=========================  =====================================================  ============

``--target tensorrt`` exports at :data:`~dtr_compile.exporters.onnx.TENSORRT_OPSET` and lints the
ONNX files with :func:`~dtr_compile.exporters.tensorrt.lint_trt`; a ``reject`` or ``avoid`` finding
fails the run like a parity miss (exit 4, artifacts kept).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from dtr_compile.errors import InputError
from dtr_compile.exporters.fused import (
    LINEAR_ATTENTION_OPSET,
    count_fused,
    fused_domain,
    resolve_fused,
)
from dtr_compile.exporters.onnx import (
    DEFAULT_OPSET,
    FP16_ATOL,
    FP16_RTOL,
    TENSORRT_OPSET,
    ParityCase,
    check_parity,
    export_onnx,
    export_program,
    onnx_interface,
    save_program,
    sites_metadata,
    to_half,
)
from dtr_compile.exporters.tensorrt import (
    Finding,
    blocking,
    build_engine,
    lint_trt,
    require_tensorrt,
)
from dtr_compile.fileio import data_path

TARGETS = ("onnxruntime", "tensorrt")


def export_paths(output: str | Path) -> dict[str, Path]:
    """The artifact paths derived from ``-o``: ``onnx``, ``pt2``, ``onnx_fp16``, ``original_onnx``."""
    out = Path(output)
    return {"onnx": out, "pt2": out.with_suffix(".pt2"),
            "onnx_fp16": out.with_suffix(".fp16.onnx"),
            "original_onnx": out.with_suffix(".original.onnx")}


def _needed(fp16: bool, export_original: bool, engine: str | None) -> set[str]:
    return ({"onnx", "pt2"} | ({"onnx_fp16"} if fp16 else set())
            | ({"original_onnx"} if export_original else set()) | ({"engine"} if engine else set()))


def max_opset() -> int:
    """The highest opset dtr-compile writes: the installed onnx's (torch.onnx writes up to its
    own maximum, 23, and onnx's version converter takes the file the rest of the way), capped at
    :data:`~dtr_compile.exporters.fused.LINEAR_ATTENTION_OPSET` (27), the highest tested."""
    import onnx

    return min(LINEAR_ATTENTION_OPSET, onnx.defs.onnx_opset_version())


def resolve_opset(target: str, opset: int | None) -> int:
    """The opset of a run: ``opset`` if given, else the target's default.

    Raises:
        InputError: unknown target, or an opset below 18 (the exporter's lowest).
    """
    if target not in TARGETS:
        raise InputError(f"unknown --target {target!r}; known: {', '.join(TARGETS)}")
    if opset is not None and opset < 18:
        raise InputError(f"--opset {opset}: torch.onnx.export(dynamo=True) exports opset 18 and up")
    top = max_opset()
    if opset is not None and opset > top:
        raise InputError(f"--opset {opset}: dtr-compile writes opset {top} at most with the "
                         "installed onnx")
    return opset if opset is not None else (TENSORRT_OPSET if target == "tensorrt" else DEFAULT_OPSET)


#: ``--external-data``: auto (weights in ``NAME.data`` only above
#: :data:`~dtr_compile.exporters.onnx.EXTERNAL_DATA_BYTES`), always, never.
EXTERNAL_DATA = ("auto", "always", "never")


def external_weights(mode: str) -> bool | None:
    """``--external-data mode`` as ``export_onnx``'s ``external_data`` (None: by size).

    Raises:
        InputError: an unknown mode.
    """
    if mode not in EXTERNAL_DATA:
        raise InputError(f"--external-data {mode!r}: choose one of {', '.join(EXTERNAL_DATA)}")
    return None if mode == "auto" else mode == "always"


def check_export_options(*, target: str, opset: int | None, engine: str | None,
                         linear_attention: str = "auto", external_data: str = "auto") -> None:
    """Checks that need no model, done before a compile starts.

    Raises:
        InputError: bad target, opset, external-data mode or linear-attention form (the fused
            one for TensorRT), or an engine path that is the ONNX output.
        DependencyError: ``engine`` without TensorRT or without a CUDA GPU.
    """
    external_weights(external_data)
    resolve_fused(linear_attention, resolve_opset(target, opset), target)
    if engine is not None:
        if Path(engine).suffix == ".onnx":
            raise InputError(f"--engine {engine!r}: the engine path must not end in .onnx")
        require_tensorrt()


@dataclass
class ExportResult:
    """What the export stage wrote and what its checks found."""

    opset: int
    target: str
    artifacts: dict[str, str] = field(default_factory=dict)
    parity: list[ParityCase] = field(default_factory=list)
    parity_fp16: list[ParityCase] = field(default_factory=list)
    parity_original: list[ParityCase] = field(default_factory=list)
    lint: dict[str, list[Finding]] = field(default_factory=dict)
    engine: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    #: the hybrid ONNX's inputs and outputs (:func:`~dtr_compile.exporters.onnx.onnx_interface`)
    interface: dict[str, Any] = field(default_factory=dict)
    #: the students' recurrences are written fused (``--linear-attention``)
    fused: bool = False
    #: ``LinearAttention`` nodes in the hybrid ONNX (0: the plain form)
    fused_nodes: int = 0

    def failures(self) -> list[str]:
        """One line per failed check (empty when every artifact verified)."""
        out = []
        for what, cases in (("hybrid", self.parity), ("fp16 hybrid", self.parity_fp16),
                            ("original", self.parity_original)):
            for c in cases:
                if not c.ok:
                    out.append(f"{what} ONNX vs PyTorch at {c.label or c.shape}: max-abs "
                               f"{c.max_abs:.3g}, rel. RMS {c.rel_rms:.3g}")
        if self.target == "tensorrt":
            for name, findings in self.lint.items():
                for f in blocking(findings):
                    out.append(f"{name}: TensorRT lint {f.rule} ({f.severity}) {f.op}: {f.message}")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures()

    def to_dict(self) -> dict[str, Any]:
        return {
            "opset": self.opset, "target": self.target, "artifacts": self.artifacts,
            "parity_fp16": [p.__dict__ for p in self.parity_fp16],
            "parity_original": [p.__dict__ for p in self.parity_original],
            "fp16_tolerance": {"atol_relative": FP16_ATOL, "rel_rms": FP16_RTOL},
            "tensorrt_lint": {k: [f.to_dict() for f in v] for k, v in self.lint.items()},
            "engine": self.engine, "seconds": self.seconds, "interface": self.interface,
            "linear_attention": {"form": "fused" if self.fused_nodes else "plain",
                                 "nodes": self.fused_nodes,
                                 "domain": (fused_domain(self.opset) or "ai.onnx")
                                 if self.fused_nodes else None},
        }


def _timed(seconds: dict[str, float], key: str, t0: float) -> None:
    seconds[key] = round(time.perf_counter() - t0, 3)


def _engine_ranges(example: Mapping[str, torch.Tensor], dynamic_dims: Mapping[str, Mapping[int, str]],
                   axis_ranges: Mapping[str, tuple[int, int | None]]) -> dict[str, tuple[int, int, int]]:
    """TensorRT profile ranges per axis: from 1, optimised for the example, up to the axis's
    exported maximum (or 4× the example where it has none)."""
    out: dict[str, tuple[int, int, int]] = {}
    for name, dims in dynamic_dims.items():
        for i, axis in dims.items():
            opt = int(example[name].shape[i])
            hi = axis_ranges.get(axis, (1, None))[1]
            out[axis] = (1, opt, max(opt, hi if hi is not None else 4 * opt))
    return out


def export_artifacts(
    hybrid: torch.nn.Module,
    original: torch.nn.Module | None,
    example: Mapping[str, torch.Tensor],
    cases: Sequence[tuple[str, Mapping[str, torch.Tensor]]],
    input_names: Sequence[str],
    dynamic_dims: Mapping[str, Mapping[int, str]],
    axis_ranges: Mapping[str, tuple[int, int | None]],
    *,
    output: str | Path,
    atol: float,
    target: str = "onnxruntime",
    opset: int | None = None,
    fp16: bool = False,
    export_original: bool = False,
    engine: str | None = None,
    console: Console | None = None,
    write_to: Callable[[Path], Path] | None = None,
    output_names: Sequence[str] | None = None,
    sites: Sequence[tuple[str, str]] = (),
    linear: Sequence[str] = (),
    linear_attention: str = "auto",
    external_data: str = "auto",
) -> ExportResult:
    """Write and verify the artifacts of one compile (see the module docstring).

    Parity failures and blocking TensorRT lint findings do not raise: they are in
    :meth:`ExportResult.failures`, so the caller can write its report first. ``sites``
    (``(id, module path)`` in graph order) and the ``linear`` ids among them are recorded in each
    ONNX file's metadata (:data:`~dtr_compile.exporters.onnx.SITES_KEY`), for ``inspect``.

    ``external_data`` (:func:`external_weights`) puts each ONNX file's weights in ``NAME.data``
    beside it; the result's artifacts name each such file (``onnx_data``, ...).

    ``write_to`` maps an artifact's final path to the path to write it at now (a staging
    folder, see :class:`dtr_compile.fileio.Staging`); the result names the final paths.

    Raises:
        DtrError: an export or the engine build failed outright.
    """
    console = console or Console(stderr=True, quiet=True)
    final = export_paths(output)
    if engine is not None:
        final["engine"] = Path(engine)
    where = write_to or (lambda p: p)
    paths = {k: where(p) for k, p in final.items() if k in _needed(fp16, export_original, engine)}
    res = ExportResult(resolve_opset(target, opset), target)
    res.fused = resolve_fused(linear_attention, res.opset, target)
    common: dict[str, Any] = dict(axis_ranges=axis_ranges, output_names=output_names,
                                  external_data=external_weights(external_data))

    def written(key: str) -> None:  # an ONNX artifact, and its weights file if it has one
        res.artifacts[key] = str(final[key])
        if data_path(paths[key]).exists():
            res.artifacts[f"{key}_data"] = str(data_path(final[key]))

    def meta(lin: Sequence[str]) -> dict[str, str]:
        return sites_metadata(sites or (), lin)

    t0 = time.perf_counter()
    program = export_program(hybrid, example, input_names, dynamic_dims,
                             axis_ranges=axis_ranges)
    save_program(program, paths["pt2"])
    res.artifacts["pt2"] = str(final["pt2"])
    _timed(res.seconds, "pt2", t0)

    t0 = time.perf_counter()
    # the fused form needs its own trace (the .pt2 keeps plain ops: it loads without dtr_compile)
    export_onnx(hybrid if res.fused else program, example, input_names, dynamic_dims,
                paths["onnx"], opset=res.opset, metadata=meta(linear), fused=res.fused, **common)
    written("onnx")
    res.interface = onnx_interface(paths["onnx"])
    res.fused_nodes = count_fused(paths["onnx"]) if res.fused else 0
    res.parity = check_parity(paths["onnx"], hybrid, cases, input_names, atol=atol)
    _timed(res.seconds, "onnx", t0)
    console.log(f"exported {final['onnx'].name} (opset {res.opset}) and {final['pt2'].name}")

    if fp16:
        t0 = time.perf_counter()
        half = to_half(hybrid) if isinstance(hybrid, torch.fx.GraphModule) else hybrid.half()
        ex16 = {k: v.half() if v.dtype == torch.float32 else v for k, v in example.items()}
        export_onnx(half, ex16, input_names, dynamic_dims, paths["onnx_fp16"], opset=res.opset,
                    metadata=meta(linear), fused=res.fused, **common)
        written("onnx_fp16")
        res.parity_fp16 = check_parity(paths["onnx_fp16"], hybrid, cases, input_names,
                                       atol=FP16_ATOL, rtol=FP16_RTOL, atol_relative=True)
        _timed(res.seconds, "onnx_fp16", t0)
        console.log(f"exported {final['onnx_fp16'].name}")

    if export_original and original is not None:
        t0 = time.perf_counter()
        export_onnx(original, example, input_names, dynamic_dims, paths["original_onnx"],
                    opset=res.opset, metadata=meta(()), **common)
        written("original_onnx")
        res.parity_original = check_parity(paths["original_onnx"], original, cases, input_names,
                                           atol=atol)
        _timed(res.seconds, "original_onnx", t0)
        console.log(f"exported {final['original_onnx'].name}")

    if target == "tensorrt":
        for key in ("onnx", "onnx_fp16"):
            if key in res.artifacts:
                res.lint[key] = lint_trt(paths[key])

    if engine is not None:
        t0 = time.perf_counter()
        info = build_engine(paths["onnx"], paths["engine"], fp16=fp16,
                            ranges=_engine_ranges(example, dynamic_dims, axis_ranges))
        res.engine = info.to_dict()
        res.artifacts["engine"] = str(final["engine"])
        _timed(res.seconds, "engine", t0)
        console.log(f"built {final['engine'].name} (TensorRT {info.tensorrt_version})")
    return res
