"""Generation with a stateful decoder ONNX: greedy parity with full recomputation in PyTorch, left
padding, seeded sampling, the `generate` CLI, `bench --decode` (table, JSON, profile), the error
on a prefill-only model, genai_config.json and an onnxruntime-genai run. The
model is the hand-written fixture of tests/stateful_fixture.py (KV + recurrent state)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dtr_compile.cli import main
from dtr_compile.errors import InputError
from dtr_compile.runtime.generate import Generator, StatefulSession, choose, state_arrays
from tests.stateful_fixture import (
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    TinyStatefulLM,
    empty_state,
    export_prefill_only,
    export_stateful,
    greedy_full_recompute,
    save_tokenizer,
)


@pytest.fixture(scope="module")
def fixture_onnx(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.set_num_threads(1)
    model = TinyStatefulLM().eval()
    d = tmp_path_factory.mktemp("stateful")
    path = export_stateful(model, d / "tiny.stateful.onnx")
    return {"model": model, "path": path, "dir": d}


PROMPTS = [[5, 17, 33, 8, 61], [40, 9], [71, 3, 88, 12, 27, 54, 6, 19]]


def test_greedy_matches_full_recompute(fixture_onnx) -> None:
    gen = Generator(fixture_onnx["path"], threads=1)
    for prompt in PROMPTS[:2]:
        ref = greedy_full_recompute(fixture_onnx["model"], prompt, 64)
        got = gen.generate(prompt, 64)
        assert got.tokens[0] == ref, (prompt, got.tokens[0], ref)
        assert got.steps == 63 and got.stopped == ["max_new_tokens"]


@pytest.mark.slow
def test_greedy_matches_full_recompute_dynamo_export(fixture_onnx, tmp_path: Path) -> None:
    """The same parity through torch.onnx.export(dynamo=True), the compiler's exporter."""
    path = export_stateful(fixture_onnx["model"], tmp_path / "dynamo.onnx", dynamo=True)
    got = Generator(path, threads=1).generate(PROMPTS[0], 64).tokens[0]
    assert got == greedy_full_recompute(fixture_onnx["model"], PROMPTS[0], 64)


def test_decode_logits_match_prefill_of_the_longer_sequence(fixture_onnx) -> None:
    """Prefill of P tokens then decode steps = one prefill of the longer sequence: per-step logits
    over 64 teacher-forced random tokens (greedy runs of a random model fall into loops, so this
    checks every step on fresh inputs), max-abs and rel-RMS; the states after the last step."""
    sess = StatefulSession(fixture_onnx["path"], threads=1)
    rng = np.random.default_rng(3)
    seq = rng.integers(3, 96, (1, 70))
    ones = np.ones_like(seq)
    with torch.no_grad():
        ref = fixture_onnx["model"](torch.tensor(seq), torch.tensor(ones), *empty_state(1))
    ref_logits = ref[0][0].numpy()  # [T, V], causal: row p is the logits after token p
    logits, state = sess.step(seq[:, :6], ones[:, :6], sess.empty_state(1))
    steps = [logits[0, -1]]
    for p in range(6, seq.shape[1]):
        logits, state = sess.step(seq[:, p:p + 1], ones[:, :p + 1], state)
        steps.append(logits[0, -1])
    got, want = np.stack(steps), ref_logits[5:]
    state = state_arrays(state)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, float(np.abs(want).max()))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    np.testing.assert_allclose(state["past.1.recurrent"], ref[3].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state["past_key_values.0.key"], ref[1].numpy(), rtol=1e-4,
                               atol=1e-5)
    assert state["past_key_values.0.key"].shape == (1, KV_HEADS, 70, HEAD_DIM)


def test_signature_and_state_bytes(fixture_onnx) -> None:
    sig = StatefulSession(fixture_onnx["path"]).sig
    kinds = {(s.layer, s.name): s.kind for s in sig.states}
    assert kinds == {(0, "key"): "kv", (0, "value"): "kv", (1, "recurrent"): "recurrent"}
    b = sig.state_bytes(batch=3, past_len=100)
    assert b["kv"] == 2 * 3 * KV_HEADS * 100 * HEAD_DIM * 4
    assert b["recurrent"] == 3 * HEADS * HEAD_DIM * (HEAD_DIM + 1) * 4


