"""The fused linear-attention form: each matrix-state student's recurrence as one ONNX
``LinearAttention`` node, for onnxruntime.

dtr-compile writes a student in one of two forms, chosen by ``--linear-attention``:

=========  =================================================================  ==================
form       a recurrence (gla, deltanet, gated-deltanet) becomes               runs in
=========  =================================================================  ==================
plain      the chunked form in plain ops (MatMul, CumSum, Exp, …; no          every runtime,
           Loop/Scan/Einsum)                                                  TensorRT
fused      one ``LinearAttention`` node (``gated``, ``delta``, ``gated_delta``  onnxruntime 1.32+
           rules): the standard op (ai.onnx) at opset 27, onnxruntime's
           contrib op (``com.microsoft``) below 27
auto       fused at opset 27 and up, plain below (the default)
=========  =================================================================  ==================

In onnxruntime 1.32 (CPU) the ``com.microsoft`` op is a native kernel, while the standard
opset-27 op runs as its ONNX function body (a ``Scan`` over tokens) and an opset-27 model's
softmax layers get ``Attention``-25, which has no kernel either (function body, ~5× slower at a
16K KV cache): ``--linear-attention fused`` at the default opset 23 is the fast one in
onnxruntime; ``--opset 27`` is the portable standard. ``dtr-compile lint-trt`` says which form
a file holds (TRT011 rejects both fused ones: TensorRT imports neither). Everything around the
recurrence (gates, β, L2 norms, the output RMS norm, a ``--window``'s softmax) stays plain ops,
and feature-map students (``hedgehog``, …) are plain ops in every form.

How: a trace taken under :func:`~dtr_compile.linear.recurrence.fused_recurrence` holds one
``torch.ops.dtr_compile.linear_attention`` node per recurrence; :func:`translation_table` maps it
to ``LinearAttention`` in a private domain, because torch.onnx writes opset 23 at most and onnx's
version converter has no adapter for an op born in opset 27. :func:`finish` converts the rest of
the model to the requested opset (onnx's converter) and then moves the node into its domain.
Inputs are packed as the op wants (``[B, T, H·D]``, ``decay``/``beta`` ``[B, T, H]``, the state
``[B, H, Dk, Dv]``), ``scale = 1`` (the students scale ``q`` themselves), ``q_num_heads =
kv_num_heads = H`` (the students' gates are per query head, so keys and values arrive repeated
to ``H`` heads).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: The first opset with ONNX ``LinearAttention``: from here on the students export fused.
LINEAR_ATTENTION_OPSET = 27
#: The private domain the node carries between torch.onnx and :func:`finish`.
PENDING_DOMAIN = "dtr_compile.pending"
#: onnxruntime's contrib-op domain: the fused node's home below :data:`LINEAR_ATTENTION_OPSET`.
ORT_DOMAIN = "com.microsoft"
#: ``--linear-attention`` choices.
FORMS = ("auto", "plain", "fused")


def torch_max_opset() -> int:
    """The highest opset the installed torch.onnx exporter writes itself (23 in torch 2.13)."""
    from torch.onnx import _constants

    return int(_constants.ONNX_MAX_OPSET)


def is_fused(opset: int) -> bool:
    """Whether ``--linear-attention auto`` writes the fused form at ``opset``."""
    return opset >= LINEAR_ATTENTION_OPSET


def resolve_fused(form: str, opset: int, target: str) -> bool:
    """Whether a compile with ``--linear-attention form`` at ``opset`` for ``target`` writes the
    fused form.

    Raises:
        InputError: an unknown form, or the fused form for TensorRT (no importer for the op).
    """
    from dtr_compile.errors import InputError

    if form not in FORMS:
        raise InputError(f"--linear-attention {form!r}: choose one of {', '.join(FORMS)}")
    fused = is_fused(opset) if form == "auto" else form == "fused"
    if fused and target == "tensorrt":
        why = (f"--opset {opset} writes" if form == "auto" else "--linear-attention fused writes")
        raise InputError(f"{why} linear attention as ONNX LinearAttention, which TensorRT does "
                         f"not import; use --linear-attention plain (or --opset "
                         f"{LINEAR_ATTENTION_OPSET - 1} or lower) with --target tensorrt")
    return fused


def fused_domain(opset: int) -> str:
    """The fused node's domain at ``opset``: the standard one from
    :data:`LINEAR_ATTENTION_OPSET` on, :data:`ORT_DOMAIN` below."""
    return "" if opset >= LINEAR_ATTENTION_OPSET else ORT_DOMAIN


@contextlib.contextmanager
def tracing(fused: bool) -> Iterator[None]:
    """Trace the students' recurrences as fused ops (``fused``) or in their plain chunked
    forms."""
    from dtr_compile.linear.recurrence import fused_recurrence

    with fused_recurrence() if fused else contextlib.nullcontext():
        yield


def _schema() -> Any:  # noqa: ANN401 - onnx.defs.OpSchema
    """``LinearAttention``'s inputs, outputs and attributes under :data:`PENDING_DOMAIN`."""
    from onnx.defs import OpSchema

    opt, one = OpSchema.FormalParameterOption.Optional, OpSchema.FormalParameterOption.Single
    names = ("query", "key", "value", "past_state", "decay", "beta")
    return OpSchema(
        "LinearAttention", PENDING_DOMAIN, 1,
        inputs=[OpSchema.FormalParameter(n, "T", param_option=opt if i >= 3 else one)
                for i, n in enumerate(names)],
        outputs=[OpSchema.FormalParameter("output", "T"),
                 OpSchema.FormalParameter("present_state", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
        attributes=[OpSchema.Attribute(n, t, "") for n, t in (
            ("q_num_heads", OpSchema.AttrType.INT), ("kv_num_heads", OpSchema.AttrType.INT),
            ("scale", OpSchema.AttrType.FLOAT), ("update_rule", OpSchema.AttrType.STRING),
            ("chunk_size", OpSchema.AttrType.INT))])


def translation_table(fused: bool) -> dict[Any, Any] | None:
    """``custom_translation_table`` for ``torch.onnx.export``: the fused op → ``LinearAttention``
    (in :data:`PENDING_DOMAIN` until :func:`finish`); None for the plain form."""
    if not fused:
        return None
    import torch
    from onnxscript import opset18, values

    import dtr_compile.linear.recurrence  # noqa: F401 - registers the op

    op: Any = opset18  # untyped use: onnxscript's stubs want INT64 where a Constant is generic
    linear_attention = values.Op(values.Opset(PENDING_DOMAIN, 1), "LinearAttention", _schema())

    def translate(q, k, v, log_alpha, beta, initial_state, update_rule: str,  # noqa: ANN001, ANN202
                  chunk_size: int):
        heads = q.shape[1]
        if not isinstance(heads, int):
            raise ValueError("LinearAttention needs a static head count; got a dynamic one")
        packed = op.Constant(value_ints=[0, 0, -1])
        q3, k3, v3 = (op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), packed) for x in (q, k, v))
        decay = None if update_rule == "delta" else op.Transpose(log_alpha, perm=[0, 2, 1])
        b = None if beta is None else op.Transpose(beta, perm=[0, 2, 1])
        out, state = linear_attention(
            q3, k3, v3, initial_state, decay, b, q_num_heads=heads, kv_num_heads=heads,
            scale=1.0, update_rule=update_rule, chunk_size=chunk_size, _outputs=2)
        out = op.Reshape(out, op.Constant(value_ints=[0, 0, heads, -1]))  # [B, T, H, Dv]
        return op.Transpose(out, perm=[0, 2, 1, 3]), state

    return {torch.ops.dtr_compile.linear_attention.default: translate}


