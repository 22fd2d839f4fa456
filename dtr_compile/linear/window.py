"""Exact causal softmax over the last ``W`` keys (sliding-window attention), the window that the
matrix-state students (:mod:`~dtr_compile.linear.gated`, :mod:`~dtr_compile.linear.delta`) add
beside their recurrent state with ``--window W``.

Query ``t`` attends keys ``t − W < s <= t`` (``0 <= t − s < W``, the same window as the
feature-map students' LoLCATs form, :func:`~dtr_compile.linear.kernel.
sliding_window_linear_attention`) with the site's softmax scale; padding keys never get weight
and a query whose window holds no real key gets ``0``.

Forms: :func:`sliding_window_attention` / :func:`sliding_window_attention_lse` (chunked, two
``[C, C]`` blocks per chunk with ``C = max(chunk, W)``: prefill, training, export; the second also gives each
query's log-normaliser, which the matrix-state students' output mixing reads),
:func:`window_attention_step` (one query against a stored window: decode) and the fp64
quadratic references :func:`naive_sliding_window_attention` and :func:`naive_window_lse`.
"""

from __future__ import annotations

import torch

from dtr_compile.linear.kernel import (
    _MASKED_SCORE,
    _align_keys,
    _chunk,
    _shift_chunks,
    _unchunk,
    _window_halves,
    _window_masks,
)

__all__ = ["naive_sliding_window_attention", "naive_window_lse", "sliding_window_attention",
           "sliding_window_attention_lse", "window_attention_step"]


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
    """Causal softmax attention over the last ``window`` keys, chunked: the output of
    :func:`sliding_window_attention_lse`."""
    return sliding_window_attention_lse(q, k, v, key_valid, window=window, scale=scale,
                                        chunk_size=chunk_size)[0]


def sliding_window_attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    *,
    window: int,
    scale: float,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention over the last ``window`` keys, chunked, and its log-normaliser.

    Args:
        q: ``[B, H, T, Dk]``; k: ``[B, H, S, Dk]``; v: ``[B, H, S, Dv]`` (keys aligned top-left,
            as SDPA's ``is_causal``).
        key_valid: ``[B|1, S]``, 1 = a real key, or None.
        window: ``W >= 1``.
        scale: the softmax scale (the site's).
        chunk_size: ``C``; ``max(C, W)`` is used, so a query's window lies in its own chunk and
            the one before.

    Returns:
        ``(out: [B, H, T, Dv], lse: [B, H, T])`` fp32: ``lse`` is each query's
        ``log Σ_s exp(q·k_s·scale)`` over its window's real keys (about ``−1e4`` when there is
        none: finite, so a gate ``σ(lse − c)`` closes there instead of giving NaN). Work and
        memory ``O(T·C)`` per head, not ``O(T²)``.
    """
    C = max(chunk_size, window)
    T = q.shape[-2]
    valid = (torch.ones_like(k[:1, 0, :, 0], dtype=torch.float32) if key_valid is None
             else key_valid.float())
    k, v = _align_keys(k.float(), T), _align_keys(v.float(), T)
    valid = _align_keys(valid[..., None], T)  # [B|1, T, 1]
    q_c, k_c, v_c = _chunk(q.float(), C), _chunk(k, C), _chunk(v, C)  # [B, H, N, C, D]
    valid_c = _chunk(valid, C).transpose(-1, -2).unsqueeze(1) > 0  # [B|1, 1, N, 1, C]
    in_window, _ = _window_masks(C, window, q.device)  # [C, 2C]
    scores, allowed, top = _window_halves(q_c, k_c, valid_c, in_window, scale)
    a = [torch.exp(sc - top) * ok.float() for sc, ok in zip(scores, allowed, strict=True)]
    # the row's best key contributes exp(0) = 1, so a row with a real key sums to >= 1; an empty
    # row sums to 0 and gives 0 (clamping at 1 changes nothing else: exact, no eps)
    total = (a[0].sum(-1, keepdim=True) + a[1].sum(-1, keepdim=True)).clamp_min(1.0)
    out = (torch.matmul(a[0], _shift_chunks(v_c, 1)) + torch.matmul(a[1], v_c)) / total
    return _unchunk(out, T), _unchunk(top + torch.log(total), T)[..., 0]


def window_attention_step(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, keys_valid: torch.Tensor, *,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per row against its whole stored window (decode).

    Args:
        q: ``[B, H, 1, Dk]``; keys: ``[B, H, W, Dk]``; values: ``[B, H, W, Dv]`` — the window
            including the query's own key (key heads repeated to ``H``); keys_valid: ``[B, W]``
            (1 = real key).
        scale: the softmax scale.

    Returns:
        ``(out: [B, H, 1, Dv], lse: [B, H, 1])`` fp32, the terms
        :func:`sliding_window_attention_lse` forms for that query.
    """
    allowed = keys_valid[:, None, None, :] > 0  # [B, 1, 1, W]
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale  # [B, H, 1, W]
    scores = torch.where(allowed, scores, _MASKED_SCORE)
    top = scores.amax(dim=-1, keepdim=True)
    a = torch.exp(scores - top) * allowed.float()
    total = a.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.matmul(a, values.float()) / total, (top + torch.log(total))[..., 0]


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


def naive_window_lse(q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None, *,
                     window: int, scale: float) -> torch.Tensor:
    """fp64 reference of :func:`sliding_window_attention_lse`'s log-normaliser: ``logsumexp``
    of the allowed scores, ``[B, H, T]`` (−inf for a query without a real key); returns fp32."""
    q, k = q.double(), k.double()
    T, S = q.shape[-2], k.shape[-2]
    dist = torch.arange(T)[:, None] - torch.arange(S)[None, :]
    valid = torch.ones(1, S, dtype=torch.bool) if key_valid is None else key_valid > 0
    allowed = (dist >= 0) & (dist < window) & valid[:, None, None, :]
    scores = torch.where(allowed, (q @ k.transpose(-1, -2)) * scale, -torch.inf)
    return torch.logsumexp(scores, dim=-1).float()
