"""Validation metrics: values on hand-made outputs, direction, perplexity, import-path metrics."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from dtr_compile.errors import InputError
from dtr_compile.metrics import METRICS, Metric, get_metric, perplexity_rows

LOGITS = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
LABELS = torch.tensor([0, 1, 1, 2])  # predictions 0 1 2 0: 2 of 4 right


def test_accuracy_agreement_macro_f1():
    ref = LOGITS.clone()
    ref[2] = torch.tensor([0.0, 5.0, 0.0])  # original predicts 1 on row 2
    assert METRICS["accuracy"](LOGITS, LABELS, ref) == 0.5
    assert METRICS["agreement"](LOGITS, None, ref) == 0.75
    # per class F1: class 0: tp1 fp1 fn0 → 2/3; class 1: tp1 fp0 fn1 → 2/3; class 2: tp0 → 0
    assert METRICS["macro_f1"](LOGITS, LABELS, ref) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_directions_and_needs():
    hib = {n: m.higher_is_better for n, m in METRICS.items()}
    assert hib == {"accuracy": True, "agreement": True, "macro_f1": True, "cosine": True,
                   "mse": False, "perplexity": False, "kl": False}
    assert METRICS["accuracy"].better(0.9, 0.8) and METRICS["perplexity"].better(9.0, 10.0)
    assert [n for n, m in METRICS.items() if m.is_share] == ["accuracy", "agreement", "macro_f1"]


def test_cosine():
    ref = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    out = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    assert METRICS["cosine"](out, None, ref) == pytest.approx((1 / math.sqrt(2) + 1.0) / 2)
    assert METRICS["cosine"](ref, None, ref) == pytest.approx(1.0)


def test_mse_against_reference_or_float_labels():
    ref = torch.zeros(3, 2)
    out = torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    assert METRICS["mse"](out, None, ref) == pytest.approx(6 / 6)
    # integer (class) labels are not regression targets: compare with the original
    assert METRICS["mse"](out, torch.tensor([0, 1, 2]), ref) == pytest.approx(1.0)
    # float labels [N] for outputs [N, 1] are regression targets
    assert METRICS["mse"](torch.tensor([[1.0], [3.0]]), torch.tensor([1.0, 1.0]),
                          torch.zeros(2, 1)) == pytest.approx(2.0)
    with pytest.raises(InputError, match="differ in shape"):
        METRICS["mse"](out, None, torch.zeros(3, 3))


def _ppl_reference(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Hugging Face causal-LM loss convention: shift, mean over non-ignored tokens, exp."""
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           targets[:, 1:].reshape(-1), ignore_index=-100)
    return math.exp(loss.item())


def test_perplexity_from_input_ids_ignores_padding_and_streams():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 11, generator=g)
    ids = torch.randint(0, 11, (5, 7), generator=g)
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    m = METRICS["perplexity"]
    # reduced batch by batch (2 + 3 rows), as the evaluator does
    rows = torch.cat([m.reduce(logits[:2], {"input_ids": ids[:2], "attention_mask": mask[:2]}, None),
                      m.reduce(logits[2:], {"input_ids": ids[2:], "attention_mask": mask[2:]}, None)])
    assert rows.shape == (5, 2)
    expected = _ppl_reference(logits, ids.masked_fill(mask == 0, -100))
    assert m(rows, None, rows) == pytest.approx(expected, rel=1e-6)


def test_perplexity_from_token_labels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 9, generator=g)
    labels = torch.randint(0, 9, (2, 6), generator=g)
    labels[0, :3] = -100  # a prompt not scored
    rows = perplexity_rows(logits, {"input_ids": torch.zeros(2, 6, dtype=torch.long)}, labels)
    assert METRICS["perplexity"](rows, labels, rows) == pytest.approx(
        _ppl_reference(logits, labels), rel=1e-6)


def test_perplexity_perfect_model_is_one():
    ids = torch.tensor([[1, 2, 3, 0]])
    logits = torch.full((1, 4, 4), -1e4)
    logits[0, torch.arange(3), ids[0, 1:]] = 1e4
    rows = perplexity_rows(logits, {"input_ids": ids}, None)
    assert METRICS["perplexity"](rows, None, rows) == pytest.approx(1.0)


def test_perplexity_rejects_classifier_outputs():
    with pytest.raises(InputError, match=r"logits \[N, T, V\]"):
        perplexity_rows(LOGITS, {"input_ids": torch.zeros(4, 3, dtype=torch.long)}, None)


def test_kl_of_a_classifier_by_hand():
    """Two rows, two classes: KL(p ‖ q) = Σ p (log p − log q), averaged over the rows."""
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))  # logits whose softmax is p
    out = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    m = METRICS["kl"]
    r_ref, r_out = m.reduce(ref, {}, None), m.reduce(out, {}, None)
    row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # 0.1438…
    assert m(r_out, None, r_ref) == pytest.approx(row0 / 2, rel=1e-6)  # fp32 log-probs
    assert m(r_ref, None, r_ref) == 0.0
    stats = m.row_stats(r_out, None, r_ref)
    assert stats.reshape(-1).tolist() == pytest.approx([row0, 1.0, 0.0, 1.0], rel=1e-6, abs=1e-9)