def finish(path: str | os.PathLike[str], opset: int, fused: bool) -> None:
    """Bring the ONNX file at ``path`` (written by torch.onnx at :func:`torch_max_opset` or
    below) to ``opset`` in place: onnx's version converter for the standard ops, then every
    pending ``LinearAttention`` into :func:`fused_domain`. Weights stored beside the file
    (external data) are left where they are. No-op (the file is not read) for the plain form at
    an opset torch.onnx writes itself."""
    import onnx

    if opset <= torch_max_opset() and not fused:
        return  # torch.onnx wrote it at this opset, plain: nothing to load
    model = onnx.load(str(path), load_external_data=False)
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current < opset:
        model = onnx.version_converter.convert_version(model, opset)
    domain = fused_domain(opset)
    pending = False
    for node in nodes(model.graph):
        if node.domain == PENDING_DOMAIN:
            node.domain, pending = domain, True
    imports = [o for o in model.opset_import if o.domain != PENDING_DOMAIN]
    if pending and domain and not any(o.domain == domain for o in imports):
        imports.append(onnx.helper.make_opsetid(domain, 1))
    del model.opset_import[:]
    model.opset_import.extend(imports)
    onnx.save(model, str(Path(path)))


def count_fused(path: str | os.PathLike[str]) -> int:
    """``LinearAttention`` nodes in the ONNX file at ``path`` (subgraphs included): 0 for the
    plain form."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(n.op_type == "LinearAttention" for n in nodes(model.graph))


def nodes(graph: Any) -> Iterator[Any]:  # noqa: ANN401 - onnx.GraphProto
    """Every node of ``graph`` and of its subgraphs (``If`` branches, ``Loop`` bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from nodes(sub)
