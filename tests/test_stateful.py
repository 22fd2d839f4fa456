"""The stateful decoder pass and its ONNX export on tiny random-weight Llama (GQA, RoPE) and
GPT-2 (learned positions): greedy continuations from the stateful graph (PyTorch, onnxruntime)
equal the continuation by full recomputation token for token, for the original (KV cache) and a
hybrid (KV cache + recurrent state, with and without a window); left-padded batches generate what
each row generates alone; what cannot be made stateful says why."""

from __future__ import annotations

import pytest
import torch

from dtr_compile.capture import export_module, flat_graph_module
from dtr_compile.exporters.stateful import (
    decode_parity,
    export_stateful_onnx,
    greedy_reference,
    greedy_stateful,
    left_pad,
    ort_runner,
    torch_runner,
)
from dtr_compile.linear.kernel import LinearAttention
from dtr_compile.passes.find_attention import find_attention
from dtr_compile.passes.linearize import linearize
from dtr_compile.passes.stateful import NotStateful, StatefulGraph, make_stateful

VOCAB = 96
STEPS = 64


class LM(torch.nn.Module):
    """A transformers causal LM: ``(input_ids, attention_mask) → logits``."""

    def __init__(self, kind: str, layers: int = 3) -> None:
        super().__init__()
        import transformers as tf

        torch.manual_seed(0)
        if kind == "llama":
            cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=layers, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=512,
                                 attn_implementation="sdpa")
            self.lm = tf.LlamaForCausalLM(cfg)
        else:
            cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4,
                                n_positions=512, attn_implementation="sdpa",
                                bos_token_id=0, eos_token_id=0)
            self.lm = tf.GPT2LMHeadModel(cfg)
        with torch.no_grad():  # varied continuations, fewer near-ties than the default init
            if kind == "llama":
                self.lm.lm_head.weight.mul_(8.0)
            else:  # tied head: stronger positions instead
                self.lm.transformer.wpe.weight.mul_(5.0)
        self.lm.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


_CAPTURED: dict[str, tuple] = {}


