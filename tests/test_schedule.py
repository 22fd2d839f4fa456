"""The schedule stage on synthetic evaluators whose per-site degradations are known.

Metric values are multiples of 1/64 so that sums and differences are exact in floating point:
the strategies' choices then depend only on the values, never on rounding.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Mapping, Sequence

import pytest

from dtr_compile.search.ledger import Ledger, fingerprint, read_ledger
from dtr_compile.search.schedule import (
    STRATEGIES,
    Evaluation,
    ScheduleResult,
    greedy_schedule,
    schedule,
)

BASE = 0.75
U = 1 / 64


class Synthetic:
    """``metric(S) = BASE − Σ_{s∈S} d[s] − Σ_{pairs ⊆ S} pair[a, b]``, counting calls.

    Positive ``pair`` terms make the degradation supermodular (sites hurt more together), the
    case where ``lazy`` is exact; negative ones make sites mask each other's error.
    """

    def __init__(self, d: Mapping[str, float], pair: Mapping[frozenset[str], float] | None = None,
                 base: float = BASE, sign: float = 1.0) -> None:
        self.d, self.pair, self.base, self.sign = dict(d), dict(pair or {}), base, sign
        self.calls: list[tuple[str, ...]] = []

    def degradation(self, linear: Sequence[str]) -> float:
        s = set(linear)
        return sum(self.d[x] for x in s) + sum(v for k, v in self.pair.items() if k <= s)

    def __call__(self, linear: tuple[str, ...]) -> float:
        assert len(set(linear)) == len(linear), linear
        self.calls.append(linear)
        return self.base - self.sign * self.degradation(linear)


def paper_greedy(sites: Sequence[str], metric: Callable[[tuple[str, ...]], float],
                 threshold: float) -> list[str]:
    """Reference: DtR's Replace rule written out plainly (higher is better)."""
    committed: list[str] = []
    while len(committed) < len(sites):
        rest = [s for s in sites if s not in committed]
        vals = [metric(tuple(committed) + (s,)) for s in rest]
        best = max(range(len(rest)), key=lambda i: (vals[i], -i))
        if vals[best] < threshold:
            break
        committed.append(rest[best])
    return committed


def random_instance(seed: int, n: int, interacting: str) -> Synthetic:
    rng = random.Random(seed)
    sites = [f"site{i}" for i in range(n)]
    d = {s: rng.randint(0, 6) * U for s in sites}
    pair = {}
    if interacting != "additive":
        for a, b in itertools.combinations(sites, 2):
            if rng.random() < 0.4:
                v = rng.randint(1, 4) * U
                pair[frozenset((a, b))] = v if interacting == "supermodular" else -v
    return Synthetic(d, pair)


def run(strategy: str, syn: Synthetic, threshold: float, **kw) -> ScheduleResult:
    return schedule(list(syn.d), syn, baseline=syn.base, threshold=threshold, strategy=strategy,
                    **kw)


def greedy_evals(n: int, k: int, stopped_by_budget: bool = True) -> int:
    """Σ_{i<=k} (n − i) when the budget stops greedy after k commits."""
    return sum(n - i for i in range(k + (1 if stopped_by_budget else 0)))


# ------------------------------------------------------------------------------------------
# greedy picks what the paper's rule picks


def test_greedy_hand_worked_additive():
    # site1 is free, site3 costs 1/64, site0 2/64, site2 8/64; budget 4/64 below the baseline
    syn = Synthetic({"site0": 2 * U, "site1": 0.0, "site2": 8 * U, "site3": U})
    res = run("greedy", syn, BASE - 4 * U)
    assert res.committed == ["site1", "site3", "site0"]
    assert res.metric_after_step == [BASE, BASE - U, BASE - 3 * U]
    assert res.stop_reason.startswith("best next site site2 gives")
    assert len(res.evaluations) == 4 + 3 + 2 + 1 == greedy_evals(4, 3)
    assert res.fits and res.committed_within_budget == [True, True, True]


def test_greedy_ties_go_to_graph_order():
    syn = Synthetic({"site0": U, "site1": 0.0, "site2": 0.0, "site3": 0.0})
    res = run("greedy", syn, BASE - U)
    assert res.committed == ["site1", "site2", "site3", "site0"]


@pytest.mark.parametrize("kind", ["additive", "supermodular", "masking"])
@pytest.mark.parametrize("seed", range(12))
def test_greedy_matches_paper_rule(kind: str, seed: int):
    syn = random_instance(seed, 6, kind)
    threshold = BASE - random.Random(seed).randint(2, 20) * U
    ref = paper_greedy(list(syn.d), syn, threshold)
    res = run("greedy", syn, threshold)
    assert res.committed == ref


