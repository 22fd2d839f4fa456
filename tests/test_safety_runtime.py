"""Issue 12, runtime and model checks: `run`, `bench` and `lint-trt` on bad files or data, and the
embedding-bound checks of the compile, give one clear exit-2 error instead of a wrong number,
"TensorRT-ready" or a traceback."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dtr_compile.capture import capture, check_index_ranges, index_bounds
from dtr_compile.cli import main
from dtr_compile.errors import InputError
from dtr_compile.exporters.onnx import export_onnx
from dtr_compile.load import LoadedModel
from dtr_compile.runtime.evaluate import evaluate_onnx

from . import model_matrix
from .conftest import TinyClassifier, make_token_data

DIMS = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("safety_runtime")
    model = TinyClassifier(layers=1).eval()
    data = make_token_data(30, 12, seed=3, labels_from=model)  # labels: the model's argmax
    torch.save(data, d / "data.pt")
    path = export_onnx(model, {k: v[:2] for k, v in data.items() if k != "labels"},
                       ["input_ids", "attention_mask"], DIMS, d / "tiny.onnx",
                       axis_ranges={"sequence": (2, 64)})
    return {"data": data, "path": path, "dir": d}


def _save(tiny: dict[str, object], name: str, **changes: torch.Tensor) -> Path:
    data = dict(tiny["data"]) | changes  # type: ignore[call-overload]
    p = Path(tiny["dir"]) / name  # type: ignore[arg-type]
    torch.save(data, p)
    return p


def test_labels_n_by_1_give_the_right_accuracy(tiny) -> None:
    base = evaluate_onnx(tiny["path"], Path(tiny["dir"]) / "data.pt", metric="accuracy")
    assert base.value == 1.0
    p = _save(tiny, "labels_n1.pt", labels=tiny["data"]["labels"][:, None])
    assert evaluate_onnx(tiny["path"], p, metric="accuracy").value == 1.0  # squeezed, not [N, N]


def test_out_of_range_labels_exit_2(tiny) -> None:
    labels = tiny["data"]["labels"].clone()
    labels[7] = 4  # 4 classes: 0..3
    p = _save(tiny, "labels_oor.pt", labels=labels)
    res = CliRunner().invoke(main, ["run", str(tiny["path"]), "--data", str(p),
                                    "--no-progress"])
    assert res.exit_code == 2, res.output
    assert "label 4 at row 7" in res.output and "[0, 4)" in res.output


def test_run_refuses_fractional_ids_and_masks(tiny) -> None:
    ids = tiny["data"]["input_ids"].float()
    p = _save(tiny, "float_ids.pt", input_ids=ids)
    # whole-number floats are exact after the cast: the same result as the integers
    assert evaluate_onnx(tiny["path"], p, metric="accuracy").value == 1.0
    p = _save(tiny, "frac_ids.pt", input_ids=ids + 0.3)
    with pytest.raises(InputError, match="input 'input_ids' .*non-integer value"):
        evaluate_onnx(tiny["path"], p, metric="accuracy")
    mask = tiny["data"]["attention_mask"].float() * 0.5
    p = _save(tiny, "frac_mask.pt", attention_mask=mask)
    res = CliRunner().invoke(main, ["run", str(tiny["path"]), "--data", str(p), "--no-progress"])
    assert res.exit_code == 2 and "'attention_mask'" in res.output, res.output


def test_run_refuses_out_of_vocabulary_ids(tiny) -> None:
    ids = tiny["data"]["input_ids"].clone()
    ids[9, 2] = 128  # vocabulary [0, 128)
    p = _save(tiny, "oov.pt", input_ids=ids)
    with pytest.raises(InputError, match=r"'input_ids' holds the id 128 at row 9.*\[0, 128\)"):
        evaluate_onnx(tiny["path"], p, metric="accuracy")
    ids[9, 2] = -1
    p = _save(tiny, "neg.pt", input_ids=ids)
    with pytest.raises(InputError, match="id -1 at row 9"):
        evaluate_onnx(tiny["path"], p, metric="accuracy")


@pytest.mark.parametrize("content", [b"", b"garbage bytes, not protobuf", b"\x08\x07"])
def test_lint_trt_and_bench_refuse_bad_onnx(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    runner = CliRunner()
    res = runner.invoke(main, ["lint-trt", str(p)])
    assert res.exit_code == 2 and "TensorRT-ready" not in res.output, res.output
    assert "bad.onnx" in res.output
    res = runner.invoke(main, ["bench", str(p), "--no-memory", "--repeats", "1"])
    assert res.exit_code == 2 and "bad.onnx" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


def test_bench_missing_model_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["bench", str(tmp_path / "nope.onnx"), "--no-memory"])
    assert res.exit_code == 2 and "not found" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


# --- embedding bounds in the compile's data check -------------------------------------------


@pytest.fixture(scope="module")
def nanogpt() -> object:
    case = next(c for c in model_matrix.custom_cases() if c.name == "nanogpt-flash")
    return capture(LoadedModel("nanogpt", "pickle", module=case.build()), case.inputs())


def test_index_bounds_of_token_and_position_tables(nanogpt) -> None:
    assert index_bounds(nanogpt.gm) == {"input_ids": model_matrix.VOCAB, "<positions>": 64}


def test_out_of_vocabulary_and_too_long_sequences_are_named(nanogpt) -> None:
    ids = torch.randint(0, model_matrix.VOCAB, (5, 16), generator=torch.Generator().manual_seed(0))
    check_index_ranges(nanogpt, {"input_ids": ids}, "val.pt")
    bad = ids.clone()
    bad[3, 4] = model_matrix.VOCAB
    with pytest.raises(InputError, match=rf"'input_ids' holds the id {model_matrix.VOCAB} at "
                                         rf"row 3, outside .*\[0, {model_matrix.VOCAB}\)"):
        check_index_ranges(nanogpt, {"input_ids": bad}, "val.pt")
    bad[3, 4] = -5
    bad[4, 0] = -1
    with pytest.raises(InputError, match=r"id -5 at row 3 \(and 1 more rows\)"):
        check_index_ranges(nanogpt, {"input_ids": bad}, "val.pt")
    long = torch.randint(0, model_matrix.VOCAB, (2, 65))
    with pytest.raises(InputError, match="sequence length 65 .*beyond the model's 64 learned"):
        check_index_ranges(nanogpt, {"input_ids": long}, "val.pt")


# --- side commands never write over their inputs (issue 25 items 2 and 16) ------------------


def _side(tiny, tmp_path: Path) -> dict[str, Path]:
    """Private copies of the tiny ONNX (twice: a model and a --reference) and its data."""
    import shutil

    d = tmp_path / "side"
    d.mkdir()
    shutil.copy(tiny["path"], d / "m.onnx")
    shutil.copy(tiny["path"], d / "ref.onnx")
    shutil.copy(Path(tiny["dir"]) / "data.pt", d / "data.pt")
    (d / "m.onnx.data").write_bytes(b"weights of m.onnx")  # as if it had external data
    return {"dir": d, "model": d / "m.onnx", "ref": d / "ref.onnx", "data": d / "data.pt",
            "weights": d / "m.onnx.data"}


def _digests(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


@pytest.mark.parametrize("command, target", [
    ("run", "model"), ("run", "weights"), ("run", "data"), ("run", "ref"),
    ("lint-trt", "model"), ("lint-trt", "weights"), ("bench", "model"), ("bench", "ref"),
])
def test_json_of_a_side_command_is_never_one_of_its_inputs(tiny, tmp_path: Path, command: str,
                                                           target: str) -> None:
    """Issue 25 item 2: `--json X` where X is the model, its NAME.data, the data or the
    --reference is refused (exit 2) before anything runs; every input is left as it was."""
    f = _side(tiny, tmp_path)
    args = {"run": ["run", str(f["model"]), "--data", str(f["data"]), "--reference",
                    str(f["ref"]), "--metric", "agreement"],
            "lint-trt": ["lint-trt", str(f["model"])],
            "bench": ["bench", str(f["model"]), str(f["ref"]), "--seq", "8", "--repeats", "1",
                      "--warmup", "0", "--no-memory"]}[command]
    before = _digests(f["dir"])
    res = CliRunner().invoke(main, [*args, "--json", str(f[target])])
    assert res.exit_code == 2, res.output
    assert "--json" in res.output and "own input" in res.output, res.output
    assert _digests(f["dir"]) == before


@pytest.mark.parametrize("where", ["folder", "fifo", "proc", "sys"])
def test_json_path_that_cannot_hold_a_file_is_exit_2(tiny, tmp_path: Path, where: str) -> None:
    """Issue 25 item 16: `--json` at a folder, a FIFO (a device: a rename would replace it), or
    under /proc or /sys is one exit-2 line, not an internal error."""
    f = _side(tiny, tmp_path)
    target = {"folder": f["dir"], "fifo": tmp_path / "fifo", "proc": Path("/proc/dtr.json"),
              "sys": Path("/sys/kernel/dtr.json")}[where]
    if where == "fifo":
        os.mkfifo(target)
    res = CliRunner().invoke(main, ["lint-trt", str(f["model"]), "--json", str(target)])
    assert res.exit_code == 2, res.output
    assert "internal error" not in res.output and str(target) in res.output, res.output
    if where == "fifo":
        assert stat.S_ISFIFO(target.stat().st_mode)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny stateful decoder ONNX with a tokenizer folder beside it."""
    from .stateful_fixture import TinyStatefulLM, export_stateful, save_tokenizer

    d = tmp_path_factory.mktemp("genai_safety")
    path = export_stateful(TinyStatefulLM().eval(), d / "model.onnx")
    save_tokenizer(d / "tokenizer")
    return path


