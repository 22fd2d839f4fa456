"""Pass: locate attention sites in the captured ATen graph.

An *attention site* is one softmax-attention core: ``softmax(q kᵀ · scale + mask) v`` with
``q: [B, H, T, Dk]``, ``k: [B, Hkv, S, Dk]``, ``v: [B, Hkv, S, Dv]`` and output ``[B, H, T, Dv]``.
The projections around it (q/k/v/o linears, rotary embeddings) stay outside the site, so the
site's q and k already carry any rotary embedding.

Two spellings are recognised on the pre-decomposition ATen graph that ``torch.export`` gives:

* ``aten.scaled_dot_product_attention`` (any mask, ``is_causal``, ``scale``, ``enable_gqa``);
* eager attention: ``matmul(q, kᵀ)`` → optional ``mul``/``div`` by a constant → optional
  additive mask → ``softmax(-1)`` → optional ``dropout`` / dtype cast → ``matmul(·, v)``.

Each site is named by its module path from ``node.meta["nn_module_stack"]``. Anything that looks
like attention but cannot be rewritten is returned as a :class:`Rejected` record with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

SDPA = aten.scaled_dot_product_attention.default
_MATMULS = {aten.matmul.default, aten.bmm.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_PASSTHROUGH = {aten.dropout.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default,
                aten.clone.default, aten.contiguous.default, aten.alias.default}
_TRANSPOSES = {aten.transpose.int, aten.permute.default, aten.t.default}


@dataclass(frozen=True)
class AttentionSite:
    """One rewritable attention site. Node fields are node names in the captured graph.

    Attributes:
        id: stable id, ``"site{i}"`` in graph order.
        module_path: owner module path from ``nn_module_stack`` (``encoder.layer.3.attention.self``).
        kind: ``"sdpa"`` or ``"eager"``.
        q, k, v: nodes of ``q: [B, H, T, Dk]``, ``k: [B, Hkv, S, Dk]``, ``v: [B, Hkv, S, Dv]``.
        mask: node of the boolean or additive mask broadcastable to ``[B, H, T, S]``, or None.
        output: node of the site's output ``[B, H, T, Dv]``.
        internal: names of the nodes that the rewrite replaces (output included).
        num_heads, num_kv_heads, head_dim, head_dim_v: ``H``, ``Hkv``, ``Dk``, ``Dv``.
        causal: True for ``is_causal=True`` sites.
        mask_kind: ``"none"``, ``"bool"`` (True = attend) or ``"additive"`` (added to scores).
        scale: the softmax scale (``1/sqrt(Dk)`` when the graph gives none).
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


