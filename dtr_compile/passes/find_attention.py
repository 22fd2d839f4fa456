"""Pass: locate attention sites in the captured ATen graph.

An *attention site* is one softmax-attention core, ``softmax(q kᵀ · scale + mask) v``, with
``q: [B, H, T, Dk]``, ``k: [B, Hkv, S, Dk]``, ``v: [B, Hkv, S, Dv]`` and output ``[B, H, T, Dv]``
(layout ``"BHTD"``), or the same with batch and heads merged, ``q: [B·H, T, Dk]`` (layout
``"(BH)TD"``, the ``bmm`` path of ``nn.MultiheadAttention``). Projections, rotary embeddings and
head reshapes stay outside the site: its ``q`` and ``k`` already carry any rotary embedding.

The pass runs on the pre-decomposition ATen graph that ``torch.export`` gives, where spellings are
already normalised (``x @ y`` and ``torch.matmul`` are both ``aten.matmul``). One pattern with
named alternatives covers the spellings; each rule reads ``name := alternative | alternative``::

    site    := sdpa(q, k, v, [mask], [is_causal], [scale], [enable_gqa])  # kind "sdpa"
             | PV(probs, v)                                               # kind "eager"
    PV, QK  := matmul | bmm
    probs   := keep*(softmax(masked, -1 [, dtype]))
    keep    := to | type_as | clone | contiguous | alias | dropout(train=False)
    masked  := scaled | scaled + m | m + scaled | masked_fill(scaled, c, -big)
             | where(c, scaled, -big) | where(c, -big, scaled)
    scaled  := keep*(scores) × c | c × … | … ÷ c                  # c a number, repeated or absent
    scores  := QK(q × c?, kᵀ × c?) | baddbmm(m, q, kᵀ, beta=1, alpha=c)
    kᵀ      := transpose(k × c?, -2, -1) | permute(k × c?, [0, 1, 3, 2])
    k, v    := repeat_kv(x) | x          # expand+reshape (Llama) or repeat_interleave on dim 1

``-big`` is any value at or below :data:`~dtr_compile.linear.kernel.ADDITIVE_MASK_PADDING`.
A repeated key/value (GQA) is undone: the site's ``k``/``v`` are the ``Hkv``-head tensors and
``num_kv_heads < num_heads``; SDPA's ``enable_gqa`` grouping (head ``h`` reads kv head
``h // (H / Hkv)``) is the one ``repeat_kv`` spells out.

Masks are classified by :mod:`dtr_compile.passes.attention_mask` (provenance, then evaluation on
probe inputs). A site's ``causal`` and ``mask`` fields then say exactly what the replacement must
do; ``mask_kind`` says how to read the mask tensor (``"bool"``: True = attend, ``"additive"``):

==========  ==========  ==============================================================
causal      mask        meaning
==========  ==========  ==============================================================
False       None        bidirectional, nothing masked (an all-True mask is dropped)
False       node        key padding: the mask reduces exactly to a ``[B, S]`` key mask
True        None        causal (``is_causal=True``, or a proven causal mask tensor, which is
                        dropped; replay with SDPA ``is_causal=True``)
True        node        causal ∧ key padding; the mask tensor carries the causality, so
                        replay it with ``is_causal=False`` (:attr:`AttentionSite.sdpa_is_causal`)
==========  ==========  ==============================================================

Anything attention-like that cannot be rewritten is a :class:`Rejected` record with the reason:
the attention weights used outside the site (``output_attentions``, ``need_weights``), a mask that
is neither padding nor causal, a bias or soft-capping between the product and the softmax, a fused
kernel (``_native_multi_head_attention``; ``torch.export`` never emits the
``nn.TransformerEncoderLayer`` inference fast path, since it is disabled for fake tensors, so the
captured graph holds the standard path and its SDPA), or a decomposed SDPA kernel.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import SupportsFloat, SupportsInt, TypeGuard, cast

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import Argument

from dtr_compile.errors import NoAttentionError
from dtr_compile.linear.kernel import ADDITIVE_MASK_PADDING
from dtr_compile.passes.attention_mask import MaskPattern, classify_mask

aten = torch.ops.aten

SDPA = aten.scaled_dot_product_attention.default
_MATMULS = {aten.matmul.default, aten.bmm.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_KEEP = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
         aten.type_as.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
         aten.dropout.default}
_SCALE = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_MASK_OPS = {aten.add.Tensor, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
             aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar}


def _ops(*names: str) -> set:
    out = set()
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload or "default", None)
        if op is not None:
            out.add(op)
    return out


#: Fused kernels that hold a whole attention (or layer) and cannot be split into q, k, v.
_FUSED = _ops("_native_multi_head_attention", "_transformer_encoder_layer_fwd")
#: SDPA after ``run_decompositions``: find attention on the graph before decomposing.
_DECOMPOSED_SDPA = _ops("_scaled_dot_product_flash_attention_for_cpu",
                        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                        "_scaled_dot_product_cudnn_attention")

#: What the pass searches for, for error messages.
SEARCHED_FOR = ("aten.scaled_dot_product_attention, and eager attention: matmul/bmm/baddbmm of q "
                "and kᵀ, optional scale and mask, softmax over the key dim, matmul/bmm with v")


@dataclass(frozen=True)
class AttentionSite:
    """One rewritable attention site. Node fields are node names in the captured graph.

    Attributes:
        id: stable id, ``"site{i}"`` in graph order.
        module_path: owner module path from ``nn_module_stack`` (``encoder.layer.3.attention.self``).
        kind: ``"sdpa"`` or ``"eager"``.
        q, k, v: nodes of ``q: [B, H, T, Dk]``, ``k: [B, Hkv, S, Dk]``, ``v: [B, Hkv, S, Dv]``
            (``[B·H, T, D]`` for layout ``"(BH)TD"``).
        mask: node of the boolean or additive mask broadcastable to the scores, or None (see the
            module docstring for what ``causal`` and ``mask`` mean together).
        output: node of the site's output ``[B, H, T, Dv]``.
        internal: names of the nodes that the rewrite replaces (output included).
        num_heads, num_kv_heads, head_dim, head_dim_v: ``H``, ``Hkv``, ``Dk``, ``Dv``.
        causal: query ``t`` sees only keys ``s <= t``, aligned top-left as SDPA's ``is_causal``
            (by ``is_causal`` or by the mask).
        mask_kind: ``"none"``, ``"bool"`` (True = attend) or ``"additive"`` (added to scores).
        scale: the softmax scale (``1/sqrt(Dk)`` when the graph gives none).
        layout: ``"BHTD"`` or ``"(BH)TD"`` (batch and heads merged, as ``bmm`` attention has it).
        pattern: the alternatives that matched, e.g. ``"eager:matmul,scale:scores,mask:add,
            softmax,dropout,repeat_kv"``.
    """

    id: str
    module_path: str
    kind: str
    q: str
    k: str
    v: str
    mask: str | None
    output: str
    internal: tuple[str, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    head_dim_v: int
    causal: bool
    mask_kind: str
    scale: float
    layout: str = "BHTD"
    pattern: str = ""

    @property
    def sdpa_is_causal(self) -> bool:
        """The ``is_causal`` flag that replays this site with SDPA on ``(q, k, v, mask)``: True
        only when no mask tensor carries the causality already."""
        return self.causal and self.mask is None

    @property
    def masking(self) -> str:
        """``"none"``, ``"padding"``, ``"causal"`` or ``"causal+padding"``."""
        if self.mask is None:
            return "causal" if self.causal else "none"
        return "causal+padding" if self.causal else "padding"

    def describe(self) -> str:
        """One line: id, path, kind and shape letters."""
        return (f"{self.id} {self.module_path} [{self.kind}] H={self.num_heads} "
                f"Hkv={self.num_kv_heads} Dk={self.head_dim} mask={self.mask_kind}"
                f"{' causal' if self.causal else ''}")


@dataclass(frozen=True)
class Rejected:
    """Something attention-like that will not be rewritten, and why."""

    node: str
    module_path: str
    reason: str


@dataclass(frozen=True)
class AttentionScan:
    """Result of :func:`find_attention`: rewritable ``sites`` and ``rejected`` look-alikes."""

    sites: tuple[AttentionSite, ...]
    rejected: tuple[Rejected, ...]

    def require_sites(self) -> tuple[AttentionSite, ...]:
        """The sites; raises :class:`NoAttentionError` (what was searched for, and every
        rejected look-alike with its reason) when there are none."""
        if self.sites:
            return self.sites
        why = "; ".join(f"{r.node} ({r.module_path or 'top level'}): {r.reason}"
                        for r in self.rejected)
        raise NoAttentionError(
            f"no rewritable attention site in the model. Searched the captured graph for "
            f"{SEARCHED_FOR}. "
            + (f"Found attention that cannot be rewritten: {why}" if why else
               "Nothing attention-like was found: is this a transformer?")
        )


def module_path(node: Node) -> str:
    """The innermost module path in ``node.meta["nn_module_stack"]`` ("" at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    # torch.export spells list indices as L['self'].layer[0] in some versions; normalise.
    return str(path).replace("L['self'].", "").replace("[", ".").replace("]", "")


# ---------------------------------------------------------------------------------------------
# small graph helpers


class _Miss(str):
    """A failed match, carrying the reason (``isinstance(x, _Miss)`` tells it from a match)."""


def _is(node: object, targets: set) -> TypeGuard[Node]:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _val(node: object) -> object:
    return node.meta.get("val") if isinstance(node, Node) else None


def _is_bool(node: object) -> TypeGuard[Node]:
    """``node`` is a node whose value is a boolean tensor."""
    return getattr(_val(node), "dtype", None) == torch.bool


def _mask_kind(mask: Node) -> str:
    """``"bool"`` or ``"additive"``, by the dtype of ``mask``'s value (which it must carry)."""
    val = _val(mask)
    if not isinstance(val, torch.Tensor):
        raise TypeError(f"the mask {mask.name} has no tensor value (meta['val'] = {val!r})")
    return "bool" if val.dtype == torch.bool else "additive"


def _float(x: object) -> float:
    """``float(x)`` of an argument the op's schema makes a number."""
    if not isinstance(x, SupportsFloat):
        raise TypeError(f"float() argument must be a real number, not {type(x).__name__!r}")
    return float(x)


def _int(x: object) -> int:
    """``int(x)`` of an argument the op's schema makes an integer (a dim)."""
    if not isinstance(x, SupportsInt):
        raise TypeError(f"int() argument must be a real number, not {type(x).__name__!r}")
    return int(x)


def _seq(x: object) -> list | tuple:
    """An argument the op's schema makes a list (``permute``'s dims)."""
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"{type(x).__name__!r} object is not iterable")
    return x


