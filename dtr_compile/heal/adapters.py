"""Low-rank adapters (LoRA) on what a linear site reads and writes: its q, k, v and output.

A site sees the teacher's projections after RoPE (``q: [B, H, T, Dk]``, ``k, v: [B, Hkv, S, D]``)
and hands its output ``[B, H, T, Dv]`` to the output projection. :class:`AdaptedStudent` wraps a
student and adds a rank-``r`` update to each of the four, per token over all heads at once::

    x ← x + s · (x A) B         x: [B, T, Hx·D] (heads side by side),  A: [Hx·D, r],  B: [r, Hx·D]

(Hu et al., "LoRA", ICLR 2022, eq. 3; LoLCATs, Zhang et al. 2025, §3.2, puts rank-8 LoRA on
q/k/v/o after attention transfer). ``B`` starts at zero, so an adapted student starts as the
student itself, bit for bit. On ``v`` and the output the update equals LoRA on the teacher's
``v_proj`` / ``o_proj`` (``(I + s·AB)ᵀ`` composed with a linear map is a rank-``r`` change of
it); on ``q`` and ``k`` it acts after RoPE (a position-independent map on rotated vectors, not a
change of ``q_proj``). The teacher's own weights never change: the adapters belong to the
student, so they export with it in every form (the prefill ONNX, and the stateful decoder, since
the update is per token and :meth:`AdaptedStudent.forward_stateful` applies it to the new tokens
before the student's own recurrence, and its window stores the adapted keys).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dtr_compile.linear.base import LinearStudent

#: LoRA's ``s = α / r``; LoLCATs uses α = 16 at r = 8.
DEFAULT_ALPHA_PER_RANK = 2.0


class LowRankAdapter(nn.Module):
    """``x: [B, Hx, T, D] → x + s·(x A) B`` over the flattened heads (module docstring).

    Args:
        heads: ``Hx``.
        dim: ``D``.
        rank: ``r >= 1``.
        scale: ``s``.
        seed: ``A``'s initialisation (Kaiming-uniform, as PEFT's LoRA) is drawn from this seed,
            so that the same site and seed always give the same adapter.
    """

    def __init__(self, heads: int, dim: int, rank: int, *, scale: float = DEFAULT_ALPHA_PER_RANK,
                 seed: int = 0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {rank}")
        self.heads, self.dim, self.rank, self.scale = heads, dim, rank, scale
        width = heads * dim
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(width)  # kaiming_uniform_(a=√5) on a [r, width] weight
        self.down = nn.Parameter((torch.rand(width, rank, generator=gen) * 2 - 1) * bound)
        self.up = nn.Parameter(torch.zeros(rank, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[0], x.shape[2]
        flat = x.transpose(1, 2).reshape(b, t, self.heads * self.dim)  # [B, T, Hx·D]
        delta = torch.matmul(torch.matmul(flat.float(), self.down), self.up) * self.scale
        delta = delta.reshape(b, t, self.heads, self.dim).transpose(1, 2)  # [B, Hx, T, D]
        return x + delta.to(x.dtype)


class AdaptedStudent(LinearStudent):
    """A student with :class:`LowRankAdapter` s on its q, k, v and output (module docstring).

    Args:
        inner: the student (any :class:`LinearStudent`).
        head_dim / head_dim_v: ``Dk`` / ``Dv`` of the site.
        rank: the adapters' rank.
        seed: seeds of the four adapters' initialisations derive from it.
    """

    def __init__(self, inner: LinearStudent, *, head_dim: int, head_dim_v: int, rank: int,
                 seed: int = 0) -> None:
        super().__init__()
        self.inner = inner
        self.num_heads, self.num_kv_heads = inner.num_heads, inner.num_kv_heads
        self.causal, self.window = inner.causal, inner.window
        h, hkv = inner.num_heads, inner.num_kv_heads
        self.adapt_q = LowRankAdapter(h, head_dim, rank, seed=seed * 4 + 0)
        self.adapt_k = LowRankAdapter(hkv, head_dim, rank, seed=seed * 4 + 1)
        self.adapt_v = LowRankAdapter(hkv, head_dim_v, rank, seed=seed * 4 + 2)
        self.adapt_o = LowRankAdapter(h, head_dim_v, rank, seed=seed * 4 + 3)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """q: [B, H, T, Dk], k: [B, Hkv, S, Dk], v: [B, Hkv, S, Dv], mask as the site's
        → [B, H, T, Dv]."""
        out = self.inner(self.adapt_q(q), self.adapt_k(k), self.adapt_v(v), mask)
        return self.adapt_o(out)

    def state_names(self) -> tuple[str, ...]:
        return self.inner.state_names()

    def init_state(self, batch: int, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | None = None) -> dict[str, torch.Tensor]:
        return self.inner.init_state(batch, dtype=dtype, device=device)

    def one_form(self) -> bool:
        return self.inner.one_form()

    def forward_stateful(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         key_valid: torch.Tensor | None, state: dict[str, torch.Tensor],
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The inner student's stateful form on the adapted new tokens (shapes as
        :meth:`LinearStudent.forward_stateful`)."""
        out, new = self.inner.forward_stateful(self.adapt_q(q), self.adapt_k(k), self.adapt_v(v),
                                               key_valid, state)
        return self.adapt_o(out), new


def adapt(student: nn.Module, *, head_dim: int, head_dim_v: int, rank: int,
          seed: int) -> nn.Module:
    """``student`` with adapters of ``rank`` (itself when ``rank == 0``, when it has them
    already, or when it is not a :class:`LinearStudent`: a whole-block student trains its own
    q/k/v/o weights instead)."""
    if rank == 0 or isinstance(student, AdaptedStudent) or not isinstance(student, LinearStudent):
        return student
    return AdaptedStudent(student, head_dim=head_dim, head_dim_v=head_dim_v, rank=rank, seed=seed)
