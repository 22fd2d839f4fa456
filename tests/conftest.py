"""Shared fixtures: tiny random-weight models built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from a second thread, and on a loaded machine OpenMP spin-waits
# make them orders of magnitude slower.
torch.set_num_threads(1)


class TinyClassifier(torch.nn.Module):
    """Tiny BERT (random weights) + mean pooling + linear head: ``logits: [B, C]``."""

    def __init__(self, attn_implementation: str = "sdpa", layers: int = 3, classes: int = 4,
                 seed: int = 0) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(seed)
        cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=layers,
                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                         attn_implementation=attn_implementation)
        self.backbone = BertModel(cfg).eval()
        self.head = torch.nn.Linear(32, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1.0))


def make_token_data(n: int, t: int, *, vocab: int = 128, seed: int = 0,
                    labels_from: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Random token ids with right padding of random length; labels from a model if given."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, t), generator=g)
    lengths = torch.randint(max(2, t // 2), t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    data = {"input_ids": ids, "attention_mask": mask}
    if labels_from is not None:
        with torch.no_grad():
            data["labels"] = labels_from(ids, mask).argmax(-1)
    return data


def export_tiny(model: torch.nn.Module, path: str) -> torch.export.ExportedProgram:
    """torch.export ``model`` with dynamic batch and sequence and save it to ``path``."""
    ex = make_token_data(2, 8)
    b, s = torch.export.Dim("batch"), torch.export.Dim("sequence", max=64)
    prog = torch.export.export(model, (ex["input_ids"], ex["attention_mask"]),
                               dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}))
    torch.export.save(prog, path)
    return prog


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny exported classifier with val/test data whose labels are the model's own argmax."""
    d = tmp_path_factory.mktemp("tiny_task")
    model = TinyClassifier().eval()
    export_tiny(model, str(d / "model.pt"))
    torch.save(make_token_data(48, 24, seed=1, labels_from=model), d / "val.pt")
    torch.save(make_token_data(32, 24, seed=2, labels_from=model), d / "test.pt")
    return {"dir": str(d), "model": str(d / "model.pt"), "val": str(d / "val.pt"),
            "test": str(d / "test.pt")}
