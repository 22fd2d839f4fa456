"""What an attention site's mask does, proven by evaluating where it comes from.

The linear replacement (:mod:`dtr_compile.linear.kernel`) honours two kinds of masking: a *key
padding* mask (key ``s`` of row ``b`` is visible to every query of that row, or to none) and the
*causal* mask (query ``t`` sees keys ``s <= t``, aligned top-left as SDPA's ``is_causal`` and
the linear replacement align it), alone or together. A mask is accepted only when it is provably
one of those. Everything else (sliding windows, packed-sequence or
block-diagonal masks, prefix-LM masks, position biases such as ALiBi or T5's, masks computed from
activations or passed in as a float tensor) is rejected with the reason, never treated as padding.

The rule, applied to the mask node ``M`` of a site (the ``attn_mask`` of SDPA, the tensor added to
the scores, or the condition of a ``masked_fill`` / ``where``):

1. **Provenance.** Walk ``M``'s ancestors. An input read only through its shape (``sym_size``,
   ``*_like``, ``new_*``) does not count. Every input whose *values* are read must be an integer
   or boolean ``[B, S]`` tensor (an ``attention_mask``-like key input); a float input, or one of
   another rank, rejects the mask: its values are unknown until run time.
2. **Evaluation.** The ancestor subgraph is run on probe inputs at the export's example sizes and
   at every probed sequence length (2, 3, 4, 7, 16, 33, and ``c-1 … c+2`` around every integer
   constant ``c`` of the subgraph, so that a window of ``c`` is seen on both sides of its edge),
   clipped to the export's range for that axis and to 4096; when queries and keys have separate
   length symbols (``T`` and ``S``), also at unequal lengths in both orders. Key inputs get
   all-ones, all-zeros, right-padded, left-padded and random 0/1 rows; shape-only inputs zeros.
3. **Factorisation.** On every probe the allowed set ``A[r, t, s]`` (True of a boolean mask, or an
   additive value above :data:`~dtr_compile.linear.kernel.ADDITIVE_MASK_PADDING`; ``r`` runs
   over the leading dims) must equal ``P[t, s] ∧ K[r, s]``: one pattern ``P`` per length for all
   probes and rows, times a key validity ``K``. Query rows that ``P ∧ K`` leaves without any key
   and rows the mask itself leaves without any key are not compared (libraries fill or empty
   such rows differently; their outputs belong to padded queries). An additive mask must be
   exactly 0 where it allows a key, else it is a bias.
4. **Classification.** ``P`` all True: ``"full"`` (padding if some probe masks a key, no masking
   at all otherwise); ``P`` lower-triangular, ``s <= t``: ``"causal"``; anything else, or a
   pattern that changes class with the length, is rejected; so is a causal mask aligned
   bottom-right (``s <= t + S - T``, as with a KV cache) when ``T != S``.

This is a proof by evaluation over the probed sizes, not a symbolic one: a mask whose pattern
changes only at a length that is neither probed nor next to an integer constant of its subgraph
(or only beyond 4096) would be misclassified. The masks transformers 5 builds for BERT-, GPT-2-,
Llama- and ViT-style models, those of ``nn.MultiheadAttention`` / ``nn.TransformerEncoder`` and
nanoGPT's ``tril`` buffer are classified this way in the tests; sliding-window, prefix-LM and
ALiBi-style masks are rejected there.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

from dtr_compile.linear.kernel import ADDITIVE_MASK_PADDING

aten = torch.ops.aten

#: How a site reads its mask: ``"bool"`` True = attend; ``"additive"`` added to the scores;
#: ``"inverted"`` True = masked (a ``masked_fill`` condition).
SEMANTICS = ("bool", "additive", "inverted")

#: Ops that read only the shape, dtype or device of their tensor input.
_SHAPE_ONLY = {
    aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.size.default,
    aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
    aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
    aten._assert_tensor_metadata.default,
}

BASE_LENGTHS = (2, 3, 4, 7, 16, 33)
MAX_PROBE_LENGTH = 4096
PROBE_BATCH = 3


@dataclass(frozen=True)
class MaskPattern:
    """A mask proven to be key padding, causal, or both.

    Attributes:
        structure: ``"full"`` (no query/key pattern) or ``"causal"``.
        padding: some probe masked a key, i.e. the mask depends on a key input.
        inputs: the graph inputs whose values the mask reads (key padding inputs).
        lengths: the sequence sizes it was verified at.
    """

    structure: str
    padding: bool
    inputs: tuple[str, ...]
    lengths: tuple[int, ...]

    @property
    def masks_nothing(self) -> bool:
        """True when the mask never hides a key from a query (e.g. an all-True mask)."""
        return self.structure == "full" and not self.padding


def ancestors(node: Node) -> list[Node]:
    """``node`` and every node it depends on, in graph order."""
    seen: set[Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


def value_inputs(node: Node) -> list[Node]:
    """Placeholders among ``node``'s ancestors whose *values* (not only shapes) it reads."""
    nodes = ancestors(node)
    needs_value = {node}
    for n in reversed(nodes):
        if n not in needs_value:
            continue
        if n.op == "call_function" and n.target in _SHAPE_ONLY:
            continue
        needs_value.update(n.all_input_nodes)
    return [n for n in nodes if n.op == "placeholder" and n in needs_value]


