"""Export and check the stateful decoder graph (:mod:`dtr_compile.passes.stateful`).

* :func:`export_stateful_onnx`: ``torch.onnx.export(dynamo=True)`` of a
  :class:`~dtr_compile.passes.stateful.StatefulGraph` with dynamic ``batch``, ``sequence`` (t),
  ``past_sequence`` (P) and ``total_sequence`` (P + t) axes. Softmax layers export as ONNX
  ``Attention`` (opset 23) on the concatenated past and new keys (or MatMul/Softmax below 23, see
  :func:`~dtr_compile.exporters.onnx.prepare_for_export`); linear layers as plain ops (the chunked
  causal form serves prefill and decode alike), or in the fused form their recurrences as
  ``LinearAttention`` nodes (:mod:`~dtr_compile.exporters.fused`).
* :func:`greedy_reference`: greedy continuation by full recomputation of a prefill graph, the
  reference; :func:`greedy_stateful`: the same in onnxruntime (or in PyTorch on the stateful
  graph) with one prefill then one token per step; :func:`decode_parity`: the two compared,
  token for token and per-step logits max-abs / rel-RMS.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.export import Dim

from dtr_compile.device import usable_cpus
from dtr_compile.errors import DtrError, first_line, root_cause_line
from dtr_compile.exporters.fused import (
    ORT_DOMAIN,
    finish,
    is_fused,
    torch_max_opset,
    tracing,
    translation_table,
)
from dtr_compile.exporters.onnx import (
    DEFAULT_OPSET,
    _no_rotary_fusion,
    optimize_onnx,
    prepare_for_export,
    wants_external_data,
)
from dtr_compile.exporters.phases import merge_phases
from dtr_compile.fileio import atomic_model_path, check_copied_links
from dtr_compile.linear.base import extend_only
from dtr_compile.passes.stateful import (
    MASK,
    TOKENS,
    StatefulGraph,
    StatefulLinear,
    shared_kv_cache,
)
from dtr_compile.runtime.generate import KV_CACHE_KEY

#: ``kv_cache`` forms of :func:`export_stateful_onnx`: ``shared``, onnxruntime's
#: ``GroupQueryAttention`` over a KV buffer a runner may share between past and present (no
#: per-step copy of the cache); ``concat``, standard ops (``Concat`` + ``Attention``), what
#: TensorRT imports.
KV_FORMS = ("shared", "concat")


def _example(sg: StatefulGraph, batch: int = 2, t: int = 3, past: int = 4) -> dict[str, torch.Tensor]:
    feed = {TOKENS: torch.ones(batch, t, dtype=torch.int64),
            MASK: torch.ones(batch, past + t, dtype=torch.int64)}
    return feed | sg.empty_past(batch, length=past)


def _dynamic_shapes(sg: StatefulGraph, *, static_t: bool = False,
                    exact_past: bool = True) -> tuple[dict[int, Any], ...]:
    """``dynamic_shapes`` of ``sg``'s inputs for ``torch.export``; ``static_t``: the new tokens'
    axis fixed at 1 (the one-token graph); ``exact_past``: the KV caches hold exactly the past's
    ``P`` positions (False for shared buffers, which may be longer: the mask's length must then
    stay independent of theirs)."""
    spec = sg.dynamic_dims()
    past = Dim("past_sequence")
    has_past = any("past_sequence" in axes.values() for axes in spec.values())
    # total = past + sequence: torch.export derives it from a dynamic t; at t = 1 with exact
    # pasts it is past + 1, a derived dim (AUTO is refused once the Concat of past and new keys
    # ties the mask to the named past axis)
    total = past + 1 if static_t and exact_past and has_past else Dim.AUTO
    dims = {"batch": Dim("batch"), "sequence": Dim("sequence"), "past_sequence": past,
            "total_sequence": total}
    return tuple({i: dims[a] for i, a in spec.get(n, {}).items()
                  if not (static_t and a == "sequence")} for n in sg.input_names)


def _name_axes(model: Any, sg: StatefulGraph) -> None:  # noqa: ANN401 - an onnx_ir Model
    """Replace the exporter's symbol names (``s17``, ``s17 + s70``) on the inputs and outputs of
    ``model`` (in memory, before it is saved) by ``batch`` / ``sequence`` / ``past_sequence`` /
    ``total_sequence``."""
    import onnx_ir as ir

    spec = sg.dynamic_dims()
    names: dict[str, str] = {}
    for value in model.graph.inputs:
        for i, d in enumerate(value.shape or ()):
            axis = spec.get(value.name, {}).get(i)
            if isinstance(d, ir.SymbolicDim) and d.value and axis:
                names.setdefault(d.value, axis)
    for value in (*model.graph.inputs, *model.graph.outputs):
        if value.shape is None:
            continue
        dims = [ir.SymbolicDim(names[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in names
                else ir.SymbolicDim("total_sequence")
                if isinstance(d, ir.SymbolicDim) and d.value and "+" in d.value else d
                for d in value.shape]
        value.shape = ir.Shape(dims)


def _gqa_schema() -> Any:  # noqa: ANN401 - onnx.defs.OpSchema
    """The inputs, outputs and attributes of onnxruntime's ``com.microsoft``
    ``GroupQueryAttention`` (1.32) that :func:`_gqa_translation` uses."""
    from onnx.defs import OpSchema

    opt, one = OpSchema.FormalParameterOption.Optional, OpSchema.FormalParameterOption.Single
    names = ("query", "key", "value", "past_key", "past_value", "seqlens_k",
             "total_sequence_length", "cos_cache", "sin_cache", "position_ids", "attention_bias",
             "head_sink", "k_scale", "v_scale", "q_norm_weight", "k_norm_weight",
             "query_seqlens")
    types = {"seqlens_k": "M", "total_sequence_length": "M", "query_seqlens": "M",
             "position_ids": "I"}
    return OpSchema(
        "GroupQueryAttention", ORT_DOMAIN, 1,
        inputs=[OpSchema.FormalParameter(n, types.get(n, "T"),
                                         param_option=one if n in ("query", "seqlens_k",
                                                                   "total_sequence_length")
                                         else opt) for n in names],
        outputs=[OpSchema.FormalParameter(n, "T", param_option=opt if i else one)
                 for i, n in enumerate(("output", "present_key", "present_value"))],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("M", ["tensor(int32)"], ""), ("I", ["tensor(int64)"], "")],
        attributes=[OpSchema.Attribute(n, t, "") for n, t in (
            ("num_heads", OpSchema.AttrType.INT), ("kv_num_heads", OpSchema.AttrType.INT),
            ("scale", OpSchema.AttrType.FLOAT))])


def _gqa_translation() -> dict[Any, Any]:
    """``custom_translation_table`` entry: :data:`~dtr_compile.passes.stateful.
    kv_cache_attention_op` → ``GroupQueryAttention`` (``com.microsoft``).

    The layout is the decoder's: left padding stays where the attention mask puts it, every row
    holds ``P + t`` cache positions (``seqlens_k = P + t − 1``, ``query_seqlens = t``, which
    lets a batch extend a past by several tokens), and padding keys are masked by an additive
    ``attention_bias [B, 1, t, P + t]`` (0 / fp32 min) from ``attention_mask``; the op adds its
    own causal mask. The past and present buffers are ``[B, Hkv, L, D]``: ``L = P`` gives a
    present of ``P + t`` positions (the op copies the past), and one buffer of ``L >= P + t``
    bound as both past and present is written in place at positions ``P … P + t − 1``.
    """
    import torch
    from onnx import TensorProto
    from onnxscript import opset18, values

    op: Any = opset18
    gqa = values.Op(values.Opset(ORT_DOMAIN, 1), "GroupQueryAttention", _gqa_schema())

    def translate(q, k, v, past_key, past_value, attention_mask, scale: float):  # noqa: ANN001, ANN202
        heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[3]
        if not all(isinstance(x, int) for x in (heads, kv_heads, dim)):
            raise ValueError("GroupQueryAttention needs static head counts and head size")
        tokens = op.Constant(value_ints=[0, 0, -1])
        q3, k3, v3 = (op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), tokens) for x in (q, k, v))
        mask_shape = op.Shape(attention_mask)  # [B, P + t]
        batch = op.Slice(mask_shape, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]))
        total = op.Slice(mask_shape, op.Constant(value_ints=[1]), op.Constant(value_ints=[2]))
        t = op.Slice(op.Shape(q), op.Constant(value_ints=[2]), op.Constant(value_ints=[3]))
        seqlens_k = op.Cast(op.Expand(op.Sub(total, op.Constant(value_ints=[1])), batch),
                            to=TensorProto.INT32)  # [B]
        total_len = op.Cast(op.Squeeze(total, op.Constant(value_ints=[0])), to=TensorProto.INT32)
        query_lens = op.Cast(op.Expand(t, batch), to=TensorProto.INT32)  # [B]
        real = op.Greater(attention_mask, op.Constant(value_int=0))  # [B, P + t]
        bias = op.Where(real, op.Constant(value_float=0.0),
                        op.Constant(value_float=float(torch.finfo(torch.float32).min)))
        bias = op.Unsqueeze(bias, op.Constant(value_ints=[1, 2]))  # [B, 1, 1, P + t]
        bias = op.Expand(bias, op.Concat(batch, op.Constant(value_ints=[1]), t, total, axis=0))
        out, present_key, present_value = gqa(
            q3, k3, v3, past_key, past_value, seqlens_k, total_len, None, None, None, bias,
            None, None, None, None, None, query_lens,
            num_heads=heads, kv_num_heads=kv_heads, scale=scale, _outputs=3)
        out = op.Reshape(out, op.Constant(value_ints=[0, 0, heads, dim]))  # [B, t, H, D]
        return op.Transpose(out, perm=[0, 2, 1, 3]), present_key, present_value

    return {torch.ops.dtr_compile.kv_cache_attention.default: translate}


def export_stateful_onnx(sg: StatefulGraph, path: str | os.PathLike[str], *,
                         opset: int = DEFAULT_OPSET, fused: bool | None = None,
                         external_data: bool | None = None, kv_cache: str = "shared",
                         metadata: Mapping[str, str] | None = None, optimize: bool = True,
                         on_phase: Callable[[str], None] | None = None,
                         parallel: bool | None = None) -> Path:
    """Write ``sg`` as an ONNX model at ``path`` (atomically), inputs and outputs named as in
    ``sg`` and the ONNX checker run on it. ``fused``: the students' recurrences as ONNX
    ``LinearAttention`` nodes (:mod:`~dtr_compile.exporters.fused`; default: from opset 27 on).
    ``external_data``: the weights in ``NAME.data`` beside it (default: when they exceed
    :data:`~dtr_compile.exporters.onnx.EXTERNAL_DATA_BYTES`). ``kv_cache``: the softmax layers'
    form (:data:`KV_FORMS`; recorded in the model's metadata under
    :data:`~dtr_compile.runtime.generate.KV_CACHE_KEY`, which tells a runner how it may bind them):
    ``shared`` (onnxruntime's ``GroupQueryAttention``; the default) or ``concat`` (standard
    ops, for TensorRT). ``metadata`` goes to the model's ``metadata_props``
    (:func:`decoder_metadata`). ``on_phase`` is called with a line naming each step as it starts
    (trace, conversion, save, check). ``parallel``: export the one-token graph in a forked
    process while this one exports the prefill graph (default: where ``os.fork`` exists and
    this process may use more than one core; the two exports take about the same time, so the
    decoder's export takes ~40 % less wall time on 2 cores, at the cost of a second process's
    memory for the trace).

    Raises:
        DtrError: torch.export or torch.onnx failed, or the checker rejected the model.
        ValueError: an unknown ``kv_cache``.
    """
    import onnx

    if kv_cache not in KV_FORMS:
        raise ValueError(f"kv_cache must be one of {KV_FORMS}, got {kv_cache!r}")
    phase = on_phase or (lambda _: None)
    fused = is_fused(opset) if fused is None else fused
    shared = kv_cache == "shared"
    split = split_phases(sg, fused)
    target = Path(path)
    with atomic_model_path(target) as tmp:
        step = None
        if split:  # the one-token graph, beside the prefill when a second core is free
            step = _side_process(lambda: _to_onnx(
                sg, opset=opset, fused=fused, shared=shared, optimize=optimize, step=True,
                split=True, phase=lambda _: None).model, tmp.parent / "step.onnx",
                parallel=parallel)
            if step.running:
                phase("tracing the one-token step in a second process")
        try:
            prog = _to_onnx(sg, opset=opset, fused=fused, shared=shared, optimize=optimize,
                            step=False, split=split, phase=phase)
            if step is not None:  # both under one If (exporters/phases.py)
                phase("waiting for the one-token step" if step.running
                      else "tracing and converting the one-token step")
                prog.model = merge_phases(step.result(), prog.model)
        finally:
            if step is not None:
                step.stop()  # a failed or interrupted prefill export leaves no child behind
        phase("saving")
        for key, value in (metadata or {}).items():
            prog.model.metadata_props[key] = value
        prog.model.metadata_props[KV_CACHE_KEY] = kv_cache
        _name_axes(prog.model, sg)
        prog.save(str(tmp), external_data=wants_external_data(prog.model, external_data))
        try:
            finish(tmp, opset, fused)
        except Exception as exc:  # noqa: BLE001
            raise DtrError(f"converting the stateful ONNX to opset {opset} failed: "
                           f"{first_line(exc)}") from exc
        phase("checking (ONNX checker)")
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise DtrError(f"the stateful ONNX fails the ONNX checker: {exc}") from exc
    return target


class _SideProcess:
    """A function returning an ``onnx_ir`` model, run in a forked child (:func:`_side_process`)
    or, when that is not possible, here by :meth:`result`."""

    def __init__(self, fn: Callable[[], Any], path: Path, parallel: bool) -> None:
        self.fn, self.path = fn, path
        self.pid: int | None = None
        self.error = path.with_suffix(".error")
        if parallel:
            self._fork()

    @property
    def running(self) -> bool:
        return self.pid is not None

    def _fork(self) -> None:
        import onnx_ir as ir

        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid:
            self.pid = pid
            return
        code = 1  # the child: never returns, never runs the parent's handlers
        try:
            _die_with_parent(parent)
            for sig in (signal.SIGINT, signal.SIGTERM):  # the parent's handlers are not
                if signal.getsignal(sig) is not signal.SIG_IGN:  # ours; what it ignores, we do
                    signal.signal(sig, signal.SIG_DFL)
            # libgomp's thread pool does not survive fork: one thread, no parallel region
            torch.set_num_threads(1)
            ir.save(self.fn(), self.path, external_data=self.path.name + ".data")
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            with contextlib.suppress(Exception):
                self.error.write_text(str(exc) if isinstance(exc, DtrError)
                                      else f"{type(exc).__name__}: {first_line(exc)}")
        finally:
            os._exit(code)

    def result(self) -> Any:  # noqa: ANN401 - an onnx_ir Model
        """The model: the child's (waits for it), or, with no child, ``fn`` run here.

        Raises:
            DtrError: the child failed (its error), or was killed.
        """
        import onnx_ir as ir

        if self.pid is None:
            return self.fn()
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        if os.waitstatus_to_exitcode(status) != 0 or not self.path.is_file():
            why = (self.error.read_text() if self.error.is_file()
                   else f"exit status {os.waitstatus_to_exitcode(status)}")
            raise DtrError(f"{why} (in a second process)"
                           if why.startswith("stateful ONNX export failed") else
                           f"stateful ONNX export failed (one-token step, second process): {why}")
        # in memory: the step file is removed with the export's temporary folder
        return ir.external_data.load_to_model(ir.load(self.path))

    def stop(self) -> None:
        """Kill and reap the child if it is still running."""
        if self.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            self.pid = None


def _die_with_parent(parent: int) -> None:
    """In a forked child: be killed when ``parent`` dies, even by SIGKILL (Linux
    ``prctl(PR_SET_PDEATHSIG)``), so that a killed compile leaves no orphan export tracing on
    for minutes and writing into its dead staging folder; exit now if it already died."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() != parent:
        os._exit(1)


