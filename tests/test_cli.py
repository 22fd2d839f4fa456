"""The CLI end to end on a tiny random-weight BERT classifier, and every bad-input path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dtr_compile.exporters.onnx import ort_session

from .conftest import make_token_data

CLI = [sys.executable, "-m", "dtr_compile"]
FAST = ["--distill-steps", "40", "--max-calib-samples", "16", "--no-progress"]


def run_cli(*args: str, cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH: the package of this checkout, also when cwd is another folder
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def compiled(tiny_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "hybrid.onnx"
    # agreement with the original at a loose budget: some site must fit
    res = run_cli(tiny_task["model"], "--budget", "10%", "--data", tiny_task["val"],
                  "-o", str(out), "--metric", "agreement", *FAST)
    return res, out


def test_compile_writes_verified_artifacts(compiled) -> None:
    res, out = compiled
    assert res.returncode in (0, 3), res.stderr
    report = json.loads(out.with_suffix(".report.json").read_text())
    config = json.loads(out.with_suffix(".config.json").read_text())
    assert config["budget"] == "10%" and config["distill_steps"] == 40
    assert report["baseline_metric"] == pytest.approx(1.0)
    assert report["threshold"] == pytest.approx(0.9)
    assert len(report["sites"]) == 3 and report["parity_ok"]
    steps = report["replaced"]
    assert all(s["metric_after"] >= report["threshold"] for s in steps)
    assert set(report["distill"]) == {"site0", "site1", "site2"}
    assert set(report["timings_s"]) >= {"load", "capture", "distill", "schedule", "export"}
    assert "threshold" in res.stderr  # the resolved threshold is printed
    assert res.returncode == (0 if steps else 3)


def test_hybrid_onnx_runs_at_other_shapes(compiled, tiny_task) -> None:
    _res, out = compiled
    sess = ort_session(out)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    dims = [d for i in sess.get_inputs() for d in i.shape]
    assert dims == ["batch", "sequence", "batch", "sequence"]
    for b, t in [(1, 5), (4, 31), (7, 64)]:
        data = make_token_data(b, t, seed=b * 100 + t)
        got = sess.run(None, {k: v.numpy() for k, v in data.items()})[0]
        assert got.shape == (b, 4) and np.isfinite(got).all()


def test_same_seed_same_report(compiled, tiny_task, tmp_path) -> None:
    _res, out = compiled
    out2 = tmp_path / "again.onnx"
    res = run_cli(tiny_task["model"], "--budget", "10%", "--data", tiny_task["val"],
                  "-o", str(out2), "--metric", "agreement", *FAST)
    a = json.loads(out.with_suffix(".report.json").read_text())
    b = json.loads(out2.with_suffix(".report.json").read_text())
    assert res.returncode == a["exit_code"]
    assert a["replaced"] == b["replaced"]
    assert [e["metric"] for e in a["schedule"]["evaluations"]] == \
        [e["metric"] for e in b["schedule"]["evaluations"]]
    assert a["distill"]["site0"]["final_loss"] == b["distill"]["site0"]["final_loss"]


@pytest.mark.parametrize("args, message", [
    (["missing.pt", "--budget", "0.5%"], "model not found"),
    (["{model}", "--budget", "abc"], "malformed budget"),
    (["{model}", "--budget", "-1%"], "is negative"),
    (["{model}", "--budget", "150%"], "below 100%"),
    (["{readme}", "--budget", "1%"], "unknown model format"),
    (["{model}", "--budget", "1%", "--data", "nope.pt"], "data file not found"),
    (["{model}", "--budget", "1%"], "no validation data"),
], ids=["missing-model", "budget-abc", "budget-negative", "budget-150", "unknown-format",
        "missing-data", "no-data"])
def test_bad_input_one_line_error_writes_nothing(tiny_task, tmp_path, args, message) -> None:
    readme = tmp_path / "notes.txt"
    readme.write_text("hi")
    args = [a.format(model=tiny_task["model"], readme=readme) for a in args]
    out = tmp_path / "sub" / "hybrid.onnx"
    res = run_cli(*args, "-o", str(out), cwd=tmp_path)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert not (tmp_path / "sub").exists()


def test_data_that_does_not_fit(tiny_task, tmp_path) -> None:
    bad = tmp_path / "bad.pt"
    torch.save({"input_ids": torch.ones(4, 8, dtype=torch.long)}, bad)
    res = run_cli(tiny_task["model"], "--data", str(bad), "-o", str(tmp_path / "h.onnx"))
    assert res.returncode == 2 and "lacks ['attention_mask']" in res.stderr
    assert not (tmp_path / "h.onnx").exists()


def test_config_file_supplies_data_and_metric(tiny_task, tmp_path) -> None:
    (tmp_path / "dtr.toml").write_text(
        f'data = "{tiny_task["val"]}"\nmetric = "agreement"\ndistill-steps = 5\n'
        'max-calib-samples = 8\nmax-linear = 1\n')
    res = run_cli(tiny_task["model"], "--budget", "99pt", "-o", "h.onnx", "--no-progress",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "h.report.json").read_text())
    assert report["metric"]["name"] == "agreement" and len(report["replaced"]) == 1
    # a flag overrides the file; --window on a model without causal sites says it does nothing
    res = run_cli(tiny_task["model"], "--budget", "99pt", "-o", "h2.onnx", "--max-linear", "2",
                  "--window", "8", "--no-progress", "--no-bench", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "--window 8 has no effect" in " ".join(res.stderr.split())
    assert len(json.loads((tmp_path / "h2.report.json").read_text())["replaced"]) == 2


def test_help_documents_every_flag() -> None:
    res = run_cli("--help")
    assert res.returncode == 0
    for flag in ["--budget", "--data", "--calib", "--metric", "--report", "-o, --output",
                 "--keep", "--max-linear", "--trust-pickle", "Exit codes"]:
        assert flag in res.stdout


def test_distill_tokens_take_k_m_g_suffixes() -> None:
    """--distill-tokens 500k / 2M / 1.5G (powers of 1000) or a plain count; anything else is one
    clear error (exit 2) before any work."""
    from click.testing import CliRunner

    from dtr_compile.cli import main
    from dtr_compile.config import parse_tokens
    from dtr_compile.errors import InputError

    assert [parse_tokens(x) for x in ("0", "500k", "2M", "1.5G", " 40 ", 123)] == \
        [0, 500_000, 2_000_000, 1_500_000_000, 40, 123]
    for bad in ("2X", "-3", "", "1e6"):
        with pytest.raises(InputError, match="token count"):
            parse_tokens(bad)
    res = CliRunner().invoke(main, ["compile", "m.pt", "-o", "h.onnx", "--distill-tokens", "2X"])
    assert res.exit_code == 2 and "token count '2X'" in res.output
