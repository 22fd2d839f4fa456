"""Stages 1-2: load and capture, including every bad-input path."""

from __future__ import annotations

import zipfile

import pytest
import torch

from dtr_compile.capture import capture
from dtr_compile.errors import InputError
from dtr_compile.load import load_model

from .conftest import TinyClassifier, make_token_data


def test_load_export_archive_and_capture_flat_graph(tiny_task: dict[str, str]) -> None:
    loaded = load_model(tiny_task["model"])
    assert loaded.format == "torch.export" and loaded.program is not None
    cap = capture(loaded)
    assert cap.input_names == ["input_ids", "attention_mask"]
    assert cap.dynamic_dims == {"input_ids": {0: "batch", 1: "sequence"},
                                "attention_mask": {0: "batch", 1: "sequence"}}
    assert cap.axis_ranges["sequence"][1] == 64
    data = make_token_data(3, 11, seed=5)
    out = cap.gm(data["input_ids"], data["attention_mask"])
    ref = loaded.program.module()(data["input_ids"], data["attention_mask"])
    assert isinstance(out, tuple) and torch.equal(out[0], ref)


def test_load_hf_folder(tmp_path) -> None:
    model = TinyClassifier(layers=1).backbone
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.format == "huggingface" and loaded.module is not None
    ex = make_token_data(2, 6)
    cap = capture(loaded, ex)
    got = cap.gm(ex["input_ids"], ex["attention_mask"])[0]
    want = model(input_ids=ex["input_ids"], attention_mask=ex["attention_mask"]).last_hidden_state
    assert torch.allclose(got, want, atol=1e-6)


def _write(path, blob: bytes):
    path.write_bytes(blob)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.pt", "model not found"),
        (lambda p: _write(p / "model.onnx", b"x"), "unknown model format"),
        (lambda p: _write(p / "bad.pt", b"not a zip"), "not a torch.export archive"),
        (lambda p: p, "folder without config.json"),
    ],
    ids=["missing", "unknown-suffix", "corrupt", "empty-folder"],
)
def test_bad_model_inputs(tmp_path, make, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_model(make(tmp_path))


def test_pickle_refused_without_flag(tmp_path) -> None:
    path = tmp_path / "model.pt"
    torch.save(TinyClassifier(layers=1), path)
    assert any(n.endswith("data.pkl") for n in zipfile.ZipFile(path).namelist())
    with pytest.raises(InputError, match="--trust-pickle"):
        load_model(path)
    assert load_model(path, trust_pickle=True).format == "pickle"


def test_truncated_archive_is_clear_error(tiny_task: dict[str, str], tmp_path) -> None:
    blob = open(tiny_task["model"], "rb").read()
    bad = tmp_path / "cut.pt2"
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError):
        load_model(bad)