def _side_process(fn: Callable[[], Any], path: Path, *, parallel: bool | None) -> _SideProcess:
    """``fn`` (returning an ``onnx_ir`` model) started in a forked child that saves its model
    at ``path`` (when ``parallel``, default: ``os.fork`` exists and more than one core is
    usable), else kept to be run here by :meth:`_SideProcess.result`."""
    if parallel is None:
        parallel = usable_cpus() > 1
    return _SideProcess(fn, path, parallel and hasattr(os, "fork"))


def split_phases(sg: StatefulGraph, fused: bool) -> bool:
    """Whether ``sg`` has a linear layer whose one-token step and chunked form differ (then the
    decoder is two graphs under one ``If``, :mod:`~dtr_compile.exporters.phases`); False for
    the original and for students whose fused op serves every ``t``."""
    with tracing(fused):
        return any(isinstance(m, StatefulLinear) and not m.student.one_form()
                   for m in sg.modules.values())


def _to_onnx(sg: StatefulGraph, *, opset: int, fused: bool, shared: bool, optimize: bool,
             step: bool, split: bool, phase: Callable[[str], None]) -> Any:  # noqa: ANN401
    """``torch.export`` then ``torch.onnx`` of ``sg``: at a static ``t = 1`` (``step``), or with
    a dynamic ``t`` (linear layers in their chunked form alone when ``split``). Returns the
    ``torch.onnx.ONNXProgram``.

    Raises:
        DtrError: either step failed.
    """
    from dtr_compile.capture import flat_graph_module

    what = "one-token step" if step else ("prefill" if split else "decoder")
    example = _example(sg, t=1 if step else 3)
    args = tuple(example[n] for n in sg.input_names)
    shapes = _dynamic_shapes(sg, static_t=step, exact_past=not shared)
    table = (translation_table(fused) or {}) | (_gqa_translation() if shared else {})
    try:
        with warnings.catch_warnings(), _no_rotary_fusion():
            warnings.simplefilter("ignore")
            phase(f"tracing the {what} (torch.export)")
            with contextlib.ExitStack() as stack:
                stack.enter_context(tracing(fused))
                if shared:
                    stack.enter_context(shared_kv_cache())
                if split and not step:
                    stack.enter_context(extend_only())
                program = torch.export.export(sg.gm, args, dynamic_shapes=shapes, strict=False)
            flat = flat_graph_module(program.module())
            gm = prepare_for_export(flat, opset)
            phase(f"converting the {what} to ONNX (torch.onnx)")
            # an unchanged graph goes to torch.onnx as the program already traced: one trace
            # fewer (the exporter would trace the module again)
            prog = torch.onnx.export(program if gm is flat else gm, args, dynamo=True,
                                     opset_version=min(opset, torch_max_opset()),
                                     input_names=list(sg.input_names),
                                     output_names=list(sg.output_names),
                                     dynamic_shapes=None if gm is flat else shapes,
                                     verbose=False, optimize=False,
                                     custom_translation_table=table or None)
            if optimize and prog is not None:
                phase(f"optimizing the {what} (constant folding)")
                optimize_onnx(prog.model)
    except Exception as exc:  # noqa: BLE001
        raise DtrError(f"stateful ONNX export failed ({what}): {root_cause_line(exc)}") from exc
    assert prog is not None
    return prog