def _captured(kind: str):
    if kind not in _CAPTURED:
        model = LM(kind)
        ex = {"input_ids": torch.randint(1, VOCAB, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
        gm = flat_graph_module(export_module(model, ex).module())
        _CAPTURED[kind] = (gm, find_attention(gm))
    return _CAPTURED[kind]


def _students(scan, window: int, linear_sites=(1,)) -> dict[str, LinearAttention]:
    out = {}
    for i in linear_sites:
        s = scan.sites[i]
        torch.manual_seed(10 + i)
        st = LinearAttention(s.num_heads, s.num_kv_heads, s.head_dim, mask_kind=s.mask_kind,
                             causal=True, window=window, scale=s.scale)
        with torch.no_grad():
            for p in st.parameters():
                p.add_(0.2 * torch.randn_like(p))
        out[s.id] = st.eval()
    return out


def _prompt(seed: int, n: int = 12) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _setup(kind: str, window: int | None) -> tuple[torch.fx.GraphModule, StatefulGraph]:
    gm, scan = _captured(kind)
    students = {} if window is None else _students(scan, window)
    sg = make_stateful(gm, scan.sites, students, rejected=scan.rejected)
    assert isinstance(sg, StatefulGraph), sg
    return linearize(gm, scan.sites, students), sg


CASES = [("llama", None), ("llama", 0), ("llama", 4), ("gpt2", None), ("gpt2", 0)]
IDS = ["llama-original", "llama-linear", "llama-window4", "gpt2-original", "gpt2-linear"]


@pytest.mark.parametrize(("kind", "window"), CASES, ids=IDS)
def test_stateful_graph_greedy_equals_full_recompute(kind, window):
    prefill, sg = _setup(kind, window)
    names = sg.input_names
    assert names[:2] == ["input_ids", "attention_mask"]
    layers = {lay.layer: lay.kind for lay in sg.layers}
    assert layers == {0: "softmax", 1: "softmax" if window is None else "linear", 2: "softmax"}
    if window is not None:
        assert "past.1.recurrent" in names and ("past.1.window_key" in names) == bool(window)
    ids = torch.stack([_prompt(1), _prompt(2)])
    mask = torch.ones_like(ids)
    ref = greedy_reference(prefill, ids, STEPS, mask)
    assert len(set(ref.tokens[0].tolist())) > 4  # not a degenerate continuation
    got = greedy_stateful(torch_runner(sg), sg.empty_past(2), ids, STEPS, mask)
    par = decode_parity("torch", got, ref)
    assert par.tokens_equal, par
    assert par.worst_max_abs < 1e-3 and par.worst_rel_rms < 1e-5, par


@pytest.mark.parametrize(("kind", "window"), [("llama", 0), ("llama", 4), ("gpt2", None)],
                         ids=["llama-linear", "llama-window4", "gpt2-original"])
def test_left_padded_batch_rows_generate_what_they_generate_alone(kind, window):
    prefill, sg = _setup(kind, window)
    prompts = [_prompt(3, 5), _prompt(4, 70), _prompt(5, 9)]  # padding longer than a chunk
    ids, mask = left_pad(prompts)
    got = greedy_stateful(torch_runner(sg), sg.empty_past(3), ids, 16, mask)
    for i, p in enumerate(prompts):
        alone = greedy_reference(prefill, p[None], 16, torch.ones(1, len(p), dtype=torch.long))
        assert torch.equal(got.tokens[i], alone.tokens[0]), i
        assert (got.logits[i] - alone.logits[0]).abs().max() < 1e-3


@pytest.mark.parametrize(("kind", "window"), [
    ("llama", 0),
    pytest.param("llama", None, marks=pytest.mark.slow),  # each export ~1 min on a loaded machine
    pytest.param("llama", 4, marks=pytest.mark.slow),
    pytest.param("gpt2", 0, marks=pytest.mark.slow),
], ids=["llama-linear", "llama-original", "llama-window4", "gpt2-linear"])
def test_stateful_onnx_greedy_equals_full_recompute(tmp_path, kind, window):
    import onnx

    from dtr_compile.exporters.stateful import decoder_metadata
    from dtr_compile.inspect import inspect_onnx

    prefill, sg = _setup(kind, window)
    gm, scan = _captured(kind)
    linear = [lay.site for lay in sg.layers if lay.kind == "linear"]
    meta = decoder_metadata(sg, scan.sites, linear)
    path = export_stateful_onnx(sg, tmp_path / "decoder.onnx", metadata=meta)
    model = onnx.load(str(path))
    # issue 25 item 12: inspect reads the decoder's site record as it does the prefill ONNX's
    from dtr_compile.runtime.generate import KV_CACHE_KEY

    assert {m.key: m.value for m in model.metadata_props} == meta | {KV_CACHE_KEY: "shared"}
    seen = inspect_onnx(path)
    assert seen.recorded and [s["linear"] for s in seen.sites] == [
        s.id in linear for s in scan.sites]
    from dtr_compile.exporters.tensorrt import _with_subgraphs

    ops = {n.op_type for g in _with_subgraphs(model.graph) for n in g.node}
    assert not ops & {"Loop", "Einsum", "Scan"}, ops
    assert "GroupQueryAttention" in ops and "Attention" not in ops  # the onnxruntime form
    # a hybrid is two graphs, the one-token step and the prefill, under one If on t == 1
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == (0 if window is None else 1), [n.name for n in ifs]
    axes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}
    assert axes["attention_mask"] == ["batch", "total_sequence"]
    assert axes["past_key_values.0.key"] == ["batch", 2 if kind == "llama" else 4,
                                             "past_sequence", 8]
    ids = torch.stack([_prompt(6), _prompt(7)])
    ref = greedy_reference(prefill, ids, STEPS, torch.ones_like(ids))
    got = greedy_stateful(ort_runner(path), sg.empty_past(2), ids, STEPS)
    par = decode_parity(str(path), got, ref)
    assert par.tokens_equal, par
    assert par.worst_max_abs < 1e-3 and par.worst_rel_rms < 1e-4, par
    # a left-padded batch in onnxruntime too
    prompts = [_prompt(8, 4), _prompt(9, 11)]
    pids, pmask = left_pad(prompts)
    batch = greedy_stateful(ort_runner(path), sg.empty_past(2), pids, 8, pmask)
    for i, p in enumerate(prompts):
        alone = greedy_reference(prefill, p[None], 8, torch.ones(1, len(p), dtype=torch.long))
        assert torch.equal(batch.tokens[i], alone.tokens[0]), i


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_decoder_metadata_describes_the_model(kind, tmp_path):
    """Issue 25 items 10-12: what a decoder carries about its source. Heads and head size from the
    sites (GQA: 4 query heads over 2 KV heads, not the KV inputs' 2), the hidden size and
    vocabulary from the token embedding, and a learned position table's rows (GPT-2's wpe,
    512) where positions index a table; RoPE computes them (no table). With a Hugging Face
    folder, the model's own config adds its type and max positions."""
    import json

    from dtr_compile.exporters.onnx import SITES_KEY
    from dtr_compile.exporters.stateful import decoder_metadata
    from dtr_compile.runtime.generate import DECODER_KEY

    _, sg = _setup(kind, 0)
    gm, scan = _captured(kind)
    meta = decoder_metadata(sg, scan.sites, ["site1"])
    sites = json.loads(meta[SITES_KEY])
    assert [(s["id"], s["linear"]) for s in sites] == [("site0", False), ("site1", True),
                                                       ("site2", False)]
    info = json.loads(meta[DECODER_KEY])
    heads = (4, 2) if kind == "llama" else (4, 4)
    assert (info["num_attention_heads"], info["num_key_value_heads"]) == heads
    assert (info["head_size"], info["hidden_size"], info["vocab_size"]) == (8, 32, VOCAB)
    assert info["num_hidden_layers"] == 3
    assert info["position_table"] == (512 if kind == "gpt2" else None)
    assert info["model_type"] is None and info["max_position_embeddings"] is None
    LM(kind).lm.save_pretrained(tmp_path / "hf")
    info = json.loads(decoder_metadata(sg, scan.sites, [], tmp_path / "hf")[DECODER_KEY])
    assert info["model_type"] == kind and info["max_position_embeddings"] == 512


def test_decoder_check_stays_inside_a_learned_position_table():
    """A GPT-2 with 64 learned positions and the check's 16-token prompts + 64 greedy steps
    indexed position 80: onnxruntime's Gather failed and the compile died with an internal
    error, its artifacts lost. The check now fits prompts and steps in the table."""
    from dtr_compile.exporters.stateful import fit_decode_check, position_table

    _, sg = _setup("gpt2", 0)
    assert position_table(sg) == 512
    _, llama = _setup("llama", 0)
    assert position_table(llama) is None
    prompts = [_prompt(1, 16), _prompt(2, 11)]
    same, steps = fit_decode_check(prompts, 64, None)
    assert steps == 64 and [len(p) for p in same] == [16, 11]
    short, steps = fit_decode_check(prompts, 64, 64)
    assert max(map(len, short)) + steps <= 64 and steps == 48
    tiny, steps = fit_decode_check(prompts, 64, 8)
    assert [len(p) for p in tiny] == [4, 4] and steps == 4
    assert torch.equal(tiny[0], prompts[0][:4])


def test_not_stateful_says_why():
    from tests.conftest import TinyClassifier

    model = TinyClassifier()
    ex = {"input_ids": torch.randint(1, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    gm = flat_graph_module(export_module(model, ex).module())
    scan = find_attention(gm)
    res = make_stateful(gm, scan.sites, {})
    assert isinstance(res, NotStateful) and not res
    assert all("not causal" in r for r in res.reasons) and len(res.reasons) == len(scan.sites)
    assert "encoder.layer.0" in res.describe()


@pytest.mark.slow  # minutes on a loaded machine: a compile plus two decoder exports
def test_compile_writes_checked_decoders(tmp_path):
    from dtr_compile.config import CompileConfig
    from dtr_compile.inspect import inspect_onnx
    from dtr_compile.pipeline import compile_model

    model = LM("llama", layers=2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (8, 24), generator=g)
    mask = torch.ones_like(ids)
    prog = torch.export.export(model, (), kwargs={"input_ids": ids[:2], "attention_mask": mask[:2]},
                               dynamic_shapes={"input_ids": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},
                                               "attention_mask": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}})
    torch.export.save(prog, tmp_path / "model.pt")
    torch.save({"input_ids": ids, "attention_mask": mask}, tmp_path / "val.pt")
    out = tmp_path / "hybrid.onnx"
    res = compile_model(CompileConfig(
        model=str(tmp_path / "model.pt"), output=str(out), data=str(tmp_path / "val.pt"),
        metric="perplexity", budget="99%", max_linear=1, distill_steps=5, max_calib_samples=4,
        progress=False, workers=1, export_original=True, decode_steps=STEPS))
    rep = res.report
    assert len(rep["replaced"]) == 1
    st = rep["stateful"]
    assert st["status"] == "written", st
    for key, file in (("hybrid", "hybrid.decoder.onnx"), ("original", "hybrid.original.decoder.onnx")):
        assert (tmp_path / file).is_file()
        assert rep["artifacts"][f"{key}_decoder_onnx"] == str(tmp_path / file)
        par = st[key]["parity"]
        assert par["tokens_equal"] and par["steps"] == STEPS and par["batch"] == 2, par
        assert par["artifact"] == str(tmp_path / file)  # not the staging folder's copy
        seen = inspect_onnx(tmp_path / file)
        assert seen.recorded and sum(s["linear"] for s in seen.sites) == (key == "hybrid")
        assert par["worst_max_abs"] < 1e-3, par
    kinds = sorted(lay["kind"] for lay in st["hybrid"]["layers"])
    assert kinds == ["linear", "softmax"]
    assert {lay["kind"] for lay in st["original"]["layers"]} == {"softmax"}


class SinusoidalCausal(torch.nn.Module):
    """A causal block with sinusoidal positions computed in the graph (``arange(T) · freq``): a
    position computation the pass does not recognise."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 16)
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        pos = torch.arange(t)[:, None] * torch.arange(1, 17)[None, :]  # [T, 16]
        x = self.emb(input_ids) + torch.sin(pos.float())
        q, k, v = self.qkv(x).view(x.shape[0], t, 3, 2, 8).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(x.shape[0], t, 16)


def test_unrecognised_positions_say_why(tmp_path):
    from dtr_compile.inspect import inspect_model

    ex = {"input_ids": torch.randint(1, VOCAB, (2, 8))}
    gm = flat_graph_module(export_module(SinusoidalCausal(), ex).module())
    scan = find_attention(gm)
    assert scan.sites and all(s.causal for s in scan.sites)
    res = make_stateful(gm, scan.sites, {})
    assert isinstance(res, NotStateful)
    assert "not a recognised position computation" in res.describe()
    prog = export_module(SinusoidalCausal(), ex)
    torch.export.save(prog, tmp_path / "m.pt2")
    ins = inspect_model(str(tmp_path / "m.pt2"))
    assert ins.stateful and "position" in ins.stateful[0]
    assert ins.to_dict()["stateful"]["possible"] is False


def test_tokenizer_is_found_and_copied_beside_the_artifacts(tmp_path):
    from dtr_compile.exporters.stateful import copy_tokenizer, find_model_tokenizer, tokenizer_path

    hf = tmp_path / "hf"
    hf.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "model.safetensors", "config.json"):
        (hf / f).write_text(f)
    assert find_model_tokenizer(hf) == hf
    out = tmp_path / "out" / "hybrid.onnx"
    out.parent.mkdir()
    dest = copy_tokenizer(hf, out)
    assert dest == tokenizer_path(out) == out.parent / "hybrid.tokenizer"
    assert sorted(p.name for p in dest.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    # an archive with X.tokenizer/ beside it (the SmolLM2 demo's model.tokenizer/)
    (tmp_path / "model.pt").write_text("")
    assert find_model_tokenizer(tmp_path / "model.pt") is None
    (tmp_path / "model.tokenizer").mkdir()
    (tmp_path / "model.tokenizer" / "tokenizer.json").write_text("{}")
    assert find_model_tokenizer(tmp_path / "model.pt") == tmp_path / "model.tokenizer"
    dest = copy_tokenizer(tmp_path / "model.tokenizer", out)  # replaces the older copy
    assert [p.name for p in dest.iterdir()] == ["tokenizer.json"]
    from dtr_compile.exporters.stateful import copy_model_tokenizer

    logged: list[str] = []
    assert copy_model_tokenizer(hf, out, logged.append) == {"tokenizer": str(dest)}
    assert "the tokenizer of" in logged[0]
    assert copy_model_tokenizer(tmp_path / "none.pt", out) == {}


def _matrix_state_site1(student: str, window: int, seed: int):  # noqa: ANN202
    """The tiny Llama's capture and a ``student`` (randomised parameters) for its site 1."""
    from dtr_compile.linear import make_student

    gm, scan = _captured("llama")
    s = scan.sites[1]
    torch.manual_seed(seed)
    st = make_student(student, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads,
                      head_dim=s.head_dim, head_dim_v=s.head_dim_v, mask_kind=s.mask_kind,
                      causal=True, scale=s.scale, window=window)
    with torch.no_grad():
        for p in st.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return gm, scan, {s.id: st.eval()}


@pytest.mark.parametrize(("student", "window"), [("gla", 0), ("deltanet", 0),
                                                 ("gated-deltanet", 0), ("gla", 4),
                                                 ("gated-deltanet", 4)])
def test_matrix_state_students_decode_like_full_recompute(student, window):
    """The stateful pass calls only the student contract: the gated / delta-rule kinds decode
    token for token like full recomputation, in a left-padded batch too; with a window, past
    its boundary (prompts of 5 and 70 tokens, 16 new ones, W = 4)."""
    gm, scan, students = _matrix_state_site1(student, window, seed=11)
    sg = make_stateful(gm, scan.sites, students, rejected=scan.rejected)
    assert isinstance(sg, StatefulGraph), sg
    assert "past.1.recurrent" in sg.input_names
    assert ("past.1.window_key" in sg.input_names) == bool(window)
    prefill = linearize(gm, scan.sites, students)
    _batch_decodes_like_alone(torch_runner(sg), sg, prefill, [_prompt(6, 5), _prompt(7, 70)], 16)


def _batch_decodes_like_alone(runner, sg, prefill, prompts, steps: int) -> None:  # noqa: ANN001
    """A left-padded batch of ``prompts`` continued by ``runner`` gives each prompt's greedy
    tokens (and logits to 1e-3) of full recomputation alone."""
    ids, mask = left_pad(prompts)
    got = greedy_stateful(runner, sg.empty_past(len(prompts)), ids, steps, mask)
    for i, p in enumerate(prompts):
        alone = greedy_reference(prefill, p[None], steps, torch.ones(1, len(p), dtype=torch.long))
        assert torch.equal(got.tokens[i], alone.tokens[0]), i
        assert (got.logits[i] - alone.logits[0]).abs().max() < 1e-3


@pytest.mark.parametrize(("student", "window", "opset"), [
    ("gated-deltanet", 0, 23),
    pytest.param("gated-deltanet", 0, 27, marks=pytest.mark.slow),
    pytest.param("gla", 4, 27, marks=pytest.mark.slow),
], ids=["gated-deltanet-com.microsoft", "gated-deltanet-opset27", "gla-window4-opset27"])
def test_fused_stateful_onnx_decodes_like_full_recompute(tmp_path, student, window, opset):
    """The fused stateful decoder (onnxruntime's ``com.microsoft`` op at opset 23, the standard
    op at 27): each recurrence is one ``LinearAttention`` reading ``past.1.recurrent``; without a
    window the graph has no ``If`` (the op serves prefill and one-token decode). onnxruntime
    continues a left-padded batch token for token like PyTorch's full recomputation."""
    import onnx

    from dtr_compile.exporters.tensorrt import _with_subgraphs

    gm, scan, students = _matrix_state_site1(student, window, seed=12)
    sg = make_stateful(gm, scan.sites, students, rejected=scan.rejected)
    prefill = linearize(gm, scan.sites, students)
    path = export_stateful_onnx(sg, tmp_path / "decoder.onnx", opset=opset, fused=True)
    model = onnx.load(str(path))
    nodes = [n for g in _with_subgraphs(model.graph) for n in g.node]
    fused = [n for n in nodes if n.op_type == "LinearAttention"]
    assert fused and all(n.domain == ("" if opset == 27 else "com.microsoft") for n in fused)
    assert any("past.1.recurrent" in n.input for n in fused) or window  # inside If with a window
    assert len([n for n in model.graph.node if n.op_type == "If"]) == (1 if window else 0)
    _batch_decodes_like_alone(ort_runner(path), sg, prefill, [_prompt(8, 5), _prompt(9, 70)], 12)
