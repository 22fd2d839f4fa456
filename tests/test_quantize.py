"""Issue 24: int4 / int8 weights (``--quantize``) with onnxruntime's MatMulNBits quantizer.

The quantized decoder (KV cache + recurrent state, the stateful fixture) runs and stays close to
the fp32 one; a compile with ``--quantize int4 --test`` writes the quantized hybrid and original,
and reports their test metric beside the fp32 original's (JSON, console, report.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from dtr_compile.cli import main
from dtr_compile.exporters.quantize import quantize_onnx, quantized_path, quantized_paths
from dtr_compile.runtime.generate import StatefulSession
from tests.stateful_fixture import TinyStatefulLM, export_stateful

PROMPT = [5, 17, 33, 8, 61, 40, 9, 12]


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("quantize")
    return export_stateful(TinyStatefulLM(), d / "tiny.decoder.onnx")


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _greedy_logits(path: Path, forced: list[int] | None = None,
                   steps: int = 12) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the last-position logits of each step; with ``forced``, those tokens
    are fed instead of the model's own (so that two models see the same contexts)."""
    sess = StatefulSession(path, threads=1)
    ids = np.array([PROMPT])
    mask = np.ones_like(ids)
    logits, past = sess.step(ids, mask, sess.empty_state(1))
    tokens, rows = [], [logits[0, -1]]
    for i in range(steps):
        nxt = int(logits[0, -1].argmax()) if forced is None else forced[i]
        tokens.append(int(logits[0, -1].argmax()))
        mask = np.concatenate([mask, [[1]]], axis=1)
        logits, past = sess.step(np.array([[nxt]]), mask, past)
        rows.append(logits[0, -1])
    return tokens, np.stack(rows)


def test_quantized_names_keep_the_decoder_suffix() -> None:
    assert quantized_path("out/h.onnx", "int4") == Path("out/h.int4.onnx")
    assert quantized_path("out/h.decoder.onnx", "int8") == Path("out/h.int8.decoder.onnx")
    assert quantized_path("h.original.decoder.onnx", "int4") == Path("h.original.int4.decoder.onnx")
    got = quantized_paths({"onnx": "h.onnx", "onnx_fp16": "h.fp16.onnx", "pt2": "h.pt2",
                           "hybrid_decoder_onnx": "h.decoder.onnx"}, "int4")
    assert got == {"onnx": Path("h.int4.onnx"), "hybrid_decoder_onnx": Path("h.int4.decoder.onnx")}


@pytest.mark.parametrize(("scheme", "rel_rms"), [("int8", 0.02), ("int4", 0.15)])
def test_quantized_decoder_runs_close_to_fp32(decoder: Path, tmp_path: Path, scheme: str,
                                              rel_rms: float) -> None:
    """Every constant-weight MatMul becomes MatMulNBits (no fp32 MatMul weight is left), the
    weights shrink, and greedy decoding with the KV cache and the recurrent state runs, its
    logits within quantization error of the fp32 decoder's."""
    out = tmp_path / f"tiny.{scheme}.decoder.onnx"
    q = quantize_onnx(decoder, out, scheme, block_size=16)
    assert q.matmuls == q.matmuls_total > 0, q
    assert q.weight_bytes_after < q.weight_bytes_before
    assert _ops(out).count("MatMulNBits") == q.matmuls
    assert all(n.op_type != "MatMul" or n.input[1] not in
               {t.name for t in onnx.load(str(out)).graph.initializer}
               for n in onnx.load(str(out)).graph.node)
    ref_tokens, ref = _greedy_logits(decoder)
    tokens, got = _greedy_logits(out, forced=ref_tokens)
    assert np.isfinite(got).all()
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 0 < err < rel_rms, err  # changed (quantized), but not much
    if scheme == "int8":
        assert tokens == ref_tokens


def test_quantize_options_are_checked(tiny_task, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, [tiny_task["model"], "--data", tiny_task["val"], "-o",
                                    str(tmp_path / "h.onnx"), "--quantize", "int4",
                                    "--quantize-block-size", "24"])
    assert res.exit_code == 2 and "--quantize-block-size 24" in res.output, res.output
    assert not list(tmp_path.iterdir())


