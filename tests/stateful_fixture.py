"""A tiny hand-written stateful causal LM and its ONNX export, for the runtime's tests.

It stands in for the stateful decoder the compiler writes (LINEAR_CONTRACT.md), so that the
runner (``dtr_compile.runtime.generate``) and ``bench --decode`` can be tested without it:

* layer 0: softmax attention with RoPE and GQA (H = 4, Hkv = 2, D = 8), KV cache
  ``past_key_values.0.key`` / ``.value`` ``[B, Hkv, P, D]`` → ``present.0.key`` / ``.value``
  ``[B, Hkv, P + t, D]``;
* layer 1: feature-map linear attention (φ = elu + 1), state ``past.1.recurrent`` =
  Σ φ(k)[v, 1]ᵀ ``[B, H, F, D + 1]`` (fp32) → ``present.1.recurrent``.

Positions come from the attention mask (``cumsum(mask) - 1``), so left padding shifts nothing, and
padded keys never enter the KV softmax nor the recurrent state. ``TinyStatefulLM.forward`` with an
empty past over a whole sequence is the full-recompute ground truth.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

VOCAB = 96
HIDDEN = 32
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 8
EOS_ID = 2


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x: [B, H, t, D], pos: [B, t] (int64) → x rotated by its positions (half-split RoPE)."""
    d = x.shape[-1]
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = pos.to(torch.float32)[:, None, :, None] * inv  # [B, 1, t, D/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class TinyStatefulLM(torch.nn.Module):
    """``forward(input_ids [B, t], attention_mask [B, P + t], k0 [B, Hkv, P, D], v0 [B, Hkv, P, D],
    s1 [B, H, D, D + 1]) -> (logits [B, t, V], k0', v0', s1')``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.q = torch.nn.ModuleList([torch.nn.Linear(HIDDEN, HEADS * HEAD_DIM) for _ in range(2)])
        self.k = torch.nn.ModuleList([torch.nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
                                      for _ in range(2)])
        self.v = torch.nn.ModuleList([torch.nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
                                      for _ in range(2)])
        self.o = torch.nn.ModuleList([torch.nn.Linear(HEADS * HEAD_DIM, HIDDEN) for _ in range(2)])
        self.norm = torch.nn.ModuleList([torch.nn.LayerNorm(HIDDEN) for _ in range(3)])
        self.head = torch.nn.Linear(HIDDEN, VOCAB)
        with torch.no_grad():  # sharper logits: greedy ties are unlikely, continuations vary
            self.head.weight.mul_(4.0)

    def _proj(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = h.shape
        q = self.q[i](h).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k[i](h).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v[i](h).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        return q, k, v

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k0: torch.Tensor,
                v0: torch.Tensor, s1: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        t = input_ids.shape[1]
        mask = attention_mask.to(torch.int64)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -t:]  # [B, t]
        valid = mask[:, -t:].to(torch.float32)  # [B, t] the new tokens that are not padding
        h = self.embed(input_ids)
        rep = HEADS // KV_HEADS

        # layer 0: softmax attention over past + new keys
        x = self.norm[0](h)
        q, k, v = self._proj(0, x)
        q, k = _rope(q, pos), _rope(k, pos)
        kk, vv = torch.cat([k0, k], dim=2), torch.cat([v0, v], dim=2)  # [B, Hkv, P + t, D]
        total = kk.shape[2]
        ke, ve = kk.repeat_interleave(rep, dim=1), vv.repeat_interleave(rep, dim=1)
        scores = q @ ke.transpose(-1, -2) / HEAD_DIM ** 0.5  # [B, H, t, P + t]
        qi = torch.arange(t)[:, None] + (total - t)
        ki = torch.arange(total)[None, :]
        allowed = (ki <= qi)[None, None] & (mask[:, None, None, :] > 0)
        scores = scores.masked_fill(~allowed, -1e9)
        att = scores.softmax(-1) @ ve  # [B, H, t, D]
        h = h + self.o[0](att.transpose(1, 2).reshape(h.shape[0], t, HEADS * HEAD_DIM))

        # layer 1: linear attention, state S = Σ φ(k)[v, 1]ᵀ over valid keys
        x = self.norm[1](h)
        q, k, v = self._proj(1, x)
        fq = F.elu(q) + 1.0
        fk = (F.elu(k) + 1.0) * valid[:, None, :, None]
        fk = fk.repeat_interleave(rep, dim=1)  # [B, H, t, F]
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1).repeat_interleave(rep, dim=1)
        causal = torch.ones(t, t).tril()
        a = (fq @ fk.transpose(-1, -2)) * causal  # [B, H, t, t]
        num = a @ v1 + fq @ s1  # [B, H, t, D + 1]
        att = num[..., :-1] / (num[..., -1:] + 1e-6)
        s_new = s1 + fk.transpose(-1, -2) @ v1
        h = h + self.o[1](att.transpose(1, 2).reshape(h.shape[0], t, HEADS * HEAD_DIM))

        logits = self.head(self.norm[2](h))
        return logits, kk, vv, s_new


def empty_state(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k0, v0, s1) of an empty past (P = 0)."""
    return (torch.zeros(batch, KV_HEADS, 0, HEAD_DIM), torch.zeros(batch, KV_HEADS, 0, HEAD_DIM),
            torch.zeros(batch, HEADS, HEAD_DIM, HEAD_DIM + 1))


