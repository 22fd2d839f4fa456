"""Issue 12, the compile's data checks end to end: bad data is exit 2 before any expensive stage
(no distillation, nothing written), and one-row or one-token data compiles."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dtr_compile.exporters.onnx import parity_cases
from dtr_compile.inputs import at_least_two

from .conftest import make_token_data

CLI = [sys.executable, "-m", "dtr_compile"]
FAST = ["--distill-steps", "5", "--max-calib-samples", "8", "--no-progress", "--no-bench"]
DIMS = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=900)


def _bad(tiny_task, tmp_path: Path, **changes: torch.Tensor) -> subprocess.CompletedProcess[str]:
    data = torch.load(tiny_task["val"]) | changes
    torch.save(data, tmp_path / "val.pt")
    return run_cli(tiny_task["model"], "--budget", "5%", "--data", str(tmp_path / "val.pt"),
                   "-o", str(tmp_path / "out.onnx"), *FAST)


def _refused_early(res: subprocess.CompletedProcess[str], tmp_path: Path) -> None:
    assert res.returncode == 2, res.stderr
    assert "distilled site" not in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.pt"]


def test_fractional_token_ids_refused_before_distillation(tiny_task, tmp_path: Path) -> None:
    ids = torch.load(tiny_task["val"])["input_ids"].float()
    ids[5, 2] += 0.5
    res = _bad(tiny_task, tmp_path, input_ids=ids)
    _refused_early(res, tmp_path)
    assert "'input_ids'" in res.stderr and "row 5" in res.stderr


def test_labels_out_of_range_refused_before_distillation(tiny_task, tmp_path: Path) -> None:
    labels = torch.load(tiny_task["val"])["labels"].clone()
    labels[11] = 9
    res = _bad(tiny_task, tmp_path, labels=labels)
    _refused_early(res, tmp_path)
    assert "label 9 at row 11" in res.stderr and "[0, 4)" in res.stderr


def test_nan_labels_refused_before_distillation(tiny_task, tmp_path: Path) -> None:
    labels = torch.load(tiny_task["val"])["labels"].float()
    labels[3] = math.nan
    res = _bad(tiny_task, tmp_path, labels=labels)
    _refused_early(res, tmp_path)
    assert "'labels' holds nan at row 3" in res.stderr


def test_examples_of_one_row_or_one_token_are_widened() -> None:
    one = {"input_ids": torch.tensor([[7]]), "attention_mask": torch.tensor([[1]]),
           "pixel_values": torch.randn(1, 1, 3)}
    ex = at_least_two(one)
    assert ex["input_ids"].tolist() == [[7, 7], [7, 7]]
    assert ex["attention_mask"].tolist() == [[1, 1], [1, 1]]
    assert ex["pixel_values"].shape == (2, 1, 3)  # float dims other than batch are kept
    many = make_token_data(5, 6)
    assert {k: v.shape for k, v in at_least_two(many).items()} == {
        "input_ids": (2, 6), "attention_mask": (2, 6)}


def test_parity_cases_at_one_token() -> None:
    data = {k: v[:, :1] for k, v in make_token_data(4, 6).items()}
    data["attention_mask"][:] = 1
    cases = parity_cases(data, DIMS)
    assert all(c["input_ids"].shape[1] == 1 for _, c in cases)


@pytest.mark.slow  # a whole compile (about 90 s on two loaded cores)
def test_one_row_one_token_data_compiles(tiny_task, tmp_path: Path) -> None:
    data = torch.load(tiny_task["val"])
    torch.save({"input_ids": data["input_ids"][:1, :1], "attention_mask":
                torch.ones(1, 1, dtype=torch.long)}, tmp_path / "val.pt")
    res = run_cli(tiny_task["model"], "--budget", "50%", "--metric", "agreement", "--data",
                  str(tmp_path / "val.pt"), "-o", str(tmp_path / "out.onnx"), *FAST)
    assert res.returncode in (0, 3), res.stderr  # failed at export before
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["parity_ok"] and report["validation_rows"] == 1
