"""The prefix cache: cached evaluations are bitwise equal to whole-graph runs, and cheaper."""

from __future__ import annotations

import itertools

import pytest
import torch

from dtr_compile.capture import capture
from dtr_compile.data import Dataset, run_model
from dtr_compile.linear.kernel import LinearAttention, SiteSwitch, SoftmaxAttention
from dtr_compile.load import load_model
from dtr_compile.metrics import METRICS, Metric
from dtr_compile.passes.find_attention import find_attention
from dtr_compile.passes.linearize import rewrite_sites
from dtr_compile.search.prefix_cache import PrefixCache, SegmentedGraph
from dtr_compile.search.schedule import STRATEGIES, schedule

from .conftest import make_token_data


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops: a second intra-op thread only adds synchronisation (and on a shared 2-core
    machine, waits for a descheduled thread); restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def search(tiny_task):
    """The tiny 3-layer BERT's search graph with a switch per site (perturbed linear students)."""
    cap = capture(load_model(tiny_task["model"]))
    sites = find_attention(cap.gm).sites
    torch.manual_seed(0)
    switches = {}
    for s in sites:
        lin = LinearAttention(s.num_heads, s.num_kv_heads, s.head_dim, mask_kind=s.mask_kind)
        with torch.no_grad():  # a perturbed student, so that each site changes the outputs
            for p in lin.parameters():
                p.add_(0.3 * torch.randn_like(p))
        switches[s.id] = SiteSwitch(SoftmaxAttention(s.num_heads, s.num_kv_heads, scale=s.scale),
                                    lin.eval())
    gm = rewrite_sites(cap.gm, sites, switches, class_name="SearchGraph")
    raw = make_token_data(37, 20, seed=3)
    raw["labels"] = torch.arange(37) % 4
    data = Dataset({n: raw[n] for n in cap.input_names}, raw["labels"])
    probe = [raw[n][:2] for n in cap.input_names]
    return gm, switches, data, cap.input_names, probe


_FULL: dict[tuple[int, frozenset[str]], torch.Tensor] = {}


def _full(gm, switches, data, names, linear) -> torch.Tensor:
    """The whole search graph's outputs with ``linear`` linear (memoised per set)."""
    key = (id(gm), frozenset(linear))
    if key not in _FULL:
        for sid, sw in switches.items():
            sw.use_linear = sid in linear
        try:
            _FULL[key] = run_model(gm, data, names, 8)
        finally:
            for sw in switches.values():
                sw.use_linear = False
    return _FULL[key]


def test_cuts_sit_between_layers(search):
    gm, switches, data, names, probe = search
    seg = SegmentedGraph(gm, switches, probe)
    assert seg.sites == ("site0", "site1", "site2")
    assert len(seg.segments) == 4
    # cut 0 keeps only the inputs; later cuts keep one hidden state [B, T, C] per row
    assert set(seg.cuts[0].live) >= {"input_ids", "attention_mask"}
    assert [c.row_bytes for c in seg.cuts[2:]] == [20 * 32 * 4]
    assert seg.cuts[1].row_bytes == 20 * 32 * 4 + 20 * 20  # + the bool mask [B, 1, T, T]


@pytest.mark.parametrize("capacity", [0, 120_000, 1 << 30], ids=["off", "small", "large"])
def test_every_site_set_bitwise_equal(search, capacity: int):
    gm, switches, data, names, probe = search
    cache = PrefixCache(SegmentedGraph(gm, switches, probe), data, names, 8,
                        capacity_bytes=capacity)
    ids = list(switches)
    for r in range(len(ids) + 1):
        for linear in itertools.permutations(ids, r) if r <= 2 else itertools.combinations(ids, r):
            got = cache.outputs(linear, base=linear[:-1])
            assert torch.equal(got, _full(gm, switches, data, names, linear)), linear
    assert all(not sw.use_linear for sw in switches.values())  # flags restored
    assert cache.stats.stored_bytes <= max(capacity, 0) or capacity == 0
    if capacity == 0:
        assert cache.stats.segments_run == cache.stats.segments_full
    else:
        assert cache.stats.segments_run < cache.stats.segments_full


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_schedule_same_with_and_without_cache(search, strategy: str):
    gm, switches, data, names, probe = search
    metric = METRICS["agreement"]
    reference = _full(gm, switches, data, names, ())

    def plain(linear):
        return metric(_full(gm, switches, data, names, linear), data.labels, reference)

    cache = PrefixCache(SegmentedGraph(gm, switches, probe), data, names, 8, metric)

    def cached(linear):
        return metric(cache.outputs(linear, base=linear[:-1]), data.labels, reference)

    kw = dict(baseline=1.0, threshold=0.75, strategy=strategy)
    a, b = schedule(list(switches), plain, **kw), schedule(list(switches), cached, **kw)
    assert a.committed == b.committed
    assert [e.metric for e in a.evaluations] == [e.metric for e in b.evaluations]
    assert cache.stats.saved > 0.2


def test_greedy_step_runs_each_candidate_from_its_cut(search):
    gm, switches, data, names, probe = search
    cache = PrefixCache(SegmentedGraph(gm, switches, probe), data, names, 8)
    # step 1: site0 runs everything (4 segments); siteN then starts at cut N: 3 + 2 segments
    for sid in switches:
        cache.outputs((sid,), base=())
    assert cache.stats.segments_run == 4 + 3 + 2
    # step 2 with site1 committed: the states at cuts 0 and 1 still hold; site2 starts at cut 1
    before = cache.stats.segments_run
    for sid in ("site0", "site2"):
        cache.outputs(("site1", sid), base=("site1",))
    assert cache.stats.segments_run - before == 3 + 2


def test_metric_rows_applied_per_batch(search):
    gm, switches, data, names, probe = search
    seen = []

    def rows(out, inputs, labels):
        seen.append((out.shape[0], inputs["input_ids"].shape[0], labels.shape[0]))
        return out.argmax(-1, keepdim=True).float()

    metric = Metric("argmax", METRICS["agreement"].fn, True, False, rows=rows)
    cache = PrefixCache(SegmentedGraph(gm, switches, probe), data, names, 8, metric)
    out = cache.outputs((), base=())
    assert seen == [(8, 8, 8)] * 4 + [(5, 5, 5)]
    assert out.shape == (37, 1)


def test_switch_called_twice_is_refused(search):
    gm, switches, data, names, probe = search
    with pytest.raises(ValueError, match="called once"):
        SegmentedGraph(gm, {"site0": switches["site0"], "x": torch.nn.Identity()}, probe)
