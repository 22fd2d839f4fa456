"""Exporter: the hybrid as ONNX (``torch.onnx.export(dynamo=True)``) and as a ``torch.export``
archive, with named dynamic axes and a parity check in onnxruntime.

Opset and exactness. PyTorch's SDPA gives **0** for a query row whose keys are all masked (a
boolean mask that is all False, or an additive mask that is all ``-inf``; ``torch._safe_softmax``).
The exporter does not always agree (measured with torch 2.13, onnxscript 0.7, onnxruntime 1.32):

=========  ==================================  ======================  ======================
opset      SDPA becomes                        all-False bool row      all ``-inf`` float row
=========  ==================================  ======================  ======================
18 – 22    MatMul → Softmax → MatMul           ``mean(V)``             NaN
23         ONNX ``Attention``                  0 (exact)               0 (exact)
=========  ==================================  ======================  ======================

(An additive mask of ``finfo.min`` gives ``mean(V)`` in PyTorch too, and in every opset.) So:

* the default, :data:`DEFAULT_OPSET` = 23, emits ``Attention``; onnxruntime rejects a mask that is
  broadcast over the query axis (``[B, 1, 1, S]``), so :func:`prepare_for_export` expands every
  SDPA mask to ``[..., T, S]`` first;
* below 23 (``--opset``, or ``--target tensorrt`` whose default is :data:`TENSORRT_OPSET` = 18,
  since not every TensorRT parses ``Attention``), :func:`prepare_for_export` replaces each SDPA by
  :func:`exact_sdpa`, the same math with fully masked rows set to 0, in plain ONNX ops.

Parity is checked against the PyTorch hybrid at the export example's shape, at two other
``(B, T)`` shapes, and with one sequence fully padded (:func:`parity_cases`). fp32 passes when the
max-abs error is within ``atol`` (default 1e-3). An fp16 export (``--fp16``) is compared with the
same fp32 PyTorch hybrid and passes when the max-abs error is within :data:`FP16_ATOL` times
``max(1, max|reference|)`` and the relative RMS error ``‖ort − pt‖₂ / ‖pt‖₂`` within
:data:`FP16_RTOL`: fp16 keeps about 3 significant digits per op, and the errors add up over layers.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.export import Dim
from torch.fx import GraphModule
from torch.fx.node import Argument

from dtr_compile.errors import DtrError, first_line
from dtr_compile.exporters.fused import (
    finish,
    is_fused,
    torch_max_opset,
    tracing,
    translation_table,
)
from dtr_compile.fileio import EXTERNAL_DATA_BYTES, atomic_model_path, atomic_path
from dtr_compile.passes.attention_block import ATTENTION_MODULE

# torch.onnx logs a warning per torchvision op it cannot register; torchvision is deliberately
# not a dependency (no build matches the CPU torch pin).
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

#: Default opset: ONNX ``Attention`` (opset 23) is exact on fully masked rows in onnxruntime.
DEFAULT_OPSET = 23
#: Default opset of ``--target tensorrt``: no ``Attention`` op; SDPA exported by :func:`exact_sdpa`.
TENSORRT_OPSET = 18
#: The first opset whose exporter emits ONNX ``Attention`` for SDPA.
ATTENTION_OPSET = 23
#: fp16 parity: max-abs error allowed, relative to ``max(1, max|reference|)``.
FP16_ATOL = 3e-2
#: fp16 parity: relative RMS error allowed.
FP16_RTOL = 1e-2
#: Largest finite fp16 value; larger float literals are clamped to it by :func:`to_half`.
FP16_MAX = 65504.0

_SDPA = torch.ops.aten.scaled_dot_product_attention.default


@dataclass(frozen=True)
class ParityCase:
    """onnxruntime vs PyTorch at one input shape. ``rel_rms = ‖ort − pt‖₂ / ‖pt‖₂``.

    ``label`` names the case: ``B2-T24`` (batch and sequence), ``-padded`` when one sequence is
    all padding.
    """

    shape: dict[str, list[int]]
    max_abs: float
    rel_rms: float
    ok: bool
    label: str = ""


# --- graph preparation ----------------------------------------------------------------------


def exact_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (inference) in MatMul / Softmax / Where ops, with a row
    whose keys are all masked giving 0 as PyTorch's does (``torch._safe_softmax``).

    Args:
        q: ``[B, H, T, Dk]``. k: ``[B, Hkv, S, Dk]``. v: ``[B, Hkv, S, Dv]``.
        attn_mask: bool (True = attend) or additive, broadcastable to ``[B, H, T, S]``.
        dropout_p: ignored (inference).
        is_causal: top-left aligned causal mask, as SDPA's (``ones(T, S).tril()``).
        scale: softmax scale, default ``Dk ** -0.5``.
        enable_gqa: repeat key/value heads to ``H``.

    Returns:
        ``[B, H, T, Dv]``.
    """
    T, S = q.shape[-2], k.shape[-2]
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # [B, H, T, S]
    if is_causal:
        keep = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()  # [T, S]
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    dead = (scores == float("-inf")).all(dim=-1, keepdim=True)  # [B, H, T, 1]: nothing to attend
    probs = torch.where(dead, torch.zeros_like(scores), torch.softmax(scores, dim=-1))
    return torch.matmul(probs, v)  # [B, H, T, Dv]


