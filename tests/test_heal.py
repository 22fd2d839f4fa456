"""The recovery stage (``dtr_compile.heal``): end-to-end training of a hybrid's students against
the original's outputs lowers the loss on a tiny Llama (token KL) and a tiny BERT classifier
(class KL); the top-K KL is the exact KL of the coarsened distributions; adapters start as the
identity and decode like full recomputation; a heal is deterministic, resumes from its checkpoint
to the same weights, and is cached; rounds let a further site fit once the first ones are
healed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dtr_compile.data import Dataset
from dtr_compile.distill.plan import DistillSettings, plan_distillation
from dtr_compile.distill.run import distill
from dtr_compile.heal.adapters import AdaptedStudent, adapt
from dtr_compile.heal.cache import HealCache, heal_key, heal_key_parts
from dtr_compile.heal.loss import loss_kind, make_targets, record_targets, row_loss
from dtr_compile.heal.rounds import SearchOutcome, run_rounds
from dtr_compile.heal.train import Healed, HealRecord, HealSettings, heal
from dtr_compile.metrics import get_metric
from dtr_compile.passes.find_attention import find_attention

VOCAB = 96


class SharpLlama(torch.nn.Module):
    """Tiny ``LlamaForCausalLM`` (GQA, RoPE) with sharpened attention and logits, so that a
    linear student visibly changes the next-token distributions: ``input_ids → logits``."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=256, use_cache=False,
                          attn_implementation="sdpa")
        self.lm = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():
            self.lm.lm_head.weight.mul_(30.0)
            for layer in self.lm.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.weight.mul_(4.0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def _capture(model: torch.nn.Module, example: dict[str, torch.Tensor]):  # noqa: ANN202
    from dtr_compile.capture import export_module, flat_graph_module

    gm = flat_graph_module(export_module(model, example).module())
    return gm, [n.name for n in gm.graph.nodes if n.op == "placeholder"]


_LLAMA: dict[str, object] = {}


def _llama(window: int = 0):  # noqa: ANN202
    """The captured sharp Llama, its sites, 16 calibration rows of 32 tokens and students
    distilled 10 steps (cached per window for the module)."""
    if window not in _LLAMA:
        if "gm" not in _LLAMA:
            ids = torch.randint(1, VOCAB, (16, 32), generator=torch.Generator().manual_seed(1))
            gm, names = _capture(SharpLlama(), {"input_ids": ids[:2, :16].clone()})
            _LLAMA.update(gm=gm, names=names, sites=find_attention(gm).sites,
                          calib=Dataset({"input_ids": ids}, None))
        gm, sites, calib = _LLAMA["gm"], _LLAMA["sites"], _LLAMA["calib"]
        plan = plan_distillation(gm, sites, DistillSettings(steps=10, window=window), calib, 8)
        students, _ = distill(gm, plan, calib, _LLAMA["names"], record_batch=8,
                              max_calib_tokens=10**6)
        _LLAMA[window] = students
    return (_LLAMA["gm"], _LLAMA["names"], _LLAMA["sites"], _LLAMA["calib"], _LLAMA[window])


def _llama_targets():  # noqa: ANN202
    gm, names, _, calib, _ = _llama()
    kind = loss_kind(get_metric("perplexity", False), 3)
    return record_targets(gm, calib, names, kind, batch_size=8, top_k=16)


def _state(students: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{sid}.{k}": v.clone() for sid, m in students.items()
            for k, v in m.state_dict().items()}


FAST = HealSettings(steps=12, rows_per_step=2, lr=3e-3, eval_every=4, patience=0)


# --- the loss ---------------------------------------------------------------------------------


def test_loss_kind_follows_the_metric_and_the_output() -> None:
    assert loss_kind(get_metric("perplexity", False), 3) == "token-kl"
    assert loss_kind(get_metric("agreement", False), 3) == "token-kl"
    assert loss_kind(get_metric("accuracy", True), 2) == "class-kl"
    assert loss_kind(get_metric("cosine", False), 2) == "mse"
    assert loss_kind(get_metric("mse", False), 3) == "mse"


def test_top_k_kl_is_the_exact_kl_of_the_coarsened_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 11, generator=g) * 3
    student = torch.randn(2, 5, 11, generator=g) * 3
    inputs = {"attention_mask": torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])}
    p, q = teacher.log_softmax(-1), student.log_softmax(-1)
    full = (p.exp() * (p - q)).sum(-1)  # [2, 5]
    w = inputs["attention_mask"].float()
    # K = V: the full KL, masked positions left out
    num, den = row_loss("token-kl", student, make_targets("token-kl", teacher, inputs, 11))
    assert float(den) == 8.0
    assert float(num) == pytest.approx(float((full * w).sum()), rel=1e-5)
    # K = 3, by hand: the top 3 tokens and one bucket for the rest
    top = p.topk(3, dim=-1)
    coarse = torch.zeros(2, 5)
    for b in range(2):
        for t in range(5):
            idx = top.indices[b, t]
            pk, qk = p[b, t, idx].exp(), q[b, t, idx].exp()
            pr, qr = 1 - pk.sum(), 1 - qk.sum()
            coarse[b, t] = (pk * (pk / qk).log()).sum() + pr * (pr / qr).log()
    num3, _ = row_loss("token-kl", student, make_targets("token-kl", teacher, inputs, 3))
    assert float(num3) == pytest.approx(float((coarse * w).sum()), rel=1e-4)
    assert float(num3) <= float(num) + 1e-6  # a lower bound of the full KL
    # the student equal to the teacher: zero
    same, _ = row_loss("token-kl", teacher, make_targets("token-kl", teacher, inputs, 3))
    assert abs(float(same)) < 1e-5