# --- greedy decoding: reference and stateful ---------------------------------------------------


@dataclass
class Continuation:
    """A greedy continuation.

    Attributes:
        tokens: ``[B, N]`` int64, the generated tokens.
        logits: ``[B, N, V]`` fp32, the logits each token was chosen from.
    """

    tokens: torch.Tensor
    logits: torch.Tensor


def greedy_reference(prefill: Callable[..., Any], input_ids: torch.Tensor, steps: int,
                     attention_mask: torch.Tensor | None = None) -> Continuation:
    """Greedy continuation of ``steps`` tokens by full recomputation: every step runs
    ``prefill(input_ids[, attention_mask])`` on the whole sequence so far (first output:
    ``logits [B, T, V]``). The reference the stateful decoder must equal.

    Args:
        prefill: the captured or hybrid prefill graph (flat inputs).
        input_ids: ``[B, T0]``.
        attention_mask: ``[B, T0]`` or None (the graph has no mask input).
    """
    ids, mask = input_ids, attention_mask
    toks, logits = [], []
    with torch.inference_mode():
        for _ in range(steps):
            out = prefill(ids, mask) if mask is not None else prefill(ids)
            out = out[0] if isinstance(out, (tuple, list)) else out
            last = out[:, -1].float()  # [B, V]
            nxt = last.argmax(-1, keepdim=True)  # [B, 1]
            toks.append(nxt)
            logits.append(last)
            ids = torch.cat([ids, nxt], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return Continuation(torch.cat(toks, 1), torch.stack(logits, 1))


def forced_reference(prefill: Callable[..., Any], input_ids: torch.Tensor, tokens: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> Continuation:
    """The reference of a given continuation by full recomputation, in one pass: ``prefill`` on
    ``[input_ids, tokens[:, :-1]]``, and at each step the logits of the position before the
    step's token and their argmax, the token full recomputation picks after that prefix.

    When ``tokens`` is a greedy continuation whose every token equals the reference's, it *is*
    the greedy continuation by full recomputation (:func:`greedy_reference`, one pass instead of
    one per step); at the first step where they differ, the two continuations part there.

    Args:
        prefill: the captured or hybrid prefill graph (flat inputs).
        input_ids: ``[B, T0]``; tokens: ``[B, N]``, the continuation to check.
        attention_mask: ``[B, T0]`` or None (the graph has no mask input).
    """
    n = tokens.shape[1]
    ids = torch.cat([input_ids, tokens[:, :n - 1]], dim=1)
    with torch.inference_mode():
        if attention_mask is not None:
            mask = torch.cat([attention_mask, torch.ones_like(tokens[:, :n - 1])], dim=1)
            out = prefill(ids, mask)
        else:
            out = prefill(ids)
        out = out[0] if isinstance(out, (tuple, list)) else out
    logits = out[:, input_ids.shape[1] - 1:].float()  # [B, N, V]
    return Continuation(logits.argmax(-1), logits)


def _present_to_past(name: str) -> str:
    layer, _, rest = name.removeprefix("present.").partition(".")
    return f"past_key_values.{layer}.{rest}" if rest in ("key", "value") else f"past.{layer}.{rest}"


def greedy_stateful(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                    empty_past: Mapping[str, torch.Tensor], input_ids: torch.Tensor, steps: int,
                    attention_mask: torch.Tensor | None = None) -> Continuation:
    """Greedy continuation with a stateful decoder: one prefill of the prompt (``P = 0``), then
    one token per step with the returned ``present.*`` as the next ``past*``.

    Args:
        run: ``{input name: array} → {output name: array}`` (an onnxruntime session, or the
            PyTorch stateful graph, see :func:`ort_runner` / :func:`torch_runner`).
        empty_past: the past inputs for ``P = 0`` (:meth:`StatefulGraph.empty_past`).
        input_ids: ``[B, T0]``; attention_mask: ``[B, T0]`` (left padding allowed) or None.
    """
    b = input_ids.shape[0]
    mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).long()
    feed: dict[str, np.ndarray] = {k: v.numpy() for k, v in empty_past.items()}
    feed |= {TOKENS: input_ids.numpy(), MASK: mask.numpy()}
    toks, logits = [], []
    for _ in range(steps):
        out = run(feed)
        last = torch.from_numpy(np.asarray(out["logits"])[:, -1]).float()  # [B, V]
        nxt = last.argmax(-1, keepdim=True)
        toks.append(nxt)
        logits.append(last)
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1)
        feed = {_present_to_past(k): v for k, v in out.items() if k != "logits"}
        feed |= {TOKENS: nxt.numpy(), MASK: mask.numpy()}
    return Continuation(torch.cat(toks, 1), torch.stack(logits, 1))


