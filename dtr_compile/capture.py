"""Stage 2, capture: the model's fx ``GraphModule`` via ``torch.export``.

transformers 5 has no fx tracer (``torch.fx.symbolic_trace`` fails on HF attention), so every model
goes through ``torch.export``. Attention is found on this pre-decomposition ATen graph, where
``scaled_dot_product_attention`` is still one node.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch.export import Dim

from dtr_compile.errors import CaptureError, InputError
from dtr_compile.load import LoadedModel


@dataclass
class CapturedModel:
    """A captured model.

    Attributes:
        program: the ``torch.export`` program.
        gm: ``program.module()``: an fx GraphModule whose parameters are attributes, with
            ``node.meta["nn_module_stack"]`` on every node created inside a module call.
        input_names: the graph's placeholder names, in call order.
        dynamic_dims: for each input name, ``{dim index: axis name}`` of its symbolic dims
            (``"batch"`` for dim 0, ``"sequence"`` and so on after it).
        axis_ranges: ``{axis name: (min, max or None)}`` of the program's dynamic dims.
        output_names: a name per flat output, from the model's own output structure
            (:func:`output_names`): ``logits``, ``last_hidden_state``…
    """

    program: torch.export.ExportedProgram
    gm: torch.fx.GraphModule
    input_names: list[str]
    dynamic_dims: dict[str, dict[int, str]]
    axis_ranges: dict[str, tuple[int, int | None]]
    output_names: list[str] = field(default_factory=list)


def output_names(program: torch.export.ExportedProgram) -> list[str]:
    """A name per flat output of ``program``, from its output structure (``call_spec.out_spec``),
    as Optimum names ONNX outputs: the keys of a Hugging Face ``ModelOutput`` or a dict
    (``logits``, ``last_hidden_state``, nested ones joined by ``.``), ``output_<i>`` for the items
    of a tuple, ``output`` for a lone tensor."""
    spec = program.call_spec.out_spec
    if spec is None:
        return []
    names: list[str] = []

    def walk(node: object, prefix: str) -> None:
        if node.is_leaf():  # type: ignore[attr-defined]
            names.append(prefix or "output")
            return
        children = node.children_specs  # type: ignore[attr-defined]
        ctx = node.context  # type: ignore[attr-defined]
        keyed = isinstance(ctx, (list, tuple)) and len(ctx) == len(children) \
            and all(isinstance(k, str) for k in ctx)
        for i, child in enumerate(children):
            key = str(ctx[i]) if keyed else str(i)
            walk(child, f"{prefix}.{key}" if prefix else (key if keyed else f"output_{key}"))

    walk(spec, "")
    if len(names) == 1 and names[0].startswith("output_"):
        names = ["output"]  # a one-tensor tuple (the flat graph's form)
    return names if len(set(names)) == len(names) else []


def _user_inputs(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _dynamic_dims(gm: torch.fx.GraphModule) -> dict[str, dict[int, str]]:
    """Name each symbolic input dim by its position: dim 0 is ``batch``, dim 1 ``sequence``,
    later ones ``dim{i}``. These names become the ONNX dynamic axes."""
    out: dict[str, dict[int, str]] = {}
    for node in _user_inputs(gm):
        val = node.meta.get("val")
        out[node.name] = {
            i: ("batch", "sequence")[i] if i < 2 else f"dim{i}"
            for i, size in enumerate(getattr(val, "shape", ()))
            if isinstance(size, torch.SymInt)
        }
    return out


def export_module(
    module: torch.nn.Module, example: dict[str, torch.Tensor]
) -> torch.export.ExportedProgram:
    """``torch.export`` an eager module on keyword ``example`` inputs, with dim 0 of every input
    dynamic as ``batch`` and dim 1 of every 2-D+ integer input (token ids, masks) as ``sequence``.

    Raises:
        InputError: an example dim is < 2 (torch.export would specialise it).
        CaptureError: torch.export failed; the message names the construct and usual fixes.
    """
    shapes: dict[str, dict[int, object]] = {}
    for name, t in example.items():
        # Dim.AUTO lets torch.export derive each dim's range (e.g. max_position_embeddings).
        dims: dict[int, object] = {0: Dim.AUTO}
        if t.dim() >= 2 and not t.is_floating_point():
            dims[1] = Dim.AUTO
        for i in dims:
            if t.shape[i] < 2:
                raise InputError(
                    f"example input {name!r} has size {t.shape[i]} at dim {i}; torch.export "
                    "specialises sizes 0 and 1, so use example batch and sequence sizes >= 2"
                )
        shapes[name] = dims
    try:
        return torch.export.export(module, (), kwargs=example, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with a hint below
        raise CaptureError(
            f"torch.export could not capture the model: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Usual fixes: example batch and "
            "sequence sizes >= 2 (dims of size 0/1 get specialised), strict=False, and removing "
            "data-dependent Python control flow from forward()"
        ) from exc


def flat_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` (sharing its parameters) whose ``forward`` takes the placeholders as flat
    positional tensors and returns the flat tuple of output tensors, without pytree specs or
    input-constraint hooks. Every later stage works on this form."""
    graph = copy.deepcopy(gm.graph)
    graph._codegen = torch.fx.graph.CodeGen()
    # torch.export's `_guards_fn` re-checks the export-time input constraints, including the
    # aliasing of the example tensors (an example that was a view adds guards on its `_base`).
    # Inputs are checked against the placeholders' shapes by `check_inputs` instead.
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)
    out = graph.output_node()
    if not isinstance(out.args[0], (tuple, list)):
        out.args = ((out.args[0],),)
    return torch.fx.GraphModule(gm, graph, class_name="CapturedGraph")