def test_greedy_schedule_wrapper_is_greedy():
    syn = random_instance(3, 5, "masking")
    a = greedy_schedule(list(syn.d), syn, baseline=BASE, threshold=BASE - 6 * U)
    b = run("greedy", syn, BASE - 6 * U)
    assert a.committed == b.committed and a.strategy == "greedy"


# ------------------------------------------------------------------------------------------
# the committed model never breaks the budget


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", ["additive", "supermodular", "masking"])
def test_committed_model_within_budget(strategy: str, kind: str):
    for seed in range(10):
        syn = random_instance(100 + seed, 7, kind)
        threshold = BASE - (3 + seed) * U
        res = run(strategy, syn, threshold)
        assert res.final_metric >= threshold
        # every prefix of the committed list was measured and is within budget
        for k in range(1, len(res.committed) + 1):
            assert syn(tuple(res.committed[:k])) == res.metric_after_step[k - 1] >= threshold
        # every evaluation in the trajectory is what the evaluator says
        for ev in res.evaluations:
            assert ev.metric == syn(ev.linear)
            assert ev.within_budget == (ev.metric >= threshold)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lower_is_better_metric(strategy: str):
    # a perplexity-like metric: baseline 10, each linear site raises it
    syn = Synthetic({"site0": 2 * U, "site1": 0.0, "site2": 9 * U, "site3": U}, base=10.0,
                    sign=-1.0)
    res = schedule(list(syn.d), syn, baseline=10.0, threshold=10.0 + 4 * U,
                   higher_is_better=False, strategy=strategy)
    assert res.final_metric <= 10.0 + 4 * U
    assert res.committed == ["site1", "site3", "site0"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nan_metric_is_never_committed(strategy: str):
    def ev(linear: tuple[str, ...]) -> float:
        return float("nan") if "site0" in linear else BASE - U * len(linear)

    res = schedule(["site0", "site1", "site2"], ev, baseline=BASE, threshold=BASE - 5 * U,
                   strategy=strategy)
    assert "site0" not in res.committed
    assert res.committed == ["site1", "site2"]


# ------------------------------------------------------------------------------------------
# evaluation counts


@pytest.mark.parametrize("seed", range(8))
def test_lazy_equals_greedy_when_supermodular_and_counts(seed: int):
    for kind in ("additive", "supermodular"):
        syn_g, syn_l = random_instance(seed, 7, kind), random_instance(seed, 7, kind)
        threshold = BASE - (4 + seed) * U
        g, lz = run("greedy", syn_g, threshold), run("lazy", syn_l, threshold)
        assert lz.committed == g.committed
        assert lz.metric_after_step == g.metric_after_step
        assert len(lz.evaluations) <= len(g.evaluations)
        k = len(g.committed)
        if kind == "additive":
            # step 1 measures all L sites; every later step re-measures only the top
            budget_stop = k < 7
            assert len(lz.evaluations) == 7 + k - (0 if budget_stop else 1)
        assert len(g.evaluations) == greedy_evals(7, k, k < 7)


def test_lazy_with_masking_sites_still_within_budget_and_cheaper():
    syn = random_instance(5, 8, "masking")
    threshold = BASE - 10 * U
    lz = run("lazy", syn, threshold)
    g = run("greedy", random_instance(5, 8, "masking"), threshold)
    assert lz.final_metric >= threshold
    assert len(lz.evaluations) <= len(g.evaluations)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("kind", ["additive", "supermodular", "masking"])
def test_ranked_counts(seed: int, kind: str):
    syn = random_instance(200 + seed, 6, kind)
    threshold = BASE - (2 + 2 * seed) * U
    res = run("ranked", syn, threshold)
    k = len(res.committed)
    singles = {s: BASE - syn.d[s] for s in syn.d}
    if k == 0:
        assert len(res.evaluations) == 6
    elif k < 6:
        assert len(res.evaluations) == 6 + k
    else:
        assert len(res.evaluations) == 2 * 6 - 1
    # the sensitivity pass comes first and measures each site alone
    assert [ev.linear for ev in res.evaluations[:6]] == [(s,) for s in syn.d]
    assert all(ev.phase == "sensitivity" for ev in res.evaluations[:6])
    # commits follow the sensitivity order (ties: graph order)
    order = sorted(syn.d, key=lambda s: (-singles[s], list(syn.d).index(s)))
    assert res.committed == order[:k]


def test_ranked_additive_matches_greedy():
    syn = random_instance(9, 6, "additive")
    assert run("ranked", syn, BASE - 9 * U).committed == \
        run("greedy", random_instance(9, 6, "additive"), BASE - 9 * U).committed


# ------------------------------------------------------------------------------------------
# constraints and limits


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_max_linear(strategy: str):
    syn = Synthetic({f"site{i}": 0.0 for i in range(5)})
    res = run(strategy, syn, BASE, max_linear=2)
    assert res.committed == ["site0", "site1"]
    assert res.stop_reason == "reached --max-linear 2"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_min_linear_forces_least_bad_commits(strategy: str):
    syn = Synthetic({"site0": 5 * U, "site1": 3 * U, "site2": 9 * U})
    res = run(strategy, syn, BASE - 2 * U, min_linear=2)
    assert res.committed == ["site1", "site0"]
    assert res.committed_within_budget == [False, False]
    assert not res.fits
    # nothing fits and nothing is forced: no commit
    assert run(strategy, Synthetic(syn.d), BASE - 2 * U).committed == []


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_min_linear_then_budget(strategy: str):
    syn = Synthetic({"site0": U, "site1": 3 * U, "site2": 0.0})
    res = run(strategy, syn, BASE - 2 * U, min_linear=1)
    assert res.committed == ["site2", "site0"] and res.fits


def test_bad_arguments():
    syn = Synthetic({"site0": 0.0})
    with pytest.raises(ValueError, match="unknown search strategy"):
        run("beam", syn, BASE)
    with pytest.raises(ValueError, match="min_linear"):
        run("greedy", syn, BASE, min_linear=2)
    with pytest.raises(ValueError, match="duplicate"):
        schedule(["a", "a"], syn, baseline=BASE, threshold=BASE)
    assert schedule([], syn, baseline=BASE, threshold=BASE).stop_reason == "no candidate site"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_max_evals(strategy: str):
    syn = Synthetic({f"site{i}": i * U for i in range(5)})
    res = run(strategy, syn, BASE - 20 * U, max_evals=7)
    assert len(res.evaluations) == 7 == len(syn.calls)
    assert res.stop_reason.startswith("reached --max-evals 7")
    assert res.committed  # what was committed before the limit stands
    assert res.final_metric >= BASE - 20 * U


def test_time_limit_with_fake_clock():
    now = [0.0]

    def ev(linear: tuple[str, ...]) -> float:
        now[0] += 10.0  # every evaluation takes 10 s
        return BASE

    res = schedule([f"site{i}" for i in range(4)], ev, baseline=BASE, threshold=BASE,
                   time_limit_s=35.0, clock=lambda: now[0])
    assert len(res.evaluations) == 4  # started at 0, 10, 20, 30 s; not at 40 s
    assert res.stop_reason.startswith("reached --time-limit 35 s after 4 evaluations")
    assert res.committed == ["site0"]


class _Timed:
    """A fake evaluation that takes ``step_s`` on a fake clock, with given single-site metrics."""

    def __init__(self, single: Mapping[str, float], step_s: float = 10.0,
                 pair: float = -U) -> None:
        self.single, self.step_s, self.pair, self.now = dict(single), step_s, pair, 0.0

    def __call__(self, linear: tuple[str, ...]) -> float:
        self.now += self.step_s
        return min(self.single[s] for s in linear) + self.pair * (len(linear) - 1)

    def clock(self) -> float:
        return self.now


def test_time_limit_in_the_sensitivity_pass_commits_the_best_single_site():
    """Issue 25 item 9: a time limit during ranked's first pass used to commit nothing. The sites
    measured alone are evidence: the best of them within budget is committed (it was measured
    exactly as it is delivered), and the report says which sites were never measured."""
    sites = {"site0": BASE - 2 * U, "site1": BASE - U, "site2": BASE - 9 * U,
             "site3": BASE - U, "site4": BASE, "site5": BASE}
    ev = _Timed(sites)
    res = schedule(list(sites), ev, baseline=BASE, threshold=BASE - 4 * U, strategy="ranked",
                   time_limit_s=35.0, clock=ev.clock)
    assert [e.candidate for e in res.evaluations] == ["site0", "site1", "site2", "site3"]
    assert res.committed == ["site1"]  # tie with site3: graph order; site4/5 never measured
    assert res.metric_after_step == [BASE - U] and res.committed_within_budget == [True]
    assert res.evaluations_at_commit == [4] and res.fits
    assert res.stop_reason.startswith("reached --time-limit 35 s after 4 evaluations")
    assert "site1" in res.stop_reason and "2 sites not measured" in res.stop_reason


def test_time_limit_mid_step_commits_only_what_was_measured_within_budget():
    """greedy, a limit inside step 2: the best site measured with the committed set is added if
    within budget and passes the judge; a site within the threshold but not the judge is not."""
    sites = {f"site{i}": BASE - i * U for i in range(5)}
    ev = _Timed(sites, pair=0.0)

    def judge(linear: tuple[str, ...], m: float) -> tuple[bool, dict | None]:
        return m >= BASE - 3 * U and "site1" not in linear[1:], None

    res = schedule(list(sites), ev, baseline=BASE, threshold=BASE - 3 * U, time_limit_s=75.0,
                   clock=ev.clock, judge=judge)
    # step 1: 5 evaluations (commit site0); step 2: site1 (judge says no), site2, site3 (t=80)
    assert len(res.evaluations) == 8
    assert res.committed == ["site0", "site2"]
    assert res.metric_after_step == [BASE, BASE - 2 * U]
    none_fit = schedule(list(sites), _Timed(sites), baseline=BASE, threshold=BASE + U,
                        time_limit_s=15.0, clock=_Timed(sites).clock)
    assert none_fit.committed == []


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_max_linear_still_caps_what_a_limit_commits(strategy: str):
    sites = {f"site{i}": BASE for i in range(4)}
    ev = _Timed(sites, pair=0.0)
    res = schedule(list(sites), ev, baseline=BASE, threshold=BASE, strategy=strategy,
                   max_linear=1, time_limit_s=15.0, clock=ev.clock)
    assert len(res.committed) == 1


# ------------------------------------------------------------------------------------------
# determinism and resume


def _trace(res: ScheduleResult) -> tuple:
    return (res.committed, res.metric_after_step, res.stop_reason,
            [(e.linear, e.metric, e.phase, e.step, e.index) for e in res.evaluations])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_reruns_identical(strategy: str):
    a = run(strategy, random_instance(42, 8, "masking"), BASE - 9 * U)
    b = run(strategy, random_instance(42, 8, "masking"), BASE - 9 * U)
    assert _trace(a) == _trace(b)
    json.dumps(a.to_dict())  # the report can always serialise it


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_from_ledger_continues_exactly(strategy: str, tmp_path):
    threshold = BASE - 9 * U
    full = run(strategy, random_instance(7, 6, "supermodular"), threshold)
    path, fp = tmp_path / "search.ledger.jsonl", fingerprint({"model": "m", "data": "d"})

    # first run: interrupted after 5 evaluations; the ledger keeps the finished ones
    syn = random_instance(7, 6, "supermodular")

    def flaky(linear: tuple[str, ...]) -> float:
        if len(syn.calls) == 5:
            raise Interrupt
        return syn(linear)

    ledger, known, note = Ledger.open(path, fp, resume=True)
    assert known == {} and "no ledger" in note
    with ledger, pytest.raises(Interrupt):
        schedule(list(syn.d), flaky, baseline=BASE, threshold=threshold, strategy=strategy,
                 on_eval=lambda ev: ev.replayed or ledger.append(ev))
    header, entries, bad = read_ledger(path)
    assert header is not None and header["fingerprint"] == fp
    assert len(entries) == 5 and bad == 0

    # second run resumes: replays 5, measures the rest, ends exactly like the uninterrupted run
    syn2 = random_instance(7, 6, "supermodular")
    ledger, known, note = Ledger.open(path, fp, resume=True)
    assert len(known) == 5 and "5 evaluations replayed" in note
    with ledger:
        res = run(strategy, syn2, threshold, known=known,
                  on_eval=lambda ev: ev.replayed or ledger.append(ev))
    assert _trace(res) == _trace(full)
    assert res.evaluations_replayed == 5
    assert res.evaluations_run == len(syn2.calls) == len(full.evaluations) - 5
    assert len(read_ledger(path)[1]) == len(full.evaluations)


def test_stale_or_torn_ledger(tmp_path):
    path = tmp_path / "l.jsonl"
    ledger, _, _ = Ledger.open(path, "fp-a", resume=False)
    with ledger:
        ledger.append(Evaluation(1, "site0", ("site0",), 0.5, 1.0, True))
    with path.open("a") as fh:  # killed mid-write
        fh.write('{"linear": ["site0", "si')
    ledger, known, note = Ledger.open(path, "fp-a", resume=True)
    with ledger:
        assert known == {frozenset({"site0"}): (0.5, 1.0)}
        assert "1 unreadable lines skipped" in note
        ledger.append(Evaluation(2, "site1", ("site0", "site1"), 0.25, 1.0, True))
    assert len(read_ledger(path)[1]) == 2
    # other inputs: nothing is reused, the ledger starts over
    ledger, known, note = Ledger.open(path, "fp-b", resume=True)
    ledger.close()
    assert known == {} and "other inputs" in note
    header, entries, _ = read_ledger(path)
    assert header["fingerprint"] == "fp-b" and entries == []
    # without --resume the ledger is always new
    Ledger.open(path, "fp-b", resume=False)[0].close()
    assert read_ledger(path)[1] == []
    # the note names what changed, from the inputs the header records
    Ledger.open(path, "fp-c", resume=False,
                inputs={"model": "m", "runtime": "cpu/fp32", "eval_batch": "8"})[0].close()
    ledger, _, note = Ledger.open(path, "fp-d", resume=True,
                                  inputs={"model": "m", "runtime": "cpu/bf16", "eval_batch": "4"})
    ledger.close()
    assert "(--eval-batch, --device / --dtype differ)" in note, note