def ort_runner(path: str | os.PathLike[str], threads: int | None = 1, *, prepack: bool = True,
               capacity: int = 64) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """``feed → outputs`` by name through an onnxruntime CPU session of ``path`` (``prepack``:
    see :func:`~dtr_compile.exporters.onnx.ort_session`), as a runner runs it
    (:class:`~dtr_compile.runtime.generate.StatefulSession`): a decoder whose KV caches may be
    shared gets, at its first call, one buffer per cache with room for ``capacity`` more
    positions, which every later call writes in place (its ``present.*`` KV outputs are those
    buffers, longer than ``P + t``: feed them back as they are)."""
    from dtr_compile.runtime.generate import StatefulSession

    sess = StatefulSession(path, threads, prepack=prepack)
    names = {s.past: s.present for s in sess.sig.states}
    kv = [s.past for s in sess.sig.states if s.kind == "kv"]

    def run(feed: dict[str, Any]) -> dict[str, Any]:
        ids, mask = np.asarray(feed[TOKENS]), np.asarray(feed[MASK])
        past = {k: v for k, v in feed.items() if k in names}
        past_len = mask.shape[1] - ids.shape[1]
        if sess.kv_shared and kv and all(
                (v.shape if isinstance(v, np.ndarray) else v.shape())[2] == past_len
                for k, v in past.items() if k in kv):
            past = sess.with_capacity(past, past_len, mask.shape[1] + capacity)
        logits, present = sess.step(ids, mask, past)
        return {"logits": logits} | {names[k]: v for k, v in present.items()}
    return run


