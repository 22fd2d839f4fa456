"""Gated linear attention (GLA; Yang et al. 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training"), the student kind ``gla``.

Recurrence, per head, with a per-head scalar data-dependent decay ``α_t ∈ (0, 1)``::

    S_t = α_t S_{t−1} + k_t v_tᵀ,    o_t = S_tᵀ q_t,    out_t = RMSNorm_h(o_t) · g_h

``S: [Dk, Dv]``. This is GLA's ``diag(α_t)`` with all ``Dk`` entries equal (the form of RetNet,
Mamba-2 and Gated DeltaNet): a scalar decay keeps every exponent of the chunked form ``<= 0``
(no per-dimension ``exp(−G)`` rescaling that overflows at fast decays, hence no secondary
chunking) and it maps onto ONNX ``LinearAttention``'s ``gated`` rule. ``α_t = σ(w_h·v_t + b_h)``
(:class:`~dtr_compile.linear.recurrence.HeadGate`: from the site's own values, so it works for
site and block targets), constructed data-independent with slow decays
(:func:`~dtr_compile.linear.recurrence.slow_decay_bias`); distillation then starts each head's
decay from the teacher's attention distance (:meth:`~dtr_compile.linear.recurrence.
MatrixStateStudent.init_from_teacher`). ``q`` is the teacher's query times the
site's softmax scale, ``k, v`` the teacher's; the output RMS norm (GLA's own) fixes the scale
that softmax's normalisation gave.

Forms: :func:`gla_chunked` (prefill/training, export), :func:`gla_recurrent` (decode) and the fp64
sequential reference :func:`naive_gla`; :class:`GatedLinearAttention` is the student.
"""

from __future__ import annotations

import torch

from dtr_compile.linear.recurrence import (
    HeadGate,
    MatrixStateStudent,
    chunked_recurrence,
    log_sigmoid,
    naive_recurrence,
    recurrent_steps,
    slow_decay_bias,
)

__all__ = ["GatedLinearAttention", "gla_chunked", "gla_recurrent", "naive_gla"]


def gla_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor, *,
                chunk_size: int = 64, initial_state: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked GLA. q, k: [B, H, T, Dk]; v: [B, H, T, Dv]; log_alpha: [B, H, T] (<= 0);
    initial_state: [B, H, Dk, Dv] or None → ``(o: [B, H, T, Dv], S_T: [B, H, Dk, Dv])``, fp32."""
    return chunked_recurrence(q, k, v, log_alpha, None, chunk_size=chunk_size,
                              initial_state=initial_state)


def gla_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                  state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token GLA from ``state: [B, H, Dk, Dv]``; shapes as :func:`gla_chunked`."""
    return recurrent_steps(q, k, v, log_alpha, None, state)


def naive_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
              initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential fp64 reference of :func:`gla_chunked` (returns fp32)."""
    return naive_recurrence(q, k, v, log_alpha, None, initial_state)


class GatedLinearAttention(MatrixStateStudent):
    """The ``gla`` student of one causal site: ``(q, k, v[, mask]) → [B, H, T, Dv]``.

    Args:
        num_heads, num_kv_heads, head_dim, head_dim_v: ``H``, ``Hkv``, ``Dk``, ``Dv``.
        mask_kind: the site's mask kind (read as a key padding mask).
        causal: must be True (ValueError otherwise).
        scale: the site's softmax scale, applied to ``q``.
        chunk_size: ``C`` of the chunked form.
        window: ``W > 0`` adds exact softmax over the last ``W`` keys beside the state, which
            then holds the keys before them (:class:`~dtr_compile.linear.recurrence.
            MatrixStateStudent`).

    Parameters: ``gate.weight [H, Dv] = 0``, ``gate.bias [H]`` (slow decays),
    ``norm.weight [H, Dv] = 1``.
    """

    kind = "gla"
    update_rule = "gated"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, head_dim_v: int,
                 **kwargs: object) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, head_dim_v, **kwargs)  # type: ignore[arg-type]
        self.gate = HeadGate(num_heads, head_dim_v, slow_decay_bias(num_heads))

    def _inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        m = valid[:, None, :]  # [B|1, 1, t]
        log_alpha = log_sigmoid(self.gate(v)) * m  # [B, H, t]
        return q.float() * self.scale, k.float() * m[..., None], log_alpha, None
