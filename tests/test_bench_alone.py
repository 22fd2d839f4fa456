"""Issue 24: every benchmark times each model alone, in a process of its own, several rounds,
median and spread (`bench`, `bench --decode` and so the compile's speed stage); an
onnxruntime-genai folder is timed with genai's own Generator beside our decoders, and the table
says plainly which model is not faster."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dtr_compile.cli import main
from dtr_compile.runtime import alone
from dtr_compile.runtime.bench import bench, split_repeats
from dtr_compile.runtime.bench_decode import bench_decode, decode_table, verdicts
from tests.stateful_fixture import TinyStatefulLM, export_stateful, save_tokenizer


@pytest.fixture(scope="module")
def decoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("alone")
    a = export_stateful(TinyStatefulLM(seed=0), d / "a.onnx")
    b = d / "b.onnx"
    b.write_bytes(a.read_bytes())
    return {"a": a, "b": b, "dir": d}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    """Every :func:`run_alone` call: ``(target, kwargs)``."""
    seen: list[tuple[str, dict]] = []
    real = alone.run_alone

    def spy(target: str, kwargs: dict, **kw: object) -> dict:
        seen.append((target, kwargs))
        return real(target, kwargs, **kw)

    monkeypatch.setattr(alone, "run_alone", spy)
    return seen


def test_run_alone_runs_in_a_fresh_process_and_reports_its_memory() -> None:
    got = alone.run_alone("tests.alone_child:child_info", {"mib": 64})
    assert got["pid"] != os.getpid() and got["held"] == 64 * 2**20
    assert 56 * 2**20 <= got["peak_bytes_added"] < 96 * 2**20  # the ballast, give or take
    from dtr_compile.errors import DtrError

    with pytest.raises(DtrError, match="failed in its own process: .*ZeroDivisionError"):
        alone.run_alone("tests.alone_child:child_fails", {})


def test_split_repeats() -> None:
    assert split_repeats(5, 3) == [2, 2, 1]
    assert split_repeats(2, 3) == [1, 1]
    assert split_repeats(9, 3) == [3, 3, 3]


def test_decode_models_are_timed_alone_in_rotating_rounds(decoders, calls) -> None:
    """One child per model, context and round, each given one model; the order rotates from
    round to round; the figures are medians over all rounds, with each round's median kept."""
    a, b = str(decoders["a"]), str(decoders["b"])
    res = bench_decode([a, b], [16, 48], tokens=9, prefill_repeats=3, rounds=3, warmup=1,
                       max_prefill=16, threads=1)
    assert [(kw["path"], kw["context"]) for _, kw in calls] == [
        (a, 16), (b, 16), (b, 16), (a, 16), (a, 16), (b, 16),
        (a, 48), (b, 48), (b, 48), (a, 48), (a, 48), (b, 48)]
    assert all(t.endswith("bench_decode:time_decode") for t, _ in calls)
    assert [kw["tokens"] for _, kw in calls[:6:2]] == [3, 3, 3]
    assert [kw["prefill_repeats"] for _, kw in calls[:6:2]] == [1, 1, 1]
    for c in res.cells:
        assert len(c.decode_runs_ms) == 9 and len(c.decode_round_ms) == 3
        assert c.decode_spread_ms[0] <= c.decode_ms <= c.decode_spread_ms[1]
        assert c.peak_bytes and c.peak_bytes > 0
        assert (len(c.prefill_runs_ms) == 3) == (c.context == 16)
        assert c.decode_synthesised == (c.context == 48)
    assert res.to_dict()["method"] == "alone" and res.rounds == 3


