"""Issue 12, `inspect` on what dtr-compile writes: a hybrid .pt2 keeps its sites' ids and shows
which are linear; an .onnx lists its sites instead of being refused."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from dtr_compile.capture import capture
from dtr_compile.cli import main
from dtr_compile.data import Dataset
from dtr_compile.distill.plan import DistillSettings, plan_distillation
from dtr_compile.exporters.onnx import SITES_KEY, export_onnx, export_program, save_program
from dtr_compile.inspect import inspect_model, inspect_onnx
from dtr_compile.load import LoadedModel
from dtr_compile.passes.find_attention import find_attention
from dtr_compile.passes.linearize import linearize

from .conftest import TinyClassifier, make_token_data


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny 3-layer classifier with site1 linear (untrained student): .pt2 and .onnx."""
    d = tmp_path_factory.mktemp("hybrid")
    data = make_token_data(4, 8)
    cap = capture(LoadedModel("tiny", "pickle", module=TinyClassifier().eval()), data)
    sites = find_attention(cap.gm).require_sites()
    assert [s.id for s in sites] == ["site0", "site1", "site2"]
    plan = plan_distillation(cap.gm, sites, DistillSettings(), Dataset(data, None), 4)
    hyb = linearize(cap.gm, sites, {"site1": plan.empty_student(cap.gm, "site1")},
                    blocks=plan.blocks)
    program = export_program(hyb, data, cap.input_names, cap.dynamic_dims,
                             axis_ranges=cap.axis_ranges)
    save_program(program, d / "hybrid.pt2")
    meta = {SITES_KEY: json.dumps([{"id": s.id, "module_path": s.module_path,
                                    "linear": s.id == "site1"} for s in sites])}
    export_onnx(program, data, cap.input_names, cap.dynamic_dims, d / "hybrid.onnx",
                axis_ranges=cap.axis_ranges, metadata=meta)
    plain = onnx.load(str(d / "hybrid.onnx"))  # as another tool would write it: no record
    del plain.metadata_props[:]
    onnx.save(plain, str(d / "plain.onnx"))
    return {"pt2": d / "hybrid.pt2", "onnx": d / "hybrid.onnx", "plain": d / "plain.onnx"}


def test_inspect_hybrid_keeps_ids_and_shows_linear_sites(hybrid) -> None:
    ins = inspect_model(str(hybrid["pt2"]))
    assert [s.id for s in ins.sites] == ["site0", "site2"]  # not renumbered to site0, site1
    assert [s.module_path for s in ins.sites] == ["backbone.encoder.layer.0.attention.self",
                                                  "backbone.encoder.layer.2.attention.self"]
    assert [(s.id, s.module_path) for s in ins.linear] == [
        ("site1", "backbone.encoder.layer.1.attention.self")]
    res = CliRunner().invoke(main, ["inspect", str(hybrid["pt2"]), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["linear_sites"][0]["id"] == "site1"
    res = CliRunner().invoke(main, ["inspect", str(hybrid["pt2"])])
    assert "Linear attention" in res.output and "site1" in res.output


def test_inspect_onnx_lists_recorded_sites(hybrid) -> None:
    ins = inspect_onnx(hybrid["onnx"])
    assert ins.recorded and [(s["id"], s["linear"]) for s in ins.sites] == [
        ("site0", False), ("site1", True), ("site2", False)]
    res = CliRunner().invoke(main, ["inspect", str(hybrid["onnx"])])
    assert res.exit_code == 0, res.output
    assert "linear" in res.output and "1 of 3" in res.output


def test_inspect_other_onnx_finds_softmax_attention(hybrid) -> None:
    assert SITES_KEY not in {m.key for m in onnx.load(str(hybrid["plain"])).metadata_props}
    ins = inspect_onnx(hybrid["plain"])
    assert not ins.recorded
    paths = [s["module_path"] for s in ins.sites]
    assert {"backbone.encoder.layer.0.attention.self",
            "backbone.encoder.layer.2.attention.self"} <= set(paths)
    assert all(s["ops"] in ("Attention", "Softmax") and not s["linear"] for s in ins.sites)
    assert "not written by dtr-compile" in ins.note
    res = CliRunner().invoke(main, ["inspect", str(hybrid["plain"]), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["format"] == "onnx", res.output


def test_inspect_bad_onnx_is_exit_2(tmp_path: Path) -> None:
    (tmp_path / "x.onnx").write_bytes(b"")
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "x.onnx" in res.output, res.output