def torch_runner(sg: StatefulGraph) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """``feed → outputs`` by name through the stateful graph in PyTorch."""
    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = sg.run({k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()})
        return {k: v.numpy() for k, v in out.items()}
    return run


@dataclass
class DecodeParity:
    """Stateful continuation vs the reference by full recomputation.

    Attributes:
        steps: tokens generated per row.
        batch: rows.
        tokens_equal: every row's continuation equals the reference token for token.
        first_mismatch: the first step where some row differs (None when equal).
        max_abs / rel_rms: per step (up to the first mismatch), over all rows, of the logits.
    """

    artifact: str
    steps: int
    batch: int
    tokens_equal: bool
    first_mismatch: int | None
    max_abs: list[float] = field(default_factory=list)
    rel_rms: list[float] = field(default_factory=list)

    @property
    def worst_max_abs(self) -> float:
        return max(self.max_abs, default=0.0)

    @property
    def worst_rel_rms(self) -> float:
        return max(self.rel_rms, default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"worst_max_abs": self.worst_max_abs,
                               "worst_rel_rms": self.worst_rel_rms}


def decode_parity(artifact: str, got: Continuation, ref: Continuation) -> DecodeParity:
    """Compare a stateful continuation with the reference (same prompts)."""
    diff = (got.tokens != ref.tokens).any(dim=0)  # [N]
    bad = [i for i, d in enumerate(diff.tolist()) if d]
    first = bad[0] if bad else None
    n = got.tokens.shape[1] if first is None else first + 1  # the logits of the mismatching step count
    max_abs, rel = [], []
    for i in range(n):
        a, r = got.logits[:, i].double(), ref.logits[:, i].double()
        max_abs.append(float((a - r).abs().max()))
        rel.append(float((a - r).norm() / r.norm().clamp_min(1e-30)))
    return DecodeParity(artifact, got.tokens.shape[1], got.tokens.shape[0], first is None, first,
                        max_abs, rel)


