"""The model matrix: tiny random-weight backbones built from configs (no downloads).

Every case is small (hidden 32, 2 layers, 4 heads, ``T = 10``, ``B = 2``) so that export, search
and the equivalence check of all of them fit in well under a minute on two CPU cores.
``Case.inputs(t, left_pad)`` builds inputs of any length with padding on either side, so the
rewritten graph can be checked on shapes and masks other than the ones it was captured with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

B, T, C, HEADS, LAYERS, VOCAB = 2, 10, 32, 4, 2, 64


@dataclass(frozen=True)
class Case:
    """One backbone of the matrix.

    Attributes:
        name: test id (``bert-eager``).
        build: makes the model (eval mode, seeded).
        kind: ``"text"`` (input_ids + attention_mask), ``"ids"`` (input_ids only) or
            ``"image"`` (pixel_values).
        layers: attention layers, i.e. the sites that must be found.
        masking: expected :attr:`AttentionSite.masking` of every site with padded inputs.
        kv_heads: expected ``Hkv`` (``HEADS`` unless GQA).
        layout: expected site layout.
    """

    name: str
    build: Callable[[], nn.Module]
    kind: str = "text"
    layers: int = LAYERS
    masking: str = "padding"
    kv_heads: int = HEADS
    layout: str = "BHTD"

    def inputs(self, t: int = T, *, left_pad: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
        """Example inputs ``[B, t]`` (row 1 padded by ``t // 3``) or ``pixel_values``."""
        g = torch.Generator().manual_seed(seed)
        if self.kind == "image":
            return {"pixel_values": torch.randn(B, 3, 16, 16, generator=g)}
        ids = torch.randint(3, VOCAB, (B, t), generator=g)
        if self.kind == "ids":
            return {"input_ids": ids}
        mask = torch.ones(B, t, dtype=torch.long)
        pad = max(1, t // 3)
        if left_pad:
            mask[1, :pad] = 0
        else:
            mask[1, t - pad:] = 0
        return {"input_ids": ids * mask + (1 - mask), "attention_mask": mask}


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return make().eval()

    return build


# --- Hugging Face backbones (transformers 5, random weights) ----------------------------------


def _hf(model_cls: str, config_cls: str, **cfg: object) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import transformers

        config = getattr(transformers, config_cls)(**cfg)
        return getattr(transformers, model_cls)(config)

    return _seeded(make)


def _bert_like(model: str, config: str, impl: str, **extra: object) -> Callable[[], nn.Module]:
    return _hf(model, config, vocab_size=VOCAB, hidden_size=C, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, intermediate_size=2 * C, max_position_embeddings=64,
               attn_implementation=impl, **extra)


def _vit_like(model: str, config: str, impl: str) -> Callable[[], nn.Module]:
    return _hf(model, config, hidden_size=C, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               intermediate_size=2 * C, image_size=16, patch_size=4, attn_implementation=impl)


def hf_cases() -> list[Case]:
    cases = []
    for impl in ("eager", "sdpa"):
        cases += [
            Case(f"bert-{impl}", _bert_like("BertModel", "BertConfig", impl)),
            Case(f"roberta-{impl}", _bert_like("RobertaModel", "RobertaConfig", impl,
                                               pad_token_id=1)),
            Case(f"distilbert-{impl}", _hf("DistilBertModel", "DistilBertConfig", vocab_size=VOCAB,
                                           dim=C, n_layers=LAYERS, n_heads=HEADS,
                                           hidden_dim=2 * C, max_position_embeddings=64,
                                           attn_implementation=impl)),
            Case(f"vit-{impl}", _vit_like("ViTModel", "ViTConfig", impl), kind="image",
                 masking="none"),
            Case(f"deit-{impl}", _vit_like("DeiTModel", "DeiTConfig", impl), kind="image",
                 masking="none"),
            Case(f"gpt2-{impl}", _hf("GPT2Model", "GPT2Config", vocab_size=VOCAB, n_embd=C,
                                     n_layer=LAYERS, n_head=HEADS, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, use_cache=False,
                                     attn_implementation=impl), masking="causal+padding"),
            Case(f"llama-{impl}", _hf("LlamaModel", "LlamaConfig", vocab_size=VOCAB,
                                      hidden_size=C, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, num_key_value_heads=2,
                                      intermediate_size=2 * C, max_position_embeddings=64,
                                      use_cache=False, attn_implementation=impl),
                 masking="causal+padding", kv_heads=2),
        ]
    return cases


# --- hand-written backbones -------------------------------------------------------------------


class TimmAttention(nn.Module):
    """timm's ``Attention`` as ViTs write it: fused qkv linear, ``F.scaled_dot_product_attention``
    (``fused_attn``) or the readable path (``q * scale`` before ``q @ kᵀ``)."""

    def __init__(self, dim: int, num_heads: int, fused_attn: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(0.1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Bx, N, Cx = x.shape
        qkv = self.qkv(x).reshape(Bx, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, D)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)  # (B, H, N, N)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        return self.proj(x.transpose(1, 2).reshape(Bx, N, Cx))


class TimmBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, fused_attn: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = TimmAttention(dim, num_heads, fused_attn)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmViT(nn.Module):
    """A timm-style ViT: 4×4 patches of a 16×16 image, a class token, ``LAYERS`` blocks."""

    def __init__(self, fused_attn: bool = True) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, C, kernel_size=4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, C) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 17, C) * 0.02)
        self.blocks = nn.Sequential(*[TimmBlock(C, HEADS, fused_attn) for _ in range(LAYERS)])
        self.norm = nn.LayerNorm(C)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # (B, 16, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))