def module_path(node: Node) -> str:
    """The innermost module path in ``node.meta["nn_module_stack"]`` ("" at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    # torch.export spells list indices as L['self'].layer[0] in some versions; normalise.
    return str(path).replace("L['self'].", "").replace("[", ".").replace("]", "")


def _shape(node: object) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    shape = getattr(val, "shape", None)
    if shape is None:
        return None
    return tuple(int(s) if not isinstance(s, torch.SymInt) else -1 for s in shape)


def _dtype(node: Node) -> torch.dtype | None:
    return getattr(node.meta.get("val"), "dtype", None)


def _heads(q: Node, k: Node, v: Node) -> tuple[int, int, int, int] | str:
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    if qs is None or ks is None or vs is None:
        return "q/k/v have no shape metadata"
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return f"q/k/v are not 4-D [B, H, T, D] (got ranks {len(qs)}, {len(ks)}, {len(vs)})"
    h, hkv = qs[1], ks[1]
    if h <= 0 or hkv <= 0 or h % hkv != 0:
        return f"query heads {h} not a multiple of key/value heads {hkv}"
    return h, hkv, qs[3], vs[3]


def _mask_kind(mask: Node | None) -> str:
    if mask is None:
        return "none"
    return "bool" if _dtype(mask) == torch.bool else "additive"


def _match_sdpa(node: Node) -> AttentionSite | Rejected:
    args = list(node.args) + [None] * (8 - len(node.args))
    q, k, v = args[0], args[1], args[2]
    mask = node.kwargs.get("attn_mask", args[3])
    dropout_p = node.kwargs.get("dropout_p", args[4]) or 0.0
    causal = bool(node.kwargs.get("is_causal", args[5]) or False)
    scale = node.kwargs.get("scale", args[6])
    path = module_path(node)
    heads = _heads(q, k, v)
    if isinstance(heads, str):
        return Rejected(node.name, path, heads)
    if dropout_p:
        return Rejected(node.name, path, f"dropout_p={dropout_p} inside attention (export in eval mode)")
    if causal and mask is not None:
        return Rejected(node.name, path, "both is_causal and an explicit mask")
    h, hkv, dk, dv = heads
    return AttentionSite(
        id="", module_path=path, kind="sdpa", q=q.name, k=k.name, v=v.name,
        mask=mask.name if isinstance(mask, Node) else None, output=node.name,
        internal=(node.name,), num_heads=h, num_kv_heads=hkv, head_dim=dk, head_dim_v=dv,
        causal=causal, mask_kind=_mask_kind(mask if isinstance(mask, Node) else None),
        scale=float(scale) if scale is not None else dk ** -0.5,
    )


def _is_call(node: object, targets: set) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _const(x: object) -> float | None:
    if isinstance(x, (int, float)):
        return float(x)
    return None


def _match_eager(softmax: Node) -> AttentionSite | Rejected | None:
    """Match eager attention around one softmax node; None when it is no attention at all."""
    path = module_path(softmax)
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    internal: list[Node] = [softmax]
    # downstream: softmax -> [dropout | cast]* -> matmul(probs, v)
    cur = softmax
    while True:
        users = list(cur.users)
        if len(users) != 1:
            if any(_is_call(u, _MATMULS) for u in users):
                return Rejected(softmax.name, path,
                                "the attention weights are also used outside the site "
                                "(e.g. returned as an output)")
            return None
        user = users[0]
        if _is_call(user, _PASSTHROUGH):
            internal.append(user)
            cur = user
            continue
        break
    if not (_is_call(user, _MATMULS) and user.args[0] is cur):
        return None
    out, v = user, user.args[1]
    internal.append(out)
    # upstream: scores -> [add mask | masked_fill] -> [mul/div const] -> matmul(q, kᵀ)
    x = softmax.args[0]
    mask: Node | None = None
    scale = 1.0
    while isinstance(x, Node) and x.op == "call_function":
        if x.target in (aten.add.Tensor,) and isinstance(x.args[1], Node) and mask is None:
            if len(x.users) != 1:
                break
            internal.append(x)
            mask = x.args[1]
            x = x.args[0]
        elif x.target in (aten.mul.Tensor, aten.div.Tensor) and _const(x.args[1]) is not None:
            c = _const(x.args[1])
            scale *= c if x.target == aten.mul.Tensor else 1.0 / c
            internal.append(x)
            x = x.args[0]
        elif x.target in _PASSTHROUGH:
            internal.append(x)
            x = x.args[0]
        else:
            break
    if not _is_call(x, _MATMULS):
        return None
    scores = x
    internal.append(scores)
    q, kt = scores.args[0], scores.args[1]
    if not _is_call(kt, _TRANSPOSES):
        return Rejected(softmax.name, path, "scores matmul whose second operand is not a transposed key")
    k = kt.args[0]
    if kt.target == aten.transpose.int:
        dims = sorted(d % 4 for d in kt.args[1:3])
        if dims != [2, 3]:
            return Rejected(softmax.name, path, f"key transposed on dims {kt.args[1:3]}, not the last two")
    elif kt.target == aten.permute.default and [d % 4 for d in kt.args[1]] != [0, 1, 3, 2]:
        return Rejected(softmax.name, path, f"key permuted by {kt.args[1]}, not a last-two swap")
    if len(kt.users) == 1:
        internal.append(kt)
    if dim not in (-1, 3):
        return Rejected(softmax.name, path, f"softmax over dim {dim}, not the key dim")
    heads = _heads(q, k, v)
    if isinstance(heads, str):
        return Rejected(softmax.name, path, heads)
    if mask is not None and _shape(mask) is not None and len(_shape(mask)) != 4:
        return Rejected(softmax.name, path, f"mask of rank {len(_shape(mask))}, expected 4")
    h, hkv, dk, dv = heads
    return AttentionSite(
        id="", module_path=path, kind="eager", q=q.name, k=k.name, v=v.name,
        mask=mask.name if mask is not None else None, output=out.name,
        internal=tuple(n.name for n in internal), num_heads=h, num_kv_heads=hkv, head_dim=dk,
        head_dim_v=dv, causal=False, mask_kind=_mask_kind(mask), scale=scale,
    )


def find_attention(gm: GraphModule) -> AttentionScan:
    """Find every attention site of ``gm`` (a captured, pre-decomposition ATen graph).

    Returns sites in graph order with ids ``site0``, ``site1``…, and the rejected look-alikes.
    """
    found: list[AttentionSite] = []
    rejected: list[Rejected] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        res: AttentionSite | Rejected | None = None
        if node.target == SDPA:
            res = _match_sdpa(node)
        elif node.target in _SOFTMAX:
            res = _match_eager(node)
        if isinstance(res, AttentionSite):
            found.append(res)
        elif isinstance(res, Rejected):
            rejected.append(res)
    sites = tuple(
        AttentionSite(**{**s.__dict__, "id": f"site{i}"}) for i, s in enumerate(found)
    )
    return AttentionScan(sites=sites, rejected=tuple(rejected))


__all__ = ["AttentionScan", "AttentionSite", "Rejected", "find_attention", "module_path"]
