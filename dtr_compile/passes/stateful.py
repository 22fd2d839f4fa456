"""Pass: turn a captured causal prefill graph into one stateful decoder graph.

The captured graph maps ``input_ids: [B, T]`` (and maybe ``attention_mask: [B, T]``) to
``logits: [B, T, V]``, recomputing the whole prefix on every call. The stateful graph takes ``t``
new tokens after a past of ``P`` tokens summarised per layer, and returns the new layer states:

* inputs ``input_ids: [B, t]``, ``attention_mask: [B, P + t]`` (int64, 1 = real token; left
  padding allowed), then per layer ``i`` (the model's layer number, from the site's module path:
  ``model.layers.7.self_attn`` → 7; graph order when no site has one), in layer order: softmax layers
  ``past_key_values.{i}.key`` / ``.value: [B, Hkv, P, Dk|Dv]``, linear layers
  ``past.{i}.{name}`` for each name of the student's
  :meth:`~dtr_compile.linear.base.LinearStudent.state_names`;
* outputs ``logits: [B, t, V]``, then ``present.{i}.key`` / ``.value: [B, Hkv, P + t, D]`` and
  ``present.{i}.{name}`` (onnxruntime-genai's naming).

One graph serves prefill (``P = 0``, ``t`` = the prompt) and decode (``t = 1``). The rewrite, on
a copy of the captured ATen graph (functional; parameters are shared):

1. **Positions.** The model's own position computation, ``arange(T)`` (``+ 0``, the past length
   of a cache-less capture) unsqueezed to ``position_ids: [1, T]`` or read by a position
   embedding, is replaced by per-row positions ``cumsum(attention_mask) − 1`` at the last ``t``
   columns (clamped at 0 for padding): RoPE and learned position embeddings then see the same
   positions as each row alone, whatever its left padding. Every other use of the old
   ``attention_mask`` (its size as the sequence length, its values) reads its last ``t`` columns.
2. **Softmax sites** call :class:`KVCacheAttention`: past keys/values concatenated with the new
   ones, attended with a mask built from ``attention_mask`` (causal aligned bottom-right,
   ``[t, P + t]``, and key padding). This is sound because the site's own mask was proven
   causal (∧ padding) by :mod:`dtr_compile.passes.attention_mask`; the site's mask subgraph is
   dropped.
3. **Linear sites** call :class:`StatefulLinear` around their student: its
   ``forward_stateful(q, k, v, key_valid, state)``, with ``key_valid`` the last ``t`` columns of
   ``attention_mask``.

What cannot be made stateful is a :class:`NotStateful` record with every reason (a non-causal
site, an attention that was not rewritable, a position computation not recognised, a student
with no stateful form, ...); the prefill artifacts do not depend on it.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from dtr_compile.linear.base import LinearStudent
from dtr_compile.passes.find_attention import AttentionSite, Rejected

aten = torch.ops.aten

TOKENS = "input_ids"
MASK = "attention_mask"
_ARANGES = {aten.arange.default, aten.arange.start, aten.arange.start_step}
_SYM_SIZE = aten.sym_size.int


@dataclass(frozen=True)
class LayerState:
    """The state of one layer in the stateful graph.

    Attributes:
        layer: the model's layer index ``i``.
        site: the site id.
        kind: ``"softmax"`` (a KV cache) or ``"linear"`` (a recurrent state).
        names: state tensor names: ``("key", "value")`` or the student's ``state_names()``.
        inputs / outputs: ``past_key_values.{i}.key`` … / ``present.{i}.key`` … in ``names`` order.
    """

    layer: int
    site: str
    kind: str
    names: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass
class StatefulGraph:
    """Result of :func:`make_stateful`.

    Attributes:
        gm: ``(input_ids, attention_mask, *past) → (logits, *present)``, flat positional tensors.
        input_names / output_names: in call order.
        layers: per layer, in layer order.
        modules: ``{site id: module}`` the sites call (``KVCacheAttention`` / ``StatefulLinear``).
    """

    gm: GraphModule
    input_names: list[str]
    output_names: list[str]
    layers: list[LayerState]
    modules: dict[str, nn.Module] = field(default_factory=dict)

    def empty_past(self, batch: int, *, dtype: torch.dtype = torch.float32,
                   length: int = 0) -> dict[str, torch.Tensor]:
        """Past inputs of ``batch`` rows for an empty past (``length = 0``), or zeros of
        ``length`` cached positions for softmax layers (an all-padding past, e.g. to trace)."""
        out: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            mod = self.modules[layer.site]
            if isinstance(mod, KVCacheAttention):
                for name, d in zip(layer.inputs, (mod.head_dim, mod.head_dim_v), strict=True):
                    out[name] = torch.zeros(batch, mod.num_kv_heads, length, d, dtype=dtype)
            else:
                assert isinstance(mod, StatefulLinear)
                state = mod.student.init_state(batch, dtype=dtype)
                for name, sname in zip(layer.inputs, layer.names, strict=True):
                    out[name] = state[sname]
        return out

    def dynamic_dims(self) -> dict[str, dict[int, str]]:
        """``{input: {dim: axis}}``: ``batch``, ``sequence`` (t), ``total_sequence`` (P + t),
        ``past_sequence`` (P)."""
        dims: dict[str, dict[int, str]] = {TOKENS: {0: "batch", 1: "sequence"},
                                           MASK: {0: "batch", 1: "total_sequence"}}
        for layer in self.layers:
            for name in layer.inputs:
                dims[name] = {0: "batch"} | ({2: "past_sequence"} if layer.kind == "softmax" else {})
        return dims

    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run ``gm`` on inputs by name; outputs by name."""
        outs = self.gm(*(feed[n] for n in self.input_names))
        return dict(zip(self.output_names, outs, strict=True))


