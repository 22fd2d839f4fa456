"""Issue 12, data and metrics: bad data or a bad metric is one clear exit-2 error, never a
silently wrong number. Each test fails on the code before the fix."""

from __future__ import annotations

import math
import re
import sys
import textwrap

import pytest
import torch

from dtr_compile.data import load_dataset, read_tensors
from dtr_compile.errors import InputError
from dtr_compile.metrics import METRICS, get_metric

from .conftest import make_token_data

NAMES = ["input_ids", "attention_mask"]


# --- labels (item 4) ---------------------------------------------------------------------------


def test_labels_n_by_1_are_squeezed_not_broadcast() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 5, generator=g)
    labels = logits.argmax(-1)
    acc, f1 = METRICS["accuracy"], METRICS["macro_f1"]
    assert acc(logits, labels[:, None], logits) == 1.0  # broadcast [N, N] gave ~0.2 before
    assert f1(logits, labels[:, None], logits) == 1.0
    assert acc(logits, labels.float(), logits) == 1.0  # whole-number float labels are fine


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([0, 1, 5, 2]), r"label 5 at row 2 is outside \[0, 3\)"),
    (torch.tensor([0, -1, 1, 2]), r"label -1 at row 1 is outside \[0, 3\)"),
    (torch.tensor([0.0, 1.5, 1.0, 2.0]), "row 1 holds 1.5"),
    (torch.tensor([[0, 1], [1, 1], [2, 2], [0, 0]]), r"labels have shape \[4, 2\]"),
])
def test_bad_class_labels_are_refused(bad: torch.Tensor, match: str) -> None:
    logits = torch.eye(3)[[0, 1, 2, 0]]
    for name in ("accuracy", "macro_f1"):
        with pytest.raises(InputError, match=match):
            METRICS[name](logits, bad, logits)


# --- NaN / inf and integer inputs in the data (items 8, 11) -------------------------------------


def test_non_finite_float_input_names_tensor_and_row(tmp_path) -> None:
    x = torch.randn(6, 4, 3)
    x[3, 1, 2] = math.nan
    x[5, 0, 0] = math.inf
    torch.save({"pixel_values": x}, tmp_path / "d.pt")
    with pytest.raises(InputError, match=r"'pixel_values' holds nan at row 3 \(and 1 more row\)"):
        load_dataset(tmp_path / "d.pt", ["pixel_values"])
    y = torch.randn(6, 3)
    y[2, 0] = -math.inf
    torch.save({"pixel_values": y, "labels": torch.tensor([0.0, 1, math.nan, 0, 0, 0])},
               tmp_path / "e.pt")
    with pytest.raises(InputError, match="'pixel_values' holds -inf at row 2"):
        load_dataset(tmp_path / "e.pt", ["pixel_values"])


def test_non_finite_labels_are_refused(tmp_path) -> None:
    torch.save({"x": torch.randn(3, 2), "labels": torch.tensor([0.5, math.nan, 1.0])},
               tmp_path / "d.pt")
    with pytest.raises(InputError, match="'labels' holds nan at row 1"):
        load_dataset(tmp_path / "d.pt", ["x"])


def test_fractional_token_ids_and_masks_are_refused(tmp_path) -> None:
    data = make_token_data(5, 6)
    torch.save({"input_ids": data["input_ids"].float() + 0.5,
                "attention_mask": data["attention_mask"]}, tmp_path / "ids.pt")
    with pytest.raises(InputError, match="input 'input_ids' .* non-integer value .* row 0"):
        load_dataset(tmp_path / "ids.pt", NAMES)
    mask = data["attention_mask"].float()
    mask[4, 1] = 0.25
    torch.save({"input_ids": data["input_ids"], "attention_mask": mask}, tmp_path / "m.pt")
    with pytest.raises(InputError, match="'attention_mask' .* 0.25 at row 4"):
        load_dataset(tmp_path / "m.pt", NAMES, integer_inputs=NAMES)