def test_left_padded_batch_equals_each_row_alone(fixture_onnx) -> None:
    gen = Generator(fixture_onnx["path"], threads=1)
    batch = gen.generate(PROMPTS, 24, pad_token_id=0)
    for r, prompt in enumerate(PROMPTS):
        alone = gen.generate(prompt, 24)
        assert batch.tokens[r] == alone.tokens[0], r
    # padding with another id changes nothing: it never enters the KV softmax nor the state
    other = gen.generate(PROMPTS, 24, pad_token_id=77)
    assert other.tokens == batch.tokens


def test_eos_stops_a_row(fixture_onnx) -> None:
    gen = Generator(fixture_onnx["path"], threads=1)
    free = gen.generate(PROMPTS[0], 16)
    stop_at = free.tokens[0][5]
    first = free.tokens[0].index(stop_at)
    got = gen.generate(PROMPTS[0], 16, eos_token_id=stop_at)
    assert got.tokens[0] == free.tokens[0][:first + 1] and got.stopped == ["eos"]


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed(fixture_onnx) -> None:
    gen = Generator(fixture_onnx["path"], threads=1)
    a = gen.generate(PROMPTS[0], 32, temperature=1.0, top_k=20, seed=1).tokens
    b = gen.generate(PROMPTS[0], 32, temperature=1.0, top_k=20, seed=1).tokens
    c = gen.generate(PROMPTS[0], 32, temperature=1.0, top_k=20, seed=2).tokens
    greedy = gen.generate(PROMPTS[0], 32).tokens
    assert a == b
    assert a != c and a != greedy


def test_choose_respects_top_k_and_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50))
    top3 = np.argsort(logits, -1)[:, -3:]
    for _ in range(50):
        picks = choose(logits, 1.0, 3, rng)
        assert all(picks[r] in top3[r] for r in range(4))
    # top_k=1 is greedy whatever the temperature
    assert (choose(logits, 5.0, 1, rng) == logits.argmax(-1)).all()
    # sampling frequencies follow softmax(logits / T) (fresh draws, 3-sigma band)
    two = np.array([[0.0, np.log(3.0)]] * 4000)
    freq = (choose(two, 1.0, None, rng) == 1).mean()
    assert abs(freq - 0.75) < 3 * (0.75 * 0.25 / 4000) ** 0.5


def test_bad_options_are_input_errors(fixture_onnx) -> None:
    gen = Generator(fixture_onnx["path"])
    for kwargs in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_k": 0}):
        with pytest.raises(InputError):
            gen.generate([1, 2], **{"max_new_tokens": 4, **kwargs})
    with pytest.raises(InputError, match="no tokenizer"):
        gen.generate("hello", 4)
    with pytest.raises(InputError, match="empty"):
        gen.generate([[1, 2], []], 4)


