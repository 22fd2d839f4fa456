"""Issue 12, the compile's outcome: a metric that returns inf for a candidate never makes it fit;
report.json is strict JSON (no NaN / Infinity); exit 3 says what to try next and what a site's
"rel. error" means; the ONNX keeps the model's own input and output names."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dtr_compile.capture import capture, output_names
from dtr_compile.exporters.onnx import export_onnx, onnx_interface, ort_session
from dtr_compile.fileio import json_text, write_json_atomic
from dtr_compile.load import LoadedModel
from dtr_compile.report import next_steps, render_markdown

CLI = [sys.executable, "-m", "dtr_compile"]
FAST = ["--distill-steps", "10", "--max-calib-samples", "8", "--no-progress", "--no-bench"]


def _strict(text: str) -> object:
    def refuse(name: str) -> float:
        raise ValueError(f"invalid JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_never_holds_nan_or_infinity(tmp_path: Path) -> None:
    obj = {"a": math.nan, "b": [1.0, math.inf, (-math.inf, 2)], "c": {"d": 0.5}}
    assert _strict(json_text(obj)) == {"a": None, "b": [1.0, None, [None, 2]], "c": {"d": 0.5}}
    write_json_atomic(tmp_path / "r.json", obj)
    assert _strict((tmp_path / "r.json").read_text())["a"] is None


def test_next_steps_name_block_window_budget_and_rows() -> None:
    report = {
        "metric": {"name": "accuracy", "higher_is_better": True},
        "baseline_metric": 0.9, "budget": {"text": "1%", "unit": "%"},
        "calibration_rows": 16,
        "sites": [{"id": "site0", "causal": True}, {"id": "site1", "causal": True}],
        "distill": {"site0": {"ok": True}, "site1": {"ok": True}},
        "schedule": {"evaluations": [
            {"linear": ["site0"], "candidate": "site0", "metric": 0.85},
            {"linear": ["site1"], "candidate": "site1", "metric": 0.873},
            {"linear": ["site0", "site1"], "candidate": "site1", "metric": 0.89}]},
    }
    steps = next_steps(report, distill_target="site", window=0, calib_available=64)
    text = "\n".join(steps)
    assert "site1" in text and "0.873" in text and "--budget 3.2%" in text  # 3% * 1.05
    assert "--distill-target block" in text and "--window 64" in text
    assert "16 of the 64 available" in text
    steps = next_steps(report, distill_target="block", window=32, calib_available=16)
    assert not any("--distill-target" in s or "--window" in s for s in steps)
    report["next_steps"] = steps
    md = render_markdown(report | {"schedule": {}})
    assert "## What to try next" in md and "--calib FILE" in md


@pytest.fixture
def inf_metric(tmp_path: Path) -> Path:
    """A user metric that returns +inf for any output that differs from the original's."""
    (tmp_path / "infmetric.py").write_text(textwrap.dedent("""
        import math, torch
        def fragile(outputs, labels, reference):
            return 1.0 if torch.equal(outputs, reference) else math.inf
    """))
    return tmp_path


@pytest.mark.slow  # a whole compile (about 100 s on two loaded cores)
def test_inf_from_a_user_metric_never_fits(tiny_task, inf_metric: Path) -> None:
    out = inf_metric / "hybrid.onnx"
    root = str(Path(__file__).resolve().parents[1])  # this checkout's package, from any cwd
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([*CLI, tiny_task["model"], "--budget", "1%", "--data", tiny_task["val"],
                          "-o", str(out), "--metric", "infmetric:fragile", *FAST],
                         capture_output=True, text=True, cwd=inf_metric, env=env, timeout=900)
    # before: inf passed the >= threshold test, every site "fit" and the run exited 0
    assert res.returncode == 3, res.stderr
    text = out.with_suffix(".report.json").read_text()
    report = _strict(text)  # strict JSON: the NaN of each refused evaluation is null
    assert report["replaced"] == [] and report["final_metric"] == 1.0
    assert all(e["metric"] is None and not e["within_budget"]
               for e in report["schedule"]["evaluations"])
    assert "try: --distill-target block" in res.stdout and "a looser budget" in res.stdout
    assert "rel. error = ‖y − ŷ‖₂ / ‖y‖₂" in res.stderr
    md = out.with_suffix(".report.md").read_text()
    assert "What to try next" in md and "0 is exact" in md
    # the interface of the written ONNX, in the report: the inputs' own names, axes and dtypes
    iface = report["export"]["interface"]
    assert [(i["name"], i["dtype"], i["shape"]) for i in iface["inputs"]] == [
        ("input_ids", "int64", ["batch", "sequence"]),
        ("attention_mask", "int64", ["batch", "sequence"])]
    assert [o["name"] for o in iface["outputs"]] == ["output"]  # not `linear_37`
    assert "## ONNX interface" in md


class _Named(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.emb(input_ids)
        return {"logits": self.head(h.mean(1)), "last_hidden_state": h}


def test_onnx_keeps_the_models_output_names(tmp_path: Path) -> None:
    ids = torch.randint(0, 16, (2, 5))
    cap = capture(LoadedModel("named", "pickle", module=_Named().eval()), {"input_ids": ids})
    assert cap.output_names == ["logits", "last_hidden_state"]
    path = export_onnx(cap.gm, {"input_ids": ids}, cap.input_names, cap.dynamic_dims,
                       tmp_path / "m.onnx", axis_ranges=cap.axis_ranges,
                       output_names=cap.output_names)
    sess = ort_session(path)
    assert [o.name for o in sess.get_outputs()] == ["logits", "last_hidden_state"]
    iface = onnx_interface(path)
    assert iface["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch", 3]}
    assert iface["outputs"][1]["shape"] == ["batch", "sequence", 8]


def test_output_names_of_tuples_and_lone_tensors() -> None:
    class Pair(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x + 1, x * 2

    class Lone(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1

    x = torch.randn(2, 3)
    assert output_names(torch.export.export(Pair(), (x,))) == ["output_0", "output_1"]
    assert output_names(torch.export.export(Lone(), (x,))) == ["output"]


def test_next_steps_name_the_time_limit_first_when_it_cut_the_run() -> None:
    """A --time-limit that stopped the search before any evaluation (or cut a distillation) is
    why no site fits: the first suggestion is a longer limit, not a looser budget."""
    report = {
        "metric": {"name": "accuracy", "higher_is_better": True},
        "baseline_metric": 0.9, "budget": {"text": "1%", "unit": "%"},
        "calibration_rows": 16, "sites": [{"id": "site0"}, {"id": "site1"}],
        "distill": {"site0": {"ok": True, "time_limited": True}, "site1": {"ok": True}},
        "search": {"evaluations": 0, "stop_reason": "reached --time-limit 0 s after 0 evaluations"},
        "time_limit": {"limit_s": 1.0}, "schedule": {"evaluations": []},
    }
    steps = next_steps(report, distill_target="site", window=0, calib_available=16)
    assert steps[0].startswith("a longer --time-limit than 1 s"), steps
    assert "after 0 evaluations" in steps[0] and "1 of 2 sites" in steps[0]
    unlimited = report | {"search": {"evaluations": 3, "stop_reason": "no candidate fits"},
                          "distill": {"site0": {"ok": True}}}
    assert not any("--time-limit" in s for s in next_steps(
        unlimited, distill_target="site", window=0, calib_available=16))