def test_prefill_bench_times_each_model_alone(decoders, calls) -> None:
    """`bench` (and the compile's speed stage, which calls it): one child per model and round,
    ``repeats`` runs spread over the rounds, the memory from the same child."""
    a = str(decoders["dir"] / "prefill.onnx")
    if not Path(a).exists():
        from tests.stateful_fixture import export_prefill_only

        export_prefill_only(TinyStatefulLM(), a)
    b = str(decoders["dir"] / "prefill-b.onnx")
    Path(b).write_bytes(Path(a).read_bytes())
    res = bench([a, b], [8], repeats=5, rounds=3, warmup=1, threads=1)
    assert len(calls) == 6 and all(t.endswith("bench:time_onnx") for t, _ in calls)
    assert [kw["repeats"] for _, kw in calls] == [2, 2, 2, 2, 1, 1]
    cell = res.cell(a, 8)
    assert len(cell.runs_ms) == 5 and len(cell.round_ms) == 3 and cell.peak_bytes > 0
    assert res.to_dict()["rounds"] == 3


def test_verdicts_say_plainly_who_is_not_faster(decoders) -> None:
    a, b = str(decoders["a"]), str(decoders["b"])
    res = bench_decode([a, b], [16], tokens=4, prefill_repeats=1, rounds=1, warmup=1, threads=1)
    res.cell(a, 16).decode_ms, res.cell(b, 16).decode_ms = 10.0, 12.5
    assert verdicts(res) == ["C=16: B decodes at 12.50 ms/token, NOT faster than A "
                             "(10.00 ms, ×1.25)"]
    res.cell(b, 16).decode_ms = 5.0
    assert verdicts(res) == ["C=16: B decodes at 5.00 ms/token, faster than A (10.00 ms, ×0.50)"]


def test_a_genai_folder_is_timed_with_its_generator_beside_ours(decoders, tmp_path) -> None:
    """A folder with genai_config.json is timed with onnxruntime-genai's Generator (real prefill
    through append_tokens), alone like ours; the CLI table lists it and says who is faster."""
    pytest.importorskip("onnxruntime_genai")
    src = tmp_path / "src"
    src.mkdir()
    (src / "tiny.onnx").write_bytes(decoders["a"].read_bytes())
    save_tokenizer(src / "tokenizer")
    genai = tmp_path / "genai"
    res = CliRunner().invoke(main, ["genai-folder", str(src / "tiny.onnx"), "-o", str(genai),
                                    "--context-length", "256"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "d.json"
    res = CliRunner().invoke(main, ["bench", "--decode", "--context", "16,64", "--tokens", "6",
                                    "--rounds", "2", "--prefill-repeats", "2", "--max-prefill",
                                    "16", "--threads", "1", str(decoders["a"]), str(genai),
                                    "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    cells = {(c["model"], c["context"]): c for c in data["cells"]}
    for ctx in (16, 64):
        g = cells[(str(genai), ctx)]
        assert g["runtime"] == "onnxruntime-genai" and g["decode_ms"] > 0
        assert len(g["decode_runs_ms"]) == 6 and len(g["decode_round_ms"]) == 2
        assert not g["decode_synthesised"]  # genai always decodes from its own prefill
        assert (g["prefill_ms"] is not None) == (ctx <= 16)
        assert g["state_bytes"]["kv"] == cells[(str(decoders["a"]), ctx)]["state_bytes"]["kv"]
    assert "(onnxruntime-genai)" in res.stdout
    assert "each model alone" in res.stdout


def test_genai_context_beyond_the_model_is_a_note_not_a_crash(decoders, tmp_path) -> None:
    pytest.importorskip("onnxruntime_genai")
    src = tmp_path / "src"
    src.mkdir()
    (src / "tiny.onnx").write_bytes(decoders["a"].read_bytes())
    save_tokenizer(src / "tokenizer")
    genai = tmp_path / "genai"
    CliRunner().invoke(main, ["genai-folder", str(src / "tiny.onnx"), "-o", str(genai),
                              "--context-length", "64"])
    res = bench_decode([str(genai)], [128], tokens=2, prefill_repeats=1, rounds=1, warmup=0)
    c = res.cell(str(genai), 128)
    assert c.decode_ms is None and "exceed the model's context_length 64" in c.note
    assert os.path.isdir(genai)
    decode_table(res)  # renders