def left_pad(prompts: Sequence[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths ``[T_i]`` → ``input_ids, attention_mask: [B, max T_i]``, left
    padded."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(prompts), width, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


# --- the compile's decoder artifacts -----------------------------------------------------------


def decoder_paths(output: str | os.PathLike[str]) -> dict[str, Path]:
    """``<output>.decoder.onnx`` (the hybrid) and ``<output>.original.decoder.onnx``."""
    out = Path(output)
    return {"hybrid": out.with_suffix(".decoder.onnx"),
            "original": out.with_suffix(".original.decoder.onnx")}


def parity_prompts(inputs: Mapping[str, torch.Tensor], *, rows: int = 2,
                   lengths: Sequence[int] = (16, 11)) -> list[torch.Tensor]:
    """Prompts for the decode parity check: the first ``rows`` validation rows' real tokens (by
    their ``attention_mask``, if any), cut to ``lengths`` (different lengths, so the batch is
    left padded)."""
    ids = inputs[TOKENS]
    mask = inputs.get(MASK)
    out = []
    for r in range(min(rows, len(ids))):
        row = ids[r] if mask is None else ids[r][mask[r] > 0]
        out.append(row[: max(1, lengths[r % len(lengths)])].clone())
    return out


def fit_decode_check(prompts: Sequence[torch.Tensor], steps: int, table: int | None
                     ) -> tuple[list[torch.Tensor], int]:
    """Prompts and greedy steps of the decoder check that stay inside a learned position table
    of ``table`` rows (None: no table, unchanged): prompts cut to at most half the table when
    they and ``steps`` do not fit, then the steps cut to what is left."""
    out = list(prompts)
    longest = max(len(p) for p in out)
    if table is None or longest + steps <= table:
        return out, steps
    keep = min(longest, max(1, table // 2))
    out = [p[:keep] for p in out]
    return out, max(1, min(steps, table - max(len(p) for p in out)))


def check_decoder(path: str | os.PathLike[str], sg: StatefulGraph, prefill: Callable[..., Any],
                  prompts: Sequence[torch.Tensor], steps: int, *, has_mask: bool) -> DecodeParity:
    """Greedy ``steps`` tokens from the ONNX decoder at ``path`` on the left-padded batch of
    ``prompts``, against each prompt's continuation alone by full recomputation of ``prefill``
    (:func:`forced_reference`: one pass per prompt); both fitted inside a learned position table
    (:func:`fit_decode_check`), which cannot index past its last row."""
    prompts, steps = fit_decode_check(prompts, steps, position_table(sg))
    ids, mask = left_pad(prompts)
    got = greedy_stateful(ort_runner(path, prepack=False), sg.empty_past(len(prompts)), ids, steps, mask)
    refs = [forced_reference(prefill, p[None], got.tokens[i:i + 1],
                             torch.ones(1, len(p), dtype=torch.long) if has_mask else None)
            for i, p in enumerate(prompts)]
    ref = Continuation(torch.cat([r.tokens for r in refs]), torch.cat([r.logits for r in refs]))
    return decode_parity(str(path), got, ref)


#: Files of a Hugging Face tokenizer (copied from a model folder; never its weights).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja")


def find_model_tokenizer(model: str | os.PathLike[str]) -> Path | None:
    """The tokenizer that came with the input model: a Hugging Face folder holding
    ``tokenizer.json`` or ``tokenizer_config.json``; for a file ``X.pt``, ``X.tokenizer/`` or
    ``tokenizer/`` beside it (``examples/smollm2/prepare.py`` writes ``model.tokenizer/``).
    None when there is none."""
    p = Path(model)
    if p.is_dir():
        return p if any((p / f).is_file() for f in TOKENIZER_FILES[:2]) else None
    for cand in (p.with_name(p.name.split(".")[0] + ".tokenizer"), p.parent / "tokenizer"):
        if cand.is_dir():
            return cand
    return None


def tokenizer_files(source: Path) -> list[Path]:
    """The files :func:`copy_tokenizer` copies from ``source``: all files of a
    ``*.tokenizer``/``tokenizer`` folder, only :data:`TOKENIZER_FILES` of a model folder.

    Links are followed only within the folder (see
    :func:`dtr_compile.fileio.check_copied_links`).

    Raises:
        InputError: a link leads elsewhere (named).
    """
    names = TOKENIZER_FILES if not (source.name.endswith(".tokenizer")
                                    or source.name == "tokenizer") else None
    cands = [source / f for f in names] if names is not None else sorted(source.iterdir())
    files = [f for f in cands if f.is_file()]
    check_copied_links(files, source)
    return files


def tokenizer_path(output: str | os.PathLike[str]) -> Path:
    """``<output name up to its first dot>.tokenizer/`` (``hybrid.onnx`` → ``hybrid.tokenizer``),
    where ``dtr-compile generate`` looks for it beside ``hybrid.decoder.onnx``."""
    out = Path(output)
    return out.with_name(out.name.split(".")[0] + ".tokenizer")


def copy_tokenizer(source: Path, output: str | os.PathLike[str],
                   write_to: Callable[[Path], Path] | None = None) -> Path:
    """Copy the tokenizer files of ``source`` (all files of a ``*.tokenizer``/``tokenizer``
    folder, only :data:`TOKENIZER_FILES` of a model folder) to :func:`tokenizer_path`.

    The folder is a staged artifact like the others: written where ``write_to`` (the run's
    :meth:`dtr_compile.fileio.Staging.path`) says and moved into place, replacing an older copy
    whole, with the run's other artifacts; without ``write_to`` it is staged and moved at once.
    Files get an artifact's mode (:func:`dtr_compile.fileio.copy_artifact`), the folder that of
    the folder it replaces, else ``0o777`` less the umask. Nothing is copied when ``source`` is
    that folder already. Returns the final path."""
    from dtr_compile.fileio import Staging, copy_artifact

    target = tokenizer_path(output)
    if target.resolve() == source.resolve():  # the model's own X.tokenizer/: already in place
        return target
    files = tokenizer_files(source)
    staging = Staging(target) if write_to is None else None
    try:
        dest = (staging.path if staging is not None else write_to)(target)  # type: ignore[misc]
        dest.mkdir()
        for f in files:
            copy_artifact(f, dest / f.name, like=target / f.name)
        if staging is not None:
            staging.commit()
    finally:
        if staging is not None:
            staging.discard()
    return target


def copy_model_tokenizer(model: str | os.PathLike[str], output: str | os.PathLike[str],
                         log: Callable[[str], None] = lambda _: None,
                         write_to: Callable[[Path], Path] | None = None) -> dict[str, str]:
    """The input ``model``'s tokenizer (:func:`find_model_tokenizer`) copied beside ``output``
    (:func:`copy_tokenizer`, staged through ``write_to``), for every model, encoders too:
    ``{"tokenizer": path}`` for the report's artifacts, ``{}`` when the model came without one."""
    source = find_model_tokenizer(model)
    if source is None:
        return {}
    copied = str(copy_tokenizer(source, output, write_to=write_to))
    log(f"wrote {copied} (the tokenizer of {source})")
    return {"tokenizer": copied}

# --- what a decoder carries about its model (issue 25: inspect, generate, genai-folder) --------


def decoder_metadata(sg: StatefulGraph, sites: Sequence[Any], linear: Sequence[str],
                     source: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """``metadata_props`` of a stateful decoder ONNX: the site record every ONNX model of a
    compile carries (:func:`~dtr_compile.exporters.onnx.sites_metadata`, read by ``inspect``),
    and :data:`~dtr_compile.runtime.generate.DECODER_KEY`, the model's description that
    ``generate`` and ``genai-folder`` need and the decoder's inputs do not show.

    From the graph: ``num_attention_heads`` ``H``, ``num_key_value_heads`` ``Hkv`` and
    ``head_size`` ``Dk`` of the first site; ``hidden_size`` ``C`` and ``vocab_size`` ``V`` from
    the token embedding ``[V, C]`` (the one indexed by ``input_ids``); ``position_table``: the
    rows of a learned position embedding (one indexed by the positions), the positions the
    decoder can see at all (None when positions are computed, e.g. RoPE); ``num_hidden_layers``.
    From ``source``, a Hugging Face folder: ``model_type``, ``max_position_embeddings`` and
    ``hidden_size`` of its ``config.json`` (None without one).

    Args:
        sites: the compile's attention sites in graph order (``.id``, ``.module_path``, heads).
        linear: ids of the sites that are linear attention in this decoder.
    """
    import json

    from dtr_compile.exporters.onnx import sites_metadata
    from dtr_compile.runtime.generate import DECODER_KEY

    embed, table = _embeddings(sg)
    config = _source_config(source)
    first = sites[0] if sites else None
    info = {
        "model_type": config.get("model_type"),
        "num_attention_heads": getattr(first, "num_heads", None),
        "num_key_value_heads": getattr(first, "num_kv_heads", None),
        "head_size": getattr(first, "head_dim", None),
        "hidden_size": config.get("hidden_size") or (embed[1] if embed else None),
        "num_hidden_layers": max((lay.layer for lay in sg.layers), default=-1) + 1,
        "vocab_size": embed[0] if embed else config.get("vocab_size"),
        "max_position_embeddings": config.get("max_position_embeddings"),
        "position_table": table,
    }
    return sites_metadata([(s.id, s.module_path) for s in sites], linear) | {
        DECODER_KEY: json.dumps(info)}


def position_table(sg: StatefulGraph) -> int | None:
    """Rows of the learned position embedding of ``sg`` (an embedding indexed by the positions;
    the smallest if several): the positions the decoder can see at all. None when positions
    are computed (RoPE, sinusoids)."""
    return _embeddings(sg)[1]


def _embeddings(sg: StatefulGraph) -> tuple[tuple[int, ...] | None, int | None]:
    """``(token embedding shape [V, C] or None, position table rows or None)`` of ``sg``: the
    embedding indexed by ``input_ids`` (through reshapes) and those indexed by the positions."""
    import operator

    from dtr_compile.passes.stateful import positions_from_mask

    aten = torch.ops.aten
    reshapes = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                aten.unsqueeze.default, aten.squeeze.dim, aten.clone.default,
                aten._to_copy.default}

    def through_reshapes(node: Any) -> Any:
        while getattr(node, "op", None) == "call_function" and node.target in reshapes:
            node = node.args[0]
        return node

    def shape(node: Any) -> tuple[int, ...] | None:
        val = getattr(node, "meta", {}).get("val")
        if val is None and getattr(node, "op", None) == "get_attr":
            val = operator.attrgetter(str(node.target))(sg.gm)
        return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None

    tokens = next((n for n in sg.gm.graph.nodes if n.op == "placeholder"), None)
    embed = table = None
    for node in sg.gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.embedding.default:
            continue
        index = through_reshapes(node.args[1])
        if index is tokens and embed is None:
            embed = shape(node.args[0])
        elif getattr(index, "target", None) is positions_from_mask:
            rows = shape(node.args[0])
            table = rows[0] if rows and (table is None or rows[0] < table) else table
    return embed, table


def _source_config(source: str | os.PathLike[str] | None) -> dict[str, Any]:
    """``model_type``, ``hidden_size``, ``vocab_size`` and ``max_position_embeddings`` from the
    ``config.json`` of a Hugging Face folder ``source`` (through transformers' config class, so
    ``n_embd`` / ``n_positions`` are read as the standard names); ``{}`` when there is none."""
    if source is None or not (Path(source) / "config.json").is_file():
        return {}
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    except Exception:  # noqa: BLE001 - the description is optional; the load already checked it
        return {}
    out: dict[str, Any] = {"model_type": getattr(config, "model_type", None)}
    for key in ("hidden_size", "vocab_size", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            out[key] = value
    return out