def test_genai_folder_never_replaces_its_own_input(decoder: Path, tmp_path: Path) -> None:
    """Issue 25 item 2: `genai-folder DIR/model.onnx -o DIR` would write DIR/model.onnx over
    the decoder it reads: exit 2, the folder as it was."""
    import shutil

    d = tmp_path / "dir"
    shutil.copytree(decoder.parent, d)
    before = _digests(d)
    res = CliRunner().invoke(main, ["genai-folder", str(d / "model.onnx"), "-o", str(d)])
    assert res.exit_code == 2 and "own input" in res.output, res.output
    assert _digests(d) == before


@pytest.mark.parametrize("case", ["output-is-a-file", "missing-model"])
def test_genai_folder_bad_paths_are_exit_2(decoder: Path, tmp_path: Path, case: str) -> None:
    """Issue 25 item 16: `genai-folder -o` an existing file, or a missing model: one line,
    exit 2, nothing written."""
    out = tmp_path / "out"
    model = decoder
    if case == "output-is-a-file":
        out.write_text("mine")
    else:
        model = tmp_path / "nope.onnx"
    for tok in (["--tokenizer", str(decoder.parent / "tokenizer")], []):
        res = CliRunner().invoke(main, ["genai-folder", str(model), *tok, "-o", str(out)])
        assert res.exit_code == 2, res.output
        assert "internal error" not in res.output and len(res.output.strip().splitlines()) == 1
        assert ("is a file" if case == "output-is-a-file" else "not found") in res.output
        assert (out.read_text() == "mine") if case == "output-is-a-file" else not out.exists()