def test_class_kl_and_relative_mse_by_hand() -> None:
    t, s = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.5, 0.5, 0.0]])
    num, den = row_loss("class-kl", s, make_targets("class-kl", t, {}, 0))
    p, q = t.softmax(-1), s.softmax(-1)
    assert float(num) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-6)
    assert float(den) == 1.0
    num, den = row_loss("mse", s, make_targets("mse", t, {}, 0))
    assert float(num) / float(den) == pytest.approx(float(((s - t) ** 2).sum() / (t**2).sum()))


# --- healing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 4], ids=["students", "students+lora4"])
def test_heal_lowers_the_token_kl_of_a_tiny_llama(rank: int) -> None:
    gm, names, sites, calib, students = _llama(window=4)
    targets = _llama_targets()
    teacher_before = {k: v.clone() for k, v in gm.state_dict().items()}
    grads_before = [p.requires_grad for p in gm.parameters()]
    given = _state(students)
    linear = [s.id for s in sites]
    healed = heal(gm, sites, students, linear, calib, names, targets,
                  HealSettings(steps=20, rows_per_step=2, lr=3e-3 if rank == 0 else 1e-3,
                               eval_every=5, patience=0, rank=rank))
    rec = healed.record
    assert rec.loss == "token-kl" and rec.ok and rec.steps == 20
    assert rec.rows_train == 14 and rec.rows_heldout == 2 and rec.tokens == 20 * 2 * 32
    assert rec.init_loss > 1e-3
    if rank == 0:
        assert rec.final_loss < 0.97 * rec.init_loss, rec.heldout_history
    else:  # 14 random rows are too few for 4 adapters per site: early stopping keeps the best
        assert rec.final_loss <= rec.init_loss, rec.heldout_history
    # the teacher and the given students are untouched; the healed ones differ
    assert all(torch.equal(v, teacher_before[k]) for k, v in gm.state_dict().items())
    assert [p.requires_grad for p in gm.parameters()] == grads_before
    assert all(torch.equal(v, given[k]) for k, v in _state(students).items())
    assert set(healed.students) == set(linear)
    if rank:
        assert all(isinstance(m, AdaptedStudent) for m in healed.students.values())
        assert rec.trainable_params > sum(p.numel() for m in students.values()
                                          for p in m.parameters())
    # the held-out loss it reports is the one of the healed students
    from dtr_compile.device import Placement
    from dtr_compile.heal.train import _Trainer
    from dtr_compile.parallel import Group

    tr = _Trainer(gm, sites, dict(healed.students), calib, names, targets, Placement(), Group(),
                  None)
    assert tr.loss([14, 15]) == pytest.approx(rec.final_loss, rel=1e-6)