def _static(x: object) -> int | None:
    return x if isinstance(x, int) else None


def prepare_for_export(gm: GraphModule, opset: int) -> GraphModule:
    """A copy of ``gm`` whose SDPA nodes export exactly at ``opset`` (functional, shares weights).

    * ``opset >= 23``: an SDPA mask broadcast over the query axis is expanded to ``[..., T, S]``
      (onnxruntime's ``Attention`` kernel requires it);
    * ``opset < 23``: each SDPA becomes a call of :func:`exact_sdpa`.

    Other nodes, and every node's ``meta``, are kept.
    """
    graph = copy.deepcopy(gm.graph)
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _SDPA:
            continue
        if opset < ATTENTION_OPSET:
            node.target = exact_sdpa
            changed = True
            continue
        args = list(node.args)
        mask = args[3] if len(args) > 3 else node.kwargs.get("attn_mask")
        if not isinstance(mask, torch.fx.Node):
            continue
        mval, qval = mask.meta.get("val"), args[0].meta.get("val")
        if mval is None or qval is None or mval.dim() < 2:
            continue
        T = qval.shape[-2]
        if _static(mval.shape[-2]) == 1 and _static(T) != 1:
            with graph.inserting_before(node):
                q_len = graph.call_function(torch.ops.aten.sym_size.int, (args[0], qval.dim() - 2))
                sizes: list[Argument] = [-1] * (mval.dim() - 2) + [q_len, -1]
                expanded = graph.call_function(torch.ops.aten.expand.default, (mask, sizes))
            expanded.meta = dict(mask.meta)
            expanded.meta["val"] = mval.expand(*mval.shape[:-2], T, mval.shape[-1])
            if len(args) > 3:
                args[3] = expanded
                node.args = tuple(args)
            else:
                node.kwargs = {**node.kwargs, "attn_mask": expanded}
            changed = True
    if not changed:
        return gm
    graph.lint()
    return GraphModule(gm, graph, class_name=type(gm).__name__)


def to_half(gm: GraphModule, *, keep_fp32: Sequence[str] = ("dtr.",)) -> GraphModule:
    """An fp16 copy of ``gm`` (functional): float32 weights, constants and dtype arguments become
    float16, float literals beyond fp16's range are clamped to ±65504.

    Submodules called by ``call_module`` whose path starts with a ``keep_fp32`` prefix (the linear
    attention modules, ``dtr.<site>``) keep fp32 weights: they take fp16 q, k, v, accumulate state
    and normaliser in fp32 and return fp16. ``gm`` must be the linearized graph (sites as
    ``call_module``), not an inlined one, whose fp32 casts inside the sites would become fp16.
    """
    graph = copy.deepcopy(gm.graph)

    def conv(a: object) -> object:
        if a is torch.float32:
            return torch.float16
        if isinstance(a, float) and math.isfinite(a) and abs(a) > FP16_MAX:
            return math.copysign(FP16_MAX, a)
        if isinstance(a, (list, tuple)):
            return type(a)(conv(x) for x in a)
        return a

    root: dict[str, object] = {}
    for node in graph.nodes:
        if node.op == "call_function":
            node.args = tuple(conv(a) for a in node.args)
            node.kwargs = {k: conv(v) for k, v in node.kwargs.items()}
        elif node.op == "get_attr":
            obj = _resolve(gm, str(node.target))
            keep = any(str(node.target).startswith(p) for p in keep_fp32)
            if isinstance(obj, torch.Tensor) and obj.dtype == torch.float32 and not keep:
                half = obj.detach().half()
                obj = torch.nn.Parameter(half, requires_grad=False) if isinstance(obj, torch.nn.Parameter) else half
            root[str(node.target)] = obj
        elif node.op == "call_module":
            mod = _resolve(gm, str(node.target))
            keep = any(str(node.target).startswith(p) for p in keep_fp32)
            if keep and isinstance(mod, GraphModule):
                # a whole attention block (--distill-target block): fp16 weights around its
                # linear-attention module, which keeps fp32 as above
                mod = to_half(mod, keep_fp32=(ATTENTION_MODULE,))
            elif not keep:
                # a call_module target names a submodule
                mod = copy.deepcopy(cast(torch.nn.Module, mod)).half()
            root[str(node.target)] = mod
    graph.lint()
    return GraphModule(root, graph, class_name=type(gm).__name__)


