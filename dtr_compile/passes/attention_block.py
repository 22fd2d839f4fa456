"""Pass: the attention *block* of a site, from the owner module's input hidden states to the
output of its output projection, as a subgraph that can be run, trained and swapped on its own.

The block is what ``--distill-target block`` trains (DtR's blockwise form): its q/k/v/o
projections start from the teacher's weights and train together with the feature map. It is
found from the site alone:

1. the *output projection*: from the site's output, follow single-use layout ops (view, reshape,
   transpose, permute, contiguous, …) to the first linear map with a weight attribute
   (``linear``, ``addmm``, ``mm``/``matmul`` by a weight, with a following bias ``add``);
2. the *owner* module: the innermost module holding both the site and that projection, by
   ``nn_module_stack`` (BERT: ``encoder.layer.3.attention`` holds ``.self`` with the site and
   ``.output.dense``; Llama: ``layers.3.self_attn`` holds ``o_proj``);
3. the *block*: the projection's ancestors that run inside the owner. What the block reads from
   outside is its inputs: tensors (hidden states, the mask, rotary tables), weight attributes,
   and sizes (``sym_size`` of a tensor computed outside, which the block recomputes from its own
   tensor inputs so that it runs on any batch). Nodes of the owner after the projection (BERT's
   residual add and LayerNorm) stay outside the block, with the teacher's weights.

A block is rejected (a :class:`BlockMiss` carrying the reason) when no projection follows the
site, when an intermediate value of the block is used outside it, or when a size cannot be
recomputed. :func:`block_module` turns a block into a standalone ``GraphModule``
``(*inputs) → output``, either the teacher itself (sharing the teacher's weights, never copies)
or a student (the site replaced by a module, the weights copied).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from dtr_compile.linear.kernel import SiteSwitch
from dtr_compile.passes.find_attention import AttentionSite

aten = torch.ops.aten

#: Ops between a site's output and its output projection that only move or relabel values.
_LAYOUT = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
           aten.transpose.int, aten.permute.default, aten.contiguous.default, aten.clone.default,
           aten.flatten.using_ints, aten.alias.default, aten.to.dtype, aten._to_copy.default,
           aten.dropout.default}
#: Linear maps that can be an output projection: (op, index of the activation, index of the weight).
_PROJECTIONS = {aten.linear.default: (0, 1), aten.addmm.default: (1, 2), aten.mm.default: (0, 1),
                aten.matmul.default: (0, 1)}
_WEIGHT_VIEWS = {aten.t.default, aten.transpose.int, aten.permute.default}
_MAX_LAYOUT_HOPS = 8
#: Where a student block keeps its replacement of the site, and the prefix of its own weights.
ATTENTION_MODULE = "attention"
WEIGHTS_PREFIX = "weights."


class BlockMiss(str):
    """Why a site has no block (a falsy-by-type failure: test with ``isinstance``)."""


@dataclass(frozen=True)
class AttentionBlock:
    """The owner-module subgraph of one site. Node fields are node names in the captured graph.

    Attributes:
        site_id: the site inside the block.
        owner: module path of the owner module (``encoder.layer.3.attention``).
        projection: module path of the output projection (``encoder.layer.3.attention.output.dense``).
        inputs: tensor nodes read from outside, in graph order (hidden states ``[B, T, C]``,
            the mask, …).
        sizes: ``(size node, input index, dim)``: each size the block reads from outside is
            ``inputs[input index].shape[dim]``.
        weights: ``get_attr`` nodes the block reads (its projections' weights and biases).
        nodes: the block's nodes in graph order (output last).
        output: the output projection's node, ``[B, T, C]``.
    """

    site_id: str
    owner: str
    projection: str
    inputs: tuple[str, ...]
    sizes: tuple[tuple[str, int, int], ...]
    weights: tuple[str, ...]
    nodes: tuple[str, ...]
    output: str

    def describe(self) -> str:
        """One line: owner, inputs and weight count."""
        return (f"{self.site_id} block {self.owner} ({len(self.nodes)} nodes, inputs "
                f"{list(self.inputs)}, {len(self.weights)} weights, output {self.output})")


def _norm_path(path: object) -> str:
    return str(path).replace("L['self'].", "").replace("[", ".").replace("]", "")


def _stack_paths(node: Node) -> list[str]:
    """Every module path in ``node.meta["nn_module_stack"]``, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [_norm_path(path) for path, _cls in stack.values()]


def _innermost(node: Node) -> str:
    paths = _stack_paths(node)
    return paths[-1] if paths else ""


def _is_weight(node: object) -> bool:
    """A ``get_attr`` node, possibly viewed (``t``, ``transpose``, ``permute``)."""
    while isinstance(node, Node) and node.op == "call_function" and node.target in _WEIGHT_VIEWS:
        node = node.args[0]
    return isinstance(node, Node) and node.op == "get_attr"


def _common_module(a: str, b: str) -> str:
    """The longest common module-path prefix of ``a`` and ``b``, whole components only."""
    common: list[str] = []
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _output_projection(site_out: Node) -> Node | BlockMiss:
    """The projection node after the site (with its bias ``add``, if separate)."""
    node = site_out
    for _ in range(_MAX_LAYOUT_HOPS):
        users = list(node.users)
        if len(users) != 1:
            return BlockMiss(f"{node.name} has {len(users)} users between the site and an output "
                             "projection (expected one chain of layout ops)")
        user = users[0]
        if user.op == "call_function" and user.target in _PROJECTIONS:
            x_idx, w_idx = _PROJECTIONS[user.target]
            if len(user.args) > w_idx and user.args[x_idx] is node and _is_weight(user.args[w_idx]):
                out = user
                if user.target in (aten.mm.default, aten.matmul.default) and len(out.users) == 1:
                    add = next(iter(out.users))
                    if (add.op == "call_function" and add.target == aten.add.Tensor
                            and any(_is_weight(a) for a in add.args)):
                        out = add
                return out
            return BlockMiss(f"{user.name} ({user.target}) after the site is not a projection by "
                             "a weight")
        if user.op == "call_function" and user.target in _LAYOUT:
            node = user
            continue
        return BlockMiss(f"{user.name} ({getattr(user.target, '__name__', user.target)}) follows "
                         "the site before any output projection")
    return BlockMiss(f"no output projection within {_MAX_LAYOUT_HOPS} layout ops of the site")


def _size_source(size: Node, inputs: list[Node]) -> tuple[int, int] | None:
    """``(input index, dim)`` of an input whose shape holds the symbolic size ``size``."""
    val = size.meta.get("val")
    expr = getattr(getattr(val, "node", None), "expr", None)
    if expr is None:
        return None
    for i, inp in enumerate(inputs):
        shape = getattr(inp.meta.get("val"), "shape", ())
        for d, s in enumerate(shape):
            if isinstance(s, torch.SymInt) and s.node.expr == expr:
                return i, d
    return None


def find_block(gm: GraphModule, site: AttentionSite) -> AttentionBlock | BlockMiss:
    """The attention block of ``site`` in ``gm``, or a :class:`BlockMiss` saying why not."""
    nodes = {n.name: n for n in gm.graph.nodes}
    if site.output not in nodes:
        return BlockMiss(f"the site's output {site.output} is not in the graph")
    proj = _output_projection(nodes[site.output])
    if isinstance(proj, BlockMiss):
        return proj
    owner = _common_module(site.module_path, _innermost(proj))
    if not owner:
        return BlockMiss(f"the site ({site.module_path}) and its output projection "
                         f"({_innermost(proj) or 'top level'}) share no module")

    def inside(n: Node) -> bool:
        return n.op == "call_function" and owner in _stack_paths(n)

    block: set[Node] = set()
    stack = [proj]
    while stack:
        n = stack.pop()
        if n in block:
            continue
        block.add(n)
        stack.extend(a for a in n.all_input_nodes if inside(a))
    for name in (site.output, *site.internal):
        if nodes[name] not in block:
            return BlockMiss(f"site node {name} is not inside the owner module {owner}")
    order = [n for n in gm.graph.nodes if n in block]
    escaping = [n.name for n in order if n is not proj and any(u not in block for u in n.users)]
    if escaping:
        return BlockMiss(f"values inside the block are used outside it: {escaping}")

    external = [a for n in order for a in n.all_input_nodes if a not in block]
    seen: set[Node] = set()
    tensors: list[Node] = []
    sizes: list[Node] = []
    weights: list[Node] = []
    for a in external:
        if a in seen:
            continue
        seen.add(a)
        val = a.meta.get("val")
        if a.op == "get_attr":
            weights.append(a)
        elif isinstance(val, torch.Tensor):
            tensors.append(a)
        elif isinstance(val, torch.SymInt):
            sizes.append(a)
        else:
            return BlockMiss(f"the block reads {a.name} from outside, which is neither a tensor, "
                             f"a weight nor a size ({type(val).__name__})")
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    tensors.sort(key=position.__getitem__)
    size_map = []
    for s in sizes:
        src = _size_source(s, tensors)
        if src is None:
            return BlockMiss(f"size {s.name} used by the block is not a dim of any of its inputs "
                             f"{[t.name for t in tensors]}")
        size_map.append((s.name, *src))
    return AttentionBlock(
        site_id=site.id, owner=owner, projection=_innermost(proj),
        inputs=tuple(t.name for t in tensors), sizes=tuple(size_map),
        weights=tuple(w.name for w in sorted(weights, key=position.__getitem__)),
        nodes=tuple(n.name for n in order), output=proj.name)


def block_module(
    gm: GraphModule,
    block: AttentionBlock,
    site: AttentionSite,
    attention: nn.Module | None = None,
    *,
    copy_weights: bool = False,
) -> GraphModule:
    """The block as a standalone ``GraphModule``: ``(*block.inputs) → block.output``.

    Args:
        gm: the captured graph the block was found in.
        block: from :func:`find_block`.
        site: the site inside the block.
        attention: replaces the site (called as ``attention(q, k, v[, mask])``, registered as
            submodule ``attention``); None keeps the teacher's own attention nodes. The weights
            are attributes ``weights.<get_attr node name>``.
        copy_weights: give the module its own copies of the weights (as trainable
            ``nn.Parameter``s where the teacher's are parameters); otherwise the module shares
            the teacher's tensors, which must then never be trained or changed in place.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    graph = Graph()
    env: dict[str, Node] = {}
    root: dict[str, object] = {}
    for name in block.inputs:
        env[name] = graph.placeholder(name)
        env[name].meta = dict(nodes[name].meta)
    for name, idx, dim in block.sizes:
        env[name] = graph.call_function(aten.sym_size.int, (env[block.inputs[idx]], dim))
        env[name].meta = dict(nodes[name].meta)
    for name in block.weights:
        value = operator.attrgetter(nodes[name].target)(gm)
        if copy_weights and isinstance(value, torch.Tensor):
            copied = value.detach().clone()
            value = nn.Parameter(copied) if isinstance(value, nn.Parameter) else copied
        root[WEIGHTS_PREFIX + name] = value
        env[name] = graph.get_attr(WEIGHTS_PREFIX + name)
        env[name].meta = dict(nodes[name].meta)
    internal = set(site.internal) | {site.output}
    if attention is not None:
        root[ATTENTION_MODULE] = attention
    for name in block.nodes:
        n = nodes[name]
        if attention is not None and name in internal:
            if name == site.output:
                args = [env[site.q], env[site.k], env[site.v]]
                if site.mask:
                    args.append(env[site.mask])
                env[name] = graph.call_module(ATTENTION_MODULE, tuple(args))
                env[name].meta = dict(n.meta)
            continue
        env[name] = graph.node_copy(n, lambda a: env[a.name])
    graph.output(env[block.output])
    graph.lint()
    return GraphModule(root, graph, class_name="AttentionBlockGraph")


class BlockSwitch(SiteSwitch):
    """A block that runs either the teacher's block or the student's, by ``use_linear``: the
    :class:`SiteSwitch` of a ``block``-target site (same flag, same exact swap)."""

    def forward(self, *args: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return (self.linear if self.use_linear else self.softmax)(*args)