def test_heal_lowers_the_class_kl_of_a_tiny_bert() -> None:
    from tests.conftest import TinyClassifier, make_token_data

    class FirstToken(TinyClassifier):  # the classes from token 0 ([CLS]), not a mean
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
            return self.head(h.last_hidden_state[:, 0])

    model = FirstToken(layers=2)
    with torch.no_grad():  # peaked attention that outweighs the residual, and sharp logits
        model.head.weight.mul_(50.0)
        for layer in model.backbone.encoder.layer:
            layer.attention.self.query.weight.mul_(3.0)
            layer.attention.self.key.weight.mul_(3.0)
            layer.attention.self.value.weight.mul_(8.0)
            layer.attention.output.dense.weight.mul_(8.0)
    data = make_token_data(24, 16, seed=3)
    gm, names = _capture(model, {k: v[:2] for k, v in data.items()})
    sites = find_attention(gm).sites
    calib = Dataset({n: data[n] for n in names}, None)
    plan = plan_distillation(gm, sites, DistillSettings(steps=5), calib, 8)
    students, _ = distill(gm, plan, calib, names, record_batch=8, max_calib_tokens=10**6)
    kind = loss_kind(get_metric("accuracy", True), 2)
    assert kind == "class-kl"
    targets = record_targets(gm, calib, names, kind, batch_size=8)
    rec = heal(gm, sites, students, [s.id for s in sites], calib, names, targets,
               HealSettings(steps=20, rows_per_step=4, lr=1e-2, eval_every=5, patience=0)).record
    assert rec.loss == "class-kl" and rec.rows_heldout == 3
    assert rec.init_loss > 1e-3
    assert rec.final_loss < 0.8 * rec.init_loss, rec.heldout_history


def test_heal_is_deterministic_and_resumes_to_the_same_weights(tmp_path: Path) -> None:
    gm, names, sites, calib, students = _llama()
    targets = _llama_targets()
    linear = [sites[1].id]
    a = heal(gm, sites, students, linear, calib, names, targets, FAST)
    b = heal(gm, sites, students, linear, calib, names, targets, FAST)
    assert _state(a.students).keys() == _state(b.students).keys()
    assert all(torch.equal(v, _state(b.students)[k]) for k, v in _state(a.students).items())
    assert a.record.heldout_history == b.record.heldout_history

    # interrupted after step 6 (a checkpoint was written at step 4), then resumed
    ckpt = tmp_path / "heal.ckpt"

    def boom(step: int, loss: float) -> None:
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        heal(gm, sites, students, linear, calib, names, targets, FAST, checkpoint=ckpt,
             key="k1", on_step=boom)
    assert ckpt.is_file()
    c = heal(gm, sites, students, linear, calib, names, targets, FAST, checkpoint=ckpt, key="k1")
    assert c.record.resumed_from_step == 4
    assert all(torch.equal(v, _state(c.students)[k]) for k, v in _state(a.students).items())
    assert c.record.heldout_history == a.record.heldout_history
    # a finished heal's checkpoint gives its result without training again
    e = heal(gm, sites, students, linear, calib, names, targets, FAST, checkpoint=ckpt, key="k1")
    assert e.record.resumed_from_step == FAST.steps
    assert all(torch.equal(v, _state(e.students)[k]) for k, v in _state(a.students).items())
    # a checkpoint of another key is not used
    d = heal(gm, sites, students, linear, calib, names, targets, FAST, checkpoint=ckpt, key="k2")
    assert d.record.resumed_from_step == 0


