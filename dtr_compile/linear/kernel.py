"""Linear-attention operators that replace softmax attention sites.

Shapes use a fixed letter set: ``q: [B, H, T, Dk]``, ``k: [B, Hkv, S, Dk]``, ``v: [B, Hkv, S, Dv]``,
feature maps ``φ(x): [..., F]`` (see :mod:`dtr_compile.linear.feature_maps`), output ``[B, H, T, Dv]``.
Key/value heads are repeated to ``H`` as ``repeat_interleave`` (the grouping SDPA's
``enable_gqa`` uses); the functional operators below take ``H`` key heads.

Three forms, each a fast operator with a readable quadratic ``naive_*`` reference of the same
signature (the references compute in fp64 and return fp32):

* bidirectional (Katharopoulos et al. 2020, eq. 4–6), with a key padding mask ``m_s``::

      out_t = Σ_s m_s (φ(q_t)·φ(k_s)) v_s  /  (Σ_s m_s φ(q_t)·φ(k_s) + eps)

* causal: the same sum over ``s <= t``. Positions are aligned at the top left, as
  ``F.scaled_dot_product_attention(is_causal=True)`` does when ``T != S`` (its mask is
  ``ones(T, S).tril(0)``): query ``t`` sees keys ``0..t``, so keys ``s >= T`` are never attended.
  Computed in chunks of ``C`` positions: a ``[C, C]`` quadratic block inside each chunk plus an
  exclusive prefix sum of per-chunk states ``Σ φ(k_s) v_sᵀ: [F, Dv]`` across chunks, so memory is
  ``O(T·(F + Dv + C) + T/C·F·Dv)`` per head, never ``[T, F, Dv]``, and time is linear in ``T``.
* sliding window + linear (LoLCATs, Zhang et al. 2025), causal: query ``t`` attends the last
  ``W`` keys ``t−W < s <= t`` with softmax weights and every earlier key with linear weights, in
  one normalisation::

      a_ts = σ(γ_h) · exp(q_t·k_s·scale − max_window(q_t·k·scale))   if t − W < s <= t
           = φ(q_t)·φ(k_s)                                           if s <= t − W
      out_t = Σ_s m_s a_ts v_s / (Σ_s m_s a_ts + eps)

  with ``γ: [H]`` a learnable per-head logit (initialised to 0). The max is over the window only,
  as in LoLCATs: it keeps ``exp`` in ``(0, 1]`` and fixes the scale at which softmax and linear
  weights mix.

Numerics: feature maps return fp32 and every state, normaliser and output is accumulated in fp32
whatever the input dtype (so ``eps`` is an fp32 constant and never rounds to 0); a query with no
valid key gives ``0 / eps = 0``, never NaN. The graphs are plain ONNX (MatMul, CumSum with a
constant axis, Pad, Slice, Gather, Reshape, reductions, elementwise ops; no Einsum) and trace with
a dynamic ``T`` without shape guards, so ``torch.onnx.export(dynamo=True)`` gives one graph that
onnxruntime and TensorRT both accept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from dtr_compile.linear.base import (
    LinearStudent,
    first_token,
    stored_window,
    window_terms_step,
)
from dtr_compile.linear.feature_maps import FEATURE_MAPS, FeatureMap, make_feature_map

__all__ = [
    "ADDITIVE_MASK_PADDING",
    "DEFAULT_CHUNK_SIZE",
    "FEATURE_MAPS",
    "MASK_KINDS",
    "LinearAttention",
    "SiteSwitch",
    "SoftmaxAttention",
    "key_valid_from_mask",
    "linear_attention",
    "make_feature_map",
    "naive_linear_attention",
    "naive_sliding_window_linear_attention",
    "repeat_kv",
    "sliding_window_linear_attention",
]

#: Keys with an additive-mask value at or below this count as padding.
ADDITIVE_MASK_PADDING = -5.0e3
#: Positions per chunk of the causal forms (the sliding window form uses ``max(C, W)``).
DEFAULT_CHUNK_SIZE = 64
MASK_KINDS = ("none", "bool", "additive")
# A masked score: below any real one, but finite, so that (masked − row max) is never inf − inf.
_MASKED_SCORE = -1.0e9


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``x: [B, Hkv, S, D]`` → ``[B, H, S, D]``, each kv head repeated ``H // Hkv`` times."""
    hkv = x.shape[1]
    if hkv == num_heads:
        return x
    return x.repeat_interleave(num_heads // hkv, dim=1)


def key_valid_from_mask(mask: torch.Tensor, mask_kind: str) -> torch.Tensor:
    """Key padding mask ``[B|1, S]`` (float, 1 = attend) from a site's attention mask.

    Args:
        mask: bool (True = attend) or additive float mask, broadcastable to ``[B, H, T, S]``.
        mask_kind: ``"bool"`` or ``"additive"``.

    A key is valid when any query of any head may attend it; for a padding mask this is exactly
    the padding mask.
    """
    if mask_kind == "bool":
        valid = mask.to(torch.float32)
    else:
        valid = (mask > ADDITIVE_MASK_PADDING).to(torch.float32)
    while valid.dim() < 4:
        valid = valid.unsqueeze(0)
    return valid.amax(dim=2).amax(dim=1)  # [B|1, S]


# --- sequence helpers: x is [..., L, D], positions on dim -2 ----------------------------------


def _align_keys(x: torch.Tensor, length: int) -> torch.Tensor:
    """Keys ``[..., S, D]`` → ``[..., T, D]`` at top-left causal alignment: keys ``s >= T`` are
    dropped (no query sees them), missing ones are zeros. A no-op when ``S == T`` provably."""
    if statically_known_true(x.shape[-2] == length):
        return x
    return F.pad(x, (0, 0, 0, length))[..., :length, :]


def _chunk(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[..., L, D]`` → ``[..., N, C, D]``, zero-padded at the front to ``N·C`` positions.

    ``N = ceil(L / C) + 1``: at least one whole chunk of padding, which makes ``N >= 2`` and the
    padded length ``N·C`` provable to torch.export for every ``L >= 1`` (no shape guards).
    """
    length = x.shape[-2]
    n = (length + 2 * size - 1) // size  # one FloorDiv atom, so that N·C / N simplifies
    x = F.pad(x, (0, 0, n * size - length, 0))
    return x.reshape(*x.shape[:-2], n, size, x.shape[-1])


def _shift_chunks(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[..., N, C, D]`` → the same shape, chunk ``i`` holding chunk ``i − n`` (zeros before 0)."""
    return F.pad(x, (0, 0, 0, 0, n, 0))[..., :-n, :, :]


def _unchunk(x: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, H, N, C, D]`` → ``[B, H, L, D]``, dropping the padding of :func:`_chunk`."""
    x = x.flatten(2, 3)  # [B, H, N·C, D]
    # A gather, not a slice: torch.export cannot prove N·C >= L for a slice bound.
    index = torch.arange(x.shape[2] - length, x.shape[2], device=x.device)  # [L]
    return x.index_select(2, index)


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """``v: [..., S, Dv]`` → ``[v, 1]: [..., S, Dv+1]``: one matmul then gives the numerator and
    the normaliser, ``A [v, 1] = [A v, A 1]``, instead of a second pass over ``A`` or ``φ``."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _normalise(num_den: torch.Tensor, eps: float) -> torch.Tensor:
    """``[..., Dv+1]`` (numerator, normaliser) → ``numerator / (normaliser + eps): [..., Dv]``."""
    return num_den[..., :-1] / (num_den[..., -1:] + eps)


def _prefix_state(phi_k: torch.Tensor, v1: torch.Tensor, shift: int) -> torch.Tensor:
    """Exclusive prefix sum of chunk states: chunk ``i`` gets the keys of chunks ``< i − shift + 1``.

    Args:
        phi_k: ``[B, H, N, C, F]``.
        v1: ``[B, H, N, C, Dv+1]``, values with a ones column.
        shift: 1 = chunks ``< i``; 2 = chunks ``< i − 1``.

    Returns:
        ``[B, H, N, F, Dv+1]``: ``Σ φ(k_s) [v_s, 1]ᵀ``, the state and the normaliser together.
    """
    state = torch.matmul(phi_k.transpose(-1, -2), v1)  # [B, H, N, F, Dv+1], one chunk each
    return _shift_chunks(torch.cumsum(state, dim=2), shift)


# --- the operators ---------------------------------------------------------------------------


def linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    causal: bool = False,
    eps: float = 1e-6,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linear attention from feature-mapped queries and keys (fp32 state and normaliser).

    Args:
        phi_q: ``[B, H, T, F]``.
        phi_k: ``[B, H, S, F]``.
        v: ``[B, H, S, Dv]``.
        key_valid: ``[B|1, S]``, 1 = attend, or None.
        causal: causal form; query ``t`` sees keys ``s <= t`` (SDPA's ``is_causal`` alignment).
        eps: added to the normaliser.
        chunk_size: ``C`` of the causal form.
        initial_state: causal form only: ``[B, H, F, Dv+1]``, ``Σ φ(k_s) [v_s, 1]ᵀ`` over keys
            that precede all of ``phi_k`` (a past, see :meth:`LinearAttention.forward_stateful`);
            every query sees it. None: no past.

    Returns:
        ``[B, H, T, Dv]`` in fp32.
    """
    phi_q, phi_k, v = phi_q.float(), phi_k.float(), v.float()
    if key_valid is not None:
        phi_k = phi_k * key_valid[:, None, :, None].float()
    if not causal:
        if phi_q.shape[-1] > 2 * (v.shape[-1] + 1):  # wide φ: read it once, for both
            state = torch.matmul(phi_k.transpose(-1, -2), _with_ones(v))  # [B, H, F, Dv+1]
            return _normalise(torch.matmul(phi_q, state), eps)  # [B, H, T, Dv]
        # narrow φ: a second pass over it costs less than widening v and slicing the output
        num = torch.matmul(phi_q, torch.matmul(phi_k.transpose(-1, -2), v))  # [B, H, T, Dv]
        den = torch.matmul(phi_q, phi_k.sum(dim=-2, keepdim=True).transpose(-1, -2))  # [B, H, T, 1]
        return num / (den + eps)

    T = phi_q.shape[-2]
    v1 = _with_ones(v)  # [B, H, S, Dv+1]
    phi_k, v1 = _align_keys(phi_k, T), _align_keys(v1, T)  # [B, H, T, *]
    q_c, k_c, v_c = _chunk(phi_q, chunk_size), _chunk(phi_k, chunk_size), _chunk(v1, chunk_size)
    # q_c: [B, H, N, C, F], k_c: [B, H, N, C, F], v_c: [B, H, N, C, Dv+1]
    causal_mask = torch.ones(chunk_size, chunk_size, device=q_c.device).tril()  # [C, C], query row, key column
    a = torch.matmul(q_c, k_c.transpose(-1, -2)) * causal_mask  # [B, H, N, C, C] within chunk
    state = _prefix_state(k_c, v_c, shift=1)  # earlier chunks: [B, H, N, F, Dv+1]
    if initial_state is not None:
        state = state + initial_state.float()[:, :, None]
    num_den = torch.matmul(q_c, state) + torch.matmul(a, v_c)  # [B, H, N, C, Dv+1]
    return _unchunk(_normalise(num_den, eps), T)


def naive_linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    causal: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Quadratic reference of :func:`linear_attention`: the masked ``A = φ(Q) φ(K)ᵀ: [B, H, T, S]``
    normalised by its row sums, applied to ``V``. Computed in fp64, returned in fp32."""
    phi_q, phi_k, v = phi_q.double(), phi_k.double(), v.double()
    a = phi_q @ phi_k.transpose(-1, -2)  # [B, H, T, S]
    if key_valid is not None:
        a = a * key_valid[:, None, None, :].double()
    if causal:
        T, S = a.shape[-2:]
        a = a * torch.ones(T, S, dtype=torch.float64, device=a.device).tril()  # SDPA's is_causal: top-left
    return ((a @ v) / (a.sum(-1, keepdim=True) + eps)).float()


def _window_masks(chunk: int, window: int,
                  device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks ``[C, 2C]`` of query ``i`` of chunk ``n`` against keys ``j`` of chunks ``n−1, n``.

    The distance is ``t − s = C + i − j``; the window is ``0 <= t − s < W``, the linear part inside
    these two chunks is ``t − s >= W`` (chunks before ``n − 1`` are all linear when ``W <= C``).
    """
    dist = (chunk + torch.arange(chunk, device=device)[:, None]
            - torch.arange(2 * chunk, device=device)[None, :])  # [C, 2C]
    return (dist >= 0) & (dist < window), (dist >= window).float()


def _window_halves(
    q_c: torch.Tensor, k_c: torch.Tensor, valid_c: torch.Tensor, in_window: torch.Tensor,
    scale: float,
) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The softmax window of chunk ``n``'s queries against chunk ``n−1``'s keys and its own, as
    two ``[C, C]`` halves: no ``[N, 2C, D]`` concatenation of keys (a second copy of them).

    Args:
        q_c: ``[B, H, N, C, Dk]``; k_c: ``[B, H, N, C, Dk]``; valid_c: ``[B|1, 1, N, 1, C]`` bool
            (a real key); in_window: ``[C, 2C]`` from :func:`_window_masks`; scale: the softmax
            scale.

    Returns:
        ``(scores, allowed, top)``: scores ``[previous, own]``, each ``[B, H, N, C, C]`` with
        ``_MASKED_SCORE`` where not allowed; allowed, each ``[B|1, 1, N, C, C]`` bool; top
        ``[B, H, N, C, 1]``, each query's highest score over both halves.
    """
    C = in_window.shape[0]
    allowed = (in_window[:, :C] & _shift_chunks(valid_c, 1), in_window[:, C:] & valid_c)
    scores = [torch.where(ok, torch.matmul(q_c, k_h.transpose(-1, -2)) * scale, _MASKED_SCORE)
              for k_h, ok in zip((_shift_chunks(k_c, 1), k_c), allowed, strict=True)]
    top = torch.maximum(scores[0].amax(dim=-1, keepdim=True), scores[1].amax(dim=-1, keepdim=True))
    return scores, allowed, top


def sliding_window_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    *,
    window: int,
    scale: float,
    softmax_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal softmax over the last ``window`` keys plus linear attention before them (LoLCATs).

    Args:
        q: ``[B, H, T, Dk]``.
        k: ``[B, H, S, Dk]``.
        v: ``[B, H, S, Dv]``.
        phi_q: ``[B, H, T, F]``.
        phi_k: ``[B, H, S, F]``.
        key_valid: ``[B|1, S]``, 1 = attend, or None.
        window: ``W >= 1``, keys ``t − W < s <= t`` get softmax weights.
        scale: softmax temperature (the site's SDPA scale).
        softmax_weight: ``[H]`` factor of the softmax weights (``σ(γ)``), or None for 1.
        eps: added to the normaliser.
        chunk_size: ``C``; ``max(C, W)`` is used.
        initial_state: ``[B, H, F, Dv+1]``, ``Σ φ(k_s) [v_s, 1]ᵀ`` over keys before all of ``k``
            and at least ``W`` positions before every query (linear weights for all), or None.

    Returns:
        ``[B, H, T, Dv]`` in fp32.
    """
    C = max(chunk_size, window)
    T = q.shape[-2]
    phi_k = phi_k.float()
    if key_valid is None:
        valid = torch.ones_like(k[:1, 0, :, 0], dtype=torch.float32)  # [1, S]
    else:
        valid = key_valid.float()  # [B, S]
        phi_k = phi_k * valid[:, None, :, None]  # [B, H, S, F]
    k, v1, phi_k = (_align_keys(x, T) for x in (k.float(), _with_ones(v.float()), phi_k))
    valid = _align_keys(valid[..., None], T)  # [B|1, T, 1]

    q_c, phi_q_c = _chunk(q.float(), C), _chunk(phi_q.float(), C)  # [B, H, N, C, Dk | F]
    k_c, v_c, phi_k_c = _chunk(k, C), _chunk(v1, C), _chunk(phi_k, C)  # [B, H, N, C, Dk|Dv+1|F]
    valid_c = _chunk(valid, C).transpose(-1, -2).unsqueeze(1) > 0  # [B|1, 1, N, 1, C]

    in_window, linear_mask = _window_masks(C, window, q.device)  # [C, 2C]
    scores, allowed, top = _window_halves(q_c, k_c, valid_c, in_window, scale)
    # the linear part inside chunks n−1, n; W = C: the own half is all window, no linear term
    halves = ((_shift_chunks(v_c, 1), _shift_chunks(phi_k_c, 1), linear_mask[:, :C]),
              (v_c, phi_k_c, linear_mask[:, C:] if window < C else None))
    state = _prefix_state(phi_k_c, v_c, shift=2)  # chunks < n − 1: [B, H, N, F, Dv+1]
    if initial_state is not None:
        state = state + initial_state.float()[:, :, None]
    num_den = torch.matmul(phi_q_c, state)  # [B, H, N, C, Dv+1]
    for sc, ok, (v_h, phi_h, lin) in zip(scores, allowed, halves, strict=True):
        a = torch.exp(sc - top) * ok.float()  # [B, H, N, C, C]
        if softmax_weight is not None:
            a = a * softmax_weight.float()[:, None, None, None]
        if lin is not None:
            a = a + torch.matmul(phi_q_c, phi_h.transpose(-1, -2)) * lin
        num_den = num_den + torch.matmul(a, v_h)
    return _unchunk(_normalise(num_den, eps), T)


def naive_sliding_window_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    *,
    window: int,
    scale: float,
    softmax_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Quadratic reference of :func:`sliding_window_linear_attention` on full ``[B, H, T, S]``
    weights. Computed in fp64, returned in fp32."""
    q, k, v, phi_q, phi_k = (x.double() for x in (q, k, v, phi_q, phi_k))
    T, S = q.shape[-2], k.shape[-2]
    dist = torch.arange(T)[:, None] - torch.arange(S)[None, :]  # [T, S], t − s
    valid = torch.ones(1, S, dtype=torch.bool) if key_valid is None else key_valid > 0  # [B|1, S]
    valid = valid[:, None, None, :]  # [B|1, 1, 1, S]
    in_window = (dist >= 0) & (dist < window) & valid  # [B|1, 1, T, S]
    linear = (dist >= window) & valid

    scores = torch.where(in_window, (q @ k.transpose(-1, -2)) * scale, -torch.inf)  # [B, H, T, S]
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)  # a row with an empty window
    a = torch.exp(scores - row_max)
    if softmax_weight is not None:
        a = a * softmax_weight.double()[:, None, None]
    a = a + (phi_q @ phi_k.transpose(-1, -2)) * linear
    return ((a @ v) / (a.sum(-1, keepdim=True) + eps)).float()


# --- modules ---------------------------------------------------------------------------------


class LinearAttention(LinearStudent):
    """Feature-map linear attention, a drop-in for one softmax attention site: ``(q, k, v[, mask]) → [B, H, T, Dv]``.

    Args:
        num_heads: ``H``.
        num_kv_heads: ``Hkv`` (``H % Hkv == 0``).
        head_dim: ``Dk``.
        mask_kind: the site's mask, ``"none"``, ``"bool"`` or ``"additive"``; the mask is read as
            a key padding mask (:func:`key_valid_from_mask`).
        causal: causal site (SDPA ``is_causal`` alignment).
        feature_map: a :data:`FEATURE_MAPS` name; queries and keys get separate instances.
        eps: added to the fp32 normaliser; must be > 0.
        window: ``W > 0`` adds softmax over the last ``W`` keys (causal sites only).
        scale: the site's softmax scale, used by the window (default ``Dk ** -0.5``).
        chunk_size: ``C`` of the causal forms.

    Raises:
        ValueError: inconsistent arguments.
        InputError: unknown feature map.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        mask_kind: str = "none",
        causal: bool = False,
        feature_map: str = "hedgehog",
        eps: float = 1e-6,
        window: int = 0,
        scale: float | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__()
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}"
            )
        if mask_kind not in MASK_KINDS:
            raise ValueError(f"mask_kind must be one of {MASK_KINDS}, got {mask_kind!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (an all-padding row is 0 / eps), got {eps}")
        if window < 0 or (window and not causal):
            raise ValueError(f"window={window}: a sliding window needs causal=True and window >= 1")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.mask_kind, self.causal, self.eps = mask_kind, causal, eps
        self.window, self.chunk_size = window, chunk_size
        self.scale = scale if scale is not None else head_dim**-0.5
        self.feature_map_name = feature_map
        self.feature_map_q: FeatureMap = make_feature_map(
            feature_map, num_heads, head_dim, role="query"
        )
        self.feature_map_k: FeatureMap = make_feature_map(
            feature_map, num_heads, head_dim, role="key"
        )
        if window:
            self.window_factor = nn.Parameter(torch.zeros(num_heads))  # γ: [H], σ(0) = 1/2

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q: [B, H, T, Dk], k: [B, Hkv, S, Dk], v: [B, Hkv, S, Dv], mask as the site's
        → [B, H, T, Dv] in q's dtype."""
        k, v = repeat_kv(k, self.num_heads), repeat_kv(v, self.num_heads)  # [B, H, S, *]
        key_valid = key_valid_from_mask(mask, self.mask_kind) if mask is not None else None
        phi_q, phi_k = self.feature_map_q(q), self.feature_map_k(k)  # [B, H, T|S, F] fp32
        if self.window:
            out = sliding_window_linear_attention(
                q,
                k,
                v,
                phi_q,
                phi_k,
                key_valid,
                window=self.window,
                scale=self.scale,
                softmax_weight=torch.sigmoid(self.window_factor),
                eps=self.eps,
                chunk_size=self.chunk_size,
            )
        else:
            out = linear_attention(
                phi_q,
                phi_k,
                v,
                key_valid,
                causal=self.causal,
                eps=self.eps,
                chunk_size=self.chunk_size,
            )
        return out.to(q.dtype)

    def without_linear(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       key_valid: torch.Tensor | None) -> torch.Tensor:
        """The window's softmax alone (see :meth:`LinearStudent.without_linear`): the
        feature-map terms leave the numerator and the shared normaliser, so what remains is
        softmax over the last ``W`` keys (``σ(γ)`` cancels); zeros without a window."""
        if not self.window:
            return torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float32, device=q.device)
        from dtr_compile.linear.window import sliding_window_attention  # it imports this module

        k, v = repeat_kv(k, self.num_heads), repeat_kv(v, self.num_heads)
        return sliding_window_attention(q, k, v, key_valid, window=self.window, scale=self.scale,
                                        chunk_size=self.chunk_size)

    # --- stateful (decode) form, see LinearStudent ---------------------------------------------

    def state_names(self) -> tuple[str, ...]:
        """``("recurrent",)``, plus ``("window_key", "window_value", "window_valid")`` with a
        window."""
        names: tuple[str, ...] = ("recurrent",)
        return names + (("window_key", "window_value", "window_valid") if self.window else ())

    def init_state(
        self, batch: int, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """An empty past: ``recurrent: [B, H, F, Dv+1]`` zeros (fp32, whatever ``dtype``); with a
        window ``window_key: [B, Hkv, W, Dk]`` / ``window_value: [B, Hkv, W, Dv]`` zeros in
        ``dtype`` and ``window_valid: [B, W]`` zeros (no valid key yet).

        ``Dv`` is taken equal to ``Dk`` (every site we rewrite has ``Dv == Dk``).
        """
        F_ = self.feature_map_k.feature_dim
        state = {"recurrent": torch.zeros(batch, self.num_heads, F_, self.head_dim + 1,
                                          dtype=torch.float32, device=device)}
        if self.window:
            W, hkv = self.window, self.num_kv_heads
            state["window_key"] = torch.zeros(batch, hkv, W, self.head_dim, dtype=dtype, device=device)
            state["window_value"] = torch.zeros(batch, hkv, W, self.head_dim, dtype=dtype,
                                                device=device)
            state["window_valid"] = torch.zeros(batch, W, dtype=torch.float32, device=device)
        return state

    def decode_step(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_valid: torch.Tensor,
        state: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One new token after ``state`` (``t = 1``; see :meth:`LinearStudent.decode_step`).

        Without a window: ``S ← S + φ(k)[v, 1]ᵀ``, ``out = (φ(q)·S)`` normalised. With a window
        ``W``: the key leaving the window (the oldest stored one) moves into ``S``; the query gets
        softmax weights over the other ``W − 1`` stored keys and its own, linear weights over
        ``S`` (the module docstring's ``a_ts``, the same terms :func:`sliding_window_linear_attention`
        forms for this query). O(``W + F·Dv``) per head; no chunk, no padding.

        Args:
            q: [B, H, 1, Dk]; k: [B, Hkv, 1, Dk]; v: [B, Hkv, 1, Dv]; key_valid: [B, 1] fp32.
            state: see :meth:`init_state`.

        Returns:
            ``(out: [B, H, 1, Dv]`` fp32``, new state)``.
        """
        q, k, v = first_token(q, 2), first_token(k, 2), first_token(v, 2)  # no-ops at t = 1
        valid = first_token(key_valid, 1)  # [B, 1]
        past = state["recurrent"].float()  # [B, H, F, Dv+1]
        phi_q = self.feature_map_q(q)  # [B, H, 1, F] fp32
        if not self.window:
            kh, vh = repeat_kv(k, self.num_heads), repeat_kv(v, self.num_heads)  # [B, H, 1, *]
            phi_k = self.feature_map_k(kh) * valid[:, None, :, None]
            new = past + phi_k.transpose(-1, -2) * F.pad(vh.float(), (0, 1), value=1.0)
            return _normalise(torch.matmul(phi_q, new), self.eps), {"recurrent": new}

        win_k, win_v = state["window_key"], state["window_value"]  # [B, Hkv, W, D]
        win_valid = state["window_valid"].float()  # [B, W]
        # the oldest stored key is W positions back: it leaves the window for the state
        leave_k = repeat_kv(win_k[:, :, :1].to(k.dtype), self.num_heads)  # [B, H, 1, Dk]
        leave_v = repeat_kv(win_v[:, :, :1], self.num_heads).float()  # [B, H, 1, Dv]
        leave_valid = win_valid[:, :1].reshape(win_valid.shape[0], 1, 1, 1)
        phi_leave = self.feature_map_k(leave_k) * leave_valid  # [B, H, 1, F]
        # the outer product φ(k)ᵀ[v, 1] as a broadcast multiply: [B, H, F, 1] · [B, H, 1, Dv+1]
        new = past + phi_leave.transpose(-1, -2) * F.pad(leave_v, (0, 1), value=1.0)
        keys = torch.cat([win_k[:, :, 1:].to(k.dtype), k], dim=2)  # [B, Hkv, W, Dk]: the window
        values = torch.cat([win_v[:, :, 1:].to(v.dtype), v], dim=2)
        keys_valid = torch.cat([win_valid[:, 1:], valid], dim=1)  # [B, W]
        # softmax weights σ(γ)·exp(s − max) over the window (key heads not repeated), linear
        # weights φ(q)·φ(k) over the state, one normalisation
        num_den = window_terms_step(q, keys, values, keys_valid, scale=self.scale,
                                    weight=torch.sigmoid(self.window_factor))
        num_den = num_den + torch.matmul(phi_q, new)  # [B, H, 1, Dv+1]
        return _normalise(num_den, self.eps), {
            "recurrent": new,
            "window_key": keys.to(win_k.dtype),
            "window_value": values.to(win_v.dtype),
            "window_valid": keys_valid.to(state["window_valid"].dtype),
        }

    def extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_valid: torch.Tensor,
        state: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``t >= 1`` new tokens after the past in ``state``: the chunked form (prefill).

        Without a window: the causal chunked form on the new tokens with the past's
        ``Σ φ(k)[v, 1]ᵀ`` added to every chunk's prefix state, then the new keys added to it.
        With a window ``W``: the sliding-window form on ``[last W keys; new keys]`` (the queries of
        the ``W`` stored positions are zeros and their outputs dropped), with the past state
        (keys at least ``W`` before every new query) added likewise; then the keys leaving the
        window move into the state. Padding (``key_valid == 0``) never enters either.

        Args:
            q: [B, H, t, Dk]; k: [B, Hkv, t, Dk]; v: [B, Hkv, t, Dv].
            key_valid: [B, t] fp32 (1 = real token).
            state: see :meth:`init_state`.

        Returns:
            ``(out: [B, H, t, Dv]`` fp32``, new state)``.
        """
        t = q.shape[-2]
        valid = key_valid
        past = state["recurrent"].float()  # [B, H, F, Dv+1]
        if not self.window:
            kh, vh = repeat_kv(k, self.num_heads), repeat_kv(v, self.num_heads)
            phi_q, phi_k = self.feature_map_q(q), self.feature_map_k(kh)  # [B, H, t, F] fp32
            out = linear_attention(phi_q, phi_k, vh, valid, causal=True, eps=self.eps,
                                   chunk_size=self.chunk_size, initial_state=past)
            phi_k = phi_k * valid[:, None, :, None]
            new = past + torch.matmul(phi_k.transpose(-1, -2), _with_ones(vh.float()))
            return out, {"recurrent": new}

        W = self.window
        C, win_k, win_v, win_valid = stored_window(state, W, self.chunk_size, k.dtype)
        lead = C - W
        valid_all = torch.cat([win_valid, valid], dim=-1)  # [B, C+t]
        q_all = torch.cat([q.new_zeros(q.shape[0], q.shape[1], C, q.shape[-1]), q], dim=-2)
        # heads repeated before concatenating: repeating a length C + t makes torch.export guard
        kh = torch.cat([repeat_kv(win_k, self.num_heads), repeat_kv(k, self.num_heads)], dim=-2)
        vh = torch.cat([repeat_kv(win_v, self.num_heads), repeat_kv(v, self.num_heads)], dim=-2)
        phi_q, phi_k = self.feature_map_q(q_all), self.feature_map_k(kh)  # [B, H, C+t, F]
        out = sliding_window_linear_attention(
            q_all, kh, vh, phi_q, phi_k, valid_all, window=W, scale=self.scale,
            softmax_weight=torch.sigmoid(self.window_factor), eps=self.eps,
            chunk_size=self.chunk_size, initial_state=past)  # [B, H, C+t, Dv]
        # Gathers, not slices: torch.export cannot prove slice bounds of C + t for every t.
        leave = torch.arange(lead, lead + t, device=q.device)  # [t]: the first t of [window; new]
        keep = torch.arange(lead + t, C + t, device=q.device)  # [W]: the new window
        out = out.index_select(2, torch.arange(C, C + t, device=q.device))  # [B, H, t, Dv]
        phi_leave = phi_k.index_select(2, leave) * valid_all.index_select(1, leave)[:, None, :, None]
        new = past + torch.matmul(phi_leave.transpose(-1, -2),
                                  _with_ones(vh.index_select(2, leave).float()))
        k_all = torch.cat([win_k, k], dim=-2)  # [B, Hkv, C+t, Dk]
        v_all = torch.cat([win_v, v], dim=-2)
        return out.to(q.dtype), {
            "recurrent": new,
            "window_key": k_all.index_select(2, keep).to(state["window_key"].dtype),
            "window_value": v_all.index_select(2, keep).to(state["window_value"].dtype),
            "window_valid": valid_all.index_select(1, keep).to(state["window_valid"].dtype),
        }


class SoftmaxAttention(nn.Module):
    """Recomputes a site's softmax attention from its own q, k, v and mask (the teacher).

    Equal to the original site: SDPA with the site's scale, causality and mask.
    """

    def __init__(
        self, num_heads: int, num_kv_heads: int, *, scale: float, causal: bool = False
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.scale, self.causal = (
            num_heads,
            num_kv_heads,
            scale,
            causal,
        )

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q: [B, H, T, Dk], k: [B, Hkv, S, Dk], v: [B, Hkv, S, Dv] → [B, H, T, Dv]."""
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=self.causal,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )


class SiteSwitch(nn.Module):
    """A site that runs either its softmax teacher or its linear student, by ``use_linear``.

    The scheduler flips the flag to try a candidate and flips it back to revert: an exact swap,
    with no graph or weight copies.
    """

    def __init__(self, softmax: SoftmaxAttention, linear: LinearAttention) -> None:
        super().__init__()
        self.softmax, self.linear = softmax, linear
        self.use_linear = False

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return (self.linear if self.use_linear else self.softmax)(q, k, v, mask)