def _resolve(gm: torch.nn.Module, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# --- export -----------------------------------------------------------------------------------


def _dynamic_shapes(
    input_names: Sequence[str],
    dynamic_dims: Mapping[str, Mapping[int, str]],
    ranges: Mapping[str, tuple[int, int | None]],
) -> tuple[dict[int, Dim], ...]:
    dims: dict[str, Dim] = {}
    for name, (lo, hi) in ranges.items():
        dims[name] = Dim(name, min=lo, max=hi) if hi is not None else Dim(name, min=lo)
    return tuple({i: dims[axis] for i, axis in dynamic_dims.get(n, {}).items()} for n in input_names)


def _ranges(dynamic_dims: Mapping[str, Mapping[int, str]],
            axis_ranges: Mapping[str, tuple[int, int | None]] | None) -> dict[str, tuple[int, int | None]]:
    ranges = dict(axis_ranges or {})
    for dims in dynamic_dims.values():
        for axis in dims.values():
            ranges.setdefault(axis, (2, None))
    return ranges


def export_program(
    model: torch.nn.Module,
    example: Mapping[str, torch.Tensor],
    input_names: Sequence[str],
    dynamic_dims: Mapping[str, Mapping[int, str]],
    *,
    axis_ranges: Mapping[str, tuple[int, int | None]] | None = None,
) -> torch.export.ExportedProgram:
    """``torch.export`` ``model`` (flat positional inputs ``input_names``) with named dynamic dims.

    Raises:
        DtrError: torch.export failed.
    """
    args = tuple(example[n] for n in input_names)
    shapes = _dynamic_shapes(input_names, dynamic_dims, _ranges(dynamic_dims, axis_ranges))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, args, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # noqa: BLE001
        raise DtrError(f"torch.export of the hybrid failed: {first_line(exc)}") from exc


def save_program(program: torch.export.ExportedProgram, path: str | os.PathLike[str]) -> Path:
    """Write ``program`` as a ``torch.export`` archive (``.pt2``) at ``path``, atomically."""
    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        torch.export.save(program, f)
    return target


@contextlib.contextmanager
def _no_rotary_fusion() -> Iterator[None]:
    """Turn off onnxscript's opset-23 ``RotaryEmbedding`` fusion for one export.

    The fusion feeds ``cos, sin: [Bc, T, Dk/2]`` to the fused op as they are, but Hugging Face
    RoPE models compute them from ``position_ids: [1, T]`` (``Bc = 1``) and onnxruntime's
    ``RotaryEmbedding`` requires ``Bc == B``: the fused model fails for every batch > 1. The
    unfused Mul/Slice/Concat form broadcasts and is exact.
    """
    try:
        from onnxscript.rewriter.rules.fusion import _rotary_embedding
    except ImportError:  # pragma: no cover - other onnxscript layouts: nothing to turn off
        yield
        return
    real = _rotary_embedding.fuse_rotary_embedding
    _rotary_embedding.fuse_rotary_embedding = lambda model, debug=False: 0  # type: ignore[assignment]
    try:
        yield
    finally:
        _rotary_embedding.fuse_rotary_embedding = real


def export_onnx(
    model: torch.nn.Module | torch.export.ExportedProgram,
    example: Mapping[str, torch.Tensor],
    input_names: Sequence[str],
    dynamic_dims: Mapping[str, Mapping[int, str]],
    path: str | os.PathLike[str],
    *,
    axis_ranges: Mapping[str, tuple[int, int | None]] | None = None,
    opset: int = DEFAULT_OPSET,
    output_names: Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    fused: bool | None = None,
    external_data: bool | None = None,
) -> Path:
    """Export ``model`` (flat positional inputs ``input_names``) to ONNX at ``path``, atomically.

    ``model`` may already be a ``torch.export`` program of it (see :func:`export_program`), except
    for the fused form (``fused``; default: from opset 27 on), where the students' recurrences
    are traced as fused ops and written as ONNX ``LinearAttention``
    (:mod:`~dtr_compile.exporters.fused`); opsets above the torch exporter's own (23) are reached
    with onnx's version converter. Its SDPA nodes are made exact for ``opset``
    (:func:`prepare_for_export`) on the inlined ATen graph, so SDPA calls inside submodules are
    covered too. Dynamic axes carry the names in
    ``dynamic_dims`` (``batch``, ``sequence``). Inputs are named ``input_names``; outputs
    ``output_names`` when given (the model's own, e.g. ``logits``) and as many as the model's
    outputs, else as the exporter names them. ``metadata`` is written to the model's
    ``metadata_props`` (dtr-compile records its sites there: :data:`SITES_KEY`). The weights go
    to ``NAME.data`` beside the file (ONNX external data) when ``external_data``, or by default
    when they exceed :data:`EXTERNAL_DATA_BYTES` (see :func:`wants_external_data`). The ONNX
    checker runs on the file before it is renamed into place (with its ``NAME.data``).

    Raises:
        DtrError: torch.export, torch.onnx or the opset conversion failed, the checker rejected
            the model, or ``model`` is a program and the form is fused.
    """
    import onnx

    from dtr_compile.capture import flat_graph_module

    fused = is_fused(opset) if fused is None else fused
    if isinstance(model, torch.export.ExportedProgram):
        if fused:
            raise DtrError("the fused form writes LinearAttention nodes: export the module, not a "
                           "torch.export program traced without them")
        program = model
    else:
        with tracing(fused):
            program = export_program(model, example, input_names, dynamic_dims,
                                     axis_ranges=axis_ranges)
    gm = prepare_for_export(flat_graph_module(program.module()), opset)
    args = tuple(example[n] for n in input_names)
    outs = gm.graph.output_node().args[0]
    n_out = len(outs) if isinstance(outs, (tuple, list)) else 1
    names = list(output_names) if output_names and len(output_names) == n_out \
        and not set(output_names) & set(input_names) else None
    shapes = _dynamic_shapes(input_names, dynamic_dims, _ranges(dynamic_dims, axis_ranges))
    target = Path(path)
    with atomic_model_path(target) as tmp:
        try:
            with warnings.catch_warnings(), _no_rotary_fusion():
                warnings.simplefilter("ignore")
                prog = torch.onnx.export(
                    gm, args, dynamo=True, opset_version=min(opset, torch_max_opset()),
                    input_names=list(input_names), output_names=names, dynamic_shapes=shapes,
                    verbose=False, custom_translation_table=translation_table(fused),
                    optimize=False,
                )
                if prog is not None:
                    optimize_onnx(prog.model)
        except Exception as exc:  # noqa: BLE001
            raise DtrError(f"ONNX export failed: {first_line(exc)}") from exc
        assert prog is not None
        for key, value in (metadata or {}).items():
            prog.model.metadata_props[key] = value
        prog.save(str(tmp), external_data=wants_external_data(prog.model, external_data))
        try:
            finish(tmp, opset, fused)
        except Exception as exc:  # noqa: BLE001
            raise DtrError(f"converting the ONNX to opset {opset} failed: {first_line(exc)}") from exc
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise DtrError(f"the exported ONNX fails the ONNX checker: {first_line(exc)}") from exc
    return target


def optimize_onnx(model: Any) -> None:  # noqa: ANN401 - an onnx_ir Model
    """``model`` cleaned in place the way ``torch.onnx.export(optimize=True)`` does, without its
    pattern rewrites: functions inlined, constants folded (shapes too, with node-level shape
    inference) and unused nodes removed (twice, or until nothing changes), constants lifted to
    initializers, duplicate initializers and common subexpressions merged, names fixed.

    onnxscript's default optimizer also runs ~70 pattern rules (Cast-Cast, Reshape-Reshape, …),
    each matched against every node: on a 30-layer decoder's prefill graph that matching took
    most of the export (minutes; measured on SmolLM2-135M). onnxruntime applies the same
    eliminations itself when a session is created, so they are not worth it at export time.
    Measured on a SmolLM2-shaped hybrid decoder: its one-token step keeps ~150 more ops (Slice,
    Transpose, Shape chains) without the rewrites, and decodes at the same speed within the
    machine's noise (1K context, 3 rounds × 64 steps); the rewrites cost 5 of its 9 minutes.
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import _constant_folding

    loop = ir.passes.PassManager(
        [_constant_folding.FoldConstantsPass(
            shape_inference=True,
            input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
            output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
         common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
         common.RemoveUnusedOpsetsPass()],
        steps=2, early_stop=True)
    ir.passes.Sequential(
        common.InlinePass(), loop, common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(), common.OutputFixPass(),
        common.NameFixPass())(model)


def wants_external_data(model: Any, external_data: bool | None) -> bool:  # noqa: ANN401
    """Whether to write the ``onnx_ir`` ``model`` with its weights in a ``NAME.data`` file:
    ``external_data`` when given, else whether its initializers exceed
    :data:`EXTERNAL_DATA_BYTES`."""
    if external_data is not None:
        return external_data
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None) > EXTERNAL_DATA_BYTES


#: ``metadata_props`` key of the ONNX models dtr-compile writes: JSON
#: ``[{"id", "module_path", "linear"}]``, one entry per attention site in graph order.
SITES_KEY = "dtr_compile.sites"


def sites_metadata(sites: Sequence[tuple[str, str]], linear: Sequence[str]) -> dict[str, str]:
    """``{SITES_KEY: JSON}`` for ``sites`` (``(id, module path)`` in graph order), the ``linear``
    ids among them marked; ``{}`` without sites. Written in every ONNX model of a compile (prefill
    and decoders) and read by ``inspect``."""
    lin = set(linear)
    return {SITES_KEY: json.dumps([{"id": sid, "module_path": path, "linear": sid in lin}
                                   for sid, path in sites])} if sites else {}

_ONNX_TYPES = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 6: "int32", 9: "bool",
               3: "int8", 2: "uint8", 16: "bfloat16"}


def onnx_interface(path: str | os.PathLike[str]) -> dict[str, list[dict[str, object]]]:
    """The interface of the ONNX model at ``path``: ``{"inputs": [...], "outputs": [...]}``, each
    ``{"name", "dtype", "shape"}`` with a named dynamic axis as its name (``batch``,
    ``sequence``) and a static one as its size."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(v: onnx.ValueInfoProto) -> dict[str, object]:
        t = v.type.tensor_type
        shape: list[object] = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                               for d in t.shape.dim]
        return {"name": v.name, "dtype": _ONNX_TYPES.get(t.elem_type, str(t.elem_type)),
                "shape": shape}

    inits = {i.name for i in graph.initializer}
    return {"inputs": [describe(v) for v in graph.input if v.name not in inits],
            "outputs": [describe(v) for v in graph.output]}