def _subgraph(gm: GraphModule, node: Node) -> tuple[GraphModule, list[Node]]:
    """A module computing ``node`` from the placeholders it needs, sharing ``gm``'s attributes."""
    graph = Graph()
    env: dict[Node, Node] = {}
    placeholders = []
    for n in ancestors(node):
        if n.op == "placeholder":
            env[n] = graph.placeholder(n.name)
            env[n].meta = dict(n.meta)
            placeholders.append(n)
        else:
            env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(env[node])
    return GraphModule(gm, graph), placeholders


def _bound(x: object, default: int) -> int:
    """``int(x)`` for a finite sympy bound or hint, ``default`` for None or ±infinity."""
    try:
        return int(x)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError, AttributeError):
        return default


def _symbols(placeholders: list[Node]) -> tuple[dict, dict, dict]:
    """``(batch symbols, length symbols, {symbol: (lo, hi, hint)})`` of the inputs' dims."""
    batch: dict[object, bool] = {}
    length: dict[object, bool] = {}
    info: dict[object, tuple[int, int, int]] = {}
    for p in placeholders:
        for i, d in enumerate(getattr(p.meta.get("val"), "shape", ())):
            if not isinstance(d, torch.SymInt):
                continue
            expr = d.node.expr
            vr = d.node.shape_env.var_to_range.get(expr)
            lo = _bound(vr.lower if vr is not None else None, 2)
            hi = _bound(vr.upper if vr is not None else None, MAX_PROBE_LENGTH)
            info[expr] = (lo, hi, _bound(d.node.hint, lo))
            (batch if i == 0 else length)[expr] = True
    for s in batch:  # a symbol seen at dim 0 anywhere is a batch symbol
        length.pop(s, None)
    return batch, length, info


def _int_constants(sub: GraphModule) -> set[int]:
    out: set[int] = set()

    def visit(a: object) -> None:
        if isinstance(a, bool):
            return
        if isinstance(a, int) and 2 <= abs(a) <= MAX_PROBE_LENGTH:
            out.add(abs(a))
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)

    for n in sub.graph.nodes:
        visit(n.args)
        visit(tuple(n.kwargs.values()))
    return out