def test_heal_cache_round_trip_and_tampering(tmp_path: Path) -> None:
    gm, names, sites, calib, students = _llama()
    linear = [sites[0].id]
    healed = heal(gm, sites, students, linear, calib, names, _llama_targets(),
                  HealSettings(steps=2, rank=2, eval_every=1))
    parts = heal_key_parts(teacher="t", calib="c", record_batch=8, linear=linear, students="s",
                           settings={"rank": 2}, loss="token-kl", runtime="cpu/fp32")
    key = heal_key(parts)
    assert key != heal_key({**parts, "linear": '["site1"]'})
    cache = HealCache(tmp_path)
    cache.save(key, healed.students, healed.record.to_dict(), parts)
    from dtr_compile.heal.train import trainable_students

    empty = trainable_students(sites, students, linear, HealSettings(rank=2))
    got = cache.load(key, empty)
    assert got is not None
    assert all(torch.equal(v, _state(healed.students)[k]) for k, v in _state(got[0]).items())
    assert got[1]["steps"] == 2
    # students of another shape (no adapters) do not fit: a miss, with a warning
    warned: list[str] = []
    cache = HealCache(tmp_path, on_warning=warned.append)
    plain = trainable_students(sites, students, linear, HealSettings(rank=0))
    assert cache.load(key, plain) is None and "do not fit" in warned[-1]
    # a flipped byte in the file: a miss
    path = cache.path(key)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert cache.load(key, empty) is None and "digest" in warned[-1]


# --- adapters ----------------------------------------------------------------------------------


def test_adapters_start_as_the_student_itself() -> None:
    _, _, sites, _, students = _llama(window=4)
    s = sites[1]
    inner = students[s.id]
    adapted = adapt(inner, head_dim=s.head_dim, head_dim_v=s.head_dim_v, rank=4, seed=1)
    assert isinstance(adapted, AdaptedStudent)
    assert adapt(adapted, head_dim=8, head_dim_v=8, rank=4, seed=1) is adapted
    assert adapt(inner, head_dim=8, head_dim_v=8, rank=0, seed=1) is inner
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 20, 8, generator=g)
    k, v = torch.randn(2, 2, 20, 8, generator=g), torch.randn(2, 2, 20, 8, generator=g)
    assert torch.equal(adapted(q, k, v), inner(q, k, v))


@pytest.mark.parametrize(("student", "window"), [("hedgehog", 4), ("gated-deltanet", 4)])
def test_adapted_students_decode_like_full_recompute(student: str, window: int) -> None:
    """The stateful pass on an adapted student (non-zero adapters): a left-padded batch decodes
    token for token like full recomputation of the adapted hybrid, past the window."""
    from dtr_compile.exporters.stateful import torch_runner
    from dtr_compile.passes.linearize import linearize
    from dtr_compile.passes.stateful import StatefulGraph, make_stateful
    from tests.test_stateful import _batch_decodes_like_alone, _matrix_state_site1, _prompt

    gm, scan, students = _matrix_state_site1(student, window, seed=13)
    s = scan.sites[1]
    adapted = adapt(students[s.id], head_dim=s.head_dim, head_dim_v=s.head_dim_v, rank=3, seed=2)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith(".up"):
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    studs = {s.id: adapted.eval()}
    prefill = linearize(gm, scan.sites, studs)
    plain = linearize(gm, scan.sites, students)
    ids = _prompt(3, 20)[None]
    assert not torch.allclose(prefill(ids, torch.ones_like(ids))[0],
                              plain(ids, torch.ones_like(ids))[0])
    sg = make_stateful(gm, scan.sites, studs, rejected=scan.rejected)
    assert isinstance(sg, StatefulGraph), sg
    _batch_decodes_like_alone(torch_runner(sg), sg, prefill, [_prompt(6, 5), _prompt(7, 30)], 8)


