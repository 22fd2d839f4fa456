"""Issue 12, runtime and model checks: `run`, `bench` and `lint-trt` on bad files or data, and the
embedding-bound checks of the compile, give one clear exit-2 error instead of a wrong number,
"TensorRT-ready" or a traceback."""

from __future__ import annotations

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
