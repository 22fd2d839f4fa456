"""The fused linear-attention form: each matrix-state student's recurrence as one ONNX
``LinearAttention`` node (opset 27), for onnxruntime 1.32+.

dtr-compile writes a student in one of two forms, chosen by the opset:

================  ==========================================================  ================
opset             a recurrence (gla, deltanet, gated-deltanet) becomes        runs in
================  ==========================================================  ================
18 … 26           the chunked form in plain ops (MatMul, CumSum, Exp, …;      every runtime,
                  no Loop/Scan/Einsum; the default, opset 23)                 TensorRT
27 and up         one ``LinearAttention`` node (``gated``, ``delta``,         onnxruntime
                  ``gated_delta`` rules), its chunk-parallel kernel           1.32+
================  ==========================================================  ================

``dtr-compile lint-trt`` says which form a file holds (rule TRT011 rejects the fused one:
TensorRT does not import the op). Everything around the recurrence (gates, β, L2 norms, the
output RMS norm, a ``--window``'s softmax) stays plain ops in both forms, and feature-map students
(``hedgehog``, …) are plain ops at every opset.

How: a trace taken under :func:`~dtr_compile.linear.recurrence.fused_recurrence` holds one
``torch.ops.dtr_compile.linear_attention`` node per recurrence; :func:`translation_table` maps it
to ``LinearAttention`` in a private domain, because torch.onnx writes opset 23 at most and onnx's
version converter has no adapter for an op born in opset 27. :func:`finish` converts the rest of
the model from 23 to the requested opset (onnx's converter) and then moves the node into the
standard domain. Inputs are packed as the op wants (``[B, T, H·D]``, ``decay``/``beta``
``[B, T, H]``, the state ``[B, H, Dk, Dv]``), ``scale = 1`` (the students scale ``q``
themselves), ``q_num_heads = kv_num_heads = H`` (the students' gates are per query head, so keys
and values arrive repeated to ``H`` heads).
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


def torch_max_opset() -> int:
    """The highest opset the installed torch.onnx exporter writes itself (23 in torch 2.13)."""
    from torch.onnx import _constants

    return int(_constants.ONNX_MAX_OPSET)


def is_fused(opset: int) -> bool:
    """Whether an export at ``opset`` writes the fused form."""
    return opset >= LINEAR_ATTENTION_OPSET


@contextlib.contextmanager
def tracing(opset: int) -> Iterator[None]:
    """Trace the students for ``opset``: fused recurrences from :data:`LINEAR_ATTENTION_OPSET`
    on, their plain chunked forms below it."""
    from dtr_compile.linear.recurrence import fused_recurrence

    with fused_recurrence() if is_fused(opset) else contextlib.nullcontext():
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


def translation_table(opset: int) -> dict[Any, Any] | None:
    """``custom_translation_table`` for ``torch.onnx.export`` at ``opset``: the fused op →
    ``LinearAttention`` (in :data:`PENDING_DOMAIN` until :func:`finish`); None below
    :data:`LINEAR_ATTENTION_OPSET`."""
    if not is_fused(opset):
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


def finish(path: str | os.PathLike[str], opset: int) -> None:
    """Bring the ONNX file at ``path`` (written by torch.onnx at :func:`torch_max_opset` or
    below) to ``opset`` in place: onnx's version converter for the standard ops, then every
    pending ``LinearAttention`` into the standard domain. Weights stored beside the file
    (external data) are left where they are. No-op (the file is not read) at an opset torch.onnx
    writes itself below :data:`LINEAR_ATTENTION_OPSET`."""
    import onnx

    if opset <= torch_max_opset() and not is_fused(opset):
        return  # torch.onnx wrote it at this opset, plain: nothing to load
    model = onnx.load(str(path), load_external_data=False)
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    pending = any(n.domain == PENDING_DOMAIN for n in _nodes(model.graph))
    if current == opset and not pending:
        return
    if current < opset:
        model = onnx.version_converter.convert_version(model, opset)
    for node in _nodes(model.graph):
        if node.domain == PENDING_DOMAIN:
            node.domain = ""
    imports = [o for o in model.opset_import if o.domain != PENDING_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(imports)
    onnx.save(model, str(Path(path)))


def count_fused(path: str | os.PathLike[str]) -> int:
    """``LinearAttention`` nodes in the ONNX file at ``path`` (subgraphs included): 0 for the
    plain form."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(n.op_type == "LinearAttention" for n in _nodes(model.graph))


def _nodes(graph: Any) -> Iterator[Any]:  # noqa: ANN401 - onnx.GraphProto
    """Every node of ``graph`` and of its subgraphs (``If`` branches, ``Loop`` bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _nodes(sub)
