"""onnxruntime `run` and `bench`: the metric PyTorch gives, synthesised inputs, the benchmark table
and JSON, and lengths beyond a model's position table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from dtr_compile.cli import main
from dtr_compile.errors import InputError
from dtr_compile.exporters.onnx import export_onnx
from dtr_compile.metrics import get_metric
from dtr_compile.runtime.bench import bench, bench_table
from dtr_compile.runtime.evaluate import (
    OnnxModel,
    evaluate_onnx,
    extend_positions,
    position_limit,
    synthesize_inputs,
)

from .conftest import TinyClassifier, make_token_data

DIMS = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A 1-layer tiny BERT classifier (64 positions) as ONNX, and data with random labels (so
    accuracy is far from 0 and 1)."""
    d = tmp_path_factory.mktemp("runtime")
    model = TinyClassifier(layers=1).eval()
    data = make_token_data(40, 16, seed=3)
    data["labels"] = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(0))
    torch.save(data, d / "data.pt")
    path = export_onnx(model, {k: v[:2] for k, v in data.items() if k != "labels"},
                       ["input_ids", "attention_mask"], DIMS, d / "tiny.onnx",
                       axis_ranges={"sequence": (2, 64)})
    return {"model": model, "data": data, "path": path, "data_path": d / "data.pt", "dir": d}


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_run_reproduces_pytorch_metric(tiny_onnx, metric: str) -> None:
    data = tiny_onnx["data"]
    with torch.no_grad():
        logits = tiny_onnx["model"](data["input_ids"], data["attention_mask"])
    ref = get_metric(metric, True)(logits, data["labels"], logits)
    res = evaluate_onnx(tiny_onnx["path"], tiny_onnx["data_path"], metric=metric, batch_size=16)
    assert res.metric == metric and res.rows == 40
    assert res.value == pytest.approx(ref, abs=1e-12)
    assert 0.0 < res.value < 1.0