def test_whole_float_ids_are_cast_for_integer_inputs(tmp_path) -> None:
    data = make_token_data(5, 6)
    torch.save({"input_ids": data["input_ids"].double(),
                "attention_mask": data["attention_mask"]}, tmp_path / "d.pt")
    ds = load_dataset(tmp_path / "d.pt", NAMES, integer_inputs={"input_ids"})
    assert ds.inputs["input_ids"].dtype == torch.long
    assert torch.equal(ds.inputs["input_ids"], data["input_ids"])


@pytest.mark.parametrize("value", [1e30, -1e30, 2.0**63])
def test_float_ids_beyond_int64_are_named_as_given(tmp_path, value: float) -> None:
    """Issue 25 item 16: a float id of 1e30 is whole, but a cast to int64 wraps it (to a
    negative id): refused naming the value as given, not as the id it wrapped to."""
    data = make_token_data(5, 6)
    ids = data["input_ids"].double()
    ids[2, 3] = value
    torch.save({"input_ids": ids, "attention_mask": data["attention_mask"]}, tmp_path / "d.pt")
    with pytest.raises(InputError, match=rf"'input_ids' .* holds {re.escape(f'{value:g}')} "
                                         r"at row 2") as info:
        load_dataset(tmp_path / "d.pt", NAMES, integer_inputs={"input_ids"})
    assert "-9223372036854775808" not in str(info.value)


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage", b"not a zip"])
def test_unreadable_data_file_is_input_error(tmp_path, content: bytes) -> None:
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(InputError, match="bad.pt"):
        read_tensors(p)


def test_malicious_data_file_is_refused_not_run(tmp_path) -> None:
    import pickle

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (open, (str(marker), "w"))

    p = tmp_path / "evil.pt"
    torch.save({"input_ids": torch.ones(2, 2, dtype=torch.long), "x": Evil()}, p,
               pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(InputError, match="weights_only"):
        read_tensors(p)
    assert not marker.exists()


# --- user metrics (item 12) ----------------------------------------------------------------------


@pytest.fixture
def metric_module(tmp_path, monkeypatch):
    (tmp_path / "umetrics.py").write_text(textwrap.dedent("""
        import math, torch
        def inf(outputs, labels, reference): return math.inf
        def nan(outputs, labels, reference): return float("nan")
        def boom(outputs, labels, reference): raise KeyError("logits")
        def text(outputs, labels, reference): return "0.9"
        def many(outputs, labels, reference): return outputs.mean(0)
        def flag(outputs, labels, reference): return True
        def tensor(outputs, labels, reference): return (outputs == reference).float().mean()
        def huge(outputs, labels, reference): return 10 ** 400
        def tiny(outputs, labels, reference): return -(10 ** 400)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("umetrics", None)


@pytest.mark.parametrize("fn, match", [
    ("inf", "returned inf, not a finite number"),
    ("nan", "returned nan, not a finite number"),
    ("boom", r"metric 'umetrics:boom' failed: KeyError: 'logits'"),
    ("text", "returned str .*not a float"),
    ("many", r"returned a tensor of shape \[3\]"),
    ("flag", "returned bool"),
    ("huge", "returned inf, not a finite number"),  # issue 25: an int beyond a float
    ("tiny", "returned -inf, not a finite number"),
])
def test_bad_user_metric_results(metric_module, fn: str, match: str) -> None:
    m = get_metric(f"umetrics:{fn}", has_labels=False)
    out = torch.randn(4, 3)
    with pytest.raises(InputError, match=match):
        m(out, None, out)


def test_user_metric_returning_a_tensor_is_a_float(metric_module) -> None:
    m = get_metric("umetrics:tensor", has_labels=False)
    out = torch.randn(4, 3)
    assert m(out, None, out) == 1.0
    assert math.isinf(get_metric("umetrics:inf", False).value(out, None, out))