# --- parity ---------------------------------------------------------------------------------


def ort_session(path: str | os.PathLike[str], threads: int | None = None,  # noqa: ANN201
                *, prepack: bool = True):
    """A CPU onnxruntime InferenceSession for ``path``.

    ``prepack=False`` turns off onnxruntime's weight prepacking (``session.disable_prepacking``):
    a prepacked MatMul keeps its own copy of the weights, about 0.8× the model's weights more
    memory (``benchmarks/memory.py``) for faster runs; a parity check, which runs a few times,
    does without it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


#: onnxruntime's type strings → numpy dtypes, for the input types a model may declare.
ORT_DTYPES: dict[str, type] = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def ort_run(sess, inputs: Mapping[str, torch.Tensor | np.ndarray]) -> np.ndarray:  # noqa: ANN001
    """Run ``sess`` on inputs by name (torch or numpy, cast to the declared input types); return
    its first output."""
    feed = {}
    for i in sess.get_inputs():
        x = inputs[i.name]
        arr = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        want = ORT_DTYPES.get(i.type)
        feed[i.name] = arr.astype(want) if want is not None and arr.dtype != want else arr
    return sess.run(None, feed)[0]


def _label(case: Mapping[str, torch.Tensor], dynamic_dims: Mapping[str, Mapping[int, str]]) -> str:
    for name, t in case.items():
        axes = dynamic_dims.get(name, {})
        if "batch" in axes.values() and "sequence" in axes.values():
            inv = {a: i for i, a in axes.items()}
            return f"B{t.shape[inv['batch']]}-T{t.shape[inv['sequence']]}"
    t = next(iter(case.values()))
    return f"B{t.shape[0]}"


def parity_cases(
    inputs: Mapping[str, torch.Tensor],
    dynamic_dims: Mapping[str, Mapping[int, str]],
    *,
    example_rows: int = 2,
) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Labelled parity inputs cut from ``inputs`` (validation rows ``[N, ...]``).

    The export example (``example_rows`` rows, full length), three rows at half the length, one
    row at three quarters (taken from the end of the data), and — when an input is a 2-D
    ``*mask*`` tensor — the example with its last sequence all padding (a fully masked row).
    """
    seq_dims = {n: [i for i, a in d.items() if a == "sequence"] for n, d in dynamic_dims.items()}
    n = next(iter(inputs.values())).shape[0]

    def cut(rows: slice, frac: float) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in inputs.items():
            t = t[rows]
            for d in seq_dims.get(name, []):
                t = t.narrow(d, 0, min(t.shape[d], max(2, int(t.shape[d] * frac))))
            out[name] = t
        return out

    cases = [cut(slice(0, min(example_rows, n)), 1.0), cut(slice(0, min(3, n)), 0.5),
             cut(slice(n - 1, n), 0.75)]
    out = [(_label(c, dynamic_dims), c) for c in cases]
    masks = [k for k, t in inputs.items() if "mask" in k.lower() and t.dim() == 2]
    if masks and cases[0][masks[0]].shape[0] >= 2:
        padded = {k: v.clone() for k, v in cases[0].items()}
        for k in masks:
            padded[k][-1] = 0
        out.append((_label(padded, dynamic_dims) + "-padded", padded))
    return out


