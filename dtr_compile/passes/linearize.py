"""Pass: rewrite attention sites into calls of replacement modules.

Functional: the input GraphModule is never mutated. The result shares every parameter with the
input (no weight copies) and adds the replacement modules under ``dtr.<site id>``. Each site's
output node is replaced by ``call_module dtr.<id>(q, k, v[, mask])``, which keeps the output node's
``meta`` (shapes, ``nn_module_stack``); the site's internal nodes are erased.

A site given with its attention block (``blocks``, see
:mod:`dtr_compile.passes.attention_block`) is replaced as a whole block instead: the block's
output node becomes ``call_module dtr.<id>(*block inputs)`` and every node of the block is
erased, with the teacher weights only the block read; the module carries its own weights.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from dtr_compile.errors import PassError
from dtr_compile.passes.attention_block import AttentionBlock
from dtr_compile.passes.find_attention import AttentionSite

MODULE_PREFIX = "dtr"


def _resolve(gm: GraphModule, target: str) -> object:
    return operator.attrgetter(target)(gm)


def rewrite_sites(
    gm: GraphModule,
    sites: Sequence[AttentionSite],
    modules: Mapping[str, nn.Module],
    *,
    class_name: str = "HybridGraph",
    blocks: Mapping[str, AttentionBlock] | None = None,
) -> GraphModule:
    """Return a copy of ``gm`` where each site whose id is in ``modules`` calls that module.

    Args:
        gm: the captured graph (flat inputs and outputs, see :mod:`dtr_compile.capture`).
        sites: sites found in ``gm`` by :func:`find_attention`.
        modules: ``{site id: module}``; each module maps ``(q, k, v[, mask])`` to the site output
            ``[B, H, T, Dv]``. Sites not in the mapping stay as they are.
        blocks: ``{site id: block}`` for sites whose module replaces the whole block, mapping
            ``(*block.inputs)`` to the block's output.

    Raises:
        PassError: a site's nodes are not in ``gm`` (the sites came from another graph).
    """
    graph = copy.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    new_targets: dict[str, nn.Module] = {}
    for site in sites:
        if site.id not in modules:
            continue
        block = (blocks or {}).get(site.id)
        if block is not None:
            _rewrite_block(graph, nodes, site, block, f"{MODULE_PREFIX}.{site.id}")
            new_targets[f"{MODULE_PREFIX}.{site.id}"] = modules[site.id]
            continue
        names = [site.q, site.k, site.v, site.output] + ([site.mask] if site.mask else [])
        missing = [n for n in names if n not in nodes]
        if missing:
            raise PassError(f"linearize: {site.id} ({site.module_path}) refers to nodes {missing} "
                            "that are not in the graph")
        out = nodes[site.output]
        args = [nodes[site.q], nodes[site.k], nodes[site.v]]
        if site.mask:
            args.append(nodes[site.mask])
        target = f"{MODULE_PREFIX}.{site.id}"
        new_targets[target] = modules[site.id]
        with graph.inserting_before(out):
            call = graph.call_module(target, tuple(args))
        call.meta = dict(out.meta)
        out.replace_all_uses_with(call)
        # erase the site's internal nodes, consumers first
        internal = set(site.internal)
        for node in reversed(list(graph.nodes)):
            if node.name in internal and not node.users:
                graph.erase_node(node)
    graph.lint()
    root: dict[str, object] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            root[node.target] = new_targets.get(node.target) or _resolve(gm, node.target)
    return GraphModule(root, graph, class_name=class_name)


def _rewrite_block(graph: torch.fx.Graph, nodes: dict[str, torch.fx.Node], site: AttentionSite,
                   block: AttentionBlock, target: str) -> None:
    """Replace ``block``'s nodes in ``graph`` by ``call_module target(*block.inputs)``."""
    missing = [n for n in (*block.inputs, *block.nodes) if n not in nodes]
    if missing:
        raise PassError(f"linearize: the block of {site.id} ({block.owner}) refers to nodes "
                        f"{missing} that are not in the graph")
    out = nodes[block.output]
    with graph.inserting_before(out):
        call = graph.call_module(target, tuple(nodes[n] for n in block.inputs))
    call.meta = dict(out.meta)
    out.replace_all_uses_with(call)
    inside = set(block.nodes)
    for node in reversed(list(graph.nodes)):
        if node.name in inside and not node.users:
            graph.erase_node(node)
    for name in block.weights:  # teacher weights only the block read
        if not nodes[name].users:
            graph.erase_node(nodes[name])


def linearize(
    gm: GraphModule, sites: Sequence[AttentionSite], modules: Mapping[str, nn.Module],
    *, blocks: Mapping[str, AttentionBlock] | None = None,
) -> GraphModule:
    """The hybrid: ``gm`` with the given sites (or their blocks, for those in ``blocks``)
    replaced by their linear-attention modules."""
    return rewrite_sites(gm, sites, modules, class_name="HybridGraph", blocks=blocks)


def hybrid_parameters(gm: GraphModule) -> dict[str, torch.Tensor]:
    """The replacement modules' parameters (``dtr.<site>.<param>``), e.g. to save them."""
    return {k: v for k, v in gm.state_dict().items() if k.startswith(MODULE_PREFIX + ".")}