def _key_rows(b: int, length: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Key-input probes ``[b, length]`` of 0/1: all ones, all zeros, then mixed rows."""
    yield torch.ones(b, length, dtype=torch.long)
    yield torch.zeros(b, length, dtype=torch.long)
    half = (length + 1) // 2
    rows = [torch.arange(length) < half, torch.arange(length) >= length - half]
    while len(rows) < b:
        r = torch.rand(length, generator=gen) < 0.5
        r[torch.randint(length, (1,), generator=gen)] = True
        rows.append(r)
    yield torch.stack(rows[:b]).long()


def _allowed(m: torch.Tensor, semantics: str) -> torch.Tensor | str:
    if semantics == "bool":
        if m.dtype != torch.bool:
            return f"a {m.dtype} mask used as a boolean mask"
        return m
    if semantics == "inverted":
        return ~m.bool()
    if not m.is_floating_point():
        return f"an additive mask of dtype {m.dtype}"
    allowed = m > ADDITIVE_MASK_PADDING
    bias = m[allowed]
    if bias.numel() and bool((bias != 0).any()):
        return (f"the additive mask adds values other than 0 to attended scores (up to "
                f"{float(bias.abs().max()):.3g}): a position bias (ALiBi, relative position), "
                "not a mask")
    return allowed


def _describe(p: torch.Tensor) -> str:
    t, s = p.shape
    tril = torch.ones(t, s, dtype=torch.bool).tril(s - t)
    if bool((p & ~tril).any()) is False and t == s:
        width = int(p.sum(-1).max())
        if bool((p.sum(-1) == torch.arange(1, t + 1).clamp(max=width)).all()):
            return f"a sliding window of {width} keys"
    return (f"{int(p.sum())} of {t * s} query/key pairs allowed (causal would allow "
            f"{int(tril.sum())})")


def classify_mask(gm: GraphModule, mask: Node, semantics: str) -> MaskPattern | str:
    """Prove what ``mask`` does (see the module docstring); a reason string when it cannot.

    Args:
        gm: the captured graph holding ``mask``.
        mask: the mask node, as the site reads it.
        semantics: one of :data:`SEMANTICS`.
    """
    assert semantics in SEMANTICS, semantics
    keys = value_inputs(mask)
    for p in keys:
        val = p.meta.get("val")
        if val is None or val.dim() != 2 or val.is_floating_point() or val.is_complex():
            what = f"{val.dtype}, rank {val.dim()}" if val is not None else "no metadata"
            return (f"the mask is computed from the values of input {p.name!r} ({what}); only a "
                    "[B, S] integer/boolean key padding input can be proven padding or causal")
    sub, placeholders = _subgraph(gm, mask)
    batch_syms, length_syms, info = _symbols(placeholders)
    b = PROBE_BATCH
    if not all(info[s][0] <= PROBE_BATCH <= info[s][1] for s in batch_syms):
        b = max(info[s][2] for s in batch_syms)
    sizes = _probe_sizes(sub, batch_syms, length_syms, info, b)
    key_names = {p.name for p in keys}
    gen = torch.Generator().manual_seed(0)

    def shape_at(val: torch.Tensor, size: dict) -> list[int]:
        # never int(SymInt): that would guard (specialise) the symbol in the graph's ShapeEnv
        return [size.get(d.node.expr, d.node.hint) if isinstance(d, torch.SymInt) else int(d)
                for d in val.shape]

    def inputs_at(size: dict, key_probe: torch.Tensor | None) -> list[torch.Tensor]:
        out = []
        for p in placeholders:
            val, shape = p.meta["val"], shape_at(p.meta["val"], size)
            if p.name in key_names and key_probe is not None:
                out.append(key_probe[: shape[0], : shape[1]].to(val.dtype))
            else:
                out.append(torch.zeros(shape, dtype=val.dtype))
        return out

    classes: dict[str, list[str]] = {}
    padding = False
    verified: set[int] = set()
    for i, size in enumerate(sizes):
        probes: list[torch.Tensor | None] = [None]
        if keys:
            rows, key_len = shape_at(keys[0].meta["val"], size)
            probes = list(_key_rows(max(b, rows), key_len, gen))
        allowed: list[torch.Tensor] = []
        try:
            with torch.no_grad():
                for probe in probes:
                    a = _allowed(sub(*inputs_at(size, probe)), semantics)
                    if isinstance(a, str):
                        return a
                    allowed.append(a.reshape(-1, *a.shape[-2:]) if a.dim() >= 2 else a.reshape(1, 1, -1))
        except Exception as exc:  # noqa: BLE001 - e.g. a length the graph does not support
            if i == 0:  # the export's own example sizes
                return f"could not evaluate the mask's provenance: {type(exc).__name__}: {exc}"
            continue
        pattern = torch.stack([a.any(0) for a in allowed]).any(0)  # [T, S]
        t, s = pattern.shape
        at = f"at T={t}, S={s}"
        if s == 1 and all(v > 1 for v in size.values()):
            return "the mask does not vary over keys (it masks whole query rows)"
        for a in allowed:
            valid = a.any(1)  # [R, S]
            expect = pattern[None] & valid[:, None, :]
            compared = expect.any(-1, keepdim=True) & a.any(-1, keepdim=True)
            bad = (a != expect) & compared
            if bool(bad.any()):
                r, q, k = (int(j) for j in bad.nonzero()[0])
                return (f"the mask is neither key padding nor causal: {at}, row {r}, query {q} "
                        f"may not see key {k} although that key is valid for the row and the "
                        "query/key pattern allows it")
            padding |= not bool(valid[:, pattern.any(0)].all())
        if bool(pattern.all()):
            cls = "full"
        elif t > 1 and bool((pattern == torch.ones(t, s, dtype=torch.bool).tril()).all()):
            cls = "causal"
        elif t > 1 and bool((pattern == torch.ones(t, s, dtype=torch.bool).tril(s - t)).all()):
            return (f"a causal mask aligned bottom-right (query t sees keys s <= t + S - T, as "
                    f"with a KV cache) {at}: the linear replacement aligns causal masks top-left, "
                    "as SDPA's is_causal does")
        else:
            return f"the mask is neither key padding nor causal: {at} it allows {_describe(pattern)}"
        classes.setdefault(cls, []).append(at)
        verified |= set(size.values())
    if not classes:
        return "could not evaluate the mask at any sequence length in the export's range"
    if len(classes) > 1:
        where = "; ".join(f"{c} {ls[0]}" for c, ls in classes.items())
        return f"the mask's pattern changes with the sequence length ({where})"
    return MaskPattern(next(iter(classes)), padding, tuple(sorted(key_names)), tuple(sorted(verified)))


def _probe_sizes(sub: GraphModule, batch_syms: dict, length_syms: dict, info: dict,
                 b: int) -> list[dict]:
    """Symbol → size assignments to probe, the export's example sizes first.

    Every sequence symbol gets each probe length ``n``; with several sequence symbols (``T`` and
    ``S`` from different inputs) they also get unequal lengths ``n, n + 3, …`` in both orders."""
    syms = sorted(length_syms, key=str)
    first = {s: b for s in batch_syms} | {s: info[s][2] for s in syms}
    candidates = set(BASE_LENGTHS) | {info[s][2] for s in syms}
    for c in _int_constants(sub):
        candidates |= {c - 1, c, c + 1, c + 2}
    sizes = [first]
    for n in sorted(candidates) if syms else []:
        shifts = [[0] * len(syms)]
        if len(syms) > 1:
            shifts += [[3 * j for j in range(len(syms))], [3 * j for j in reversed(range(len(syms)))]]
        for shift in shifts:
            size = {s: n + d for s, d in zip(syms, shift, strict=True)}
            if all(2 <= v <= MAX_PROBE_LENGTH and info[s][0] <= v <= info[s][1]
                   for s, v in size.items()):
                sizes.append({s: b for s in batch_syms} | size)
    return sizes

__all__ = ["MaskPattern", "SEMANTICS", "ancestors", "classify_mask", "value_inputs"]
