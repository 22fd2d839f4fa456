"""Issue 14 end to end: each of the new student kinds (gla, deltanet, gated-deltanet) distils
(site and block targets), searches and exports on a tiny Llama (GQA, RoPE) and a tiny GPT-2, and
the exported ONNX matches the PyTorch hybrid at other batch sizes and lengths (past a chunk).
A causal-only kind on an encoder is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dtr_compile.config import CompileConfig
from dtr_compile.errors import InputError
from dtr_compile.exporters.onnx import ort_session
from dtr_compile.linear.recurrence import MatrixStateStudent
from dtr_compile.pipeline import compile_model
from tests.test_decoder_vision import FAST, VOCAB, TinyCausalLM

KINDS = ("gla", "deltanet", "gated-deltanet")


@pytest.fixture(autouse=True)
def _fewer_scan_rounds(monkeypatch) -> None:  # noqa: ANN001
    """Exports here run the delta rule's chunk scan 4 rounds (up to 16 chunks; the checks go to
    3): the default 16 only add identity compositions (tests/test_linear_delta.py) and time."""
    import dtr_compile.linear.recurrence as recurrence

    monkeypatch.setattr(recurrence, "MAX_SCAN_ROUNDS", 4)


class TinyGPT2(torch.nn.Module):
    """Tiny random-weight ``GPT2LMHeadModel``: ``input_ids: [B, T]`` → ``logits: [B, T, V]``."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                         bos_token_id=0, eos_token_id=0, use_cache=False,
                         attn_implementation="sdpa")
        self.lm = GPT2LMHeadModel(cfg).eval()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def _compile(tmp_path: Path, model: torch.nn.Module, **flags: object):  # noqa: ANN202
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (16, 32), generator=g)
    auto = torch.export.Dim.AUTO
    prog = torch.export.export(model, (), kwargs={"input_ids": ids[:2, :16].clone()},
                               dynamic_shapes={"input_ids": {0: auto, 1: auto}})
    torch.export.save(prog, tmp_path / "model.pt")
    torch.save({"input_ids": ids}, tmp_path / "val.pt")
    out = tmp_path / "hybrid.onnx"
    res = compile_model(CompileConfig(model=str(tmp_path / "model.pt"), output=str(out),
                                      data=str(tmp_path / "val.pt"), metric="perplexity",
                                      budget="99%", **{**FAST, **flags}))  # type: ignore[arg-type]
    return res, out


def _check_onnx(res, out: Path) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(3)
    sess = ort_session(str(out))
    for b, t in ((1, 7), (3, 40), (1, 130)):
        x = torch.randint(1, VOCAB, (b, t), generator=g)
        with torch.inference_mode():
            ref = res.hybrid(x)
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).numpy()
        got = sess.run(None, {"input_ids": x.numpy()})[0]
        assert got.shape == (b, t, VOCAB)
        np.testing.assert_allclose(got, ref, atol=2e-3, rtol=1e-3)


# every kind and both targets at least once in the default suite; the full matrix is slow (each
# compile exports the hybrid and checks parity: minutes on a loaded two-core machine)
DEFAULT = {("llama", "deltanet", "block"), ("gpt2", "gated-deltanet", "site")}
# (llama, gla, site) runs in the default suite as test_opset_27_writes_fused_linear_attention


def _cases() -> list:  # noqa: ANN201
    out = []
    for model in ("llama", "gpt2"):
        for kind in KINDS:
            for target in ("site", "block"):
                marks = [] if (model, kind, target) in DEFAULT else [pytest.mark.slow]
                if (model, target) == ("gpt2", "block"):  # not the students': hedgehog too
                    marks.append(pytest.mark.xfail(
                        strict=True, raises=RuntimeError,
                        reason="block target on GPT2LMHeadModel: the block's recorded output "
                               "and its replay differ in shape ([32, …] vs [256, …]) for every "
                               "student kind, feature maps included"))
                out.append(pytest.param(model, kind, target, marks=marks,
                                        id=f"{model}-{kind}-{target}"))
    return out


