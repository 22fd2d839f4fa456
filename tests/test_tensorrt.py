"""TensorRT: the lint rules on hand-built ONNX graphs, the --target tensorrt export, and the
engine build (marker `tensorrt`: skips cleanly without TensorRT and a CUDA GPU)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from dtr_compile.cli import main
from dtr_compile.errors import DependencyError
from dtr_compile.exporters.onnx import TENSORRT_OPSET, export_onnx
from dtr_compile.exporters.tensorrt import RULES, blocking, build_engine, lint_trt, require_tensorrt

from .conftest import TinyClassifier, make_token_data

F32, F16, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64


def _model(nodes: list, inputs: list, outputs: list, inits: list | None = None,
           opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits or [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _rules(findings) -> dict[str, str]:
    return {f.rule: f.severity for f in findings}


def test_planted_einsum_is_flagged() -> None:
    x = helper.make_tensor_value_info("x", F32, [2, 3, 4])
    y = helper.make_tensor_value_info("y", F32, [2, 4, 5])
    z = helper.make_tensor_value_info("z", F32, None)
    plain = _model([helper.make_node("Einsum", ["x", "y"], ["z"], equation="bij,bjk->bik")],
                   [x, y], [z])
    assert _rules(lint_trt(plain)) == {"TRT004": "avoid"}
    assert blocking(lint_trt(plain))
    ellipsis = _model([helper.make_node("Einsum", ["x", "y"], ["z"], equation="...ij,...jk->...ik")],
                      [x, y], [z])
    assert _rules(lint_trt(ellipsis)) == {"TRT004": "reject"}


def test_cumsum_axis_must_be_constant() -> None:
    x = helper.make_tensor_value_info("x", F32, [2, 8])
    axis_in = helper.make_tensor_value_info("axis", I64, [])
    y = helper.make_tensor_value_info("y", F32, [2, 8])
    dynamic = _model([helper.make_node("CumSum", ["x", "axis"], ["y"], name="cs")], [x, axis_in], [y])
    (finding,) = [f for f in lint_trt(dynamic) if f.rule == "TRT003"]
    assert finding.severity == "reject" and finding.nodes == ("cs",) and "axis" in finding.message
    const = _model([helper.make_node("CumSum", ["x", "axis"], ["y"])], [x], [y],
                   [helper.make_tensor("axis", I64, [], [1])])
    assert "TRT003" not in _rules(lint_trt(const))


def test_fp16_sum_unsupported_and_unknown_ops() -> None:
    x = helper.make_tensor_value_info("x", F16, [2, 8])
    y = helper.make_tensor_value_info("y", F16, None)
    u = helper.make_tensor_value_info("u", F16, None)
    w = helper.make_tensor_value_info("w", F16, None)
    c = helper.make_tensor_value_info("c", F16, None)
    model = _model([helper.make_node("ReduceSum", ["x"], ["y"]),
                    helper.make_node("Unique", ["x"], ["u"]),
                    helper.make_node("Gelu", ["x"], ["w"]),
                    helper.make_node("FusedGemm", ["x"], ["c"], domain="com.microsoft")],
                   [x], [y, u, w, c], opset=23)
    rules = {(f.rule, f.op): f.severity for f in lint_trt(model)}
    assert rules[("TRT005", "ReduceSum")] == "avoid"
    assert rules[("TRT001", "Unique")] == "reject"
    assert rules[("TRT001", "com.microsoft::FusedGemm")] == "reject"
    assert rules[("TRT002", "Gelu")] == "warn"
    assert rules[("TRT007", "opset 23")] == "warn"


def test_rule_table_is_documented() -> None:
    import dtr_compile.exporters.tensorrt as trt_module

    ids = [r.id for r in RULES]
    assert ids == sorted(set(ids))
    assert all(i in (trt_module.__doc__ or "") for i in ids)


def test_tensorrt_target_export_has_no_blocking_finding(tmp_path: Path) -> None:
    from dtr_compile.capture import capture
    from dtr_compile.linear.kernel import LinearAttention
    from dtr_compile.load import LoadedModel
    from dtr_compile.passes.find_attention import find_attention
    from dtr_compile.passes.linearize import linearize

    model = TinyClassifier(layers=2).eval()
    ex = make_token_data(2, 8)
    b, s = torch.export.Dim("batch"), torch.export.Dim("sequence", max=64)
    prog = torch.export.export(model, (ex["input_ids"], ex["attention_mask"]),
                               dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}))
    cap = capture(LoadedModel("tiny", "torch.export", program=prog))
    sites = find_attention(cap.gm).sites
    s0 = sites[0]
    hybrid = linearize(cap.gm, sites, {s0.id: LinearAttention(s0.num_heads, s0.num_kv_heads,
                                                              s0.head_dim, mask_kind=s0.mask_kind)})
    path = export_onnx(hybrid, ex, cap.input_names, cap.dynamic_dims, tmp_path / "trt.onnx",
                       axis_ranges=cap.axis_ranges, opset=TENSORRT_OPSET)
    findings = lint_trt(path)
    assert blocking(findings) == [], findings
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Attention" not in ops and "Einsum" not in ops
    res = CliRunner().invoke(main, ["lint-trt", str(path)])
    assert res.exit_code == 0 and "TensorRT-ready" in res.output
    assert "linear-attention form: plain ops" in res.output


def test_lint_cli_exits_4_on_a_blocking_finding(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", F32, [2, 3, 4])
    z = helper.make_tensor_value_info("z", F32, None)
    model = _model([helper.make_node("Einsum", ["x", "x"], ["z"], equation="bij,bkj->bik",
                                     name="planted")], [x], [z])
    path = tmp_path / "einsum.onnx"
    onnx.save(model, str(path))
    res = CliRunner().invoke(main, ["lint-trt", str(path), "--json", str(tmp_path / "lint.json")])
    assert res.exit_code == 4, res.output
    assert "TRT004" in res.output and "planted" in res.output
    missing = CliRunner().invoke(main, ["lint-trt", str(tmp_path / "nope.onnx")])
    assert missing.exit_code == 2


def _has_tensorrt() -> bool:
    try:
        require_tensorrt()
    except DependencyError:
        return False
    return True


@pytest.mark.skipif(_has_tensorrt(), reason="TensorRT and a GPU are present")
def test_engine_without_tensorrt_is_a_clear_error(tiny_task, tmp_path: Path) -> None:
    with pytest.raises(DependencyError, match=r"dtr-compile\[tensorrt\]|CUDA GPU"):
        build_engine(tmp_path / "x.onnx", tmp_path / "x.engine")
    out = tmp_path / "hybrid.onnx"
    res = CliRunner().invoke(main, [tiny_task["model"], "--data", tiny_task["val"], "-o",
                                    str(out), "--engine", str(tmp_path / "h.engine")])
    assert res.exit_code == 2, res.output
    assert "TensorRT" in res.output and not out.exists()  # refused before any work


@pytest.mark.tensorrt
def test_engine_build(tmp_path: Path) -> None:
    if not _has_tensorrt():
        pytest.skip("needs TensorRT (pip install 'dtr-compile[tensorrt]') and a CUDA GPU")
    model = TinyClassifier(layers=1).eval()
    ex = make_token_data(2, 8)
    dims = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    path = export_onnx(model, ex, ["input_ids", "attention_mask"], dims, tmp_path / "m.onnx",
                       axis_ranges={"sequence": (2, 64)}, opset=TENSORRT_OPSET)
    info = build_engine(path, tmp_path / "m.engine", fp16=True,
                        ranges={"batch": (1, 2, 8), "sequence": (1, 8, 64)})
    assert Path(info.path).stat().st_size == info.bytes > 0
    assert info.profile["input_ids"] == [[1, 1], [2, 8], [8, 64]]


def test_fused_linear_attention_is_rejected_and_named() -> None:
    """TRT011: an ONNX LinearAttention-27 node (the fused form of the gla/deltanet students)."""
    from onnx import TensorProto, helper

    from dtr_compile.exporters.tensorrt import lint_trt

    vi = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    node = helper.make_node("LinearAttention", ["q", "k", "v"], ["o"], update_rule="linear",
                            q_num_heads=1, kv_num_heads=1, name="la")
    graph = helper.make_graph([node], "g", [vi("q", [1, 2, 4]), vi("k", [1, 2, 4]),
                                            vi("v", [1, 2, 4])], [vi("o", [1, 2, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 27)])
    hits = [f for f in lint_trt(model) if f.rule == "TRT011"]
    assert len(hits) == 1 and hits[0].severity == "reject" and hits[0].nodes == ("la",)


def _if_model(else_rank: int, else_op: str = "Identity") -> onnx.ModelProto:
    """``y = If(c, then: x, else: op(x))`` with the else branch's output declared at ``else_rank``."""
    x = helper.make_tensor_value_info("x", F32, [2, 3])
    c = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", F32, None)
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", F32, [2, 3])])
    e_nodes = ([helper.make_node("Einsum", ["x", "x"], ["e"], equation="ij,ij->i")]
               if else_op == "Einsum" else [helper.make_node(else_op, ["x"], ["e"])])
    other = helper.make_graph(e_nodes, "else", [],
                              [helper.make_tensor_value_info("e", F32, [2, 3][:else_rank])])
    node = helper.make_node("If", ["c"], ["y"], name="choose", then_branch=then, else_branch=other)
    return _model([node], [c, x], [y])


def test_if_needs_equal_branch_ranks_and_its_branches_are_linted() -> None:
    equal = lint_trt(_if_model(2))
    assert not [f for f in equal if f.rule == "TRT010"], equal  # TensorRT imports it
    uneven = [f for f in lint_trt(_if_model(1, "Einsum")) if f.rule in ("TRT010", "TRT004")]
    assert {(f.rule, f.severity) for f in uneven} == {("TRT010", "reject"), ("TRT004", "avoid")}
    assert [f.nodes for f in uneven if f.rule == "TRT010"] == [("choose",)]
