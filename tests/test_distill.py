"""Stage 5: distillation of sites and blocks, the teacher store, workers and the cache."""

from __future__ import annotations

import copy
import dataclasses
import json
import operator

import pytest
import torch

from dtr_compile.capture import capture
from dtr_compile.data import Dataset, load_dataset, run_model
from dtr_compile.distill.activations import ActivationStore, record_sites
from dtr_compile.distill.cache import DistillCache
from dtr_compile.distill.plan import DistillSettings, plan_distillation
from dtr_compile.distill.run import distill
from dtr_compile.distill.train import distill_site
from dtr_compile.errors import InputError
from dtr_compile.linear.kernel import SoftmaxAttention
from dtr_compile.load import load_model
from dtr_compile.passes.attention_block import BlockMiss, block_module, find_block
from dtr_compile.passes.find_attention import find_attention
from dtr_compile.passes.linearize import linearize

from .conftest import TinyClassifier, export_tiny


@pytest.fixture(scope="module")
def tiny(tiny_task):
    """The tiny BERT of ``tiny_task``: ``(gm, input names, sites, 16 calibration rows)``."""
    cap = capture(load_model(tiny_task["model"]))
    calib = load_dataset(tiny_task["val"], cap.input_names)
    return cap.gm, cap.input_names, find_attention(cap.gm).sites, calib.take(16)


@pytest.fixture(scope="module")
def tiny_records(tiny, tiny_task):
    gm, names, sites, _ = tiny
    calib = load_dataset(tiny_task["val"], names)
    return sites, record_sites(gm, sites, calib, names, batch_size=16)