def test_run_cli_prints_metric_and_json(tiny_onnx, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    res = CliRunner().invoke(main, ["run", str(tiny_onnx["path"]), "--data",
                                    str(tiny_onnx["data_path"]), "--batch-size", "7",
                                    "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("accuracy: ") and "40 rows" in res.output
    assert json.loads(out.read_text())["metric"] == "accuracy"


def test_run_agreement_needs_a_reference(tiny_onnx) -> None:
    with pytest.raises(InputError, match="--reference"):
        evaluate_onnx(tiny_onnx["path"], tiny_onnx["data_path"], metric="agreement")
    res = evaluate_onnx(tiny_onnx["path"], tiny_onnx["data_path"], metric="agreement",
                        reference=tiny_onnx["path"])
    assert res.value == 1.0


def test_run_rejects_data_that_does_not_fit(tiny_onnx, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    torch.save({"input_ids": torch.ones(4, 8, dtype=torch.long)}, bad)
    res = CliRunner().invoke(main, ["run", str(tiny_onnx["path"]), "--data", str(bad)])
    assert res.exit_code == 2 and "attention_mask" in res.output


def test_synthesized_inputs_follow_the_signature(tiny_onnx) -> None:
    model = OnnxModel(tiny_onnx["path"])
    feed = synthesize_inputs(model, 3, 10, seed=1)
    assert feed["input_ids"].shape == (3, 10) and feed["input_ids"].dtype == np.int64
    assert 1 <= feed["input_ids"].min() and feed["input_ids"].max() < 128  # the vocabulary
    assert (feed["attention_mask"] == 1).all()
    assert model.run(feed).shape == (3, 4)


def test_position_table_extension_keeps_the_model(tiny_onnx) -> None:
    proto = onnx.load(str(tiny_onnx["path"]))
    assert position_limit(proto) == 64
    longer = extend_positions(proto, 100)
    assert position_limit(longer) == 100
    path = Path(tiny_onnx["dir"]) / "extended.onnx"
    onnx.save(longer, str(path))
    short = synthesize_inputs(OnnxModel(tiny_onnx["path"]), 2, 32)
    np.testing.assert_allclose(OnnxModel(path).run(short), OnnxModel(tiny_onnx["path"]).run(short),
                               atol=1e-6)  # positions < 64 untouched
    assert OnnxModel(path).run(synthesize_inputs(OnnxModel(path), 1, 100)).shape == (1, 4)


def test_bench_table_json_and_ratios(tiny_onnx, tmp_path: Path) -> None:
    other = tmp_path / "copy.onnx"
    other.write_bytes(Path(tiny_onnx["path"]).read_bytes())
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(main, ["bench", str(tiny_onnx["path"]), str(other), "--seq", "8,16",
                                    "--repeats", "3", "--warmup", "1", "--threads", "1",
                                    "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "B/A time" in res.output and "B/A mem" in res.output and "A = " in res.output
    report = json.loads(out.read_text())
    assert report["seqs"] == [8, 16] and len(report["cells"]) == 4
    for cell in report["cells"]:
        assert cell["latency_ms"] > 0 and len(cell["runs_ms"]) == 3
        assert cell["peak_bytes"] > 0
    assert set(report["ratios"]["8"][str(other)]) == {"latency", "peak_bytes"}


@pytest.mark.parametrize("external", [False, True], ids=["one-file", "external-data"])
def test_bench_says_when_a_length_is_beyond_the_positions(tiny_onnx, tmp_path, external) -> None:
    path = str(tiny_onnx["path"])
    if external:  # the position table lives in NAME.data, beside the model
        path = str(tmp_path / "ext.onnx")
        onnx.save_model(onnx.load(str(tiny_onnx["path"])), path, save_as_external_data=True,
                        location="ext.onnx.data", size_threshold=256)  # as torch.onnx does
        ints = [t for t in onnx.load(path, load_external_data=False).graph.initializer
                if t.data_type == onnx.TensorProto.INT64 and list(t.dims) == [1, 64]]
        assert ints and all(t.data_location == onnx.TensorProto.EXTERNAL for t in ints)
        assert position_limit(onnx.load(path, load_external_data=False), tmp_path) == 64
    plain = bench([path], [16, 128], repeats=1, warmup=1, memory=False)
    cell = plain.cell(path, 128)
    assert cell.latency_ms is None and "beyond the model's 64 positions" in cell.note
    extended = bench([path], [128], repeats=1, warmup=1, memory=False, extend=True)
    cell = extended.cell(path, 128)
    assert cell.latency_ms is not None and cell.extended_positions
    if external:
        return
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(bench_table(extended))
    text = console.export_text()
    assert "random extra position rows" in text
    assert "MiB" not in text and "peak RSS" not in text  # memory=False: no memory columns


def test_bench_rejects_bad_lengths(tiny_onnx) -> None:
    res = CliRunner().invoke(main, ["bench", str(tiny_onnx["path"]), "--seq", "8,x"])
    assert res.exit_code == 2 and "--seq" in res.output


def test_memory_probe_takes_inputs_named_like_savez_arguments(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    from dtr_compile.runtime.bench import measure_peak_bytes

    names = ["file", "allow_pickle"]
    graph = helper.make_graph(
        [helper.make_node("Add", names, ["y"])], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [256, 1024]) for n in names],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256, 1024])])
    path = tmp_path / "add.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal((256, 1024), dtype=np.float32) for n in names}
    assert measure_peak_bytes(path, feed, threads=1) >= 256 * 1024 * 4  # the output, at least


def test_prepacking_is_turned_off_when_the_weights_do_not_fit_twice(tiny_onnx) -> None:
    from dtr_compile.fileio import onnx_weight_bytes
    from dtr_compile.runtime.bench import _without_float_weights, prepack_decision

    full = onnx.load(str(tiny_onnx["path"]))
    weights = onnx_weight_bytes(full)
    bare = _without_float_weights(onnx.load(str(tiny_onnx["path"])))
    assert onnx_weight_bytes(bare) == weights > 0  # counted from shapes, values dropped or not
    protos = {"a": bare, "b": bare}
    assert prepack_decision(protos, 4 * weights) == (True, "")
    assert prepack_decision(protos, None) == (True, "")
    on, why = prepack_decision(protos, 4 * weights - 1)
    assert not on and "prepacking off" in why and "available" in why
    # the timing runs either way, and says how it ran
    path = str(tiny_onnx["path"])
    res = bench([path], [16], repeats=1, warmup=1, memory=False, prepack=False)
    assert res.cell(path, 16).latency_ms > 0 and res.to_dict()["prepack"] is False


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_limits_bound_the_available_memory(tmp_path, version) -> None:
    """A container's memory limit (its cgroup's, or a parent's) counts, not the machine's."""
    from dtr_compile.runtime.bench import _cgroup_room

    root = tmp_path / "cgroup"
    if version == "v1":
        membership, base, files = "4:memory:/job/step\n", root / "memory", (
            "memory.limit_in_bytes", "memory.usage_in_bytes")
        none = str(2**63 - 4096)
    else:
        membership, base, files = "0::/job/step\n", root, ("memory.max", "memory.current")
        none = "max"
    for rel, cap, used in (("job", 3000, 1000), ("job/step", none, 500), ("", none, 9000)):
        d = base / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / files[0]).write_text(f"{cap}\n")
        (d / files[1]).write_text(f"{used}\n")
    (tmp_path / "self").write_text(membership)
    assert _cgroup_room(tmp_path / "self", root) == [2000]  # the parent's limit, less its use
    stat = "total_inactive_file" if version == "v1" else "inactive_file"
    (base / "job" / "memory.stat").write_text(f"anon 700\n{stat} 300\n")
    assert _cgroup_room(tmp_path / "self", root) == [2300]  # page cache it can drop is room
    (tmp_path / "self").write_text("3:cpu:/x\n")
    assert _cgroup_room(tmp_path / "self", root) == []
