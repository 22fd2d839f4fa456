"""Stage 2, capture: the model's fx ``GraphModule`` via ``torch.export``.

transformers 5 has no fx tracer (``torch.fx.symbolic_trace`` fails on HF attention), so every model
goes through ``torch.export``. Attention is found on this pre-decomposition ATen graph, where
``scaled_dot_product_attention`` is still one node.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

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
    """

    program: torch.export.ExportedProgram
    gm: torch.fx.GraphModule
    input_names: list[str]
    dynamic_dims: dict[str, dict[int, str]]
    axis_ranges: dict[str, tuple[int, int | None]]


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