@dataclass(frozen=True)
class NotStateful:
    """Why a graph cannot be made stateful: every reason found."""

    reasons: tuple[str, ...]

    def __bool__(self) -> bool:
        return False

    def describe(self) -> str:
        return "; ".join(self.reasons)


# --- the modules the sites call --------------------------------------------------------------


def decoder_mask(attention_mask: torch.Tensor, t: int) -> torch.Tensor:
    """Boolean mask ``[B, 1, t, P + t]`` (True = attend) of ``t`` new queries against the past and
    new keys: query ``i`` (position ``P + i``) sees key ``j <= P + i`` when the key is a real
    token. A query sees its own key even when it is padding, so that no row is empty (its output
    belongs to a padding token and is never read; an empty row would be NaN in SDPA).

    Args:
        attention_mask: ``[B, P + t]``, 1 = real token.
        t: number of new tokens.
    """
    total = attention_mask.shape[1]
    query = torch.arange(t, device=attention_mask.device)[:, None] + (total - t)  # [t, 1]
    key = torch.arange(total, device=attention_mask.device)[None, :]  # [1, P+t]
    allowed = (key <= query)[None, None] & (attention_mask[:, None, None, :] > 0)
    return allowed | (key == query)[None, None]  # [B, 1, t, P+t]


def positions_from_mask(attention_mask: torch.Tensor, t: int) -> torch.Tensor:
    """Per-row positions of the last ``t`` tokens, ``cumsum(attention_mask) − 1`` clamped at 0
    (padding): ``[B, P + t]`` int → ``[B, t]`` int64. Left padding does not shift positions."""
    pos = torch.cumsum(attention_mask.to(torch.int64), dim=1) - 1
    return pos.clamp(min=0)[:, attention_mask.shape[1] - t:]


def last_columns(attention_mask: torch.Tensor, t: int) -> torch.Tensor:
    """``attention_mask[:, -t:]``: the new tokens' part of the mask, ``[B, P + t]`` → ``[B, t]``."""
    return attention_mask[:, attention_mask.shape[1] - t:]