def test_cli_generate_prompt_ids(fixture_onnx) -> None:
    ref = greedy_full_recompute(fixture_onnx["model"], PROMPTS[0], 12)
    res = CliRunner().invoke(main, ["generate", str(fixture_onnx["path"]), "--prompt-ids",
                                    ",".join(map(str, PROMPTS[0])), "--max-new-tokens", "12",
                                    "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert [int(x) for x in res.stdout.split()] == ref


@pytest.mark.parametrize("where", ["stem", "base", "plain", "flag"])
def test_cli_generate_text_streams_with_a_tokenizer(fixture_onnx, tmp_path: Path,
                                                    where: str) -> None:
    d = tmp_path / where
    d.mkdir()
    model = d / "tiny.decoder.onnx"
    model.write_bytes(Path(fixture_onnx["path"]).read_bytes())
    tok_dir = {"stem": d / "tiny.decoder.tokenizer", "base": d / "tiny.tokenizer",
               "plain": d / "tokenizer",
               "flag": tmp_path / f"tok-{where}"}[where]
    save_tokenizer(tok_dir)
    prompt = " ".join(f"w{i}" for i in PROMPTS[0])
    ref = greedy_full_recompute(fixture_onnx["model"], PROMPTS[0], 20, eos_id=2)
    args = ["generate", str(model), "--prompt", prompt, "--max-new-tokens", "20"]
    if where == "flag":
        args += ["--tokenizer", str(tok_dir)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == " ".join(f"w{i}" for i in ref if i != 2)
    assert "tokens" in res.stderr and "ms/step" in res.stderr
    pf = tmp_path / f"prompt-{where}.txt"
    pf.write_text(prompt)
    res2 = CliRunner().invoke(main, [*args[:2], "--prompt-file", str(pf), *args[4:]])
    assert res2.exit_code == 0 and res2.stdout == res.stdout


def test_cli_generate_batch_of_prompt_ids(fixture_onnx) -> None:
    args = ["generate", str(fixture_onnx["path"]), "--max-new-tokens", "10", "--threads", "1"]
    for p in PROMPTS:
        args += ["--prompt-ids", ",".join(map(str, p))]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == len(PROMPTS)
    for r, (line, p) in enumerate(zip(lines, PROMPTS, strict=True)):
        assert line == f"[{r}] " + " ".join(map(str, greedy_full_recompute(
            fixture_onnx["model"], p, 10)))


def test_cli_generate_errors(fixture_onnx, tmp_path: Path) -> None:
    path = str(fixture_onnx["path"])
    res = CliRunner().invoke(main, ["generate", path, "--prompt", "hello"])
    assert res.exit_code == 2 and "no tokenizer" in res.stderr
    res = CliRunner().invoke(main, ["generate", path, "--prompt-ids", "1,x"])
    assert res.exit_code == 2 and "--prompt-ids" in res.stderr
    res = CliRunner().invoke(main, ["generate", path])
    assert res.exit_code == 2 and "--prompt" in res.stderr
    res = CliRunner().invoke(main, ["generate", path, "--prompt-ids", "1", "--threads", "0"])
    assert res.exit_code == 2 and "--threads" in res.stderr
    res = CliRunner().invoke(main, ["generate", path, "--prompt-ids", "1", "--top-k", "0"])
    assert res.exit_code == 2 and "top_k" in res.stderr
    res = CliRunner().invoke(main, ["generate", path, "--prompt-ids", "1", "--tokenizer",
                                    str(tmp_path / "nope")])
    assert res.exit_code == 2 and "not a folder" in res.stderr


def test_prefill_only_model_is_a_clear_error(fixture_onnx) -> None:
    path = export_prefill_only(fixture_onnx["model"], fixture_onnx["dir"] / "prefill.onnx")
    with pytest.raises(InputError, match="prefill-only"):
        Generator(path)
    res = CliRunner().invoke(main, ["generate", str(path), "--prompt-ids", "1,2"])
    assert res.exit_code == 2 and "prefill-only" in res.stderr


def test_bench_decode_table_json_and_ratios(fixture_onnx, tmp_path: Path) -> None:
    a = fixture_onnx["path"]
    b = tmp_path / "copy.onnx"
    b.write_bytes(Path(a).read_bytes())
    out = tmp_path / "decode.json"
    res = CliRunner().invoke(main, ["bench", "--decode", "--context", "16,64", "--tokens", "32",
                                    "--max-prefill", "16", "--threads", "1", str(a), str(b),
                                    "--profile", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "×A" in res.stdout and "synthesised" in res.stdout and "skipped" in res.stdout
    data = json.loads(out.read_text())
    assert data["contexts"] == [16, 64]
    for cell in data["cells"]:
        ctx = cell["context"]
        kv = 2 * KV_HEADS * ctx * HEAD_DIM * 4
        rec = HEADS * HEAD_DIM * (HEAD_DIM + 1) * 4
        assert cell["state_bytes"] == {"kv": kv, "recurrent": rec}
        assert len(cell["decode_runs_ms"]) >= 32 and cell["decode_ms"] > 0
        assert cell["decode_synthesised"] == (ctx > 16)
        assert (cell["prefill_ms"] is None) == (ctx > 16)
    prof = data["profile"]
    assert prof["context"] == 64
    ops = {o["op_type"] for o in prof["ops"][str(a)]}
    assert "MatMul" in ops and "Concat" in ops  # projections; the KV cache's concatenation
    assert sum(o["share"] for o in prof["ops"][str(a)]) == pytest.approx(1.0)
    assert "decode step profile" in res.stdout
    r = data["ratios"]["16"][str(b)]
    assert r["state_bytes"] == pytest.approx(1.0)
    assert r["decode"] == pytest.approx(data["cells"][1]["decode_ms"] / data["cells"][0]["decode_ms"])


def test_bench_decode_rejects_a_prefill_only_model(fixture_onnx) -> None:
    path = fixture_onnx["dir"] / "prefill.onnx"
    if not path.exists():
        export_prefill_only(fixture_onnx["model"], path)
    res = CliRunner().invoke(main, ["bench", "--decode", "--context", "8", str(path)])
    assert res.exit_code == 2 and "prefill-only" in res.stderr


def test_genai_config_describes_the_decoder(fixture_onnx, tmp_path: Path) -> None:
    from dtr_compile.runtime.genai_config import write_genai_config

    path = write_genai_config(fixture_onnx["path"], tmp_path / "genai_config.json",
                              eos_token_id=2, context_length=256)
    cfg = json.loads(path.read_text())
    dec = cfg["model"]["decoder"]
    assert dec["layer_types"] == ["full_attention", "linear_attention"]
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["inputs"]["past_recurrent_names"] == "past.%d.recurrent"
    assert dec["outputs"]["present_recurrent_names"] == "present.%d.recurrent"
    assert "past_conv_names" not in dec["inputs"]
    assert (dec["head_size"], dec["num_key_value_heads"], dec["num_hidden_layers"]) == (
        HEAD_DIM, KV_HEADS, 2)
    assert cfg["model"]["vocab_size"] == 96 and cfg["model"]["eos_token_id"] == 2
    assert dec["filename"] == Path(fixture_onnx["path"]).name


def test_onnxruntime_genai_runs_the_decoder_with_a_conv_passthrough(fixture_onnx,
                                                                     tmp_path: Path) -> None:
    """onnxruntime-genai 0.18 (optional extra `genai`) refuses a linear layer without a conv
    state; with the pass-through conv state write_genai_folder adds, its greedy continuation
    equals the PyTorch full recomputation (single prompt; see docs/exporters.md for batches)."""
    d = tmp_path / "src"
    d.mkdir()
    model = d / "tiny.onnx"
    model.write_bytes(Path(fixture_onnx["path"]).read_bytes())
    save_tokenizer(d / "tokenizer")
    res = CliRunner().invoke(main, ["genai-folder", str(model), "-o", str(tmp_path / "genai"),
                                    "--context-length", "128"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "genai"
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["inputs"][
        "past_conv_names"] == "past.%d.conv"
    ours = StatefulSession(out / "model.onnx").sig
    assert [s.past for s in ours.states if s.name == "conv"] == ["past.1.conv"]
    og = pytest.importorskip("onnxruntime_genai")
    gm = og.Model(str(out))
    for prompt in PROMPTS[:2]:
        params = og.GeneratorParams(gm)
        params.set_search_options(max_length=len(prompt) + 40, do_sample=False)
        gen = og.Generator(gm, params)
        gen.append_tokens([prompt])
        got: list[int] = []
        while not gen.is_done():
            gen.generate_next_token()
            got.append(int(gen.get_next_tokens()[0]))
        ref = greedy_full_recompute(fixture_onnx["model"], prompt, 40, eos_id=2)
        assert got == ref, prompt
    # our runner reads the genai folder too (the conv state is just another state; the
    # tokenizer files lie beside the model)
    ours_gen = Generator(out / "model.onnx")
    assert ours_gen.tokenizer is not None
    assert ours_gen.generate(PROMPTS[1], 20).tokens[0] == \
        greedy_full_recompute(fixture_onnx["model"], PROMPTS[1], 20, eos_id=2)


def test_genai_folder_keeps_external_weights_beside_the_model(fixture_onnx, tmp_path: Path) -> None:
    """A decoder written with external data (``NAME.data``, as dtr-compile writes models over
    1.5 GiB) gives a genai folder whose ``model.onnx`` keeps its weights in ``model.onnx.data``,
    and the folder still decodes like the PyTorch model."""
    import onnx

    from dtr_compile.fileio import save_onnx

    d = tmp_path / "src"
    d.mkdir()
    save_onnx(onnx.load(fixture_onnx["path"]), d / "tiny.onnx", external=True)
    assert (d / "tiny.onnx.data").is_file()
    save_tokenizer(d / "tokenizer")
    res = CliRunner().invoke(main, ["genai-folder", str(d / "tiny.onnx"), "-o",
                                    str(tmp_path / "genai"), "--context-length", "128"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "genai"
    inits = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer
    assert {e.value for t in inits for e in t.external_data if e.key == "location"} == \
        {"model.onnx.data"}
    assert Generator(out / "model.onnx").generate(PROMPTS[1], 12).tokens[0] == \
        greedy_full_recompute(fixture_onnx["model"], PROMPTS[1], 12, eos_id=2)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".lock"]


def test_genai_folder_refuses_a_model_before_writing(fixture_onnx, tmp_path: Path) -> None:
    path = fixture_onnx["dir"] / "prefill.onnx"
    if not path.exists():
        export_prefill_only(fixture_onnx["model"], path)
    save_tokenizer(tmp_path / "tokenizer")
    res = CliRunner().invoke(main, ["genai-folder", str(path), "--tokenizer",
                                    str(tmp_path / "tokenizer"), "-o", str(tmp_path / "genai")])
    assert res.exit_code == 2, res.output
    assert not (tmp_path / "genai").exists()  # nothing written for a model it cannot use


def test_signature_of_windowed_fp16_states() -> None:
    """Window tensors (past.i.window_key/value/valid, LINEAR_CONTRACT) and fp16 KV caches: fixed
    shapes, empty past = zeros (a window with no valid entry), bytes from the declared dtypes."""
    from types import SimpleNamespace as NS

    from dtr_compile.runtime.generate import read_signature

    def io(name: str, shape: list, typ: str = "tensor(float)") -> NS:
        return NS(name=name, shape=shape, type=typ)

    ins = [io("input_ids", ["batch", "sequence"], "tensor(int64)"),
           io("attention_mask", ["batch", "total_sequence"], "tensor(int64)"),
           io("past_key_values.0.key", ["batch", 2, "past_sequence", 8], "tensor(float16)"),
           io("past_key_values.0.value", ["batch", 2, "past_sequence", 8], "tensor(float16)"),
           io("past.3.recurrent", ["batch", 4, 16, 9]),
           io("past.3.window_key", ["batch", 2, 64, 8], "tensor(float16)"),
           io("past.3.window_value", ["batch", 2, 64, 8], "tensor(float16)"),
           io("past.3.window_valid", ["batch", 64], "tensor(bool)")]
    outs = [io("logits", ["batch", "sequence", 96])] + [
        io(i.name.replace("past_key_values", "present").replace("past", "present"), i.shape,
           i.type) for i in ins[2:]]
    sess = NS(get_inputs=lambda: ins, get_outputs=lambda: outs)
    sig = read_signature(sess, "m.onnx")
    assert {(s.layer, s.name, s.kind) for s in sig.states if s.layer == 3} == {
        (3, n, "recurrent") for n in ("recurrent", "window_key", "window_value", "window_valid")}
    valid = next(s for s in sig.states if s.name == "window_valid").empty(2)
    assert valid.dtype == np.bool_ and valid.shape == (2, 64) and not valid.any()
    assert next(s for s in sig.states if s.name == "key").empty(2).shape == (2, 2, 0, 8)
    b = sig.state_bytes(1, 1000)
    assert b["kv"] == 2 * 2 * 1000 * 8 * 2
    assert b["recurrent"] == 4 * 16 * 9 * 4 + 2 * 2 * 64 * 8 * 2 + 64
    # a state dim that varies (other than batch and a KV cache's length) is refused
    ins[4] = io("past.3.recurrent", ["batch", 4, "f", 9])
    with pytest.raises(InputError, match="not fixed"):
        read_signature(sess, "m.onnx")


# --- issue 25 item 10 / 16: generate's edge cases ----------------------------------------------


@pytest.mark.parametrize("temperature", [1e-310, 5e-324, 1e-300, 1e-30])
def test_tiny_temperatures_are_greedy_not_nan(temperature: float) -> None:
    """softmax(logits / 1e-310) overflowed to inf − inf = NaN and always drew token 0; in the
    limit it is the argmax (ties shared), computed without overflow."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 50)).astype(np.float32) * 10
    with np.errstate(all="raise"):
        picks = choose(logits, temperature, None, rng)
        assert (picks == logits.argmax(-1)).all()
        assert (choose(logits, temperature, 3, rng) == logits.argmax(-1)).all()
    tie = np.array([[0.0, 7.0, 7.0, 1.0]] * 400)
    drawn = choose(tie, temperature, None, rng)
    assert set(drawn.tolist()) == {1, 2}  # the two maxima, both drawn


@pytest.mark.parametrize("ids, message", [
    ("-1", r"token id -1 .*outside the model's vocabulary of 96 ids \(0\.\.95\)"),
    ("5,96", r"token id 96 .*outside the model's vocabulary of 96 ids"),
    ("5,99999999999999999999999", r"token id 99999999999999999999999 .*vocabulary of 96"),
])
def test_prompt_ids_outside_the_vocabulary_are_exit_2(fixture_onnx, ids: str,
                                                       message: str) -> None:
    res = CliRunner().invoke(main, ["generate", str(fixture_onnx["path"]), "--prompt-ids", ids,
                                    "--max-new-tokens", "2"])
    assert res.exit_code == 2, (res.output, res.exception)
    assert re.search(message, res.stderr), res.stderr
    with pytest.raises(InputError, match="vocabulary"):
        Generator(fixture_onnx["path"]).generate([[3, 4], [int(ids.split(",")[-1])]], 2)


def _with_decoder_info(src: str, dst: Path, info: dict) -> Path:
    import onnx

    from dtr_compile.runtime.generate import DECODER_KEY

    proto = onnx.load(src)
    entry = proto.metadata_props.add()
    entry.key, entry.value = DECODER_KEY, json.dumps(info)
    onnx.save(proto, str(dst))
    return dst


def test_prompt_longer_than_a_learned_position_table_is_refused(fixture_onnx,
                                                                 tmp_path: Path) -> None:
    """A decoder whose positions come from a learned table of P rows (recorded by dtr-compile in
    its metadata) cannot see position P: a longer prompt is exit 2, naming both lengths, and
    generation stops when the table is full (stop reason max_positions)."""
    path = _with_decoder_info(fixture_onnx["path"], tmp_path / "p8.onnx", {"position_table": 8})
    gen = Generator(path, threads=1)
    with pytest.raises(InputError, match=r"prompt of 9 tokens.*8 positions"):
        gen.generate([list(range(3, 12))], 4)
    got = gen.generate([PROMPTS[0], PROMPTS[1]], 10)  # 5 and 2 prompt tokens
    assert [len(t) for t in got.tokens] == [3, 6] and got.stopped == ["max_positions"] * 2
    res = CliRunner().invoke(main, ["generate", str(path), "--prompt-ids", "3,4,5,6,7,8,9,10,11"])
    assert res.exit_code == 2 and "8 positions" in res.stderr
    odd = _with_decoder_info(fixture_onnx["path"], tmp_path / "odd.onnx", {"position_table": True})
    assert Generator(odd).generate([PROMPTS[0]], 3).stopped == ["max_new_tokens"]  # not 1 row


def test_non_utf8_prompt_file_is_exit_2(fixture_onnx, tmp_path: Path) -> None:
    pf = tmp_path / "latin1.txt"
    pf.write_bytes("Grüße".encode("latin-1"))
    save_tokenizer(tmp_path / "tok")
    res = CliRunner().invoke(main, ["generate", str(fixture_onnx["path"]), "--prompt-file",
                                    str(pf), "--tokenizer", str(tmp_path / "tok")])
    assert res.exit_code == 2, (res.output, res.exception)
    assert "UTF-8" in res.stderr and "latin1.txt" in res.stderr


def test_text_stream_is_incremental_and_exact(tmp_path: Path) -> None:
    """The streamed pieces add up to the full decoding, a multi-byte character is never shown
    half (no U+FFFD), and the work is linear in the tokens: the whole continuation is not
    re-decoded for every new token."""
    from dtr_compile.runtime.generate import TextStream, load_tokenizer
    from tests.stateful_fixture import save_byte_tokenizer

    tok = load_tokenizer(save_byte_tokenizer(tmp_path / "btok"))
    ids = tok("Grüße aus Köln, naïve café — 日本語 🙂 hello world. " * 12)["input_ids"]
    decoded: list[int] = []
    real = tok.decode

    def counting(toks, **kw):
        decoded.append(len(toks))
        return real(toks, **kw)

    tok.decode = counting
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == real(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)
    assert sum(decoded) < 8 * len(ids), (sum(decoded), len(ids))  # quadratic: ~len²/2
    # a continuation that ends inside a character is flushed as it decodes
    stream = TextStream(tok)
    cut = tok("日")["input_ids"][:-1]
    assert "".join(stream.push(t) for t in cut) == ""
    assert stream.flush() == real(cut, skip_special_tokens=True)


# --- issue 25 item 11: genai-folder takes the model's own description -------------------------

#: the fixture as dtr-compile describes a decoder it writes (DECODER_KEY)
FIXTURE_INFO = {"model_type": "qwen2", "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
                "head_size": HEAD_DIM, "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 96,
                "max_position_embeddings": 256, "position_table": None}


def _genai(model: Path, out: Path, *extra: str):
    save_tokenizer(model.parent / "tokenizer")
    return CliRunner().invoke(main, ["genai-folder", str(model), "-o", str(out), *extra])


def _og_greedy(folder: Path, prompt: list[int], new: int) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai")
    params = og.GeneratorParams(og.Model(str(folder)))
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    gen = og.Generator(og.Model(str(folder)), params)
    gen.append_tokens([prompt])
    got: list[int] = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    return got


def test_genai_folder_takes_heads_type_and_context_from_the_model(fixture_onnx,
                                                                  tmp_path: Path) -> None:
    """GQA: 4 query heads over 2 KV heads and hidden size 32, not the KV inputs' 2 and 16; the
    model's type and context length, not llama / 4096; and the folder still decodes."""
    (tmp_path / "src").mkdir()
    model = _with_decoder_info(fixture_onnx["path"], tmp_path / "src" / "tiny.onnx", FIXTURE_INFO)
    res = _genai(model, tmp_path / "genai")
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "genai" / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert (dec["num_attention_heads"], dec["num_key_value_heads"], dec["head_size"],
            dec["hidden_size"]) == (HEADS, KV_HEADS, HEAD_DIM, 32)
    assert cfg["model"]["type"] == "qwen2"
    assert cfg["model"]["context_length"] == 256 == cfg["search"]["max_length"]
    assert _og_greedy(tmp_path / "genai", PROMPTS[0], 24) == greedy_full_recompute(
        fixture_onnx["model"], PROMPTS[0], 24, eos_id=2)


@pytest.mark.parametrize("info, extra, message", [
    ({**FIXTURE_INFO, "position_table": 64}, ["--context-length", "100"],
     r"--context-length 100.*64 positions"),
    (FIXTURE_INFO, ["--model-type", "bert"], r"--model-type bert.*onnxruntime-genai"),
], ids=["beyond-position-table", "unknown-type"])
def test_genai_folder_refuses_what_genai_cannot_run(fixture_onnx, tmp_path: Path, info: dict,
                                                    extra: list[str], message: str) -> None:
    (tmp_path / "src").mkdir()
    model = _with_decoder_info(fixture_onnx["path"], tmp_path / "src" / "tiny.onnx", info)
    res = _genai(model, tmp_path / "genai", *extra)
    assert res.exit_code == 2, (res.output, res.exception)
    assert re.search(message, res.stderr), res.stderr
    assert not (tmp_path / "genai").exists()


def test_genai_config_types_and_context_defaults(fixture_onnx, tmp_path: Path) -> None:
    from dtr_compile.runtime.genai_config import genai_config

    gpt2 = _with_decoder_info(fixture_onnx["path"], tmp_path / "gpt2.onnx",
                              {**FIXTURE_INFO, "model_type": "gpt2", "position_table": 64})
    cfg = genai_config(gpt2)
    # onnxruntime-genai's gpt2 type expects its own builder's inputs: the generic decoder type
    assert cfg["model"]["type"] == "decoder" and cfg["model"]["context_length"] == 64
    notes: list[str] = []
    bare = genai_config(fixture_onnx["path"], notes=notes)  # no record: said, not hidden
    assert bare["model"]["decoder"]["num_attention_heads"] == KV_HEADS
    assert any("num_attention_heads" in n and "not recorded" in n for n in notes), notes


def test_genai_config_of_an_all_linear_decoder_needs_the_record(fixture_onnx) -> None:
    """Without a KV cache the head size and KV heads are nowhere in the inputs: from the record,
    else refused (genai refuses nulls; this used to write them and exit 0)."""
    from dtr_compile.runtime.genai_config import genai_config
    from dtr_compile.runtime.generate import Signature, StateSpec

    rec = StateSpec("past.0.recurrent", "present.0.recurrent", 0, "recurrent", "recurrent",
                    np.float32, (None, HEADS, HEAD_DIM, HEAD_DIM + 1))
    sig = Signature("input_ids", "attention_mask", "logits", (rec,))
    with pytest.raises(InputError, match="no KV cache and no record"):
        genai_config(fixture_onnx["path"], sig=sig, info={})
    cfg = genai_config(fixture_onnx["path"], sig=sig, info=FIXTURE_INFO)["model"]
    assert (cfg["decoder"]["head_size"], cfg["decoder"]["num_key_value_heads"],
            cfg["decoder"]["num_attention_heads"]) == (HEAD_DIM, KV_HEADS, HEADS)
    assert cfg["decoder"]["layer_types"] == ["linear_attention"]


@pytest.mark.slow  # two stateful exports of a tiny Llama: minutes on a loaded machine
@pytest.mark.parametrize("linear", [(1,), (0, 1, 2)], ids=["one-linear", "all-linear"])
def test_genai_folder_of_a_compiled_llama_decoder_runs_in_onnxruntime_genai(tmp_path: Path,
                                                                            linear) -> None:
    """A tiny random Llama (GQA: 4 heads over 2 KV heads) through the compiler's decoder path
    (make_stateful, export with its record): the genai folder loads in onnxruntime_genai.Model
    and its greedy continuation equals our runner's, KV + recurrent and all-linear alike."""
    from dtr_compile.exporters.stateful import decoder_metadata, export_stateful_onnx
    from dtr_compile.passes.stateful import make_stateful
    from tests.test_stateful import _captured, _students

    gm, scan = _captured("llama")
    students = _students(scan, 0, linear)
    sg = make_stateful(gm, scan.sites, students, rejected=scan.rejected)
    (tmp_path / "src").mkdir()
    path = export_stateful_onnx(sg, tmp_path / "src" / "hybrid.decoder.onnx",
                                metadata=decoder_metadata(sg, scan.sites, list(students)))
    res = _genai(path, tmp_path / "genai")
    assert res.exit_code == 0, res.output
    dec = json.loads((tmp_path / "genai" / "genai_config.json").read_text())["model"]["decoder"]
    assert (dec["num_attention_heads"], dec["num_key_value_heads"], dec["hidden_size"]) == (
        4, 2, 32)
    ours = Generator(path).generate(PROMPTS[0], 16, eos_token_id=2).tokens[0]
    assert _og_greedy(tmp_path / "genai", PROMPTS[0], 16)[:len(ours)] == ours


def test_finished_rows_do_not_advance_their_positions(fixture_onnx, tmp_path: Path) -> None:
    """A row that stopped (EOS, max_positions) keeps riding the batch on pad tokens; they are
    masked out, so its positions stop growing: past a learned position table's last row they
    would index outside it and fail the whole batch."""
    path = _with_decoder_info(fixture_onnx["path"], tmp_path / "p8.onnx", {"position_table": 8})
    gen = Generator(path, threads=1)
    masks: list[np.ndarray] = []
    step = gen.model.step

    def spy(ids, mask, past):
        masks.append(mask.copy())
        return step(ids, mask, past)

    gen.model.step = spy  # type: ignore[method-assign]
    got = gen.generate([PROMPTS[0], PROMPTS[1]], 10)
    assert got.stopped == ["max_positions"] * 2 and [len(t) for t in got.tokens] == [3, 6]
    assert max(int(m.sum(-1).max()) for m in masks) <= 8  # no row past position 7
    alone = Generator(path, threads=1).generate([PROMPTS[1]], 10)
    assert alone.tokens[0] == got.tokens[1]
