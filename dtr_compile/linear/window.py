"""Exact causal softmax over the last ``W`` keys (sliding-window attention), the window that the
matrix-state students (:mod:`~dtr_compile.linear.gated`, :mod:`~dtr_compile.linear.delta`) add
beside their recurrent state with ``--window W``.

Query ``t`` attends keys ``t − W < s <= t`` (``0 <= t − s < W``, the same window as the
feature-map students' LoLCATs form, :func:`~dtr_compile.linear.kernel.
sliding_window_linear_attention`) with the site's softmax scale; padding keys never get weight
and a query whose window holds no real key gets ``0``.

Forms: :func:`sliding_window_attention` (chunked, ``[C, 2C]`` blocks with ``C = max(chunk, W)``:
prefill, training, export), :func:`window_attention_step` (one query against a stored window:
decode) and the fp64 quadratic reference :func:`naive_sliding_window_attention`.
"""

from __future__ import annotations

import torch

from dtr_compile.linear.base import window_terms_step
from dtr_compile.linear.kernel import (
    _MASKED_SCORE,
    _align_keys,
    _chunk,
    _shift_chunks,
    _unchunk,
    _window_masks,
)

__all__ = ["naive_sliding_window_attention", "sliding_window_attention", "window_attention_step"]


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    *,
    window: int,
    scale: float,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Causal softmax attention over the last ``window`` keys, chunked.

    Args:
        q: ``[B, H, T, Dk]``; k: ``[B, H, S, Dk]``; v: ``[B, H, S, Dv]`` (keys aligned top-left,
            as SDPA's ``is_causal``).
        key_valid: ``[B|1, S]``, 1 = a real key, or None.
        window: ``W >= 1``.
        scale: the softmax scale (the site's).
        chunk_size: ``C``; ``max(C, W)`` is used, so a query's window lies in its own chunk and
            the one before.

    Returns:
        ``[B, H, T, Dv]`` fp32. Work and memory ``O(T·C)`` per head, not ``O(T²)``.
    """
    C = max(chunk_size, window)
    T = q.shape[-2]
    valid = (torch.ones_like(k[:1, 0, :, 0], dtype=torch.float32) if key_valid is None
             else key_valid.float())
    k, v = _align_keys(k.float(), T), _align_keys(v.float(), T)
    valid = _align_keys(valid[..., None], T)  # [B|1, T, 1]
    q_c, k_c, v_c = _chunk(q.float(), C), _chunk(k, C), _chunk(v, C)  # [B, H, N, C, D]
    valid_c = _chunk(valid, C).transpose(-1, -2).unsqueeze(1)  # [B|1, 1, N, 1, C]
    k_l = torch.cat([_shift_chunks(k_c, 1), k_c], dim=-2)  # chunks n−1, n: [B, H, N, 2C, Dk]
    v_l = torch.cat([_shift_chunks(v_c, 1), v_c], dim=-2)
    valid_l = torch.cat([_shift_chunks(valid_c, 1), valid_c], dim=-1) > 0  # [B|1, 1, N, 1, 2C]
    in_window, _ = _window_masks(C, window, q.device)  # [C, 2C]
    allowed = in_window & valid_l
    scores = torch.matmul(q_c, k_l.transpose(-1, -2)) * scale  # [B, H, N, C, 2C]
    scores = torch.where(allowed, scores, _MASKED_SCORE)
    a = torch.exp(scores - scores.amax(dim=-1, keepdim=True)) * allowed.float()
    # the row's best key contributes exp(0) = 1, so a row with a real key sums to >= 1; an empty
    # row sums to 0 and gives 0 (clamping at 1 changes nothing else: exact, no eps)
    out = torch.matmul(a, v_l) / a.sum(-1, keepdim=True).clamp_min(1.0)
    return _unchunk(out, T)


def window_attention_step(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, keys_valid: torch.Tensor, *,
    scale: float,
) -> torch.Tensor:
    """One query per row against its whole stored window (decode).

    Args:
        q: ``[B, H, 1, Dk]``; keys: ``[B, Hkv, W, Dk]``; values: ``[B, Hkv, W, Dv]`` — the window
            including the query's own key (``Hkv`` divides ``H``; not repeated); keys_valid:
            ``[B, W]`` (1 = real key).
        scale: the softmax scale.

    Returns:
        ``[B, H, 1, Dv]`` fp32, the terms :func:`sliding_window_attention` forms for that query
        (0 for a window with no real key).
    """
    num_den = window_terms_step(q, keys, values, keys_valid, scale=scale)
    # the row's best key weighs exp(0) = 1: a row with a real key sums to >= 1, an empty one to 0
    return num_den[..., :-1] / num_den[..., -1:].clamp_min(1.0)


def naive_sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None, *,
    window: int, scale: float,
) -> torch.Tensor:
    """Quadratic fp64 reference of :func:`sliding_window_attention` (full ``[B, H, T, S]``
    scores, a plain softmax over the allowed keys); returns fp32."""
    q, k, v = q.double(), k.double(), v.double()
    T, S = q.shape[-2], k.shape[-2]
    dist = torch.arange(T)[:, None] - torch.arange(S)[None, :]  # [T, S], t − s
    valid = torch.ones(1, S, dtype=torch.bool) if key_valid is None else key_valid > 0
    allowed = (dist >= 0) & (dist < window) & valid[:, None, None, :]  # [B|1, 1, T, S]
    scores = torch.where(allowed, (q @ k.transpose(-1, -2)) * scale, -torch.inf)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty row: 0
    return (weights @ v).float()