# --- rounds ------------------------------------------------------------------------------------


def test_rounds_heal_lets_a_further_site_fit() -> None:
    """A fake hybrid whose metric is the sum of its sites' errors (budget 1.0): the distilled
    errors let two of three sites fit; healing halves the committed sites' errors, and the
    second round's search adds the third."""
    errors = {"a": 0.3, "b": 0.4, "c": 0.5}

    class Student(torch.nn.Module):
        def __init__(self, err: float) -> None:
            super().__init__()
            self.err = torch.nn.Parameter(torch.tensor(err))

    def metric_of(students, linear) -> float:  # noqa: ANN001
        return sum(float(students[s].err) for s in linear)

    searched: list[tuple[int, tuple[str, ...]]] = []

    def search(r, students, base, left):  # noqa: ANN001, ANN202
        searched.append((r, base))
        linear = list(base)
        for s in sorted(errors, key=lambda s: float(students[s].err)):
            if s not in linear and metric_of(students, [*linear, s]) <= 1.0:
                linear.append(s)
        return SearchOutcome(tuple(linear), metric_of(students, linear))

    def do_heal(r, students, linear, left) -> Healed:  # noqa: ANN001
        out = {s: Student(float(students[s].err) / 2) for s in linear}
        rec = HealRecord(list(linear), "mse", 1.0, 0.5, 3, 3, 300, 0.1, "", 7, 1, 3, 0)
        return Healed(out, rec)

    def measure(students, linear):  # noqa: ANN001, ANN202
        m = metric_of(students, linear)
        return m, m <= 1.0

    res = run_rounds({s: Student(e) for s, e in errors.items()}, search=search, heal=do_heal,
                     measure=measure, higher_is_better=False, max_rounds=3)
    assert [r.added for r in res.rounds] == [["a", "b"], ["c"], []]
    assert res.linear == ("a", "b", "c")
    assert searched == [(1, ()), (2, ("a", "b")), (3, ("a", "b", "c"))]
    r1, r2 = res.rounds[:2]
    assert r1.metric_before_heal == pytest.approx(0.7) and r1.metric_after_heal == pytest.approx(0.35)
    assert r1.heal_kept and r2.tokens == 300
    assert r2.metric_before_heal == pytest.approx(0.85)
    assert res.metric == pytest.approx(0.425)
    assert "no further site fits" in res.stop_reason
    # a heal that makes things worse is not kept, and the rounds stop
    def worse(r, students, linear, left) -> Healed:  # noqa: ANN001
        h = do_heal(r, students, linear, left)
        return Healed({s: Student(2 * float(students[s].err)) for s in linear}, h.record)

    res = run_rounds({s: Student(e) for s, e in errors.items()}, search=search, heal=worse,
                     measure=measure, higher_is_better=False, max_rounds=3)
    assert len(res.rounds) == 1 and not res.rounds[0].heal_kept
    assert res.linear == ("a", "b") and res.metric == pytest.approx(0.7)
    assert float(res.students["a"].err) == pytest.approx(0.3)
    assert "beyond the budget" in res.stop_reason
    assert math.isfinite(res.metric)


# --- ranks -------------------------------------------------------------------------------------


def test_two_ranks_heal_to_the_weights_of_one_process(tmp_path: Path) -> None:
    """Rows dealt over 2 gloo ranks (3 rows a step: 1 and 2), gradients summed in row order on
    every rank: both ranks end with the one-process weights, bit for bit."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from dtr_compile.parallel import Group
    from tests.heal_ranks import run
    from tests.test_distributed import _free_port

    root = str(Path(__file__).resolve().parents[1])
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.heal_ranks", str(tmp_path)],
                              cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port})
             for r in range(2)]
    one = run(Group())
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    for r in range(2):
        got = load_file(str(tmp_path / f"rank{r}.safetensors"))
        assert got.keys() == one.keys()
        assert all(torch.equal(got[k], one[k]) for k in one), r
