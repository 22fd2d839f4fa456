"""One stateful decoder ONNX from two graphs: a decode step (``t = 1``) and a prefill (any ``t``).

A linear layer computes one token by its recurrence (``decode_step``, O(state)) and several by
its chunked form (``extend``); the stateful decoder needs both. Traced with a dynamic ``t``, each
layer chooses by a ``torch.cond`` (one ONNX ``If`` per layer), which makes ``torch.export`` trace
every branch several times (most of a decoder export's time) and leaves an ``If`` per linear
layer on the decode path. Here the decoder is traced twice without any ``torch.cond``: once at a
static ``t = 1`` (every linear layer's recurrent step, static shapes the exporter folds away) and
once with a dynamic ``t`` and every linear layer in its chunked form; :func:`merge_phases` puts
the two graphs in one model under a single ``If`` on ``t == 1``:

    input_ids ─ Shape ─ Gather(1) ─ Equal(1) ─ If ─┬─ then: the decode graph (t = 1)
                                                   └─ else: the prefill graph (any t)

Both branches read the model's inputs and its weights from the outer graph (each weight is
stored once) and return the model's outputs; TensorRT imports such an ``If`` as an
``IIfConditional`` (both branches return the same ranks).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def _content(value: Any) -> tuple[Any, ...] | None:  # noqa: ANN401 - an onnx_ir Value
    """An initializer's identity by content: ``(dtype, shape, digest of its bytes)``; None for a
    value without data. The exporter names the tensors it folds (a transposed weight becomes
    ``val_21`` in one graph, ``val_22`` in the other), so names cannot tell two graphs' copies
    of a weight apart."""
    tensor = value.const_value
    if tensor is None:
        return None
    return (tensor.dtype, tuple(tensor.shape), hashlib.blake2b(tensor.tobytes()).digest())


def _as_branch(graph: Any, prefix: str, inputs: dict[str, Any],  # noqa: ANN401
               shared: dict[Any, Any]) -> Any:  # noqa: ANN401
    """``graph`` turned into an ``If`` branch in place: its inputs replaced by the outer graph's
    values of the same names, its initializers whose content is in ``shared``
    (:func:`_content` → outer value) by those, every other name prefixed with ``prefix`` (names
    must be unique across a model and its subgraphs)."""
    import onnx_ir as ir

    for value in list(graph.inputs):
        value.replace_all_uses_with(inputs[value.name])
    for name, value in list(graph.initializers.items()):
        outer = shared.get(_content(value))
        if outer is not None:
            graph.initializers.pop(name)
            value.replace_all_uses_with(outer)
    graph.inputs.clear()
    outputs = list(graph.outputs)
    for i, value in enumerate(outputs):
        if value.producer() is None:  # an outer value returned as it is: a branch needs a node
            node = ir.node("Identity", [value])
            graph.append(node)
            outputs[i] = node.outputs[0]
    graph.outputs[:] = outputs
    for value in list(graph.initializers.values()):
        value.name = prefix + value.name
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.name:
            node.name = prefix + node.name
        for value in node.outputs:
            if value.name:
                value.name = prefix + value.name
    graph.name = prefix.rstrip("/")
    return graph


def merge_phases(decode: Any, prefill: Any, tokens: str = "input_ids") -> Any:  # noqa: ANN401
    """One model running ``decode`` when ``tokens`` has one column and ``prefill`` otherwise.

    Args:
        decode, prefill: ``onnx_ir`` models with the same inputs and outputs (names, order),
            exported from the same module: every initializer the two hold alike (same dtype,
            shape and bytes, whatever its name) is stored once, in the outer graph.
        tokens: the input whose dim 1 is ``t``.

    Returns:
        ``prefill`` turned into the merged model (its graph holds the If; opset imports, metadata
        and producer kept).

    Raises:
        ValueError: the two models' inputs or outputs differ.
    """
    import onnx_ir as ir

    names = [v.name for v in prefill.graph.inputs]
    outs = [v.name for v in prefill.graph.outputs]
    if names != [v.name for v in decode.graph.inputs] or outs != [v.name for v in
                                                                  decode.graph.outputs]:
        raise ValueError("the decode and prefill graphs must have the same inputs and outputs")
    inputs = {v.name: ir.Value(name=v.name, type=v.type, shape=v.shape)
              for v in prefill.graph.inputs}
    in_decode = {_content(v) for v in decode.graph.initializers.values()}
    shared: dict[Any, Any] = {}  # content → the outer graph's initializer
    for name, value in prefill.graph.initializers.items():
        key = _content(value)
        if key is not None and key in in_decode and key not in shared:
            shared[key] = ir.Value(name=name, type=value.type, shape=value.shape,
                                   const_value=value.const_value)
    opsets = dict(prefill.opset_imports) | dict(decode.opset_imports)
    then_branch = _as_branch(decode.graph, "decode/", inputs, shared)
    else_branch = _as_branch(prefill.graph, "prefill/", inputs, shared)
    shape = ir.node("Shape", [inputs[tokens]], attributes={"start": 1, "end": 2})
    one = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([1], np.int64))})
    is_step = ir.node("Equal", [shape.outputs[0], one.outputs[0]])
    branch = ir.node("If", [is_step.outputs[0]],
                     attributes={"then_branch": then_branch, "else_branch": else_branch},
                     num_outputs=len(outs), name="phase")
    for value, ref in zip(branch.outputs, else_branch.outputs, strict=True):
        value.name = ref.name.removeprefix("prefill/")
        value.type, value.shape = ref.type, ref.shape
    graph = ir.Graph(list(inputs.values()), list(branch.outputs),
                     nodes=[shape, one, is_step, branch], initializers=list(shared.values()),
                     opset_imports=opsets, name="decoder")
    model = ir.Model(graph, ir_version=prefill.ir_version, producer_name=prefill.producer_name,
                     producer_version=prefill.producer_version, domain=prefill.domain,
                     model_version=prefill.model_version, doc_string=prefill.doc_string,
                     metadata_props=dict(prefill.metadata_props))
    return model