class LM(torch.nn.Module):
    """A tiny random Llama: ``(input_ids, attention_mask) → logits``."""

    def __init__(self) -> None:
        super().__init__()
        import transformers as tf

        torch.manual_seed(0)
        cfg = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, attn_implementation="sdpa")
        self.lm = tf.LlamaForCausalLM(cfg).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _causal_task(d: Path) -> dict[str, str]:
    model = LM()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 96, (12, 32), generator=g)
    mask = torch.ones_like(ids)
    auto = torch.export.Dim.AUTO
    prog = torch.export.export(model, (), kwargs={"input_ids": ids[:2], "attention_mask": mask[:2]},
                               dynamic_shapes={"input_ids": {0: auto, 1: auto},
                                               "attention_mask": {0: auto, 1: auto}})
    torch.export.save(prog, d / "model.pt")
    torch.save({"input_ids": ids[:6], "attention_mask": mask[:6]}, d / "val.pt")
    torch.save({"input_ids": ids[6:], "attention_mask": mask[6:]}, d / "test.pt")
    return {k: str(d / f"{k}.pt") for k in ("model", "val", "test")}


@pytest.mark.slow  # a compile with two decoder exports: minutes on a loaded machine
def test_compile_quantize_int4_writes_every_model_and_reports_test_quality(tmp_path: Path) -> None:
    """``--quantize int4 --test --export-original`` on a causal LM: the int4 hybrid and
    original, prefill and decoders, are written (MatMulNBits); the prefill ones run in
    onnxruntime on the test rows, their perplexity and its change vs the fp32 original in the
    report, the console summary and report.md; the int4 decoders decode."""
    task = _causal_task(tmp_path)
    out = tmp_path / "hybrid.onnx"
    res = CliRunner().invoke(main, [
        task["model"], "--data", task["val"], "--test", task["test"], "-o", str(out),
        "--metric", "perplexity", "--budget", "99%", "--max-linear", "1", "--distill-steps", "5",
        "--max-calib-samples", "4", "--workers", "1", "--no-bench",
        "--export-original", "--quantize", "int4", "--no-progress"])
    assert res.exit_code == 0, res.output
    report = json.loads(out.with_suffix(".report.json").read_text())
    q = report["quantized"]
    assert q["scheme"] == "int4" and q["block_size"] == 32
    files = {"onnx": "hybrid.int4.onnx", "original_onnx": "hybrid.original.int4.onnx",
             "hybrid_decoder_onnx": "hybrid.int4.decoder.onnx",
             "original_decoder_onnx": "hybrid.original.int4.decoder.onnx"}
    for key, file in files.items():
        assert (tmp_path / file).is_file()
        assert report["artifacts"][f"{key}_int4"] == str(tmp_path / file)
        m = q["models"][key]
        # every projection; the hybrid's student keeps its small feature-map weights in fp32
        assert 0 < m["matmuls"] <= m["matmuls_total"], m
        assert m["matmuls"] == m["matmuls_total"] or "original" not in key, m
    assert _ops(tmp_path / files["onnx"]).count("MatMulNBits") == q["models"]["onnx"]["matmuls"]
    for key in ("hybrid_decoder_onnx", "original_decoder_onnx"):
        tokens, logits = _greedy_logits(tmp_path / files[key], steps=8)
        assert np.isfinite(logits).all() and len(tokens) == 8
    test = q["test"]
    assert test["original"] == pytest.approx(report["test"]["original"])
    for label in ("hybrid", "original"):
        t = test["models"][label]
        assert np.isfinite(t["metric"]) and t["metric"] != test["original"]
        assert t["change"] == pytest.approx(t["metric"] - test["original"])
        assert f"int4 {label} on the test rows (6): perplexity" in res.output
    md = out.with_suffix(".report.md").read_text()
    assert "## Quantized weights (int4)" in md and "hybrid.int4.onnx" in md
    assert "int4 hybrid on the test rows (6): perplexity" in md
