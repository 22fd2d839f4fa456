"""DeltaNet and Gated DeltaNet (Yang et al. 2024, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length"; Yang et al. 2025, "Gated Delta Networks"), the student kinds
``deltanet`` and ``gated-deltanet``.

Recurrence, per head, with L2-normalised ``q, k``, a write strength ``β_t ∈ (0, 1)`` and (gated
only) a per-head decay ``α_t ∈ (0, 1)`` (``α = 1`` for DeltaNet)::

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,    o_t = S_tᵀ q_t,
    out_t = RMSNorm_h(o_t) · g_h

The update overwrites the value stored under ``k_t`` instead of adding to it. ``β_t = σ(w·v_t +
b)`` and ``α_t = σ(w'·v_t + b')`` per head (:class:`~dtr_compile.linear.recurrence.HeadGate`,
from the site's own values, so site and block targets work alike), initialised at ``w = 0``,
``β = σ(−1) ≈ 0.27`` (a partial overwrite: the first steps average, as softmax does, more than
they replace) and slow decays at construction; distillation then starts β from the teacher's
attention entropy and the decays from its attention distance (:meth:`~dtr_compile.linear.
recurrence.MatrixStateStudent.init_from_teacher`). The output RMS norm is the layers' own (GDN's output norm).

Forms: :func:`delta_chunked` (WY/UT chunked form, the triangular inverse by blocked doubling,
:func:`~dtr_compile.linear.recurrence.unit_lower_inverse`, so the graph has no Loop),
:func:`delta_recurrent` (decode) and the fp64 sequential reference :func:`naive_delta`;
:class:`DeltaNet` is the student (``gated=True`` for Gated DeltaNet).
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

__all__ = ["DeltaNet", "delta_chunked", "delta_recurrent", "l2_normalise", "naive_delta"]

#: Initial β logit: σ(−1) ≈ 0.27.
BETA_INIT_LOGIT = -1.0


def l2_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(‖x‖² + eps)`` over the last dim, fp32 (a zero vector stays zero)."""
    x = x.float()
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


def delta_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                  log_alpha: torch.Tensor | None = None, *, chunk_size: int = 64,
                  initial_state: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked (gated) delta rule. q, k: [B, H, T, Dk] (normalised by the caller); v: [B, H, T,
    Dv]; beta: [B, H, T]; log_alpha: [B, H, T] or None (DeltaNet); initial_state: [B, H, Dk, Dv]
    or None → ``(o: [B, H, T, Dv], S_T: [B, H, Dk, Dv])``, fp32."""
    g = torch.zeros_like(beta, dtype=torch.float32) if log_alpha is None else log_alpha
    return chunked_recurrence(q, k, v, g, beta, chunk_size=chunk_size, initial_state=initial_state)


def delta_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                    log_alpha: torch.Tensor | None, state: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token (gated) delta rule from ``state: [B, H, Dk, Dv]``."""
    g = torch.zeros_like(beta, dtype=torch.float32) if log_alpha is None else log_alpha
    return recurrent_steps(q, k, v, g, beta, state)


def naive_delta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                log_alpha: torch.Tensor | None = None,
                initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential fp64 reference of :func:`delta_chunked` with the explicit ``(I − β k kᵀ)``."""
    g = torch.zeros_like(beta, dtype=torch.float32) if log_alpha is None else log_alpha
    return naive_recurrence(q, k, v, g, beta, initial_state)


class DeltaNet(MatrixStateStudent):
    """The ``deltanet`` (``gated=False``) / ``gated-deltanet`` student of one causal site.

    Args: as :class:`~dtr_compile.linear.gated.GatedLinearAttention`, plus ``gated``.
    ``scale`` is unused (q and k are L2-normalised). Parameters: ``beta.weight [H, Dv] = 0``,
    ``beta.bias [H] = −1``, (gated) ``gate.weight [H, Dv] = 0``, ``gate.bias [H]`` (slow decays),
    ``norm.weight [H, Dv] = 1``.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, head_dim_v: int, *,
                 gated: bool = False, **kwargs: object) -> None:
        self.kind = "gated-deltanet" if gated else "deltanet"
        self.update_rule = "gated_delta" if gated else "delta"
        super().__init__(num_heads, num_kv_heads, head_dim, head_dim_v, **kwargs)  # type: ignore[arg-type]
        self.gated = gated
        self.beta = HeadGate(num_heads, head_dim_v, torch.full((num_heads,), BETA_INIT_LOGIT))
        if gated:
            self.gate = HeadGate(num_heads, head_dim_v, slow_decay_bias(num_heads))

    def _inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        m = valid[:, None, :]  # [B|1, 1, t]
        beta = torch.sigmoid(self.beta(v)) * m  # [B, H, t]
        if self.gated:
            log_alpha = log_sigmoid(self.gate(v)) * m
        else:
            log_alpha = torch.zeros_like(beta)
        return l2_normalise(q), l2_normalise(k) * m[..., None], log_alpha, beta
