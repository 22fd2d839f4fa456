"""The schedule stage inside compile_model: ledger, Ctrl-C and --resume, exit code 3, report."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from dtr_compile.cli import main
from dtr_compile.config import CompileConfig
from dtr_compile.pipeline import compile_model
from dtr_compile.report import report_paths
from dtr_compile.search.ledger import read_ledger
from dtr_compile.search.prefix_cache import PrefixCache

FAST = dict(distill_steps=10, max_calib_samples=8, progress=False, bench=False)
FAST_FLAGS = ["--distill-steps", "10", "--max-calib-samples", "8", "--no-progress", "--no-bench"]


def test_interrupt_resume_and_stale_ledger(tiny_task, tmp_path, monkeypatch):
    out = tmp_path / "hybrid.onnx"
    config = CompileConfig(model=tiny_task["model"], output=str(out), data=tiny_task["val"],
                           budget="10%", metric="agreement", **FAST)
    paths = report_paths(out.with_suffix(".report.json"))
    real = PrefixCache.outputs

    def interrupt_after(n: int):
        calls = [0]

        def outputs(self, linear, base=None):
            if calls[0] == n:
                raise KeyboardInterrupt
            calls[0] += 1
            return real(self, linear, base)

        return outputs

    # Ctrl-C during the third evaluation: the two finished ones are in the ledger
    monkeypatch.setattr(PrefixCache, "outputs", interrupt_after(2))
    with pytest.raises(KeyboardInterrupt):
        compile_model(config)
    header, entries, bad = read_ledger(paths.ledger)
    assert len(entries) == 2 and bad == 0
    assert not out.exists()

    # --resume replays them and finishes the search
    monkeypatch.setattr(PrefixCache, "outputs", real)
    res = compile_model(dataclasses.replace(config, resume=True))
    search = res.report["search"]
    assert search["evaluations_replayed"] == 2
    assert search["evaluations_run"] == search["evaluations"] - 2
    assert search["resume"].startswith("resuming from")
    assert search["students"]["reused"]  # the very weights the replayed metrics were measured on
    assert [e["metric"] for e in res.report["schedule"]["evaluations"][:2]] == \
        [e["metric"] for e in entries]
    assert len(read_ledger(paths.ledger)[1]) == search["evaluations"]
    assert res.exit_code == (0 if res.report["replaced"] else 3)
    assert search["cache"]["segments_run"] < search["cache"]["segments_full"] or \
        search["evaluations_run"] <= 1
    # the report's three files
    report = json.loads(paths.json.read_text())
    assert report["budget"]["threshold"] == pytest.approx(report["threshold"])
    md = paths.markdown.read_text()
    assert "## Search" in md and "### Trajectory" in md and paths.plot.name in md
    assert paths.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # other inputs (the evaluation batch size): the ledger is not reused but started afresh
    monkeypatch.setattr(PrefixCache, "outputs", interrupt_after(0))
    with pytest.raises(KeyboardInterrupt):
        compile_model(dataclasses.replace(config, resume=True, eval_batch=7))
    header2, entries2, _ = read_ledger(paths.ledger)
    assert entries2 == [] and header2["fingerprint"] != header["fingerprint"]


def test_min_linear_beyond_budget_exits_3(tiny_task, tmp_path):
    out = tmp_path / "forced.onnx"
    # cosine with a zero budget: every linear site moves the outputs, nothing fits
    res = CliRunner().invoke(main, [tiny_task["model"], "--data", tiny_task["val"], "-o", str(out),
                                    "--metric", "cosine", "--budget", "0", "--search", "ranked",
                                    "--min-linear", "1", *FAST_FLAGS])
    assert res.exit_code == 3, res.output
    assert "budget not met (exit 3): --min-linear forced" in res.output
    report = json.loads(out.with_suffix(".report.json").read_text())
    sched = report["schedule"]
    assert len(sched["committed"]) == 1 and sched["committed_within_budget"] == [False]
    assert not sched["fits"] and report["exit_code"] == 3
    assert sched["evaluations_total"] == 3 + 1  # sensitivity pass + the next site in order
    assert out.exists() and report["parity_ok"]


@pytest.mark.parametrize("args, message", [
    (["--search", "beam"], "Invalid value for '--search'"),
    (["--time-limit", "soon"], "malformed duration 'soon'"),
    (["--min-linear", "-1"], "--min-linear must be >= 0"),
    (["--min-linear", "3", "--max-linear", "2"], "--min-linear 3 exceeds --max-linear 2"),
    (["--min-linear", "3", "--keep", "site0"], "--min-linear 3 exceeds the 2 sites"),
    (["--max-evals", "0"], "--max-evals must be >= 1"),
    (["--cache-mb", "-5"], "--cache-mb must be >= 0"),
    (["--metric", "perplexity", "--budget", "1pt"], "percentage points, which only applies"),
    (["--metric", "accuracy", "--budget", "1"], "did you mean '1%' or '1pt'"),
])
def test_search_flags_rejected_before_writing(tiny_task, tmp_path, args, message):
    out = tmp_path / "x.onnx"
    res = CliRunner().invoke(main, [tiny_task["model"], "--data", tiny_task["val"], "-o", str(out),
                                    *args, *FAST_FLAGS])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert list(tmp_path.iterdir()) == []