@pytest.mark.parametrize("model,kind,target", _cases())
def test_distils_searches_exports(tmp_path, model: str, kind: str, target: str) -> None:
    res, out = _compile(tmp_path, TinyCausalLM() if model == "llama" else TinyGPT2(),
                        student=kind, distill_target=target)
    rep = res.report
    assert rep["student"] == kind
    assert len(rep["replaced"]) == 2, rep["replaced"]
    for sid, r in rep["distill"].items():  # trained: the held-out error fell
        assert r["ok"] and r["final_error"] < r["init_error"], (sid, r)
    print(kind, target, {sid: (round(r["init_error"], 3), round(r["final_error"], 3))
                         for sid, r in rep["distill"].items()}, rep["timings_s"])
    students = [m for m in res.hybrid.modules() if isinstance(m, MatrixStateStudent)]
    assert len(students) == 2 and all(m.kind == kind for m in students)
    assert all(s["students"][-3:] == list(KINDS) for s in rep["sites"])
    _check_onnx(res, out)
    st = rep["stateful"]  # the stateful decoder: exported and token-for-token with PyTorch
    if target == "block":
        assert st["status"] == "not_stateful", st
    else:
        assert st["status"] == "written" and "path" in st["hybrid"], st
        assert st["hybrid"]["parity"]["tokens_equal"], st["hybrid"]["parity"]


def test_opset_27_writes_fused_linear_attention(tmp_path) -> None:
    """gla on the tiny Llama at ``--opset 27``: it distils, searches and exports; the hybrid and
    its stateful decoder hold one ONNX ``LinearAttention`` per linear site (standard domain),
    both pass their parity checks (the decoder token for token), onnxruntime matches PyTorch
    past a chunk, and the report says opset 27 and the fused form.

    With ``--external-data always`` (the form of models over 1.5 GiB) each ONNX file keeps its
    weights in ``NAME.data`` beside it, refers to it by that relative name (the opset
    conversion and the decoder's axis renaming kept the references), and the pair still runs
    after the folder is moved. The report records peak RSS after each stage."""
    import shutil

    import onnx

    from dtr_compile.exporters.tensorrt import _with_subgraphs

    res, out = _compile(tmp_path, TinyCausalLM(), student="gla", opset=27, external_data="always")
    rep = res.report
    st = rep["stateful"]
    onnx_files = {"onnx": out, "hybrid_decoder_onnx": Path(st["hybrid"]["path"])}
    for key, path in onnx_files.items():
        data = path.with_name(path.name + ".data")
        assert rep["artifacts"][f"{key}_data"] == str(data) and data.stat().st_size > 1000
        locations = {e.value for t in onnx.load(str(path), load_external_data=False)
                     .graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {data.name}, (path.name, locations)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".hybrid")], "temporaries"
    moved = shutil.copytree(out.parent, tmp_path.parent / f"{tmp_path.name}-moved")
    x = torch.randint(1, VOCAB, (1, 5)).numpy()
    assert ort_session(moved / out.name).run(None, {"input_ids": x})[0].shape == (1, 5, VOCAB)
    peaks = rep["runtime"]["peak_rss_by_stage_mib"]
    assert list(peaks) == list(rep["timings_s"]) and "export" in peaks
    assert list(peaks.values()) == sorted(peaks.values()), peaks  # ru_maxrss only grows
    assert rep["export"]["opset"] == 27 and rep["parity_ok"], rep["parity"]
    assert rep["export"]["linear_attention"] == {"form": "fused", "nodes": 2, "domain": "ai.onnx"}
    md = out.with_suffix(".report.md").read_text()
    assert "Opset 27; linear attention fused: 2 ONNX `LinearAttention` node(s)" in md
    assert f"| export | {rep['timings_s']['export']:.4g} | {peaks['export']:.5g} |" in md
    assert st["status"] == "written" and st["hybrid"]["parity"]["tokens_equal"], st
    for path in (out, Path(st["hybrid"]["path"])):
        model = onnx.load(str(path))
        assert next(o.version for o in model.opset_import if o.domain == "") == 27
        fused = [n for g in _with_subgraphs(model.graph) for n in g.node
                 if n.op_type == "LinearAttention"]
        assert len(fused) == len(rep["replaced"]) == 2, (path.name, len(fused))
        assert {n.domain for n in fused} == {""}
    _check_onnx(res, out)