class NanoGPTAttention(nn.Module):
    """nanoGPT's ``CausalSelfAttention``: flash (``is_causal=True``) or a ``tril`` buffer with
    ``masked_fill(-inf)``."""

    def __init__(self, n_embd: int, n_head: int, block_size: int, flash: bool) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(0.1)
        self.n_head, self.n_embd, self.flash = n_head, n_embd, flash
        if not flash:
            self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size))
                                 .view(1, 1, block_size, block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Bx, Tx, Cx = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(Bx, Tx, self.n_head, Cx // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(Bx, Tx, self.n_head, Cx // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(Bx, Tx, self.n_head, Cx // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :Tx, :Tx] == 0, float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(Bx, Tx, Cx)
        return self.c_proj(y)


class NanoGPT(nn.Module):
    def __init__(self, flash: bool = True, block_size: int = 64) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, C), nn.Embedding(block_size, C)
        self.h = nn.ModuleList(NanoGPTAttention(C, HEADS, block_size, flash) for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(C)
        self.lm_head = nn.Linear(C, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)
        for block in self.h:
            x = x + block(x)
        return self.lm_head(self.ln_f(x))


class TorchEncoder(nn.Module):
    """``nn.TransformerEncoder`` with a key padding mask from ``attention_mask`` (and a causal
    ``src_mask`` made in ``forward`` when ``causal``)."""

    def __init__(self, causal: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.embed = nn.Embedding(VOCAB, C)
        layer = nn.TransformerEncoderLayer(C, HEADS, 2 * C, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        src_mask = None
        if self.causal:
            src_mask = nn.Transformer.generate_square_subsequent_mask(input_ids.shape[1])
        return self.encoder(self.embed(input_ids), mask=src_mask, is_causal=self.causal,
                            src_key_padding_mask=attention_mask == 0)


class TorchMHA(nn.Module):
    """``nn.MultiheadAttention`` called with its defaults (``need_weights=True``; the weights are
    discarded): the ``bmm``/``baddbmm`` path with ``[B·H, T, D]`` tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, C)
        self.attn = nn.ModuleList(nn.MultiheadAttention(C, HEADS, batch_first=True)
                                  for _ in range(LAYERS))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for mha in self.attn:
            out, _weights = mha(x, x, x, key_padding_mask=attention_mask == 0)
            x = x + out
        return x


def custom_cases() -> list[Case]:
    return [
        Case("timm-vit-fused", _seeded(lambda: TimmViT(fused_attn=True)), kind="image", masking="none"),
        Case("timm-vit-eager", _seeded(lambda: TimmViT(fused_attn=False)), kind="image", masking="none"),
        Case("nanogpt-flash", _seeded(lambda: NanoGPT(flash=True)), kind="ids", masking="causal"),
        Case("nanogpt-eager", _seeded(lambda: NanoGPT(flash=False)), kind="ids", masking="causal"),
        Case("torch-encoder", _seeded(TorchEncoder)),
        Case("torch-encoder-causal", _seeded(lambda: TorchEncoder(causal=True)),
             masking="causal+padding"),
        Case("torch-mha-bmm", _seeded(TorchMHA), layout="(BH)TD"),
    ]


def all_cases() -> list[Case]:
    return hf_cases() + custom_cases()