def check_parity(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    cases: Sequence[Mapping[str, torch.Tensor] | tuple[str, Mapping[str, torch.Tensor]]],
    input_names: Sequence[str],
    *,
    atol: float,
    rtol: float | None = None,
    atol_relative: bool = False,
) -> list[ParityCase]:
    """Compare onnxruntime with PyTorch on each input case (first output only).

    A case passes when the output is finite, has PyTorch's shape, ``max_abs <= atol`` (times
    ``max(1, max|ref|)`` with ``atol_relative``) and, if given, ``rel_rms <= rtol``. NaN in the
    same places in both counts as equal.
    """
    sess = ort_session(path, prepack=False)  # a few runs: no second copy of the weights
    out: list[ParityCase] = []
    for item in cases:
        label, case = item if isinstance(item, tuple) else ("", item)
        with torch.inference_mode():
            ref = model(*(case[n] for n in input_names))
        ref_t = ref[0] if isinstance(ref, (tuple, list)) else ref
        ref_np = ref_t.float().numpy()
        got = ort_run(sess, case).astype(np.float32)
        shape = {k: list(v.shape) for k, v in case.items()}
        if got.shape != ref_np.shape:
            out.append(ParityCase(shape, math.inf, math.inf, False, label))
            continue
        both_nan = np.isnan(got) & np.isnan(ref_np)
        diff = np.where(both_nan, 0.0, got - ref_np)
        max_abs = float(np.abs(diff).max()) if diff.size else 0.0
        ref_clean = np.where(both_nan, 0.0, ref_np)
        rel = float(np.linalg.norm(diff) / max(float(np.linalg.norm(ref_clean)), 1e-30))
        bound = atol * max(1.0, float(np.abs(ref_clean).max(initial=0.0))) if atol_relative else atol
        ok = bool(np.isfinite(diff).all()) and max_abs <= bound and (rtol is None or rel <= rtol)
        out.append(ParityCase(shape, max_abs, rel, ok, label))
    return out