def test_causal_only_kind_on_an_encoder_is_refused(tmp_path) -> None:
    from tests.test_decoder_vision import TinyViT

    x = torch.randn(8, 1, 16, 16)
    prog = torch.export.export(TinyViT(), (), kwargs={"pixel_values": x[:2]},
                               dynamic_shapes={"pixel_values": {0: torch.export.Dim.AUTO}})
    torch.export.save(prog, tmp_path / "model.pt")
    torch.save({"pixel_values": x}, tmp_path / "val.pt")
    with pytest.raises(InputError, match=r"--student gla is causal only, and site0 \(vit\..*\) is a bidirectional site"):
        compile_model(CompileConfig(model=str(tmp_path / "model.pt"),
                                    output=str(tmp_path / "h.onnx"),
                                    data=str(tmp_path / "val.pt"), student="gla", **FAST))


# slow: the default suite checks the window's forms and its decoder in seconds
# (tests/test_linear_gated.py, tests/test_stateful.py); this is the whole pipeline
@pytest.mark.slow
def test_window_with_a_recurrent_kind(tmp_path) -> None:
    """--window with gla: distils, searches, exports, and the stateful decoder (recurrent state
    plus the stored window) matches PyTorch token for token."""
    res, out = _compile(tmp_path, TinyCausalLM(), student="gla", window=8)
    students = [m for m in res.hybrid.modules() if isinstance(m, MatrixStateStudent)]
    assert len(students) == 2 and all(m.window == 8 for m in students)
    _check_onnx(res, out)
    st = res.report["stateful"]
    assert st["status"] == "written" and st["hybrid"]["parity"]["tokens_equal"], st


def test_window_refused_for_a_kind_without_a_window_form(tmp_path, monkeypatch) -> None:
    import dataclasses

    from dtr_compile.linear import STUDENTS

    monkeypatch.setitem(STUDENTS, "deltanet", dataclasses.replace(STUDENTS["deltanet"],
                                                                  window=False))
    with pytest.raises(InputError, match="--window 8 is not supported with --student deltanet"):
        _compile(tmp_path, TinyCausalLM(), student="deltanet", window=8)


def test_student_and_feature_map_must_agree(tmp_path) -> None:
    with pytest.raises(InputError, match="disagree"):
        _compile(tmp_path, TinyCausalLM(), student="elu", feature_map="relu")


def test_cli_student_option(tmp_path) -> None:
    """--student reaches the settings: an unknown kind is exit 2 naming the known ones, before
    any work."""
    from click.testing import CliRunner

    from dtr_compile.cli import main

    ids = torch.randint(1, VOCAB, (2, 16))
    prog = torch.export.export(TinyCausalLM(), (), kwargs={"input_ids": ids})
    torch.export.save(prog, tmp_path / "model.pt")
    torch.save({"input_ids": ids}, tmp_path / "val.pt")
    base = ["compile", str(tmp_path / "model.pt"), "-o", str(tmp_path / "h.onnx"), "--data",
            str(tmp_path / "val.pt")]
    res = CliRunner().invoke(main, [*base, "--student", "mamba"])
    assert res.exit_code == 2 and "unknown student kind 'mamba'" in res.output
    assert "gated-deltanet" in res.output
    res = CliRunner().invoke(main, [*base, "--student", "gla", "--window", "-1"])
    assert res.exit_code == 2 and "--window -1" in res.output
    assert not (tmp_path / "h.onnx").exists()