def check_inputs(captured: CapturedModel, inputs: dict[str, torch.Tensor], source: str) -> None:
    """Check tensors ``[N, ...]`` against the model's input signature: same rank and dtype kind,
    static dims equal, dynamic dims within the program's range.

    Raises:
        InputError: naming the input, the expected shape and what was found.
    """
    for node in captured.gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        t = inputs[node.name]
        if val is None:
            continue
        want = ["batch" if i == 0 and isinstance(s, torch.SymInt) else
                captured.dynamic_dims.get(node.name, {}).get(i, str(s)) if isinstance(s, torch.SymInt)
                else int(s) for i, s in enumerate(val.shape)]
        problem = None
        if t.dim() != len(want):
            problem = f"rank {t.dim()}"
        elif t.is_floating_point() != val.dtype.is_floating_point:
            problem = f"dtype {t.dtype} (the model takes {val.dtype})"
        else:
            for i, w in enumerate(want):
                if isinstance(w, int) and t.shape[i] != w:
                    problem = f"size {t.shape[i]} at dim {i}"
                elif isinstance(w, str) and w in captured.axis_ranges:
                    lo, hi = captured.axis_ranges[w]
                    if hi is not None and t.shape[i] > hi:
                        problem = f"{w} {t.shape[i]} at dim {i} (the model allows at most {hi})"
        if problem:
            raise InputError(f"{source}: input {node.name!r} has shape {list(t.shape)}, "
                             f"{problem}; the model expects {want}")


#: Ops an index tensor passes through unchanged in value on its way to an embedding lookup.
_VALUE_KEEPING = {"view", "reshape", "_to_copy", "to", "unsqueeze", "squeeze", "clone",
                  "expand", "contiguous", "alias", "type_as", "_unsafe_view", "detach"}


def _index_source(node: object) -> tuple[torch.fx.Node, int] | None:
    """The placeholder or ``arange`` an embedding's index tensor comes from, with the constant
    added to it on the way (``arange(T) + 2``: OPT's offset); None when the index is computed
    otherwise."""
    offset = 0
    while isinstance(node, torch.fx.Node):
        if node.op == "placeholder":
            return node, offset
        if node.op != "call_function" or not node.args:
            return None
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if name == "arange":
            return node, offset
        if name == "add" and isinstance(node.args[1], int) and len(node.args) == 2:
            offset += node.args[1]
        elif name not in _VALUE_KEEPING:
            return None
        node = node.args[0]
    return None