INPUT_NAMES = ["input_ids", "attention_mask", "past_key_values.0.key",
               "past_key_values.0.value", "past.1.recurrent"]
OUTPUT_NAMES = ["logits", "present.0.key", "present.0.value", "present.1.recurrent"]


def export_stateful(model: TinyStatefulLM, path: str | Path, *, dynamo: bool = False) -> Path:
    """Export ``model`` as a stateful decoder ONNX (dynamic batch, t and P) at ``path``.

    ``dynamo``: torch.onnx.export(dynamo=True) (what the compiler uses; ~1 min here on a loaded
    CPU) instead of the TorchScript exporter (seconds), whose graph the fast tests use.
    """
    b, p, t = 2, 3, 4
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, p + t, dtype=torch.int64)
    k0 = torch.randn(b, KV_HEADS, p, HEAD_DIM, generator=g)
    v0 = torch.randn(b, KV_HEADS, p, HEAD_DIM, generator=g)
    s1 = torch.rand(b, HEADS, HEAD_DIM, HEAD_DIM + 1, generator=g)
    path = Path(path)
    if dynamo:
        dyn = torch.export.Dim.DYNAMIC
        shapes = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 2: dyn}, {0: dyn, 2: dyn},
                  {0: dyn})
        torch.onnx.export(model, (ids, mask, k0, v0, s1), str(path), dynamo=True,
                          input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                          dynamic_shapes=shapes, optimize=True, verbose=False, opset_version=18,
                          external_data=False)
        return path
    axes = {"input_ids": {0: "batch", 1: "t"}, "attention_mask": {0: "batch", 1: "total"},
            "past_key_values.0.key": {0: "batch", 2: "past"},
            "past_key_values.0.value": {0: "batch", 2: "past"}, "past.1.recurrent": {0: "batch"},
            "logits": {0: "batch", 1: "t"}, "present.0.key": {0: "batch", 2: "total"},
            "present.0.value": {0: "batch", 2: "total"}, "present.1.recurrent": {0: "batch"}}
    torch.onnx.export(model, (ids, mask, k0, v0, s1), str(path), dynamo=False,
                      input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, dynamic_axes=axes,
                      opset_version=18)
    return path


def export_prefill_only(model: TinyStatefulLM, path: str | Path) -> Path:
    """Export ``model`` as today's prefill-only ``input_ids, attention_mask → logits`` ONNX."""

    class _Prefill(torch.nn.Module):
        def __init__(self, m: TinyStatefulLM) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            k0, v0, s1 = empty_state(input_ids.shape[0])
            return self.m(input_ids, attention_mask, k0, v0, s1)[0]

    ids = torch.randint(3, VOCAB, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "t"}, "attention_mask": {0: "batch", 1: "t"},
            "logits": {0: "batch", 1: "t"}}
    torch.onnx.export(_Prefill(model).eval(), (ids, mask), str(path), dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes=axes, opset_version=18)
    return Path(path)


@torch.no_grad()
def greedy_full_recompute(model: TinyStatefulLM, prompt: list[int], n: int,
                          eos_id: int | None = None) -> list[int]:
    """Greedy continuation of ``prompt`` by ``n`` tokens, re-running the whole sequence each step."""
    seq = list(prompt)
    out: list[int] = []
    for _ in range(n):
        ids = torch.tensor([seq])
        logits = model(ids, torch.ones_like(ids), *empty_state(1))[0]
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        seq.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
    return out


def save_tokenizer(folder: str | Path) -> Path:
    """A word-level Hugging Face tokenizer of the fixture's vocabulary (``w3`` … ``w95``, with
    ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2 = EOS) saved to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": EOS_ID, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>")
    fast.save_pretrained(str(folder))
    return Path(folder)


def save_byte_tokenizer(folder: str | Path) -> Path:
    """A byte-level BPE tokenizer (GPT-2 style, ids < ``VOCAB``) trained offline on a few lines
    with multi-byte characters (ä, é, 日本, 🙂), ``<|endoftext|>`` = 0 = EOS, saved to ``folder``:
    one character can span several tokens, as with real decoders' tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["Grüße aus Köln, naïve café — 日本語 🙂 hello world."] * 20  # 39 distinct bytes
    trainer = trainers.BpeTrainer(vocab_size=48, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=[])  # 8 merges: most characters stay split
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(str(folder))
    return Path(folder)
