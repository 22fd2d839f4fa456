"""Exact prefix cache for the schedule stage: run only what a candidate changes.

The search graph holds one :class:`~dtr_compile.linear.kernel.SiteSwitch` per candidate site.
:class:`SegmentedGraph` cuts it just before each switch, at the point between the previous switch
and this one where the fewest switch-dependent bytes are live (for a transformer: the residual
stream between two layers), and compiles each stretch into its own fx ``GraphModule``::

    inputs ─ seg 0 ─┤cut 0├─ seg 1 ─┤cut 1├─ … ─┤cut L−1├─ seg L ─ outputs
                     site0 is in seg 1; site i in seg i+1

The values live across cut ``i`` (its *state*) depend only on the flags of switches ``0 … i−1``,
since every other node before the cut precedes those switches in the graph's topological order.
:class:`PrefixCache` keeps states per validation batch under the key ``(i, flags of sites < i)``
and evaluates a linear-site set from the latest cut whose state it holds. Running the remaining
segments performs the same ATen ops on the same tensors as the whole graph, so outputs are
bitwise equal to an uncached run: the cache changes cost, never results.

Which states are kept: only those of the *base* configuration (the committed sites, which every
strategy passes as all but the last element of the set), at most ``capacity_bytes`` of them, and
states of a superseded base are dropped when the base changes. A greedy step over ``R`` remaining
sites thus runs the base once and each candidate from its own cut on: the layers before a
candidate are not recomputed. Memory: one state per cut, about ``N · T · C`` values (MiniLM,
445 rows × 256 tokens × 384 fp32: 175 MB); states that share a tensor (the attention mask, an
input) share its storage and count once.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Interpreter, Node

from dtr_compile.data import Dataset, _first_tensor
from dtr_compile.device import Placement, to_device
from dtr_compile.metrics import Metric


@dataclass(frozen=True)
class Cut:
    """Where the graph is cut before one switch.

    Attributes:
        site: the site whose switch follows the cut.
        position: index of the first node after the cut in the graph's node list.
        live: names of the nodes whose values cross the cut (the state).
        row_bytes: estimated bytes per data row that keeping this cut's state adds: its
            switch-dependent values, and the switch-independent ones not live at an earlier cut
            (those are the same tensors in every state, kept once).
    """

    site: str
    position: int
    live: tuple[str, ...]
    row_bytes: int


def _nbytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return min(value.numel() * value.element_size(), value.untyped_storage().nbytes())
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


class _SizeProbe(Interpreter):
    def __init__(self, gm: GraphModule) -> None:
        super().__init__(gm)
        self.bytes: dict[str, int] = {}

    def run_node(self, n: Node) -> object:
        out = super().run_node(n)
        self.bytes[n.name] = _nbytes(out)
        return out


class SegmentedGraph:
    """``gm`` cut before each switch into ``L + 1`` segment GraphModules sharing its weights.

    Args:
        gm: the search graph (flat positional inputs, flat tuple of outputs).
        switches: ``{site id: switch module}``; each must be called exactly once in ``gm``.
        probe_inputs: one small batch of positional inputs, used to size the live values.

    Raises:
        ValueError: a switch is not called exactly once in ``gm``.
    """

    def __init__(self, gm: GraphModule, switches: Mapping[str, nn.Module],
                 probe_inputs: Sequence[torch.Tensor]) -> None:
        self.gm = gm
        self.switches = dict(switches)
        nodes = list(gm.graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        by_module = {id(m): sid for sid, m in self.switches.items()}
        calls: dict[str, list[Node]] = {sid: [] for sid in self.switches}
        for n in nodes:
            if n.op == "call_module" and id(gm.get_submodule(n.target)) in by_module:
                calls[by_module[id(gm.get_submodule(n.target))]].append(n)
        bad = {sid: len(c) for sid, c in calls.items() if len(c) != 1}
        if bad:
            raise ValueError(f"each switch must be called once in the graph; call counts {bad}")
        order = sorted(self.switches, key=lambda sid: pos[calls[sid][0]])
        self.sites: tuple[str, ...] = tuple(order)

        # sizes, switch dependence and last use of every node
        probe = _SizeProbe(gm)
        with torch.inference_mode():
            probe.run(*probe_inputs)
        rows = max(1, int(probe_inputs[0].shape[0])) if probe_inputs else 1
        variant = {n for n in nodes if any(n is calls[s][0] for s in order)}
        for n in nodes:
            if any(a in variant for a in n.all_input_nodes):
                variant.add(n)
        last_use = {n: max((pos[u] for u in n.users), default=-1) for n in nodes}

        # sweep the positions once, keeping the live set and its bytes
        switch_pos = [pos[calls[s][0]] for s in order]
        cuts: list[Cut] = []
        live: dict[Node, None] = {}
        lo = max((pos[n] + 1 for n in nodes if n.op == "placeholder"), default=0)
        best: tuple[tuple[int, int, int], int, tuple[Node, ...]] | None = None
        counted: set[Node] = set()
        for p in range(len(nodes) + 1):
            if p > 0:
                prev = nodes[p - 1]
                if prev.op != "get_attr" and last_use[prev] >= p:
                    live[prev] = None
                for n in [n for n in live if last_use[n] < p]:
                    del live[n]
            if len(cuts) < len(order) and lo <= p <= switch_pos[len(cuts)]:
                var = sum(probe.bytes.get(n.name, 0) for n in live if n in variant)
                tot = sum(probe.bytes.get(n.name, 0) for n in live)
                key = (var, tot, -p)
                if best is None or key < best[0]:
                    best = (key, p, tuple(live))
                if p == switch_pos[len(cuts)]:
                    assert best is not None
                    (var_b, _, _), cut_p, cut_live = best
                    # switch-independent values are shared by every state: count each once
                    new_inv = [n for n in cut_live if n not in variant and n not in counted]
                    counted.update(new_inv)
                    add_b = var_b + sum(probe.bytes.get(n.name, 0) for n in new_inv)
                    cuts.append(Cut(order[len(cuts)], cut_p, tuple(n.name for n in cut_live),
                                    add_b // rows))
                    lo, best = p + 1, None
        self.cuts: tuple[Cut, ...] = tuple(cuts)

        bounds = [0] + [c.position for c in cuts] + [len(nodes)]
        by_name = {n.name: n for n in nodes}
        self.segments: list[GraphModule] = []
        for i in range(len(cuts) + 1):
            live_in = [by_name[x] for x in cuts[i - 1].live] if i > 0 else []
            live_out = [by_name[x] for x in cuts[i].live] if i < len(cuts) else None
            self.segments.append(self._segment(nodes[bounds[i]:bounds[i + 1]], live_in, live_out, i))

    def _segment(self, body: list[Node], live_in: list[Node], live_out: list[Node] | None,
                 index: int) -> GraphModule:
        """A GraphModule computing ``body`` from ``live_in`` (placeholders, or the graph's own
        inputs for segment 0) and returning ``live_out`` (or the graph's outputs, last segment).
        ``get_attr`` nodes are re-created where used instead of being passed across cuts."""
        g = Graph()
        env: dict[Node, Node] = {}
        for n in live_in:
            env[n] = g.placeholder(n.name)
            env[n].meta = dict(n.meta)

        def arg(x: Node) -> Node:
            if x not in env:
                if x.op != "get_attr":
                    raise AssertionError(f"segment {index}: {x.name} is neither computed nor "
                                         "live across the cut")
                env[x] = g.get_attr(x.target)  # type: ignore[arg-type]
            return env[x]

        for n in body:
            if n.op == "get_attr":
                continue
            if n.op == "output":
                g.output(torch.fx.map_arg(n.args[0], arg))
                continue
            env[n] = g.node_copy(n, arg)
        if live_out is not None:
            g.output(tuple(arg(n) for n in live_out))
        g.lint()
        return GraphModule(self.gm, g, class_name=f"SearchSegment{index}")


@dataclass
class CacheStats:
    """Work done by a :class:`PrefixCache`, in segments (one segment ≈ one layer)."""

    evaluations: int = 0
    segments_run: int = 0
    segments_full: int = 0  # what the same evaluations cost without the cache
    stored_bytes: int = 0
    peak_bytes: int = 0
    states_stored: int = 0
    states_dropped: int = 0
    per_cut_row_bytes: list[int] = field(default_factory=list)

    @property
    def saved(self) -> float:
        """Share of segment runs the cache saved."""
        return 1.0 - self.segments_run / self.segments_full if self.segments_full else 0.0

    def to_dict(self) -> dict[str, object]:
        return {"evaluations": self.evaluations, "segments_run": self.segments_run,
                "segments_full": self.segments_full, "saved": round(self.saved, 4),
                "stored_bytes": self.stored_bytes, "peak_bytes": self.peak_bytes,
                "states_stored": self.states_stored, "states_dropped": self.states_dropped,
                "per_cut_row_bytes": self.per_cut_row_bytes}


Key = tuple[int, tuple[bool, ...]]


class PrefixCache:
    """Evaluates the search graph on a dataset for a set of linear sites, reusing prefixes.

    Args:
        graph: the segmented search graph.
        data: the validation set, run in ``batch_size`` batches in order.
        input_names: the graph's inputs, in call order.
        metric: its :meth:`Metric.reduce` is applied to each batch's first output.
        capacity_bytes: the most state bytes kept (0: no cache, every evaluation runs in full).
        placement: the device (and autocast dtype) ``graph`` runs on; the data is moved there
            once and the reduced outputs come back to the CPU (see :mod:`dtr_compile.device`).
    """

    def __init__(self, graph: SegmentedGraph, data: Dataset, input_names: Sequence[str],
                 batch_size: int, metric: Metric | None = None, capacity_bytes: int = 1 << 30,
                 placement: Placement | None = None) -> None:
        self.graph, self.data, self.names = graph, data, list(input_names)
        self.batch_size, self.metric, self.capacity_bytes = batch_size, metric, capacity_bytes
        self.placement = placement or Placement()
        dev = self.placement.device
        self.batches = [to_device(b, dev) for b in data.batches(batch_size)]
        labels = data.labels
        self.labels = [None if labels is None else to_device(labels[i:i + batch_size], dev)
                       for i in range(0, len(data), batch_size)]
        self.states: dict[Key, list[tuple[object, ...]]] = {}
        self.base: tuple[bool, ...] | None = None
        self.stats = CacheStats(per_cut_row_bytes=[c.row_bytes for c in graph.cuts])

    def _flags(self, linear: Collection[str]) -> tuple[bool, ...]:
        unknown = set(linear) - set(self.graph.sites)
        if unknown:
            raise KeyError(f"sites {sorted(unknown)} are not switches of the search graph")
        return tuple(s in linear for s in self.graph.sites)

    def _set_base(self, base: tuple[bool, ...]) -> None:
        if base == self.base:
            return
        self.base = base
        for key in [k for k in self.states if k[1] != base[: k[0]]]:
            del self.states[key]
            self.stats.states_dropped += 1
        self._account()

    def _account(self) -> None:
        seen: dict[int, int] = {}
        for batches in self.states.values():
            for state in batches:
                for v in state:
                    if isinstance(v, torch.Tensor):
                        st = v.untyped_storage()
                        seen[st.data_ptr()] = st.nbytes()
        self.stats.stored_bytes = sum(seen.values())
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.stored_bytes)

    def outputs(self, linear: Collection[str], base: Collection[str] | None = None) -> torch.Tensor:
        """The (metric-reduced) first output over the data with exactly ``linear`` linear.

        Args:
            linear: site ids to run as linear attention; the others run softmax.
            base: the committed sites (a subset of ``linear``): states on the way that match
                them are kept for later evaluations. None keeps nothing new.
        """
        flags = self._flags(linear)
        if base is not None:
            self._set_base(self._flags(base))
        n_cuts = len(self.graph.cuts)
        start = max((i for i in range(n_cuts) if (i, flags[:i]) in self.states), default=-1)
        store: list[int] = []
        if base is not None and self.capacity_bytes > 0:
            budget = self.capacity_bytes - self.stats.stored_bytes
            for i in range(start + 1, n_cuts):
                if flags[:i] != self.base[:i]:  # type: ignore[index]
                    break
                cost = self.graph.cuts[i].row_bytes * len(self.data)
                if cost > budget:
                    break
                store.append(i)
                budget -= cost
        pending: dict[int, list[tuple[object, ...]]] = {i: [] for i in store}
        for sid, sw in self.graph.switches.items():
            sw.use_linear = sid in linear  # type: ignore[assignment]
        outs: list[torch.Tensor] = []
        try:
            with torch.inference_mode(), self.placement.autocast():
                for b, batch in enumerate(self.batches):
                    if start >= 0:
                        state: tuple[object, ...] = self.states[(start, flags[:start])][b]
                    else:
                        state = tuple(batch[n] for n in self.names)
                    for seg in range(start + 1, n_cuts + 1):
                        out = self.graph.segments[seg](*state)
                        if seg < n_cuts:
                            state = tuple(out)
                            if seg in pending:
                                pending[seg].append(state)
                        else:
                            y = _first_tensor(out)
                            outs.append((self.metric.reduce(y, batch, self.labels[b])
                                         if self.metric is not None else y.float()).cpu())
        finally:
            for sw in self.graph.switches.values():
                sw.use_linear = False  # type: ignore[assignment]
        for i, states in pending.items():
            self.states[(i, flags[:i])] = states
            self.stats.states_stored += 1
        if pending:
            self._account()
        self.stats.evaluations += 1
        self.stats.segments_run += n_cuts - start
        self.stats.segments_full += n_cuts + 1
        return torch.cat(outs)
