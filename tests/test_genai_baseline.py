"""Issue 24: onnxruntime-genai's model builder as the baseline of the decode benchmark.

On a small random Llama folder (save_pretrained, a word-level tokenizer: the builder loads
one), the builder's fp32 export run by genai's Generator and our original stateful decoder run
by our runner continue prompts with the same greedy tokens; a second build of the same folder is
reused; a folder without a tokenizer is one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dtr_compile.errors import InputError
from tests.stateful_fixture import save_tokenizer

PROMPTS = [[5, 17, 33, 8, 61, 40, 9, 12], [71, 3, 88]]


def _llama_folder(d: Path) -> Path:
    """A 2-layer random Llama (head size 16: genai's CPU GroupQueryAttention needs a multiple
    of 16) saved with save_pretrained, and a tokenizer of its 96 ids."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper logits: varied continuations, no near-ties
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(d)
    save_tokenizer(d)
    return d


def test_builder_needs_a_tokenizer(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime_genai")
    from dtr_compile.runtime.genai_baseline import build_genai

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no tokenizer"):
        build_genai(tmp_path / "hf", tmp_path / "out", "fp32")
    with pytest.raises(InputError, match="not a Hugging Face model folder"):
        build_genai(tmp_path, tmp_path / "out", "fp32")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # the builder (~30 s) and our decoder export (~1-2 min on a loaded machine)
def test_builder_fp32_and_our_original_decoder_decode_alike(tmp_path: Path) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("onnx_ir")
    import transformers as tf

    from dtr_compile.capture import export_module, flat_graph_module
    from dtr_compile.exporters.stateful import export_stateful_onnx
    from dtr_compile.passes.find_attention import find_attention
    from dtr_compile.passes.stateful import StatefulGraph, make_stateful
    from dtr_compile.runtime.genai_baseline import build_genai, genai_state_bytes
    from dtr_compile.runtime.generate import Generator

    hf = _llama_folder(tmp_path / "hf")
    build = build_genai(hf, tmp_path / "genai-fp32", "fp32")
    assert not build.reused and (Path(build.folder) / "genai_config.json").is_file()
    again = build_genai(hf, tmp_path / "genai-fp32", "fp32")
    assert again.reused and again.seconds == pytest.approx(build.seconds, abs=0.1)

    class LM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = tf.LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32,
                                                          attn_implementation="sdpa").eval()

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                           use_cache=False).logits

    ex = {"input_ids": torch.randint(1, 96, (2, 8)),
          "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    gm = flat_graph_module(export_module(LM(), ex).module())
    scan = find_attention(gm)
    sg = make_stateful(gm, scan.sites, {}, rejected=scan.rejected)
    assert isinstance(sg, StatefulGraph), sg
    ours_path = export_stateful_onnx(sg, tmp_path / "original.decoder.onnx")
    ours = Generator(ours_path, threads=1)
    model = og.Model(build.folder)
    for prompt in PROMPTS:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + 32, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array([prompt], dtype=np.int32))
        theirs: list[int] = []
        while not gen.is_done():
            gen.generate_next_token()
            theirs.append(int(gen.get_next_tokens()[0]))
        mine = list(ours.generate(prompt, 32).tokens[0])
        assert len(set(mine)) > 3, mine  # not a degenerate continuation
        # genai stops at the EOS id (2), our runner without a tokenizer does not
        assert len(theirs) > 3 and mine[:len(theirs)] == theirs, prompt
    # the same KV bytes as our original's at any context
    assert genai_state_bytes(build.folder, 1, 100)["kv"] == 2 * 2 * 2 * 100 * 16 * 4