def _shape(node: object) -> tuple[int | torch.SymInt, ...] | None:
    shape = getattr(_val(node), "shape", None)
    return tuple(shape) if shape is not None else None


def _static(d: object) -> int | None:
    return d if isinstance(d, int) else None


def _number(gm: GraphModule, x: object) -> float | None:
    """``x`` as a Python number: a literal, or a one-element constant tensor attribute."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, Node) and x.op == "get_attr":
        t = operator.attrgetter(cast(str, x.target))(gm)  # a get_attr target is an attribute path
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            return float(t)
    return None


def _scale_of(gm: GraphModule, node: Argument) -> tuple[Node, float] | None:
    """``node = x × c``, ``c × x`` or ``x ÷ c`` with ``c`` a number → ``(x, factor)``."""
    if not _is(node, _SCALE) or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    mul = node.target in (aten.mul.Tensor, aten.mul.Scalar)
    if (c := _number(gm, b)) is not None and isinstance(a, Node):
        return (a, c) if mul else ((a, 1.0 / c) if c else None)
    if mul and (c := _number(gm, a)) is not None and isinstance(b, Node):
        return b, c
    return None


def _live_nodes(gm: GraphModule) -> set[Node]:
    """Nodes whose value reaches the graph output."""
    live: set[Node] = set()
    stack = [gm.graph.output_node()]
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        stack.extend(n.all_input_nodes)
    return live


@dataclass
class _Build:
    """Accumulates one match: nodes the site replaces and the alternatives taken."""

    gm: GraphModule
    live: set[Node]
    nodes: list[Node] = field(default_factory=list)
    alts: list[str] = field(default_factory=list)
    scale: float = 1.0

    def keep(self, node: Argument) -> Argument:
        """Skip ``keep`` ops upward from ``node`` (recording them)."""
        while _is(node, _KEEP):
            self.nodes.append(node)
            node = node.args[0]
        return node

    def unscale(self, node: Argument) -> Argument:
        """Skip constant scalings upward from ``node``, folding them into ``scale``."""
        while isinstance(node, Node) and (m := _scale_of(self.gm, node)) is not None:
            self.nodes.append(node)
            node, c = m
            self.scale *= c
        return node

    def internal(self, output: Node) -> tuple[str, ...]:
        """Names of the recorded nodes used only inside the site (plus their dead users, such as
        metadata asserts), in graph order."""
        cands = set(self.nodes) | {output}
        work = [n for n in cands if n is not output]
        while work:
            n = work.pop()
            for u in n.users:
                if u not in self.live and u not in cands and u.op != "output":
                    cands.add(u)
                    work.append(u)
        changed = True
        while changed:
            changed = False
            for n in list(cands):
                if n is not output and any(u not in cands for u in n.users):
                    cands.discard(n)
                    changed = True
        return tuple(n.name for n in output.graph.nodes if n in cands)


def _unrepeat(node: Argument) -> tuple[Argument, int, list[Node]]:
    """Undo a repeat of key/value heads on dim 1: ``(x, repeats, nodes)`` with ``x`` the
    ``[B, Hkv, S, D]`` tensor, or ``(node, 1, [])`` when ``node`` is no such repeat."""
    shape = _shape(node)
    if shape is None or len(shape) != 4:
        return node, 1, []
    if _is(node, _ops("repeat_interleave.self_int")):
        args = list(node.args) + [None] * 3
        n, dim = args[1], node.kwargs.get("dim", args[2])
        if isinstance(n, int) and dim in (1, -3):
            return node.args[0], n, [node]
        return node, 1, []
    if not _is(node, _RESHAPES):
        return node, 1, []
    nodes = [node]
    e = node.args[0]
    while _is(e, {aten.clone.default, aten.contiguous.default}):
        nodes.append(e)
        e = e.args[0]
    es = _shape(e)
    if not _is(e, {aten.expand.default}) or es is None or len(es) != 5:
        return node, 1, []
    nodes.append(e)
    u = e.args[0]

    def full_slice(n: object) -> TypeGuard[Node]:
        return (_is(n, {aten.slice.Tensor}) and len(n.args) >= 4 and n.args[2] in (0, None)
                and isinstance(n.args[3], int) and n.args[3] >= 2**62)

    while full_slice(u):
        nodes.append(u)
        u = u.args[0]
    if not (_is(u, {aten.unsqueeze.default}) and u.args[1] in (2, -3)):
        return node, 1, []
    nodes.append(u)
    x = u.args[0]
    while full_slice(x):
        nodes.append(x)
        x = x.args[0]
    xs, hkv, rep = _shape(x), _static(es[1]), _static(es[2])
    if xs is None or len(xs) != 4 or hkv is None or rep is None or _static(xs[1]) != hkv:
        return node, 1, []
    if _static(shape[1]) != hkv * rep:
        return node, 1, []
    return x, rep, nodes


def _heads_merged(node: Node | None, d: int) -> int | None:
    """Heads ``H`` of a ``[B·H, T, D]`` tensor: found at the reshape that split ``H·D`` into
    ``D`` on the way from the projection."""
    for _ in range(12):
        if _is(node, _RESHAPES):
            src = _shape(node.args[0])
            e = _static(src[-1]) if src else None
            if e is not None and e % d == 0 and e > d:
                return e // d
        if not isinstance(node, Node) or node.op != "call_function" or not node.args:
            return None
        node = node.args[0] if isinstance(node.args[0], Node) else None
    return None


#: Why a site whose q, k or v has no shape is rejected (a literal has none).
_NO_SHAPE = "q/k/v have no shape metadata"
_NO_MASK_META = "the mask has no tensor metadata (meta['val'])"


def _heads(q: Node, k: Node, v: Node) -> tuple[int, int, int, int, str] | _Miss:
    """``(H, Hkv, Dk, Dv, layout)`` from the shapes of q, k, v."""
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    if qs is None or ks is None or vs is None:
        return _Miss(_NO_SHAPE)
    if not (len(qs) == len(ks) == len(vs) and len(qs) in (3, 4)):
        return _Miss(f"q/k/v are not all [B, H, T, D] or [B·H, T, D] (ranks {len(qs)}, {len(ks)}, {len(vs)})")
    dk, dv = _static(qs[-1]), _static(vs[-1])
    if dk is None or dv is None or _static(ks[-1]) != dk:
        return _Miss(f"head dims are not static and equal for q and k ({qs[-1]}, {ks[-1]})")
    if len(qs) == 3:
        h = _heads_merged(q, dk)
        if h is None:
            return _Miss("q is [B·H, T, D] and its number of heads H could not be read from the "
                         "reshape that made it")
        return h, h, dk, dv, "(BH)TD"
    h, hkv = _static(qs[1]), _static(ks[1])
    if h is None or hkv is None or _static(vs[1]) != hkv or h % hkv:
        return _Miss(f"query heads {qs[1]} are not a multiple of key/value heads {ks[1]}/{vs[1]}")
    return h, hkv, dk, dv, "BHTD"


def _kv(b: _Build, k: Argument, v: Argument) -> tuple[Argument, Argument]:
    """Undo ``repeat_kv`` on k and v together (both or neither)."""
    k0, nk, k_nodes = _unrepeat(k)
    v0, nv, v_nodes = _unrepeat(v)
    if nk > 1 and nk == nv:
        b.nodes += k_nodes + v_nodes
        b.alts.append("repeat_kv")
        return k0, v0
    return k, v


def _attend_mask(node: Node) -> Node | None:
    """A boolean True = attend node whose negation is ``node`` (a True = masked condition)."""
    if _is(node, _ops("logical_not", "bitwise_not")) and _is_bool(x := node.args[0]):
        return x
    if _is(node, _ops("eq.Scalar")) and node.args[1] in (0, False):
        a = node.args[0]
        if _is_bool(a):
            return a
    return None


# ---------------------------------------------------------------------------------------------
# the pattern


@dataclass
class _Core:
    """A matched core before its mask is classified."""

    kind: str
    node: Node  # the node the match is reported at (sdpa or softmax)
    q: Node
    k: Node
    v: Node
    output: Node
    mask: Node | None  # as the site reads it
    mask_semantics: str  # "bool" | "additive" | "inverted"
    causal_flag: bool
    build: _Build


def _match_sdpa(b: _Build, node: Node) -> _Core | _Miss:
    args = list(node.args) + [None] * (8 - len(node.args))
    q, k, v = args[0], args[1], args[2]
    mask = node.kwargs.get("attn_mask", args[3])
    dropout_p = node.kwargs.get("dropout_p", args[4]) or 0.0
    causal = bool(node.kwargs.get("is_causal", args[5]) or False)
    scale = node.kwargs.get("scale", args[6])
    if node.kwargs.get("enable_gqa", args[7]):
        b.alts.append("enable_gqa")
    if dropout_p:
        return _Miss(f"dropout_p={dropout_p} inside attention (export the model in eval mode)")
    if causal and mask is not None:
        return _Miss("both is_causal and an explicit mask")
    if causal:
        b.alts.append("is_causal")
    if scale is not None:
        b.alts.append("scale")
    if scale is not None and _number(b.gm, scale) is None:
        return _Miss(f"the SDPA scale {scale} is computed in the graph, not a constant")
    b.scale = _float(_number(b.gm, scale)) if scale is not None else float("nan")
    b.nodes.append(node)
    k, v = _kv(b, k, v)
    if not (isinstance(q, Node) and isinstance(k, Node) and isinstance(v, Node)):
        return _Miss(_NO_SHAPE)
    if isinstance(mask, Node) and not isinstance(_val(mask), torch.Tensor):
        return _Miss(_NO_MASK_META)
    return _Core("sdpa", node, q, k, v, node, mask if isinstance(mask, Node) else None,
                 _mask_kind(mask) if isinstance(mask, Node) else "additive", causal, b)


def _probs_chain(b: _Build, softmax: Node) -> Node | _Miss | None:
    """``softmax → keep* → PV``: the PV node; None when the softmax feeds no product at all."""
    cur = softmax
    while True:
        users = [u for u in cur.users if u in b.live]
        pv = [u for u in users if _is(u, _MATMULS) and u.args[0] is cur]
        if len(users) > 1:
            if pv or any(_feeds_pv(u, b.live) for u in users if _is(u, _KEEP)):
                others = ", ".join(sorted({str(u.target) if u.op != "output" else "the graph output"
                                           for u in users if u not in pv}))
                return _Miss(f"the attention weights are also used outside the site (by {others}; "
                             "e.g. returned with output_attentions / need_weights=True)")
            return None
        if not users:
            return None
        user = users[0]
        if _is(user, _KEEP):
            if user.target == aten.dropout.default and len(user.args) > 2 and user.args[2]:
                return _Miss("dropout on the attention weights is active (export in eval mode)")
            b.nodes.append(user)
            b.alts.append("dropout" if user.target == aten.dropout.default else "cast")
            cur = user
            continue
        if _is(user, {aten.einsum.default}):
            return _Miss(f"attention spelled with einsum ({user.args[0]!r}) is not matched; "
                         "write it with matmul or F.scaled_dot_product_attention")
        return user if pv else None


def _feeds_pv(node: Node, live: set[Node]) -> bool:
    """``node`` reaches the first operand of a matmul/bmm through ``keep`` ops."""
    for u in node.users:
        if u in live and ((_is(u, _MATMULS) and u.args[0] is node)
                          or (_is(u, _KEEP) and _feeds_pv(u, live))):
            return True
    return False


def _add_operands(b: _Build, node: Node) -> tuple[Node, Node] | None:
    """``(scores side, mask side)`` of ``scores + m`` (either order)."""
    a, c = node.args[0], node.args[1]
    if not (isinstance(a, Node) and isinstance(c, Node)):
        return None
    reach = [_reaches_product(b.gm, x) for x in (a, c)]
    if reach[0] and not reach[1]:
        return a, c
    if reach[1] and not reach[0]:
        return c, a
    return None


def _reaches_product(gm: GraphModule, node: Argument) -> bool:
    for _ in range(8):
        if _is(node, _MATMULS | {aten.baddbmm.default}):
            return True
        if _is(node, _KEEP):
            node = node.args[0]
        elif (m := _scale_of(gm, node)) is not None:
            node = m[0]
        else:
            return False
    return False


def _near_product(node: Node, depth: int = 6) -> bool:
    """``node`` reaches a matmul/bmm within ``depth`` ops downstream."""
    frontier = {node}
    for _ in range(depth):
        frontier = {u for n in frontier for u in n.users if u.op == "call_function"}
        if any(_is(u, _MATMULS) for u in frontier):
            return True
    return False


def _match_eager(b: _Build, softmax: Node) -> _Core | _Miss | None:
    """Match eager attention around one softmax node; None when it is no attention at all."""
    args = list(softmax.args) + [None, None]
    dim = args[1]
    dtype = softmax.kwargs.get("dtype", args[2] if softmax.target == aten.softmax.int else None)
    pv = _probs_chain(b, softmax)
    if not isinstance(pv, Node):
        return pv
    b.nodes += [softmax, pv]
    rank = len(_shape(softmax) or ())
    if dim not in (-1, rank - 1):
        return _Miss(f"softmax over dim {dim}, not the key dim")
    b.alts.insert(0, "softmax(dtype)" if dtype is not None else "softmax")
    # upward: masked := scaled [+ m | masked_fill | where]; scaled := scores × c …
    x, semantics, scaled_above_mask = softmax.args[0], "additive", False
    mask: Argument = None
    scores: Argument
    while True:
        x = b.keep(x)
        if isinstance(x, Node) and (m := _scale_of(b.gm, x)) is not None:
            b.nodes.append(x)
            x, factor = m
            b.scale *= factor
            b.alts.append("scale:scores")
            scaled_above_mask = scaled_above_mask or mask is None
            continue
        if _is(x, _MASK_OPS):
            if mask is not None:
                return _Miss("two masks are applied to the scores; SDPA takes one")
            if scaled_above_mask:
                return _Miss("the scores are scaled after the mask is applied ((s + m)·c)")
            if x.target == aten.add.Tensor:
                ops = _add_operands(b, x)
                if ops is None:
                    return _Miss("the scores are a sum of two products or of unknown terms "
                                 "(e.g. relative-position attention); no single q·kᵀ")
                scores, mask, semantics, alt = ops[0], ops[1], "additive", "mask:add"
            elif x.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
                fill = _number(b.gm, x.args[2])
                if fill is None or fill > ADDITIVE_MASK_PADDING:
                    return _Miss(f"masked_fill of the scores with {x.args[2]}, not a large "
                                 "negative value")
                scores, mask, semantics, alt = x.args[0], x.args[1], "inverted", "mask:masked_fill"
            else:
                cond, a, c = x.args[0], x.args[1], x.args[2]
                fa, fc = _number(b.gm, a), _number(b.gm, c)
                if isinstance(a, Node) and fc is not None and fc <= ADDITIVE_MASK_PADDING:
                    scores, semantics = a, "bool"
                elif isinstance(c, Node) and fa is not None and fa <= ADDITIVE_MASK_PADDING:
                    scores, semantics = c, "inverted"
                else:
                    return _Miss("where() on the scores does not fill with a large negative value")
                mask, alt = cond, "mask:where"
            b.nodes.append(x)
            b.alts.append(alt)
            x = scores
            continue
        break
    if _is(x, {aten.baddbmm.default}):
        beta = x.kwargs.get("beta", x.args[3] if len(x.args) > 3 else 1)
        alpha = x.kwargs.get("alpha", x.args[4] if len(x.args) > 4 else 1)
        alpha_value = _number(b.gm, alpha)
        if beta != 1 or alpha_value is None:
            return _Miss(f"baddbmm with beta={beta}, alpha={alpha}")
        if mask is not None:
            return _Miss("two masks are applied to the scores; SDPA takes one")
        mask, semantics = x.args[0], "additive"
        b.scale *= alpha_value
        b.alts.insert(0, "baddbmm")
        qk_args = (x.args[1], x.args[2])
    elif _is(x, _MATMULS):
        b.alts.insert(0, "matmul" if x.target == aten.matmul.default else "bmm")
        qk_args = (x.args[0], x.args[1])
    else:
        what = x.target if isinstance(x, Node) and x.op == "call_function" else getattr(x, "op", x)
        return _Miss(f"{what} between the q·kᵀ product and softmax (e.g. soft-capping or a bias); "
                     "not a softmax-attention core")
    b.nodes.append(x)
    s0 = b.scale
    q = b.unscale(qk_args[0])
    if b.scale != s0:
        b.alts.append("scale:q")
    s0 = b.scale
    kt = b.unscale(qk_args[1])
    if not _is(kt, {aten.transpose.int, aten.permute.default}):
        return _Miss("the second operand of the scores product is not a transposed key tensor")
    r = len(_shape(kt) or ())
    if r < 2:
        return _Miss(_NO_SHAPE)
    if kt.target == aten.transpose.int:
        swapped = sorted(_int(d) % r for d in kt.args[1:3]) == [r - 2, r - 1]
    else:
        swapped = [_int(d) % r for d in _seq(kt.args[1])] == [*range(r - 2), r - 1, r - 2]
    if not swapped:
        return _Miss(f"the key is permuted by {list(kt.args[1:])}, not a swap of its last two "
                     "dims; there is no [B, Hkv, S, Dk] key tensor to hand to a replacement")
    b.nodes.append(kt)
    k = b.unscale(kt.args[0])
    if b.scale != s0:
        b.alts.append("scale:k")
    v = pv.args[1]
    k, v = _kv(b, k, v)
    if not (isinstance(q, Node) and isinstance(k, Node) and isinstance(v, Node)):
        return _Miss(_NO_SHAPE)
    if mask is not None and not isinstance(mask, Node):
        return _Miss(f"the mask {mask!r} is not a tensor of the graph")
    return _Core("eager", softmax, q, k, v, pv, mask, semantics, False, b)


#: The order alternatives are listed in :attr:`AttentionSite.pattern`.
_ALT_ORDER = ("matmul", "bmm", "baddbmm", "scale:q", "scale:k", "scale:scores", "scale",
              "mask:add", "mask:masked_fill", "mask:where", "softmax", "softmax(dtype)", "cast",
              "dropout", "repeat_kv", "enable_gqa", "is_causal", "mask:dropped", "mask:causal",
              "masking:")


def _ordered(alts: list[str]) -> list[str]:
    def rank(a: str) -> int:
        return next((i for i, p in enumerate(_ALT_ORDER) if a == p or (p.endswith(":") and
                                                                       a.startswith(p))), 99)
    return sorted(dict.fromkeys(alts), key=rank)


def _site(gm: GraphModule, core: _Core, masks: dict) -> AttentionSite | _Miss:
    """Check shapes, classify the mask, and build the record."""
    b = core.build
    heads = _heads(core.q, core.k, core.v)
    if isinstance(heads, _Miss):
        return heads
    h, hkv, dk, dv, layout = heads
    scale = dk ** -0.5 if b.scale != b.scale else b.scale  # NaN: SDPA default
    causal, mask, alts = core.causal_flag, core.mask, list(b.alts)
    if mask is not None:
        key = (mask.name, core.mask_semantics)
        if key not in masks:
            masks[key] = classify_mask(gm, mask, core.mask_semantics)
        pat: MaskPattern | str = masks[key]
        if isinstance(pat, str):
            return _Miss(pat)
        causal = pat.structure == "causal"
        if pat.masks_nothing or (causal and not pat.padding):
            alts.append("mask:dropped" if pat.masks_nothing else "mask:causal")
            mask = None
        elif core.mask_semantics == "inverted":
            mask = _attend_mask(mask)
            if mask is None:
                return _Miss("the masked_fill/where condition (True = masked) has no True = attend "
                             "boolean counterpart in the graph to hand to the replacement")
        alts.append("masking:" + ("+".join(["causal"] * causal + ["padding"] * pat.padding)
                                  or "none"))
    if mask is not None and not isinstance(_val(mask), torch.Tensor):
        return _Miss(_NO_MASK_META)
    mask_kind = "none" if mask is None else _mask_kind(mask)
    return AttentionSite(
        id="", module_path=module_path(core.node), kind=core.kind, q=core.q.name, k=core.k.name,
        v=core.v.name, mask=mask.name if mask is not None else None, output=core.output.name,
        internal=b.internal(core.output), num_heads=h, num_kv_heads=hkv, head_dim=dk,
        head_dim_v=dv, causal=causal, mask_kind=mask_kind, scale=scale, layout=layout,
        pattern=f"{core.kind}:" + ",".join(_ordered(alts)),
    )


def find_attention(gm: GraphModule) -> AttentionScan:
    """Find every attention site of ``gm`` (a captured, pre-decomposition ATen graph).

    Returns sites in graph order with ids ``site0``, ``site1``…, and the rejected look-alikes.
    """
    live = _live_nodes(gm)
    masks: dict = {}
    found: list[AttentionSite] = []
    rejected: list[Rejected] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node not in live:
            continue
        res: _Core | AttentionSite | _Miss | None = None
        if node.target == SDPA:
            res = _match_sdpa(_Build(gm, live), node)
        elif node.target in _SOFTMAX:
            res = _match_eager(_Build(gm, live), node)
            if res is None and node.target == aten._softmax.default and _near_product(node):
                res = _Miss("decomposed softmax (aten._softmax, as run_decompositions writes SDPA "
                            "and softmax) feeding a product: find attention on the graph before "
                            "run_decompositions")
        elif node.target in _FUSED:
            res = _Miss(f"fused kernel {node.target}: q, k and v are not separate tensors (the "
                        "inference fast path; capture with torch.export, which takes the "
                        "standard path)")
        elif node.target in _DECOMPOSED_SDPA:
            res = _Miss(f"decomposed SDPA kernel {node.target}: find attention on the graph "
                        "before run_decompositions")
        if isinstance(res, _Core):
            res = _site(gm, res, masks)
        if isinstance(res, AttentionSite):
            found.append(res)
        elif isinstance(res, _Miss):
            rejected.append(Rejected(node.name, module_path(node), str(res)))
    sites = tuple(replace(s, id=f"site{i}") for i, s in enumerate(found))
    return AttentionScan(sites=sites, rejected=tuple(rejected))


__all__ = ["SEARCHED_FOR", "AttentionScan", "AttentionSite", "Rejected", "find_attention",
           "module_path"]