def test_kl_of_a_causal_lm_counts_valid_positions_only():
    """[N, T, V] logits: mean over positions with attention_mask == 1 of the per-token KL, as a
    hand loop computes it; reduced batch by batch; padding positions change nothing."""
    g = torch.Generator().manual_seed(2)
    ref, out = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 0]])
    total, count = 0.0, 0
    for n in range(3):
        for t in range(4):
            if mask[n, t]:
                p, q = ref[n, t].double().softmax(-1), out[n, t].double().softmax(-1)
                total += float((p * (p.log() - q.log())).sum())
                count += 1
    m = METRICS["kl"]

    def rows(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.reduce(x[:2], {"attention_mask": mask[:2]}, None),
                          m.reduce(x[2:], {"attention_mask": mask[2:]}, None)])

    assert m(rows(out), None, rows(ref)) == pytest.approx(total / count, rel=1e-6)
    garbage = out.clone()
    garbage[1, :2] = 1e3  # padding positions of row 1
    assert m(rows(garbage), None, rows(ref)) == pytest.approx(total / count, rel=1e-6)
    assert not m.higher_is_better and not m.needs_labels
    with pytest.raises(InputError, match="no counted position"):
        m(rows(out) * 0, None, rows(ref) * 0)


def test_get_metric_defaults_and_errors():
    assert get_metric(None, True).name == "accuracy"
    assert get_metric(None, False).name == "agreement"
    assert get_metric("Macro-F1", True).name == "macro_f1"
    with pytest.raises(InputError, match="unknown metric 'bleu'"):
        get_metric("bleu", True)
    with pytest.raises(InputError, match="needs a 'labels' tensor"):
        get_metric("accuracy", False)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(textwrap.dedent("""
        import torch

        def top2(outputs, labels, reference):
            return (outputs.topk(2, -1).indices == labels[:, None]).any(-1).float().mean().item()
        top2.needs_labels = True
        top2.bounds = (0.0, 1.0)

        def max_abs(outputs, labels, reference):
            return (outputs - reference).abs().max().item()
        max_abs.higher_is_better = False

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_metrics", None)


def test_import_path_metric(user_module):
    m = get_metric("my_metrics:top2", True)
    assert m.name == "my_metrics:top2" and m.higher_is_better and m.needs_labels and m.is_share
    ranked = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    assert m(ranked, LABELS, ranked) == 0.75
    assert m.identity.startswith("import:my_metrics:top2:")
    low = get_metric("my_metrics:max_abs", False)
    assert not low.higher_is_better and low.bounds is None
    assert low(LOGITS + 0.5, None, LOGITS) == pytest.approx(0.5)
    with pytest.raises(InputError, match="needs a 'labels'"):
        get_metric("my_metrics:top2", False)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("my_metrics:nope", "has no attribute 'nope'"),
        ("my_metrics:NOT_CALLABLE", "not a function"),
        ("my_metrics:", "expected 'package.module:function'"),
    ],
)
def test_import_path_errors(user_module, spec: str, message: str):
    with pytest.raises(InputError, match=message):
        get_metric(spec, True)


def test_metric_instance_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_metric_obj.py").write_text(textwrap.dedent("""
        from dtr_compile.metrics import Metric
        M = Metric("neg_mean", lambda o, l, r: -o.mean().item(), False, False)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    m = get_metric("my_metric_obj:M", False)
    assert isinstance(m, Metric) and m.name == "neg_mean" and not m.higher_is_better
    sys.modules.pop("my_metric_obj", None)


def test_kl_bound_resamples_rows_of_token_sums():
    """The confidence bound of a KL drop: the paired bootstrap over rows of ``(Σ KL, tokens)``;
    the original's own rows give 0, a hybrid's a positive degradation."""
    from dtr_compile.search.confidence import degradation_bound

    g = torch.Generator().manual_seed(3)
    ref = torch.randn(6, 5, 7, generator=g)
    out = ref + 0.3 * torch.randn(6, 5, 7, generator=g)
    m = METRICS["kl"]
    r_ref, r_out = m.reduce(ref, {}, None), m.reduce(out, {}, None)
    b = degradation_bound(m, r_out, None, r_ref, 0.9, seed=0, resamples=200)
    assert b.method == "paired-bootstrap" and b.degradation == pytest.approx(m(r_out, None, r_ref))
    assert b.upper >= b.degradation > 0
    assert degradation_bound(m, r_ref, None, r_ref, 0.9, resamples=50).upper == 0.0


@pytest.mark.slow
def test_kl_drives_a_compile_of_a_causal_lm(tmp_path):
    """``--metric kl`` end to end on a tiny Llama: the original scores 0, the hybrid's KL from
    it is positive and within an absolute budget, with a paired bound (--confidence) from the
    metric's row statistics."""
    from dtr_compile.config import CompileConfig
    from dtr_compile.pipeline import compile_model

    from .test_decoder_vision import VOCAB, TinyCausalLM, _export

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (8, 24), generator=g)
    auto = torch.export.Dim.AUTO
    _export(TinyCausalLM(), {"input_ids": ids[:2].clone()}, {"input_ids": {0: auto, 1: auto}},
            tmp_path / "model.pt")
    torch.save({"input_ids": ids}, tmp_path / "val.pt")
    res = compile_model(CompileConfig(
        model=str(tmp_path / "model.pt"), output=str(tmp_path / "h.onnx"),
        data=str(tmp_path / "val.pt"), metric="kl", budget="1", confidence=0.9, max_linear=1,
        distill_steps=5, max_calib_samples=8, workers=1, bench=False, decoder=False,
        progress=False))
    rep = res.report
    assert rep["metric"]["name"] == "kl" and not rep["metric"]["higher_is_better"]
    assert rep["baseline_metric"] == 0.0 and rep["threshold"] == 1.0
    assert len(rep["replaced"]) == 1 and 0.0 < rep["final_metric"] <= 1.0
    assert rep["confidence"]["interval"]["method"] == "paired-bootstrap"