def kv_cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       past_key: torch.Tensor, past_value: torch.Tensor,
                       attention_mask: torch.Tensor, scale: float | None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax attention of ``t`` new tokens over a KV cache, the reference form: the past and
    new keys concatenated (``present_*: [B, Hkv, P + t, D]``) and SDPA with
    :func:`decoder_mask`.

    Args:
        q: ``[B, H, t, Dk]``; k: ``[B, Hkv, t, Dk]``; v: ``[B, Hkv, t, Dv]`` — the new tokens.
        past_key: ``[B, Hkv, P, Dk]``; past_value: ``[B, Hkv, P, Dv]``.
        attention_mask: ``[B, P + t]``, 1 = real token (left padding allowed).
        scale: the softmax scale (None: ``Dk ** -0.5``).

    Returns:
        ``(out: [B, H, t, Dv], present_key, present_value)``.
    """
    key = torch.cat([past_key.to(k.dtype), k], dim=2)
    value = torch.cat([past_value.to(v.dtype), v], dim=2)
    mask = decoder_mask(attention_mask, q.shape[2])
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out, key, value


def _kv_cache_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             past_key: torch.Tensor, past_value: torch.Tensor,
                             attention_mask: torch.Tensor, scale: float,
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(x.contiguous() for x in kv_cache_attention(  # type: ignore[return-value]
        q, k, v, past_key, past_value, attention_mask, scale or None))


#: One softmax site over a KV cache as one op (:func:`kv_cache_attention`; ``scale`` 0: the
#: default ``Dk ** -0.5``). Traced under :func:`shared_kv_cache`, the ONNX exporter writes it as
#: onnxruntime's ``com.microsoft`` ``GroupQueryAttention``
#: (:mod:`dtr_compile.exporters.stateful`).
kv_cache_attention_op = torch.library.custom_op(
    "dtr_compile::kv_cache_attention", _kv_cache_attention_impl, mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor past_key, Tensor past_value, "
           "Tensor attention_mask, float scale) -> (Tensor, Tensor, Tensor)")


@kv_cache_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_key: torch.Tensor,
      past_value: torch.Tensor, attention_mask: torch.Tensor, scale: float,
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, t, _ = q.shape
    total = past_key.shape[2] + k.shape[2]
    return (q.new_empty(B, H, t, v.shape[-1]),
            k.new_empty(B, k.shape[1], total, k.shape[-1]),
            v.new_empty(B, v.shape[1], total, v.shape[-1]))


# A plain global, not a ContextVar, as linear.recurrence's _FUSED: exports run one at a time.
_SHARED_KV = [False]


@contextlib.contextmanager
def shared_kv_cache() -> Iterator[None]:
    """While active, every :class:`KVCacheAttention` runs as one :data:`kv_cache_attention_op`
    call: a trace (``torch.export``) taken inside it holds one node per softmax site, which the
    ONNX exporter writes as ``GroupQueryAttention`` over a KV buffer the runtime may share
    between past and present. Results in PyTorch are unchanged."""
    before, _SHARED_KV[0] = _SHARED_KV[0], True
    try:
        yield
    finally:
        _SHARED_KV[0] = before


class KVCacheAttention(nn.Module):
    """A softmax site with a KV cache: ``(q, k, v, past_key, past_value, attention_mask)`` →
    ``(out: [B, H, t, Dv], present_key: [B, Hkv, P + t, Dk], present_value: [B, Hkv, P + t, Dv])``.

    ``q: [B, H, t, Dk]``, ``k/v: [B, Hkv, t, D]`` are the new tokens', ``past_*: [B, Hkv, P, D]``,
    ``attention_mask: [B, P + t]``. :func:`kv_cache_attention` with the site's scale; one
    :data:`kv_cache_attention_op` under :func:`shared_kv_cache` (when the site's shapes allow
    it: ``Dk == Dv``, ``H`` a multiple of ``Hkv``).
    """

    def __init__(self, site: AttentionSite) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = site.num_heads, site.num_kv_heads
        self.head_dim, self.head_dim_v, self.scale = site.head_dim, site.head_dim_v, site.scale

    def fuses(self) -> bool:
        """Whether this site runs as one :data:`kv_cache_attention_op` under
        :func:`shared_kv_cache` (``GroupQueryAttention`` has one head size and whole groups)."""
        return (self.head_dim == self.head_dim_v and self.num_kv_heads > 0
                and self.num_heads % self.num_kv_heads == 0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor, attention_mask: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if _SHARED_KV[0] and self.fuses():
            # static head counts: the captured graph may compute them (a view with -1)
            b, t = q.shape[0], q.shape[2]
            q = q.reshape(b, self.num_heads, t, self.head_dim)
            k = k.reshape(b, self.num_kv_heads, k.shape[2], self.head_dim)
            v = v.reshape(b, self.num_kv_heads, v.shape[2], self.head_dim_v)
            out, key, value = kv_cache_attention_op(q, k, v, past_key.to(k.dtype),
                                                    past_value.to(v.dtype), attention_mask,
                                                    float(self.scale or 0.0))
            return out, key, value
        return kv_cache_attention(q, k, v, past_key, past_value, attention_mask, self.scale)


class StatefulLinear(nn.Module):
    """A linear site's student in its stateful form: ``(q, k, v, attention_mask, *state)`` →
    ``(out, *new state)``, state tensors in ``student.state_names()`` order."""

    def __init__(self, student: LinearStudent) -> None:
        super().__init__()
        self.student = student
        self.names = tuple(student.state_names())

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attention_mask: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key_valid = last_columns(attention_mask, q.shape[2])
        out, new = self.student.forward_stateful(q, k, v, key_valid,
                                                 dict(zip(self.names, state, strict=True)))
        return (out, *(new[n] for n in self.names))


# --- the pass --------------------------------------------------------------------------------


def layer_index(path: str) -> int | None:
    """The model's layer number in a module path: its last all-digit component
    (``model.layers.7.self_attn`` → 7), or None."""
    nums = [p for p in path.split(".") if p.isdigit()]
    return int(nums[-1]) if nums else None


def _is_seq_len(node: object, seq_sizes: set[Node]) -> bool:
    return isinstance(node, Node) and node in seq_sizes


def _position_nodes(graph: torch.fx.Graph, seq_sizes: set[Node]) -> tuple[list[Node], list[str]]:
    """Nodes that hold the model's positions: ``unsqueeze(arange(T) [+ 0], 0)`` (``[1, T]``) or
    ``arange(T) [+ 0]`` read only by embeddings (``[T]``); and the aranges over the sequence that
    are used otherwise (each a reason)."""
    found, problems = [], []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _ARANGES or not node.users:
            continue
        args = node.args
        end = args[0] if node.target is aten.arange.default else args[1]
        start = 0 if node.target is aten.arange.default else args[0]
        if not _is_seq_len(end, seq_sizes) or start != 0:
            continue
        head = node
        users = list(head.users)
        if (len(users) == 1 and users[0].target is aten.add.Tensor and users[0].args[0] is head
                and users[0].args[1] == 0):
            head = users[0]
        users = list(head.users)
        if users and all(u.target is aten.unsqueeze.default and u.args[1] == 0 for u in users):
            found.extend(users)
        elif users and all(u.target is aten.embedding.default and u.args[1] is head for u in users):
            found.append(head)
        else:
            problems.append(
                f"{node.name}: an arange over the sequence read by "
                f"{sorted(str(u.target) for u in users)}, not a recognised position computation "
                "(arange(T) [+ 0] → unsqueeze(0) or → a position embedding)")
    return found, problems


def _keep(node: Node) -> bool:
    """Dead-code elimination keeps inputs and the output only (``_assert_tensor_metadata`` checks
    on removed nodes go with them)."""
    return node.op in ("placeholder", "output")


def _erase_site(graph: torch.fx.Graph, site: AttentionSite) -> None:
    internal = set(site.internal)
    for node in reversed(list(graph.nodes)):
        if node.name in internal and not node.users:
            graph.erase_node(node)


def make_stateful(
    gm: GraphModule,
    sites: Sequence[AttentionSite],
    students: Mapping[str, nn.Module] | None = None,
    *,
    rejected: Sequence[Rejected] = (),
) -> StatefulGraph | NotStateful:
    """The stateful decoder graph of ``gm`` (the captured graph, flat inputs and outputs) with the
    sites in ``students`` as linear layers and every other site a KV-cached softmax layer.

    Args:
        gm: captured prefill graph ``input_ids [, attention_mask] → logits``.
        sites: all sites of ``gm`` (:func:`~dtr_compile.passes.find_attention.find_attention`).
        students: ``{site id: LinearStudent}`` of the linear layers; none: the original.
        rejected: attention look-alikes that were not rewritable (each makes the graph
            non-stateful: it would see only the new tokens).

    Returns:
        a :class:`StatefulGraph`, or a :class:`NotStateful` with the reasons.
    """
    students = dict(students or {})
    reasons: list[str] = [f"{r.node} ({r.module_path or 'top level'}): attention that is not "
                          f"rewritable ({r.reason}) cannot read a cache" for r in rejected]
    graph = copy.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    names = [p.name for p in placeholders]
    if TOKENS not in names:
        reasons.append(f"no {TOKENS!r} input (inputs: {names})")
    extra = [n for n in names if n not in (TOKENS, MASK)]
    if extra:
        reasons.append(f"inputs other than {TOKENS}/{MASK} ({extra}): their meaning for the "
                       "new tokens of a decode step is unknown")
    out_node = graph.output_node()
    outputs = list(out_node.args[0])  # type: ignore[arg-type]
    if len(outputs) != 1:
        reasons.append(f"the model returns {len(outputs)} outputs; a decoder returns logits only")

    layers: dict[int, tuple[AttentionSite, str]] = {}
    numbered = any(layer_index(s.module_path) is not None for s in sites)
    for pos, site in enumerate(sites):
        sid = f"{site.id} ({site.module_path or 'top level'})"
        if not site.causal:
            reasons.append(f"{sid} is not causal ({site.masking}): a bidirectional site has no "
                           "past/future split")
        if site.layout != "BHTD":
            reasons.append(f"{sid}: layout {site.layout} (only [B, H, T, D] sites get a cache)")
        # no site with a layer number (e.g. one block at the top level): number them in order
        idx = layer_index(site.module_path) if numbered else pos
        if idx is None:
            reasons.append(f"{sid}: no layer number in its module path")
        elif idx in layers:
            reasons.append(f"{sid} and {layers[idx][0].id} share layer number {idx}")
        else:
            layers[idx] = (site, "linear" if site.id in students else "softmax")
        if site.id in students:
            st = students[site.id]
            try:
                st.state_names()  # type: ignore[operator]
            except (NotImplementedError, AttributeError, TypeError):
                reasons.append(f"{sid}: its student ({type(st).__name__}) has no stateful form")
    if reasons:
        return NotStateful(tuple(reasons))

    # 1. inputs: input_ids, attention_mask [B, P+t]; the old mask becomes its last t columns
    tokens = nodes[TOKENS]
    old_mask = nodes.get(MASK)
    if old_mask is not None:
        mask = old_mask
        old_users = list(old_mask.users)
    else:
        with graph.inserting_after(tokens):
            mask = graph.placeholder(MASK)
        mask.meta["val"] = tokens.meta.get("val")
        old_users = []
    anchor = max(placeholders + [mask], key=lambda n: list(graph.nodes).index(n))
    past_nodes: dict[str, Node] = {}
    layer_states: list[LayerState] = []
    modules: dict[str, nn.Module] = {}
    for idx in sorted(layers):
        site, kind = layers[idx]
        ins: tuple[str, ...]
        snames: tuple[str, ...]
        if kind == "softmax":
            snames = ("key", "value")
            ins = (f"past_key_values.{idx}.key", f"past_key_values.{idx}.value")
            modules[site.id] = KVCacheAttention(site)
        else:
            wrapped = StatefulLinear(students[site.id])  # type: ignore[arg-type]
            modules[site.id], snames = wrapped, wrapped.names
            ins = tuple(f"past.{idx}.{n}" for n in snames)
        outs = tuple(f"present.{idx}.{n}" for n in snames)
        for name in ins:
            with graph.inserting_after(anchor):
                anchor = past_nodes[name] = graph.placeholder(_identifier(name))
        layer_states.append(LayerState(idx, site.id, kind, snames, ins, outs))
    with graph.inserting_after(anchor):
        t_len = graph.call_function(_SYM_SIZE, (tokens, 1))
    with graph.inserting_after(t_len):
        current_mask = graph.call_function(last_columns, (mask, t_len))
    for user in old_users:
        user.replace_input_with(mask, current_mask)

    # 2./3. sites
    presents: list[Node] = []
    for state in layer_states:
        site = next(s for s in sites if s.id == state.site)
        target = f"dtr_stateful.{site.id}"
        out = nodes[site.output]
        args: list[Node] = [nodes[site.q], nodes[site.k], nodes[site.v]]
        pasts = [past_nodes[n] for n in state.inputs]
        args += pasts + [mask] if state.kind == "softmax" else [mask] + pasts
        with graph.inserting_before(out):
            call = graph.call_module(target, tuple(args))
            items = [graph.call_function(operator.getitem, (call, i))
                     for i in range(1 + len(state.names))]
        items[0].meta = dict(out.meta)
        out.replace_all_uses_with(items[0])
        _erase_site(graph, site)
        presents.extend(items[1:])
    out_node.args = ((*outputs, *presents),)
    graph.eliminate_dead_code(is_impure_node=_keep)

    # 1. positions (after dead code is gone: the site masks' aranges no longer count)
    seq_sizes = {n for n in graph.nodes if n.op == "call_function" and n.target is _SYM_SIZE
                 and n.args[0] in (tokens, current_mask) and n.args[1] == 1}
    found, problems = _position_nodes(graph, seq_sizes)
    if problems:
        return NotStateful(tuple(problems))
    if not found:
        return NotStateful(("no position computation found (arange over the sequence → "
                            "position_ids or a position embedding): the positions of new tokens "
                            "could not be offset by the past",))
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_input):
        t_now = graph.call_function(_SYM_SIZE, (tokens, 1))
    with graph.inserting_after(t_now):
        positions = graph.call_function(positions_from_mask, (mask, t_now))
    for node in found:
        node.replace_all_uses_with(positions)
    graph.eliminate_dead_code(is_impure_node=_keep)
    graph.lint()

    root: dict[str, object] = {}
    for node in graph.nodes:
        if node.op == "get_attr" or (node.op == "call_module"
                                     and not str(node.target).startswith("dtr_stateful.")):
            root[str(node.target)] = operator.attrgetter(str(node.target))(gm)
    for sid, mod in modules.items():
        root[f"dtr_stateful.{sid}"] = mod
    new_gm = GraphModule(root, graph, class_name="StatefulGraph")
    order = [TOKENS, MASK] + [n for lay in layer_states for n in lay.inputs]
    _reorder_placeholders(new_gm.graph, [_identifier(n) for n in order])
    new_gm.recompile()
    return StatefulGraph(new_gm, order,
                         ["logits"] + [n for lay in layer_states for n in lay.outputs],
                         layer_states, modules)


def _identifier(name: str) -> str:
    """A tensor name as a Python identifier (``past.3.recurrent`` → ``past_3_recurrent``): the
    placeholder's name; the ONNX export restores the dotted name."""
    return name.replace(".", "_")


def _reorder_placeholders(graph: torch.fx.Graph, order: Sequence[str]) -> None:
    """Move the placeholders to the front of ``graph`` in ``order``."""
    by_name = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    first = next(iter(graph.nodes))
    for name in reversed(order):
        node = by_name[name]
        if node is not first:
            first.prepend(node)
        first = node
