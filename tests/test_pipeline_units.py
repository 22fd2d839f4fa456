"""Pipeline behaviour that the CLI tests do not reach: unsupported site layouts."""

from __future__ import annotations

import pytest
import torch

from dtr_compile.config import CompileConfig
from dtr_compile.errors import NoAttentionError
from dtr_compile.pipeline import compile_model

from .model_matrix import TorchMHA


def test_bh_layout_sites_are_reported_not_crashed(tmp_path) -> None:
    torch.manual_seed(0)
    model = TorchMHA().eval()
    ids = torch.randint(3, 50, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 7:] = 0
    b, s = torch.export.Dim("batch"), torch.export.Dim("sequence", max=64)
    prog = torch.export.export(model, (ids[:2], mask[:2]), dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}))
    torch.export.save(prog, tmp_path / "mha.pt2")
    torch.save({"input_ids": ids, "attention_mask": mask}, tmp_path / "val.pt")
    cfg = CompileConfig(model=str(tmp_path / "mha.pt2"), output=str(tmp_path / "h.onnx"),
                        data=str(tmp_path / "val.pt"), metric="mse", progress=False)
    with pytest.raises(NoAttentionError, match=r"layout \(BH\)TD"):
        compile_model(cfg)
    assert not (tmp_path / "h.onnx").exists()