def test_genai_folder_from_a_genai_folder_writes_its_own_config(decoder: Path,
                                                                tmp_path: Path) -> None:
    """The tokenizer found beside a genai folder's model.onnx is that folder: its model and
    genai_config.json are not tokenizer files, so they never replace the new folder's own."""
    import json

    first, second = tmp_path / "first", tmp_path / "second"
    res = CliRunner().invoke(main, ["genai-folder", str(decoder), "-o", str(first)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["genai-folder", str(first / "model.onnx"), "-o", str(second),
                                    "--context-length", "128"])
    assert res.exit_code == 0, res.output
    config = json.loads((second / "genai_config.json").read_text())
    assert config["model"]["context_length"] == 128
    assert (second / "tokenizer.json").is_file()


def test_json_of_a_side_command_waits_for_no_one(tiny, tmp_path: Path) -> None:
    """A compile writing X (its report) holds X's artifact lock: `lint-trt --json X` exits 2
    instead of replacing it mid-run; once released, it writes."""
    from dtr_compile.fileio import OutputLock, artifact_lock_path

    f = _side(tiny, tmp_path)
    target = tmp_path / "h.report.json"
    with OutputLock(artifact_lock_path(target)):
        res = CliRunner().invoke(main, ["lint-trt", str(f["model"]), "--json", str(target)])
        assert res.exit_code == 2 and "another dtr-compile run" in res.output, res.output
        assert not target.exists()
    res = CliRunner().invoke(main, ["lint-trt", str(f["model"]), "--json", str(target)])
    assert res.exit_code == 0 and target.is_file(), res.output
    assert not artifact_lock_path(target).exists()


def test_genai_folder_never_copies_a_link_out_of_the_tokenizer_folder(decoder: Path,
                                                                     tmp_path: Path) -> None:
    """A tokenizer folder whose file links to a private file elsewhere: exit 2, nothing
    written (the genai folder is shipped as is)."""
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(decoder.parent / "tokenizer", tok)
    (tmp_path / "secret").write_text("PRIVATE")
    (tok / "README.md").symlink_to(tmp_path / "secret")  # every file of the folder is copied
    res = CliRunner().invoke(main, ["genai-folder", str(decoder), "--tokenizer", str(tok),
                                    "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "is a link to" in res.output, res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [["--seq", "100000000000000000000", "--extend-positions"],
                                   ["--decode", "--context", "100000000000000000000"]])
def test_bench_lengths_beyond_any_timing_are_exit_2(tiny, decoder: Path,
                                                   flags: list[str]) -> None:
    """As --deploy-seq: a length whose inputs cannot be allocated is one exit-2 line before
    anything is timed, not an internal error (or an allocation of the machine's memory)."""
    model = decoder if "--decode" in flags else tiny["path"]
    res = CliRunner().invoke(main, ["bench", str(model), "--no-memory", *flags])
    assert res.exit_code == 2 and "beyond what can be timed" in res.output, res.output