@pytest.fixture
def records(tiny_records):
    """``(sites, {site id: SiteRecord})`` of all 48 rows, copies to modify at will."""
    sites, recs = tiny_records
    return sites, {sid: copy.deepcopy(r) for sid, r in recs.items()}


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """A tiny random-weight BERT whose layer-0 attention is sharp and learnable: queries scaled
    up 30× (score std ≈ 1, as in trained models), and no position embeddings on inputs drawn
    from 4 tokens, so that layer 0's keys take a few values that a feature map can separate
    (random keys of every position would make sharp attention beyond any small kernel)."""
    d = tmp_path_factory.mktemp("sharp")
    model = TinyClassifier(layers=2).eval()
    with torch.no_grad():
        model.backbone.embeddings.position_embeddings.weight.zero_()
        for layer in model.backbone.encoder.layer:
            layer.attention.self.query.weight.mul_(30.0)
            layer.attention.self.query.bias.mul_(30.0)
    export_tiny(model, str(d / "model.pt"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 5, (48, 24), generator=g)
    lengths = torch.randint(12, 25, (48,), generator=g)
    mask = (torch.arange(24)[None] < lengths[:, None]).long()
    cap = capture(load_model(str(d / "model.pt")))
    calib = Dataset({"input_ids": ids * mask, "attention_mask": mask}, None)
    return cap.gm, cap.input_names, find_attention(cap.gm).sites, calib


def _run(gm, names, sites, calib, settings, **kw):
    plan = plan_distillation(gm, sites, settings, calib, 16)
    kw.setdefault("max_calib_tokens", 1 << 20)
    students, results = distill(gm, plan, calib, names, record_batch=16, **kw)
    return plan, students, results


def _bytes(state: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in state.items()}


def test_record_shapes(records) -> None:
    sites, recs = records
    r = recs[sites[0].id]
    assert r.q.shape == (48, 4, 24, 8) and r.out.shape == (48, 4, 24, 8)
    assert r.mask is not None and r.mask.dtype == torch.bool


def test_distillation_reduces_error_and_is_deterministic(records) -> None:
    sites, recs = records
    site = sites[0]
    # random-weight attention is near uniform; sharpen the teacher so there is something to learn
    rec = recs[site.id]
    rec.q.mul_(6.0)
    rec.out.copy_(SoftmaxAttention(4, 4, scale=site.scale)(rec.q, rec.k, rec.v, rec.mask))
    m1, r1 = distill_site(site, rec, steps=150, lr=2e-2, seed=3)
    m2, r2 = distill_site(site, rec, steps=150, lr=2e-2, seed=3)
    assert r1.ok and r1.final_error < r1.init_error / 2
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_nan_loss_marks_site_failed(records) -> None:
    sites, recs = records
    rec = recs[sites[0].id]
    rec.out[:] = float("nan")
    _, res = distill_site(sites[0], rec, steps=5)
    assert not res.ok and "loss" in res.reason


def test_site_error_falls_tenfold_from_weight_transfer(sharp) -> None:
    gm, names, sites, calib = sharp
    _, students, results = _run(gm, names, sites[:1], calib, DistillSettings())
    r = results[sites[0].id]
    assert r.ok and r.target == "site" and r.init_error > 0.1  # non-trivial attention
    assert r.final_error * 10 <= r.init_error, r


def test_block_trains_its_own_weights_on_teacher_inputs(sharp) -> None:
    gm, names, sites, calib = sharp
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    settings = DistillSettings(target="block", steps=60)
    plan, students, results = _run(gm, names, sites, calib, settings, workers=1)
    block = plan.blocks[sites[1].id]
    assert block.owner.endswith("encoder.layer.1.attention")
    assert block.projection.endswith("attention.output.dense") and len(block.weights) == 8
    for r in results.values():
        assert r.ok and r.target == "block" and r.final_error < r.init_error, r
    # the teacher is untouched and received no gradient: each block trained on recorded inputs
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    assert all(p.grad is None for p in gm.parameters())
    teacher_ptrs = {p.data_ptr() for p in gm.parameters()}
    assert not teacher_ptrs & {p.data_ptr() for m in students.values() for p in m.parameters()}
    # blocks are independent: distilling one alone gives the very same weights
    _, alone, _ = _run(gm, names, sites[1:], calib, settings, workers=1)
    assert _bytes(alone[sites[1].id].state_dict()) == _bytes(students[sites[1].id].state_dict())
    # its q weight moved away from the teacher's
    q_name = next(n for n in block.weights if "query_weight" in n)
    teacher_q = operator.attrgetter(next(n.target for n in gm.graph.nodes if n.name == q_name))(gm)
    assert not torch.equal(students[sites[1].id].get_parameter("weights." + q_name), teacher_q)


def test_block_rewrite_is_exact_with_the_teacher_block_and_drops_its_weights(sharp) -> None:
    gm, names, sites, calib = sharp
    site = sites[1]
    block = find_block(gm, site)
    assert not isinstance(block, BlockMiss)
    ref = run_model(gm, calib, names, 16)
    same = linearize(gm, sites, {site.id: block_module(gm, block, site)}, blocks={site.id: block})
    assert torch.equal(run_model(same, calib, names, 16), ref)
    plan, students, _ = _run(gm, names, sites[1:], calib,
                             DistillSettings(target="block", steps=5), workers=1)
    hybrid = linearize(gm, sites, students, blocks=plan.blocks)
    targets = {str(n.target) for n in hybrid.graph.nodes if n.op == "get_attr"}
    assert not any("layer.1.attention.self" in t for t in targets)  # the student's own weights
    assert any("layer.0.attention.self" in t for t in targets)
    assert run_model(hybrid, calib, names, 16).shape == ref.shape


def test_block_without_output_projection_falls_back_to_site(tmp_path) -> None:
    class NoProjection(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v).sum(1)

    torch.manual_seed(0)
    x = torch.randn(4, 6, 16)
    prog = torch.export.export(NoProjection().eval(), (x,))
    from dtr_compile.capture import flat_graph_module

    gm = flat_graph_module(prog.module())
    sites = find_attention(gm).sites
    assert isinstance(find_block(gm, sites[0]), BlockMiss)
    calib = Dataset({"x": x}, None)
    plan = plan_distillation(gm, sites, DistillSettings(target="block", steps=3), calib, 4)
    assert plan.targets[sites[0].id] == "site" and "no attention block" in plan.notes[sites[0].id]


def test_cache_hit_gives_byte_identical_weights(tiny, tmp_path, monkeypatch) -> None:
    gm, names, sites, calib = tiny
    cache = DistillCache(tmp_path / "cache")
    settings = DistillSettings(steps=30)
    plan, first, r1 = _run(gm, names, sites, calib, settings, cache=cache)
    assert not any(r.cached for r in r1.values())
    files = sorted((tmp_path / "cache" / "distill").glob("*.safetensors"))
    assert [f.stem for f in files] == sorted(plan.keys.values())

    import dtr_compile.distill.run as distill_mod

    def no_teacher(*args, **kwargs):
        raise AssertionError("a full cache hit must not run the teacher")

    monkeypatch.setattr(distill_mod, "record_teacher", no_teacher)
    _, second, r2 = _run(gm, names, sites, calib, settings, cache=cache)
    assert all(r.cached for r in r2.values())
    for sid in plan.keys:
        assert _bytes(second[sid].state_dict()) == _bytes(first[sid].state_dict())
        assert dataclasses.replace(r2[sid], cached=False) == r1[sid]
    meta = json.loads(json.dumps(plan.key_parts[sites[0].id]))
    assert set(meta) >= {"teacher", "settings", "calib", "code", "site"}


def test_cache_key_changes_only_with_what_a_site_depends_on(tiny) -> None:
    gm, names, sites, calib = tiny
    settings = DistillSettings(steps=30)
    keys = plan_distillation(gm, sites, settings, calib, 16).keys
    # the last layer's attention weights: only the last site's teacher changed
    last = copy.deepcopy(gm)
    with torch.no_grad():
        last.get_parameter("backbone.encoder.layer.2.attention.self.value.weight").add_(0.01)
    changed = plan_distillation(last, sites, settings, calib, 16).keys
    assert [keys[s.id] == changed[s.id] for s in sites] == [True, True, False]
    # the feature map, the calibration rows, the target: every site
    for other in (plan_distillation(gm, sites, dataclasses.replace(settings, feature_map="t2r"),
                                    calib, 16),
                  plan_distillation(gm, sites, settings, calib.take(15), 16),
                  plan_distillation(gm, sites, dataclasses.replace(settings, target="block"),
                                    calib, 16)):
        assert all(other.keys[s.id] != keys[s.id] for s in sites)
    # a sliding window: only causal sites have one, so these bidirectional keys stay
    windowed = plan_distillation(gm, sites, dataclasses.replace(settings, window=8), calib, 16)
    assert windowed.keys == keys


def test_spill_and_workers_do_not_change_the_weights(tiny, tmp_path) -> None:
    gm, names, sites, calib = tiny
    settings = DistillSettings(steps=20)
    _, ref, _ = _run(gm, names, sites, calib, settings, workers=1)
    seen: list[str] = []
    _, got, res = _run(gm, names, sites, calib, settings, workers=2, max_calib_tokens=24,
                       spill_dir=tmp_path, on_step=lambda sid, step, loss: seen.append(sid))
    assert set(seen) == {s.id for s in sites}  # progress from the worker processes
    for sid in ref:
        assert _bytes(got[sid].state_dict()) == _bytes(ref[sid].state_dict())
    assert list(tmp_path.iterdir()) == []  # spill files removed


def test_activation_store_spills_beyond_its_token_cap(tmp_path) -> None:
    store = ActivationStore(max_tokens=20, spill_dir=tmp_path)
    x = torch.arange(6 * 10, dtype=torch.float32).reshape(6, 10)
    const = torch.ones(1, 10)
    for i in range(0, 6, 2):
        store.append({"x": x[i:i + 2], "m": const}, rows=2, tokens=20)
    assert store.spilled and store.tokens_in_memory == 20 and store.rows == 6
    idx = torch.tensor([5, 0, 3])
    assert torch.equal(store.get("x", idx), x[idx]) and store.get("m", idx) is store.constants["m"]
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_feature_map_without_parameters_has_nothing_to_distill(tiny) -> None:
    gm, names, sites, calib = tiny
    _, _, results = _run(gm, names, sites[:1], calib, DistillSettings(feature_map="elu"))
    r = results[sites[0].id]
    assert r.ok and r.steps == 0 and r.final_error == r.init_error
    assert "no trainable parameters" in r.note


def test_failed_sites_are_reported_and_not_cached(tiny, tmp_path, monkeypatch) -> None:
    gm, names, sites, calib = tiny
    import dtr_compile.distill.train as train_mod

    real = train_mod.SiteTask.loss

    def nan_loss(self, idx, gen):
        return real(self, idx, gen) * float("nan")

    monkeypatch.setattr(train_mod.SiteTask, "loss", nan_loss)
    cache = DistillCache(tmp_path)
    _, _, results = _run(gm, names, sites[:1], calib, DistillSettings(steps=5), cache=cache)
    r = results[sites[0].id]
    assert not r.ok and "loss became nan" in r.reason
    assert not list(tmp_path.rglob("*.safetensors"))


@pytest.mark.parametrize("bad, message", [
    (dict(target="layer"), "unknown distillation target"),
    (dict(feature_map="cosine"), "unknown feature map"),
    (dict(loss="mse+ce", target="block"), "needs --distill-target site"),
    (dict(batch_rows=0), "batch rows must be >= 1"),
    (dict(window=-1), "--window -1: the sliding window must be >= 0"),
])
def test_bad_settings_are_input_errors(bad, message) -> None:
    with pytest.raises(InputError, match=message):
        DistillSettings(**bad).check()


def test_compile_with_block_target_exports_and_hits_the_cache(tiny_task, tmp_path) -> None:
    from dtr_compile.config import CompileConfig
    from dtr_compile.pipeline import compile_model

    config = CompileConfig(model=tiny_task["model"], output=str(tmp_path / "h.onnx"),
                           data=tiny_task["val"], metric="agreement", budget="50%", fp16=True,
                           distill_target="block", distill_steps=20, max_calib_samples=16,
                           max_linear=1, progress=False, bench=False)
    first = compile_model(config)
    assert first.report["parity_ok"] and len(first.report["replaced"]) == 1
    assert all(r["target"] == "block" and not r["cached"] for r in first.report["distill"].values())
    assert (tmp_path / ".dtr-cache" / "distill").is_dir()
    again = compile_model(dataclasses.replace(config, output=str(tmp_path / "again.onnx"),
                                              fp16=False))
    assert all(r["cached"] for r in again.report["distill"].values())
    assert again.report["replaced"] == first.report["replaced"]


# --- token budget, window dropout, the linear branch's contribution (issue 23) ---------------


def _causal_record(T: int = 40, rows: int = 8, seed: int = 0):
    """A synthetic causal site (H = 4, Hkv = 2, D = 8) and its teacher record: sharp causal
    softmax attention of random q, k, v."""
    from dtr_compile.distill.activations import SiteRecord
    from dtr_compile.passes.find_attention import AttentionSite

    site = AttentionSite("site0", "layers.0.attn", "sdpa", "q", "k", "v", None, "out", ("out",),
                         4, 2, 8, 8, True, "none", 8**-0.5)
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(rows, 4, T, 8, generator=g) * 2, torch.randn(rows, 2, T, 8, generator=g)
    v = torch.randn(rows, 2, T, 8, generator=g)
    out = SoftmaxAttention(4, 2, scale=site.scale, causal=True)(q, k, v, None)
    return site, SiteRecord(q, k, v, None, out)


def test_token_budget_sets_the_steps() -> None:
    """Steps per site: ceil(tokens / (rows × row length)), at most --distill-steps; 0 tokens:
    the steps alone. A site trained on 10k tokens of 40-token rows, 4 rows a step, makes 63
    steps (63 × 160 = 10,080 tokens), and says so."""
    s = DistillSettings(steps=400, tokens=10_000, batch_rows=4)
    assert s.steps_for(256) == 10 and s.steps_for(1024) == 3 and s.steps_for(10**6) == 1
    assert dataclasses.replace(s, steps=2).steps_for(256) == 2
    assert dataclasses.replace(s, tokens=0).steps_for(256) == 400
    site, rec = _causal_record()
    settings = DistillSettings(steps=400, tokens=10_000, batch_rows=4, eval_every=1000,
                               window=8)
    _, res = distill_site(site, rec, settings=settings)
    assert res.steps == 63 and res.tokens == 63 * 4 * 40
    # long rows: fewer rows per step (step_tokens // row length, 1 to batch_rows), more steps
    short = dataclasses.replace(s, step_tokens=1024)
    assert [short.rows_for(t) for t in (64, 256, 300, 512, 1024, 4096)] == [4, 4, 3, 2, 1, 1]
    assert short.steps_for(1024) == 10 and dataclasses.replace(s, step_tokens=0).rows_for(1024) == 4
    _, res = distill_site(site, rec, settings=dataclasses.replace(settings, step_tokens=80))
    assert res.steps == 125 and res.tokens == 125 * 2 * 40


def test_linear_contribution_is_zero_for_an_unused_branch() -> None:
    """The diagnostic ‖ŷ − ŷ₀‖ / ‖ŷ‖ (ŷ₀: the linear branch removed) on held-out rows: 0 for a
    gla student whose far keys get no share of the output (π = 1) and for a hedgehog student whose window
    covers every key (no key left for its feature maps); 1 without a window (ŷ₀ = 0); between
    for a trained windowed student, and the same number in its DistillResult."""
    from dtr_compile.distill.activations import RecordData
    from dtr_compile.distill.train import SiteTask

    site, rec = _causal_record()
    hold = torch.arange(6, 8)

    def task(kind: str, window: int) -> SiteTask:
        fmap = kind if kind == "hedgehog" else "hedgehog"
        s = DistillSettings(feature_map=fmap, student=None if kind == "hedgehog" else kind,
                            window=window)
        t = SiteTask(site, s, RecordData(rec, "none"))
        t.init_output_scale(torch.arange(4))
        return t

    gla = task("gla", 8)
    assert gla.linear_contribution(hold) > 0.1
    with torch.no_grad():
        gla.module.far_bias.fill_(-1e4)  # the far keys' normaliser 0: π = 1, the window alone
    assert gla.linear_contribution(hold) == 0.0
    assert task("hedgehog", 64).linear_contribution(hold) < 1e-5  # T = 40 <= W; eps = 1e-6
    assert task("gated-deltanet", 0).linear_contribution(hold) == pytest.approx(1.0)
    _, res = distill_site(site, rec, settings=DistillSettings(student="gla", window=8,
                                                              steps=20))
    assert 0.0 < res.linear_contribution < 5.0
    _, res = distill_site(site, rec, settings=DistillSettings(window=8, steps=20))
    assert 0.0 < res.linear_contribution < 5.0


@pytest.mark.parametrize("kind", ["hedgehog", "gla"])
def test_window_dropout_is_scheduled_and_deterministic(kind: str) -> None:
    """Window dropout: a step runs without the window with probability p0·(1 − 2(i − 1)/n),
    0 from half the steps on; the draws come from the site's seeded generator, so two runs give
    the same weights, and other weights than without dropout. The window is back afterwards."""
    from dtr_compile.distill.train import dropout_probability

    assert dropout_probability(0.5, 1, 10) == 0.5
    assert dropout_probability(0.5, 3, 10) == pytest.approx(0.3)
    assert dropout_probability(0.5, 6, 10) == 0.0 == dropout_probability(0.5, 10, 10)
    site, rec = _causal_record()
    student = None if kind == "hedgehog" else kind
    runs = [distill_site(site, rec, settings=DistillSettings(student=student, window=8, steps=12,
                                                             window_dropout=p))
            for p in (0.9, 0.9, 0.0)]
    assert all(m.window == 8 for m, _ in runs)
    (ma, ra), (mb, rb), (_, rc) = runs
    assert _bytes(ma.state_dict()) == _bytes(mb.state_dict()) and ra.loss_history == rb.loss_history
    assert ra.loss_history[0] != rc.loss_history[0]  # step 1 ran without the window


def test_window_dropped_runs_the_student_without_its_window() -> None:
    """Inside window_dropped(student, True) a windowed hedgehog student is plain causal linear
    attention (its feature maps over every key), and its window is restored after."""
    from dtr_compile.distill.train import window_dropped
    from dtr_compile.linear import make_student

    site, rec = _causal_record(T=20, rows=2)
    windowed = make_student("hedgehog", num_heads=4, num_kv_heads=2, head_dim=8, head_dim_v=8,
                            causal=True, scale=site.scale, window=8)
    plain = make_student("hedgehog", num_heads=4, num_kv_heads=2, head_dim=8, head_dim_v=8,
                         causal=True, scale=site.scale)
    plain.load_state_dict({k: v for k, v in windowed.state_dict().items()
                           if k != "window_factor"})
    with torch.no_grad(), window_dropped(windowed, True):
        dropped = windowed(rec.q, rec.k, rec.v)
    assert windowed.window == 8
    with torch.no_grad():
        assert torch.equal(dropped, plain(rec.q, rec.k, rec.v))
        assert not torch.equal(dropped, windowed(rec.q, rec.k, rec.v))


def test_cache_key_covers_the_new_settings(tiny) -> None:
    """Token budget, window dropout and the matrix-state initialisation enter a causal site's
    key; window dropout does not enter a bidirectional site's (it has no window), nor the
    initialisation a feature map's."""
    gm, names, sites, calib = tiny
    base = DistillSettings(steps=30)
    keys = plan_distillation(gm, sites, base, calib, 16).keys
    for change, same in ((dict(tokens=5000), False), (dict(window_dropout=0.3), True),
                         (dict(init="plain"), True)):
        other = plan_distillation(gm, sites, dataclasses.replace(base, **change), calib, 16).keys
        assert (other == keys) == same, change
    causal = dataclasses.replace(sites[0], causal=True)  # the same teacher, read as causal
    settings = DistillSettings(student="gla", window=8)
    k0 = plan_distillation(gm, [causal], settings, calib, 16).keys[causal.id]
    for change in (dict(window_dropout=0.3), dict(init="plain"), dict(tokens=5000)):
        k1 = plan_distillation(gm, [causal], dataclasses.replace(settings, **change), calib,
                               16).keys[causal.id]
        assert k1 != k0, change


def test_search_order_puts_explosive_students_last() -> None:
    """The search meets sites by distillation error, lowest first (ties: graph order), and last
    those whose student is further from its teacher than zeros (error >= 1) or non-finite, so
    the ranked strategy's first pass measures them last (and ranks them last among ties)."""
    from dtr_compile.distill.plan import DistillResult, search_order
    from dtr_compile.search.schedule import schedule

    errors = {"a": 0.5, "b": float("nan"), "c": 0.2, "d": 1.3, "e": 0.2}
    results = {s: DistillResult(s, True, 1.0, e, 0.0, 1, 0.0) for s, e in errors.items()}
    order = search_order(list(errors), results)
    assert order == ["c", "e", "a", "d", "b"]
    seen: list[str] = []

    def evaluate(linear: tuple[str, ...]) -> float:
        seen.append(linear[-1])
        return 1.0  # every site alike: the given order decides
    res = schedule(order, evaluate, baseline=1.0, threshold=0.5, strategy="ranked")
    assert seen[:5] == order and res.committed == order


def test_time_limit_cuts_a_site_and_says_so() -> None:
    """A site whose share of --time-limit is spent after 5 steps (a fake clock: 1 s a reading,
    5.5 s allowed) stops there with its best weights, the tokens of those 5 steps and a note;
    without the limit it trains to its token budget."""
    site, rec = _causal_record()
    settings = DistillSettings(steps=400, tokens=10_000, batch_rows=4, eval_every=1000,
                               window=8)
    now = [0.0]

    def tick() -> float:
        now[0] += 1.0
        return now[0]

    _, res = distill_site(site, rec, settings=settings, time_limit_s=5.5, clock=tick)
    assert res.time_limited and res.ok and not res.cacheable
    assert res.steps == 5 and res.tokens == 5 * 4 * 40
    assert "stopped by --time-limit after 5 of 63 steps" in res.note
    assert res.final_error <= res.init_error
    _, full = distill_site(site, rec, settings=settings)
    assert not full.time_limited and full.cacheable and full.steps == 63


@pytest.mark.parametrize("workers", [1, 2])
def test_sites_cut_by_the_time_limit_are_not_cached(tiny, tmp_path, workers) -> None:
    """A distillation whose share of --time-limit is already spent trains no step: every site
    keeps its starting weights, is reported as cut (0 tokens) and is not stored in the
    cross-run cache, whose key does not cover the time a site had; the same distillation
    without the limit stores every site, and a later cut run takes them from the cache."""
    gm, names, sites, calib = tiny
    cache = DistillCache(tmp_path)
    settings = DistillSettings(steps=5)
    _, _, cut = _run(gm, names, sites, calib, settings, cache=cache, time_limit_s=0.0,
                     workers=workers)
    assert all(r.time_limited and r.steps == 0 and r.tokens == 0 for r in cut.values())
    assert all("stopped by --time-limit" in r.note for r in cut.values())
    assert not list(tmp_path.rglob("*.safetensors"))
    _, _, full = _run(gm, names, sites, calib, settings, cache=cache, workers=workers)
    assert not any(r.time_limited for r in full.values())
    assert len(list(tmp_path.rglob("*.safetensors"))) == len(sites)
    _, _, again = _run(gm, names, sites, calib, settings, cache=cache, time_limit_s=0.0,
                       workers=workers)
    assert all(r.cached and not r.time_limited for r in again.values())