def index_bounds(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Rows of the embedding tables the graph's inputs index directly: ``{input name: V}``
    (token ids must lie in ``[0, V)``), and ``{"<positions>": P}`` for a table indexed by an
    ``arange`` over the sequence (at most ``P`` positions)."""
    out: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.embedding.default:
            continue
        weight, index = node.args[0], node.args[1]
        table = getattr(weight, "meta", {}).get("val")
        found = _index_source(index)
        if table is None or not table.dim() or found is None:
            continue
        src, offset = found
        if src.op == "placeholder":
            if offset:
                continue
            key, rows = src.name, int(table.shape[0])
        else:
            key, rows = "<positions>", int(table.shape[0]) - offset
        out[key] = min(rows, out.get(key, rows))
    return out


def check_index_ranges(captured: CapturedModel, inputs: dict[str, torch.Tensor],
                       source: str) -> None:
    """Token ids within the embedding tables they index and sequences within a learned
    position table (:func:`index_bounds`), before the model is run on them.

    Raises:
        InputError: naming the input, the first bad row, the value and the table's size.
    """
    bounds = index_bounds(captured.gm)
    for name, rows in bounds.items():
        t = inputs.get(name)
        if t is None or t.is_floating_point() or not t.dim():
            continue
        bad = (t < 0) | (t >= rows)
        if bool(bad.any()):
            where = torch.nonzero(bad.reshape(bad.shape[0], -1).any(1)).reshape(-1).tolist()
            value = int(t[where[0]][bad[where[0]]].reshape(-1)[0])
            more = f" (and {len(where) - 1} more rows)" if len(where) > 1 else ""
            raise InputError(f"{source}: input {name!r} holds the id {value} at row {where[0]}"
                             f"{more}, outside the model's vocabulary [0, {rows}) (the rows of "
                             "its embedding table): tokenize with the model's own tokenizer")
    positions = bounds.get("<positions>")
    if positions is not None:
        for name, dims in captured.dynamic_dims.items():
            t = inputs.get(name)
            for i, axis in dims.items():
                if axis == "sequence" and t is not None and t.shape[i] > positions:
                    raise InputError(f"{source}: input {name!r} has sequence length "
                                     f"{t.shape[i]} (every row), beyond the model's "
                                     f"{positions} learned positions; truncate to <= {positions}")


def capture(loaded: LoadedModel, example: dict[str, torch.Tensor] | None = None) -> CapturedModel:
    """Capture ``loaded`` as an fx graph.

    ``example`` (keyword inputs, batch and sequence sizes >= 2) is needed only when ``loaded`` is
    an eager module (a Hugging Face folder or a trusted pickle).

    Raises:
        CaptureError: torch.export failed.
        InputError: an eager module was given without example inputs.
    """
    if loaded.program is not None:
        program = loaded.program
    else:
        if example is None:
            raise InputError(
                f"{loaded.source} is a {loaded.format} model: pass --data so it can be captured "
                "with example inputs"
            )
        assert loaded.module is not None
        program = export_module(loaded.module, example)
    gm = flat_graph_module(program.module())
    return CapturedModel(
        program=program,
        gm=gm,
        input_names=[n.name for n in _user_inputs(gm)],
        dynamic_dims=_dynamic_dims(gm),
        axis_ranges=_axis_ranges(program, gm),
        output_names=output_names(program),
    )


def _as_int(x: object) -> int | None:
    """``int(x)`` for a finite sympy bound, None for ±infinity."""
    try:
        return int(x)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def _axis_ranges(program: torch.export.ExportedProgram,
                 gm: torch.fx.GraphModule) -> dict[str, tuple[int, int | None]]:
    out: dict[str, tuple[int, int | None]] = {}
    dims = _dynamic_dims(gm)
    for node in _user_inputs(gm):
        for i, axis in dims.get(node.name, {}).items():
            sym = node.meta["val"].shape[i].node.expr
            vr = program.range_constraints.get(sym)
            if vr is None:
                continue
            lo = max(_as_int(vr.lower) or 2, 2)
            hi = _as_int(vr.upper)
            prev = out.get(axis)
            if prev is not None:  # inputs sharing an axis: intersect their ranges
                lo = max(lo, prev[0])
                hi = hi if prev[1] is None else (prev[1] if hi is None else min(hi, prev[1]))
            out[axis] = (lo, hi)
    return out
