"""Shared machinery of the matrix-state students (:mod:`~dtr_compile.linear.gated`,
:mod:`~dtr_compile.linear.delta`): the chunk-level scan, the intra-chunk masks, the
unit-lower-triangular inverse, the output normalisation and the gate projections.

Both families keep a state ``S: [B, H, Dk, Dv]`` (fp32) updated per token; over a chunk of ``C``
tokens the update is affine in the state at the chunk start, ``S_end = P_n S_start + R_n`` with
``P_n`` a scalar ``[B, H, N, 1, 1]`` (GLA) or a matrix ``[B, H, N, Dk, Dk]`` (DeltaNet). The
states between chunks are an inclusive scan of these affine maps, computed here without a loop
(Hillis & Steele 1986): ``ceil(log2 N)`` rounds of ``x_n ← x_n ∘ x_{n−d}``, ``d = 1, 2, 4, …``.
Under ``torch.export`` ``N`` is symbolic, so the graph always runs :data:`MAX_SCAN_ROUNDS` rounds
(rounds with ``d >= N`` compose with the identity and change nothing): the exported graph is
exact for ``N <= 2**MAX_SCAN_ROUNDS`` chunks, i.e. ``T < 64·65536`` tokens at ``C = 64``.

The students reach a recurrence only through :func:`recurrence`: the chunked form, the
token-by-token form for a decode step, or — under :func:`fused_recurrence`, for an export at
opset 27 — one :func:`linear_attention_op` node (ONNX ``LinearAttention``,
:mod:`dtr_compile.exporters.fused`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dtr_compile.linear.base import LinearStudent, first_token, stored_window
from dtr_compile.linear.kernel import _align_keys, _chunk, _unchunk, key_valid_from_mask, repeat_kv
from dtr_compile.linear.window import (
    sliding_window_attention,
    sliding_window_attention_lse,
    window_attention_step,
)

#: Scan rounds of an exported graph: exact for up to ``2**MAX_SCAN_ROUNDS`` chunks.
MAX_SCAN_ROUNDS = 16
# Masked log-decays: exp() of it is exactly 0 in fp32, and it is finite (no inf − inf).
_MASKED_LOG = -1.0e4


def scan_rounds(n: int | torch.SymInt) -> int:
    """Rounds of :func:`affine_scan` for ``n`` chunks: ``ceil(log2 n)`` when ``n`` is a plain
    int (eager), :data:`MAX_SCAN_ROUNDS` (read at call time) when it is symbolic (export)."""
    # under torch.compile/cond tracing a SymInt passes isinstance(n, int): ask the tracer too
    if isinstance(n, int) and not isinstance(n, torch.SymInt) and not torch.compiler.is_compiling():
        return max(0, (n - 1).bit_length())
    return MAX_SCAN_ROUNDS


def _shift(x: torch.Tensor, d: int) -> torch.Tensor:
    """``x: [B, H, N, a, b]`` → chunk ``n`` holds chunk ``n − d`` (zeros before chunk 0).

    A gather of clamped indices times a validity mask, not Pad + Slice: padding by ``d`` would
    allocate ``N + d`` chunks, and the exported scan's last rounds have ``d = 2**15`` whatever
    ``N`` (1.5 GiB at T = 512 before this)."""
    idx = torch.arange(x.shape[2], device=x.device) - d  # [N]
    keep = (idx >= 0).to(x.dtype)[:, None, None]  # [N, 1, 1]
    return x.index_select(2, idx.clamp_min(0)) * keep


def affine_scan(p: torch.Tensor, r: torch.Tensor, *, matrix: bool,
                rounds: int | None = None) -> torch.Tensor:
    """Inclusive scan of ``S_n = P_n S_{n−1} + R_n`` from ``S_{−1} = 0``.

    Args:
        p: ``[B, H, N, 1, 1]`` (``matrix=False``, scalar decay) or ``[B, H, N, Dk, Dk]``.
        r: ``[B, H, N, Dk, Dv]``.
        rounds: scan rounds (default :func:`scan_rounds`); more than ``ceil(log2 N)`` change
            nothing, which is what makes the exported graph's fixed count exact.

    Returns:
        ``[B, H, N, Dk, Dv]``: the state after each chunk.
    """
    eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
    for i in range(scan_rounds(p.shape[2]) if rounds is None else rounds):
        d = 1 << i
        r_prev = _shift(r, d)
        if matrix:
            p_prev = _shift(p - eye, d) + eye  # identity before chunk 0
            r = torch.matmul(p, r_prev) + r
            p = torch.matmul(p, p_prev)
        else:
            p_prev = _shift(p - 1.0, d) + 1.0
            r = p * r_prev + r
            p = p * p_prev
    return r


def decay_matrix(g_cum: torch.Tensor) -> torch.Tensor:
    """``Γ_ij = exp(G_i − G_j)`` for ``j <= i``, else 0.

    ``g_cum: [..., C]`` inclusive cumulative log-decays (non-increasing) → ``[..., C, C]``; every
    exponent taken is ``<= 0``, so nothing overflows whatever the gates.
    """
    idx = torch.arange(g_cum.shape[-1], device=g_cum.device)  # no Trilu: works for a symbolic C
    mask = idx[:, None] >= idx[None, :]
    diff = g_cum[..., :, None] - g_cum[..., None, :]
    return torch.exp(torch.where(mask, diff, _MASKED_LOG))


def unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """``(I + A)^{-1}`` for ``A: [..., C, C]`` strictly lower triangular, without a loop.

    Blocked forward substitution by doubling: ``X`` starts as the inverse of the ``1×1``
    diagonal blocks (``I``); at level ``s = 1, 2, 4, …`` each diagonal block of size ``2s`` is
    ``[[L11, 0], [L21, L22]]`` with ``X`` already holding ``L11⁻¹`` and ``L22⁻¹``, and its inverse
    is ``X − X N X`` where ``N = A ⊙ M_s`` holds the ``L21`` blocks (``(X N)² = 0``). ``X`` is
    block diagonal in blocks of ``s``, so ``N X = (A X) ⊙ M_s``: the masked copy of ``A`` is never
    made (an exported graph would compute every level's copy up front, all live at once), and
    the first level (``X = I``) is ``I − N`` without a product. ``ceil(log2 C)`` levels of at
    most two ``[C, C]`` matmuls; the same products as forward substitution in blocks, so none of
    the cancellation of the power series ``Σ (−A)^k``.
    """
    c = a.shape[-1]
    eye = torch.eye(c, dtype=a.dtype, device=a.device)
    idx = torch.arange(c, device=a.device)
    x = None
    s = 1
    while s < c:
        same_block = (idx[:, None] // (2 * s)) == (idx[None, :] // (2 * s))
        lower_half = ((idx[:, None] // s) % 2 == 1) & ((idx[None, :] // s) % 2 == 0)
        m = (same_block & lower_half).to(a.dtype)  # [C, C]
        x = eye - a * m if x is None else x - torch.matmul(x, torch.matmul(a, x) * m)
        s *= 2
    return eye.expand_as(a) if x is None else x


class HeadRMSNorm(nn.Module):
    """Per-head RMS normalisation of the output: ``o / sqrt(mean_Dv(o²) + eps) · g_h``.

    GLA and DeltaNet outputs ``Sᵀq`` are not convex combinations of the values (their scale grows
    with the number and alignment of keys), unlike softmax; as in the GLA and DeltaNet layers
    (Yang et al. 2024) a per-head RMS norm restores a fixed scale. ``g: [H, Dv]`` is 1 at
    construction; distillation sets it to the teacher's per-head output RMS before training
    (:meth:`MatrixStateStudent.init_from_teacher`) and trains it. An empty state gives ``0``,
    never NaN (``eps = 1e-6``; smaller values amplify rounding where ``o`` nearly cancels, and
    the exported graph then drifts from PyTorch).
    """

    def __init__(self, num_heads: int, head_dim_v: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim_v))
        self.eps = eps

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        """o: [B, H, T, Dv] fp32 → [B, H, T, Dv] fp32."""
        o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + self.eps)
        return o * self.weight[None, :, None, :].float()


class HeadGate(nn.Module):
    """A per-head scalar projection of the values: ``z_t = w_h · v_t + b_h``, ``[B, H, T]``.

    The gate reads ``v`` because the student of a site sees only ``q, k, v`` and, of those, ``v``
    is the only one without a rotary position embedding: a linear projection of the (normalised)
    block input in every architecture, as the paper's gate projections are. It therefore works the
    same for ``--distill-target site`` and ``block``. ``w`` starts at 0 (the gate is first a
    per-head constant ``σ(b_h)``) so the first steps change only what the teacher's q/k/v give.

    Args:
        num_heads: ``H`` (values are repeated from ``Hkv`` heads first).
        head_dim_v: ``Dv``.
        bias: ``[H]`` initial biases.
    """

    def __init__(self, num_heads: int, head_dim_v: int, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_heads, head_dim_v))
        self.bias = nn.Parameter(bias.detach().clone().float())

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """v: [B, H, T, Dv] → [B, H, T] fp32 logits."""
        z = torch.matmul(v.float(), self.weight[:, :, None])[..., 0]  # [B, H, T]
        return z + self.bias[None, :, None]


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``log σ(x) = min(x, 0) − log(1 + exp(−|x|))``, finite for every finite ``x``.

    Not ``F.logsigmoid``: torch.onnx exports that as ``Log(Sigmoid(x))``, which is ``−inf`` once
    ``σ(x)`` underflows (``x < −88`` in fp32), and a ``−inf`` log-decay turns the chunked form's
    ``G_i − G_j`` into NaN. Gate logits that large occur: they are projections of the values, and
    decoder LLMs have outlier channels (SmolLM2's hybrid gave NaN in onnxruntime, not PyTorch).
    """
    x = x.float()
    return torch.clamp(x, max=0.0) - torch.log1p(torch.exp(-x.abs()))


def slow_decay_bias(num_heads: int, slowest: float = 0.999, fastest: float = 0.95) -> torch.Tensor:
    """``[H]`` logits whose sigmoids (per-head decays ``α_h``) spread log-uniformly in ``1 − α``
    from ``1 − fastest`` to ``1 − slowest``: half-lives of 14 to 690 tokens, as RetNet's heads
    (Sun et al. 2023) spread theirs. Slow decays keep the first steps close to plain linear
    attention over the whole past, which is what softmax attention most resembles."""
    if num_heads == 1:
        one_minus = torch.tensor([1 - slowest])
    else:
        one_minus = torch.logspace(math.log10(1 - fastest), math.log10(1 - slowest), num_heads)
    alpha = 1 - one_minus.double()
    return torch.log(alpha / (1 - alpha)).float()


def key_valid_or_ones(key_valid: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``[B|1, T]`` fp32 validity (1 = real token) for ``like: [B, H, T, D]``."""
    if key_valid is None:
        return torch.ones_like(like[:1, 0, :, 0], dtype=torch.float32)
    return key_valid.float()


# --- the chunked form, shared by GLA (no β) and DeltaNet (β) ---------------------------------


def chunked_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor | None = None,
    *,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked form of ``S_t = α_t S_{t−1} + k_t v_tᵀ`` (``beta is None``, GLA with a per-head
    decay) or ``S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ`` (DeltaNet), ``o_t = S_tᵀ q_t``.

    Args:
        q: ``[B, H, T, Dk]``; k: ``[B, H, T, Dk]``; v: ``[B, H, T, Dv]`` (any float dtype).
        log_alpha: ``[B, H, T]``, ``log α_t <= 0`` (0 at padding: the state is kept).
        beta: ``[B, H, T]`` in ``[0, 1]`` (0 at padding), or None.
        chunk_size: ``C``.
        initial_state: ``[B, H, Dk, Dv]`` before token 0, or None for zeros.

    Returns:
        ``(o: [B, H, T, Dv], S_T: [B, H, Dk, Dv])``, both fp32.

    Within a chunk, with ``γ_i = exp(G_i)``, ``G`` the inclusive cumulative log-decay,
    ``Γ_ij = γ_i/γ_j`` (``j <= i``) and ``S_0`` the state at the chunk start:

    * GLA: ``O = diag(γ) Q S_0 + (QKᵀ ⊙ Γ) V``; ``S_C = γ_C S_0 + (K ⊙ γ_C/γ)ᵀ V``.
    * DeltaNet, the WY/UT form (Yang et al. 2024, "Parallelizing linear transformers with the
      delta rule over sequence length", and its gated version, Yang et al. 2025): the per-token
      "new values" ``E = V − …`` solve ``(I + A) E = V − diag(γ) K S_0`` with
      ``A_ij = Γ_ij β_j k_i·k_j`` (``j < i``), so with ``M = (I + A)⁻¹``
      (:func:`unit_lower_inverse`), ``U = M V``, ``W = M diag(γ) K`` and
      ``B_ij = Γ_ij β_j q_i·k_j`` (``j <= i``): ``O = (diag(γ) Q − B W) S_0 + B U`` and
      ``S_C = (γ_C I − K̃ᵀ W) S_0 + K̃ᵀ U``, ``K̃ = K ⊙ β γ_C/γ``.

    Across chunks ``S_C = P S_0 + R``: for GLA (scalar ``P``) the states are one ``[N, N]``
    matrix of chunk decays times the ``R``; for DeltaNet they are scanned by
    :func:`affine_scan`. Memory is
    ``O(T·(C + D) + T/C·Dk·(Dk + Dv))`` per head; every exponent is ``<= 0``.
    """
    T = q.shape[-2]
    c = chunk_size
    q_c, k_c, v_c = (_chunk(x.float(), c) for x in (q, k, v))  # [B, H, N, C, D]
    g_c = _chunk(log_alpha.float()[..., None], c)[..., 0]  # [B, H, N, C]; front padding: 0
    g_cum = torch.cumsum(g_c, dim=3)  # [B, H, N, C]
    gamma = torch.exp(g_cum)
    g_last = g_cum[..., -1:]  # [B, H, N, 1]
    to_end = torch.exp(g_last - g_cum)  # [B, H, N, C], γ_C / γ_i <= 1
    decay = decay_matrix(g_cum)  # [B, H, N, C, C], Γ
    scores = torch.matmul(q_c, k_c.transpose(-1, -2)) * decay
    q_decay = q_c * gamma[..., None]  # diag(γ) Q
    if beta is None:
        b_mat, u = scores, v_c  # [B, H, N, C, C], [B, H, N, C, Dv]
        q_eff = q_decay
        k_end = k_c * to_end[..., None]
        p = torch.exp(g_last)[..., None]  # [B, H, N, 1, 1]
        r = torch.matmul(k_end.transpose(-1, -2), v_c)  # [B, H, N, Dk, Dv]
    else:
        b_c = _chunk(beta.float()[..., None], c)[..., 0][..., None, :]  # [B, H, N, 1, C], β_j
        # Γ with its diagonal zeroed is the strict one (exp of the masked log is exactly 0)
        idx = torch.arange(c, device=k_c.device)
        strict = (idx[:, None] > idx[None, :]).float()  # [C, C]
        a = torch.matmul(k_c, k_c.transpose(-1, -2)) * (decay * strict) * b_c
        m = unit_lower_inverse(a)  # [B, H, N, C, C]
        u = torch.matmul(m, v_c)  # [B, H, N, C, Dv]
        w = torch.matmul(m, k_c * gamma[..., None])  # [B, H, N, C, Dk]
        b_mat = scores * b_c
        q_eff = q_decay - torch.matmul(b_mat, w)  # [B, H, N, C, Dk]
        k_end = k_c * (to_end[..., None] * b_c.transpose(-1, -2))  # K̃: [B, H, N, C, Dk]
        eye = torch.eye(k.shape[-1], dtype=torch.float32, device=k.device)
        p = torch.exp(g_last)[..., None] * eye - torch.matmul(k_end.transpose(-1, -2), w)
        r = torch.matmul(k_end.transpose(-1, -2), u)  # [B, H, N, Dk, Dv]
    if initial_state is not None:
        # chunk 0 is all front padding (see _chunk), so its map is the identity: S after it = S_0
        # a select, not cat(S_0, r[:, :, 1:]): the slice's size N − 1 made torch.export guard
        # on it (pinning T <= 64) inside the stateful decoder's torch.cond
        first = (torch.arange(r.shape[2], device=r.device) == 0)[:, None, None]  # [N, 1, 1]
        r = torch.where(first, initial_state.float()[:, :, None], r)
    if beta is None:
        # scalar decays: S_n = Σ_{m <= n} exp(L_n − L_m) R_m, one [N, N] matmul, no scan rounds
        chunk_decay = decay_matrix(torch.cumsum(g_last[..., 0], dim=2))  # [B, H, N, N]
        states = torch.matmul(chunk_decay, r.flatten(-2)).unflatten(-1, r.shape[-2:])
    else:
        states = affine_scan(p, r, matrix=True)  # after each chunk: [B, H, N, Dk, Dv]
    out = torch.matmul(q_eff, _shift(states, 1)) + torch.matmul(b_mat, u)  # [B, H, N, C, Dv]
    return _unchunk(out, T), states[:, :, -1]


def recurrent_steps(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor | None,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence token by token (decode), fp32: shapes as :func:`chunked_recurrence`,
    ``state: [B, H, Dk, Dv]``; one step per token (a Python loop over the static ``t``)."""
    state = state.float()
    outs = []
    for i in range(q.shape[-2]):
        q_t, k_t, v_t = (x[:, :, i].float() for x in (q, k, v))  # [B, H, D]
        alpha = torch.exp(log_alpha[:, :, i].float())[..., None, None]  # [B, H, 1, 1]
        if beta is None:
            state = alpha * state + k_t[..., :, None] * v_t[..., None, :]
        else:
            b = beta[:, :, i].float()[..., None, None]
            k_s = torch.matmul(k_t[..., None, :], state)  # kᵀS: [B, H, 1, Dv]
            state = alpha * (state - b * k_t[..., :, None] * k_s) + b * k_t[..., :, None] * v_t[..., None, :]
        outs.append(torch.matmul(q_t[..., None, :], state))  # [B, H, 1, Dv]
    return torch.cat(outs, dim=2), state


def naive_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential reference of :func:`chunked_recurrence`: the defining recurrence token by token
    with the explicit ``(I − β k kᵀ)`` product, in fp64, returned in fp32."""
    q, k, v, log_alpha = (x.double() for x in (q, k, v, log_alpha))
    B, H, T, dk = k.shape
    eye = torch.eye(dk, dtype=torch.float64)
    s = (torch.zeros(B, H, dk, v.shape[-1], dtype=torch.float64) if initial_state is None
         else initial_state.double())
    outs = []
    for t in range(T):
        alpha = torch.exp(log_alpha[:, :, t])[..., None, None]
        kv = k[:, :, t, :, None] * v[:, :, t, None, :]  # [B, H, Dk, Dv]
        if beta is None:
            s = alpha * s + kv
        else:
            b = beta.double()[:, :, t][..., None, None]
            erase = eye - b * k[:, :, t, :, None] * k[:, :, t, None, :]  # [B, H, Dk, Dk]
            s = alpha * (erase @ s) + b * kv
        outs.append((s.transpose(-1, -2) @ q[:, :, t, :, None])[..., 0])  # [B, H, Dv]
    return torch.stack(outs, dim=2).float(), s.float()


# --- the fused form: one op per recurrence (ONNX LinearAttention, opset 27) -------------------

#: ``update_rule`` names of ONNX ``LinearAttention`` (opset 27) the students use.
UPDATE_RULES = ("gated", "delta", "gated_delta")
# A plain global, not a ContextVar: torch.cond traces its branches with dynamo, which reads
# module globals but cannot call ContextVar.get. Exports run one at a time.
_FUSED = [False]


@contextlib.contextmanager
def fused_recurrence() -> Iterator[None]:
    """While active, the matrix-state students run each recurrence as one
    ``torch.ops.dtr_compile.linear_attention`` call (:func:`linear_attention_op`) instead of its
    chunked or token-by-token form spelled in plain ops. A trace (``torch.export``) taken inside
    it holds one node per recurrence, which the ONNX exporter writes as ``LinearAttention``
    (opset 27, :mod:`dtr_compile.exporters.fused`). Results in PyTorch are unchanged: the op runs
    :func:`chunked_recurrence`."""
    before, _FUSED[0] = _FUSED[0], True
    try:
        yield
    finally:
        _FUSED[0] = before


def _linear_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           log_alpha: torch.Tensor, beta: torch.Tensor | None,
                           initial_state: torch.Tensor | None, update_rule: str,
                           chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if update_rule not in UPDATE_RULES:
        raise ValueError(f"update_rule must be one of {UPDATE_RULES}, got {update_rule!r}")
    if (beta is None) != (update_rule == "gated"):
        raise ValueError(f"update_rule {update_rule!r} {'takes no' if beta is None else 'needs'} β")
    return chunked_recurrence(q, k, v, log_alpha, beta, chunk_size=chunk_size,
                              initial_state=initial_state)


linear_attention_op = torch.library.custom_op(
    "dtr_compile::linear_attention", _linear_attention_impl, mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor log_alpha, Tensor? beta, Tensor? initial_state, "
           "str update_rule, int chunk_size) -> (Tensor, Tensor)")
linear_attention_op.__doc__ = """One recurrence as one op: :func:`chunked_recurrence` (same
arguments and results, ``update_rule`` in :data:`UPDATE_RULES`: ``"gated"`` without β, ``"delta"``
with ``log_alpha = 0``, ``"gated_delta"``), ONNX ``LinearAttention``'s rules with ``scale = 1``.
Raises ValueError for an unknown rule or a β that does not match it."""


@linear_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
      beta: torch.Tensor | None, initial_state: torch.Tensor | None, update_rule: str,
      chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    return (q.new_empty(B, H, T, dv, dtype=torch.float32),
            q.new_empty(B, H, dk, dv, dtype=torch.float32))


def recurrence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
               beta: torch.Tensor | None, *, update_rule: str, chunk_size: int,
               initial_state: torch.Tensor | None = None, step: bool = False,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The students' one entry to a recurrence (shapes as :func:`chunked_recurrence`): the fused
    op under :func:`fused_recurrence`, else :func:`recurrent_steps` when ``step`` (decode; needs
    ``initial_state``) or :func:`chunked_recurrence`."""
    if _FUSED[0]:
        return linear_attention_op(q, k, v, log_alpha, beta, initial_state, update_rule,
                                   chunk_size)
    if step:
        assert initial_state is not None, "a decode step continues a state"
        return recurrent_steps(q, k, v, log_alpha, beta, initial_state)
    return chunked_recurrence(q, k, v, log_alpha, beta, chunk_size=chunk_size,
                              initial_state=initial_state)


def delay(x: torch.Tensor, steps: int, dim: int) -> torch.Tensor:
    """``x`` shifted ``steps`` positions later along ``dim`` (zeros first, same length): position
    ``t`` holds position ``t − steps``."""
    d = dim % x.dim()
    pad = [0, 0] * (x.dim() - 1 - d) + [steps, 0]
    return F.pad(x, pad).narrow(d, 0, x.shape[d])


#: Shifts of the far keys' log-normaliser ``c_h`` around the teacher's mean that
#: :meth:`MatrixStateStudent.init_from_teacher` tries: −30 makes ``π ≈ 1`` (the window alone).
FAR_BIAS_SHIFTS = (-30.0, -6.0, -4.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class AttentionStatistics:
    """Per-head statistics ``[H]`` of a teacher's softmax attention on the keys a matrix state
    holds (:meth:`MatrixStateStudent.teacher_statistics`): all keys, or with a window those at
    least ``W`` positions back ("far" keys).

    Attributes:
        distance: mean distance ``t − s − W`` of the attention on far keys, weighted by it.
        entropy: entropy of the attention on far keys (renormalised over them), divided by
            ``log(count)``: 0 for one key, 1 for uniform; mass-weighted over queries.
        far_mass: mean share of the attention on far keys.
        far_lse: mean log-normaliser of the far keys, ``log Σ_{s <= t−W} exp(q_t·k_s·scale)``,
            over queries that have any.
    """

    distance: torch.Tensor
    entropy: torch.Tensor
    far_mass: torch.Tensor
    far_lse: torch.Tensor

    def decay(self) -> torch.Tensor:
        """``α = D / (1 + D)`` in ``[0.5, 0.9995]`` (geometric weights of mean distance ``D``)."""
        return (self.distance / (1 + self.distance)).clamp(0.5, 0.9995)

    def write_strength(self) -> torch.Tensor:
        """``β = 1 − Ĥ`` in ``[0.05, 0.95]``."""
        return (1 - self.entropy).clamp(0.05, 0.95)


# --- the students' common module -------------------------------------------------------------


class MatrixStateStudent(LinearStudent):
    """Common part of GLA and DeltaNet students (see :class:`~dtr_compile.linear.base.
    LinearStudent` for the contract): mask handling, kv-head repeat, the output norm, the
    optional sliding window and the stateful form. Subclasses implement :meth:`_inputs` (gates,
    β, q/k transforms).

    With ``window = W > 0`` query ``t`` gets exact softmax over its last ``W`` keys (the site's
    scale; :func:`~dtr_compile.linear.window.sliding_window_attention_lse`) *mixed with* the
    recurrence's normalised read-out of the keys that have left the window (``s <= t − W``)::

        n_t   = RMSNorm_h(S_{t−W}ᵀ q_t) · g_h
        π_t   = σ(lse_t − c_h − u_h·q_t − log r_t)
        out_t = π_t · SWA_W(q_t; k, v)_t + (1 − π_t) · n_t

    where ``S_{t−W}`` is the recurrence run on the keys, values, gates and β delayed by ``W``
    positions, ``lse_t`` the window's log-normaliser ``log Σ_{window} exp(q_t·k_s·scale)`` and
    ``r_t = ms_t / (ms_t + eps) ∈ [0, 1)`` (``ms_t`` the mean square of ``S_{t−W}ᵀ q_t``: 0 while
    no key has left the window, about 1 after). Softmax over all keys *is* this mixture with
    ``π_t = Z_win / (Z_win + Z_far)``, the window's share of the normaliser; the student models
    the far keys' log-normaliser as ``c_h + u_h·q_t`` (a per-head constant and a learned
    projection of the query, which can follow an attention sink's ``q·k_sink``), so the window
    and the state share one normaliser as in LoLCATs (Zhang et al. 2025) without the recurrence
    having one of its own. ``u = 0`` at construction; :meth:`init_from_teacher` sets ``c_h`` from
    the teacher's far log-normalisers and ``g_h`` by least squares. Removing the state's
    read-out leaves ``SWA`` alone (``Z_far = 0``: :meth:`without_linear`). The gates and β read
    the values (:class:`HeadGate`), so a key leaving a stored window has everything its state
    update needs.

    State: ``{"recurrent": [B, H, Dk, Dv]}`` fp32, plus with a window ``window_key: [B, Hkv, W,
    Dk]``, ``window_value: [B, Hkv, W, Dv]`` and ``window_valid: [B, W]`` (the last ``W``
    positions, oldest first). Causal sites only: the recurrence has no bidirectional form (raises
    ValueError; the distillation planner refuses earlier with an InputError naming the site).
    """

    kind = ""
    #: ONNX ``LinearAttention``'s ``update_rule`` of this kind (:data:`UPDATE_RULES`).
    update_rule = ""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, head_dim_v: int, *,
                 mask_kind: str = "none", causal: bool = True, scale: float | None = None,
                 chunk_size: int = 64, window: int = 0) -> None:
        super().__init__()
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        if not causal:
            raise ValueError(f"{self.kind} is causal only (a recurrence over positions)")
        if window < 0:
            raise ValueError(f"window must be >= 0 tokens, got {window}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.head_dim_v = head_dim, head_dim_v
        self.mask_kind, self.causal, self.chunk_size = mask_kind, causal, chunk_size
        self.window = window
        self.scale = scale if scale is not None else head_dim**-0.5
        self.norm = HeadRMSNorm(num_heads, head_dim_v)
        if window:
            self.far_bias = nn.Parameter(torch.zeros(num_heads))  # c_h: [H]
            self.far_gate = nn.Parameter(torch.zeros(num_heads, head_dim))  # u_h: [H, Dk]

    def _inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(q, k, log α, β)`` fp32 from q: [B, H, t, Dk], k: [B, H, t, Dk], v: [B, H, t, Dv]
        and ``valid: [B|1, t]``; padding must give ``log α = 0`` and a zero key (and β = 0)."""
        raise NotImplementedError

    def _heads(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return repeat_kv(k, self.num_heads), repeat_kv(v, self.num_heads)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """q: [B, H, T, Dk], k: [B, Hkv, S, Dk], v: [B, Hkv, S, Dv], the site's mask (read as a
        key padding mask) → [B, H, T, Dv] in q's dtype. Keys align top-left (``S != T``: keys
        ``s >= T`` unseen, as SDPA's ``is_causal``)."""
        valid = None if mask is None else key_valid_from_mask(mask, self.mask_kind)
        return self.forward_valid(q, k, v, valid)

    def _aligned(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_valid: torch.Tensor | None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v repeated to ``H`` heads and aligned to q's ``T``; validity ``[B|1, T]`` fp32."""
        T = q.shape[-2]
        k, v = self._heads(k, v)
        k, v = _align_keys(k, T), _align_keys(v, T)
        valid = key_valid_or_ones(
            None if key_valid is None else _align_keys(key_valid.float()[..., None], T)[..., 0], k)
        return k, v, valid

    def _state_readout(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       valid: torch.Tensor) -> torch.Tensor:
        """The recurrence's read-out (before the norm) for the whole sequence: ``[B, H, T, Dv]``
        fp32; with a window, of the keys ``W`` or more positions back."""
        if self.window:
            k, v, valid = (delay(x, self.window, 2 if x.dim() == 4 else 1) for x in (k, v, valid))
        q_, k_, g, beta = self._inputs(q, k, v, valid)
        out, _ = recurrence(q_, k_, v.float() * valid[:, None, :, None], g, beta,
                            update_rule=self.update_rule, chunk_size=self.chunk_size)
        return out

    def window_share(self, o: torch.Tensor, lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``π: [B, H, t, 1]``, the window's share of the output (class docstring) from the
        state's raw read-out ``o: [B, H, t, Dv]``, the window's log-normaliser ``lse: [B, H, t]``
        and the queries ``q: [B, H, t, Dk]``; fp32."""
        ms = o.square().mean(-1)  # [B, H, t]
        log_r = torch.log(ms + 1e-30) - torch.log(ms + self.norm.eps)  # log r_t <= 0
        far = torch.matmul(q.float(), self.far_gate.float()[:, :, None])[..., 0]  # u·q: [B, H, t]
        logit = lse - self.far_bias.float()[None, :, None] - far - log_r
        return torch.sigmoid(logit)[..., None]

    def _mix(self, o: torch.Tensor, sw: torch.Tensor, lse: torch.Tensor,
             q: torch.Tensor) -> torch.Tensor:
        """``π·SWA + (1 − π)·RMSNorm(o)·g`` (fp32 ``[B, H, t, Dv]``)."""
        pi = self.window_share(o, lse, q)
        return pi * sw + (1.0 - pi) * self.norm(o)

    def forward_valid(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_valid: torch.Tensor | None) -> torch.Tensor:
        """:meth:`forward` from a key padding vector ``key_valid: [B|1, S]`` (1 = real token)
        instead of the site's mask (what distillation records)."""
        k, v, valid = self._aligned(q, k, v, key_valid)
        o = self._state_readout(q, k, v, valid)
        if not self.window:
            return self.norm(o).to(q.dtype)
        sw, lse = sliding_window_attention_lse(q, k, v, valid, window=self.window,
                                               scale=self.scale, chunk_size=self.chunk_size)
        return self._mix(o, sw, lse, q).to(q.dtype)

    def without_linear(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       key_valid: torch.Tensor | None) -> torch.Tensor:
        """The window's part alone (the state's read-out removed; see :meth:`LinearStudent.
        without_linear`); zeros without a window. fp32 ``[B, H, T, Dv]``."""
        if not self.window:
            return torch.zeros(*q.shape[:-1], self.head_dim_v, dtype=torch.float32,
                               device=q.device)
        k, v, valid = self._aligned(q, k, v, key_valid)
        return sliding_window_attention(q, k, v, valid, window=self.window, scale=self.scale,
                                        chunk_size=self.chunk_size)

    @torch.no_grad()
    def teacher_statistics(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           key_valid: torch.Tensor | None) -> AttentionStatistics:
        """Per-head statistics of the teacher — softmax attention with the site's scale, causal,
        over valid keys — on these rows (real query positions only), of the keys the state
        holds: those at least ``W`` positions back (all of them without a window). Shapes as
        :meth:`forward_valid`; one head at a time, ``O(B·T²)`` memory."""
        T, H, W = q.shape[-2], self.num_heads, self.window
        k, v, valid = self._aligned(q, k, v, key_valid)
        pos = torch.arange(T, device=q.device)
        dist = (pos[:, None] - pos[None, :]).float()  # [T, T], t − s
        causal = dist >= 0
        far = dist >= W  # the state's keys, beside the window's
        acc = torch.zeros(6, H, dtype=torch.float64)  # mass, dist·p, entropy·mass, its weight, Σ lse_far, n
        for h in range(H):
            scores = torch.matmul(q[:, h].float(), k[:, h].float().transpose(-1, -2)) * self.scale
            allowed = causal & (valid[:, None, :] > 0)  # [B, T, T]
            scores = scores.masked_fill(~allowed, -torch.inf)
            log_z = torch.logsumexp(scores, dim=-1, keepdim=True)  # [B, T, 1]
            p = torch.exp(scores - log_z).nan_to_num(0.0)  # a query without a real key: 0
            p_far = p * far
            mass = p_far.sum(-1)  # [B, T]
            qw = valid.expand_as(mass) * (log_z[..., 0] > -torch.inf)  # real queries
            count = (allowed & far).sum(-1)  # [B, T] far keys
            has = (count > 0) & (qw > 0)
            share = p_far / mass.clamp_min(1e-30)[..., None]
            ent = -(share * torch.log(share.clamp_min(1e-30))).sum(-1)  # [B, T]
            ent = ent / torch.log(count.clamp_min(2).float())  # normalised: 0 (one key) … 1
            lse_far = torch.logsumexp(scores.masked_fill(~far, -torch.inf), dim=-1)
            acc[:, h] = torch.stack([
                (mass * qw).sum(), (p_far * (dist - W)).sum(-1).mul(qw).sum(),
                (ent * mass * qw * (count > 1)).sum(), (mass * qw * (count > 1)).sum(),
                torch.where(has, lse_far, 0.0).sum(), has.sum()]).double()
        mass, dist_sum, ent_sum, ent_w, lse_sum, n = acc
        return AttentionStatistics(
            distance=(dist_sum / mass.clamp_min(1e-30)).float(),
            entropy=torch.where(ent_w > 0, ent_sum / ent_w.clamp_min(1e-30), 1.0).float(),
            far_mass=(mass / n.clamp_min(1.0)).float(),
            far_lse=torch.where(n > 0, lse_sum / n.clamp_min(1.0), 0.0).float())

    @torch.no_grad()
    def init_from_teacher(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          key_valid: torch.Tensor | None, *, statistics: bool = True) -> None:
        """Start the student near the teacher on these rows (shapes as :meth:`forward_valid`;
        called once before training, ``distill.train``).

        With ``statistics`` (Taylor-Calibrate, 2026: decays from the attention distance, write
        strength from the attention entropy; LoLCATs, Zhang et al. 2025, for the window and
        state sharing one normaliser), from :meth:`teacher_statistics` of the keys the state
        holds (at least ``W`` back):

        * decay ``α_h = D_h / (1 + D_h)`` (``gla``, ``gated-deltanet``; ``gate.bias``): the
          geometric weights ``α^d`` have mean distance ``α / (1 − α) = D_h``, the teacher's mean
          distance (past the window's edge) of its attention on those keys; clamped to
          ``[0.5, 0.9995]``;
        * write strength ``β_h = 1 − Ĥ_h`` (``deltanet``, ``gated-deltanet``; ``beta.bias``),
          ``Ĥ`` the teacher's entropy on those keys normalised by ``log(count)``: sharp attention
          (one key) overwrites, diffuse attention averages; clamped to ``[0.05, 0.95]``.

        Without it the gates keep their construction values (slow decays, ``β = σ(−1)``). Then,
        either way, the output: with a window the far keys' log-normaliser ``c_h``
        (``far_bias``) starts at the teacher's mean ``log Σ_{s <= t−W} exp(q_t·k_s·scale)``
        (``u = 0``), so ``π_t`` starts at the teacher's window share up to the spread of that
        term, and the gain ``g_h`` is the least-squares fit (``>= 0``) of ``teacher − π·SWA ≈
        (1 − π)·g·n̂`` (``n̂`` the unit-RMS read-out); ``c_h`` is then the best of that mean
        shifted by each of :data:`FAR_BIAS_SHIFTS` (per head, by the fitted error), the most
        negative of which is the window alone (``π ≈ 1``), so the student starts no further
        from the teacher than the window does; without one, ``g_h`` is the teacher's per-head output RMS
        (the normalised output has RMS 1 per position, so the student starts at the teacher's
        scale instead of 1, which can be 20× off).
        """
        T = q.shape[-2]
        stats = self.teacher_statistics(q, k, v, key_valid)
        if statistics:
            gate, beta_gate = getattr(self, "gate", None), getattr(self, "beta", None)
            if isinstance(gate, HeadGate):
                alpha = stats.decay()
                gate.bias.copy_(torch.log(alpha / (1 - alpha)))
            if isinstance(beta_gate, HeadGate):
                beta = stats.write_strength()
                beta_gate.bias.copy_(torch.log(beta / (1 - beta)))
        k, v, valid = self._aligned(q, k, v, key_valid)
        allowed = (valid[:, None, None, :] > 0) & torch.ones(T, T, dtype=torch.bool,
                                                             device=q.device).tril()
        out = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=allowed, scale=self.scale)  # [B, H, T, Dv]
        w = valid[:, None, :, None].expand_as(out)  # real query positions
        if self.window:
            self.far_gate.zero_()
            sw, lse = sliding_window_attention_lse(q, k, v, valid, window=self.window,
                                                   scale=self.scale, chunk_size=self.chunk_size)
            o = self._state_readout(q, k, v, valid)
            unit = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + self.norm.eps)
            best_err = torch.full_like(stats.far_lse, torch.inf, dtype=torch.float64)
            bias, gain = stats.far_lse.clone(), torch.full_like(stats.far_lse, 1e-6)
            for shift in FAR_BIAS_SHIFTS:  # c_h = the teacher's mean, or off it by `shift`
                self.far_bias.copy_(stats.far_lse + shift)
                pi = self.window_share(o, lse, q)
                n, rest = (1.0 - pi) * unit, out - pi * sw
                nr = (n * rest * w).sum(dim=(0, 2, 3)).double()
                nn_ = (n.square() * w).sum(dim=(0, 2, 3)).double().clamp_min(1e-30)
                g = (nr / nn_).clamp_min(0.0)  # least squares, >= 0
                err = (rest.square() * w).sum(dim=(0, 2, 3)).double() - 2 * g * nr + g * g * nn_
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                bias = torch.where(better, stats.far_lse + shift, bias)
                gain = torch.where(better, g.float().clamp_min(1e-6), gain)
            self.far_bias.copy_(bias)
        else:
            gain = ((out.square() * w).sum(dim=(0, 2, 3))
                    / w.sum(dim=(0, 2, 3)).clamp_min(1.0)).sqrt().clamp_min(1e-6)
        self.norm.weight.copy_(gain[:, None].expand_as(self.norm.weight))

    def one_form(self) -> bool:
        """True while tracing the fused form (:func:`fused_recurrence`) without a window: the
        ``LinearAttention`` op runs one token as its recurrence (no padded chunk), so the
        stateful graph needs no ``If`` between phases."""
        return _FUSED[0] and not self.window

    def state_names(self) -> tuple[str, ...]:
        """``("recurrent",)``, plus ``("window_key", "window_value", "window_valid")`` with a
        window."""
        names: tuple[str, ...] = ("recurrent",)
        return names + (("window_key", "window_value", "window_valid") if self.window else ())

    def init_state(self, batch: int, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """``{"recurrent": zeros [batch, H, Dk, Dv]}`` (fp32 whatever ``dtype``); with a window
        also ``window_key: [B, Hkv, W, Dk]`` / ``window_value: [B, Hkv, W, Dv]`` zeros in
        ``dtype`` and ``window_valid: [B, W]`` zeros (no key yet)."""
        state = {"recurrent": torch.zeros(batch, self.num_heads, self.head_dim, self.head_dim_v,
                                          dtype=torch.float32, device=device)}
        if self.window:
            W, hkv = self.window, self.num_kv_heads
            state["window_key"] = torch.zeros(batch, hkv, W, self.head_dim, dtype=dtype,
                                              device=device)
            state["window_value"] = torch.zeros(batch, hkv, W, self.head_dim_v, dtype=dtype,
                                                device=device)
            state["window_valid"] = torch.zeros(batch, W, dtype=torch.float32, device=device)
        return state

    def _step_inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_valid: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        k, v = self._heads(k, v)
        q_, k_, g, beta = self._inputs(q, k, v, key_valid)
        return q_, k_, v.float() * key_valid[:, None, :, None], g, beta

    def decode_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_valid: torch.Tensor, state: dict[str, torch.Tensor],
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One token (position 0) after ``state``: one step of the recurrence
        (:func:`recurrent_steps`), normalised; see :meth:`LinearStudent.decode_step`. With a
        window the step's key is the one leaving the window (the oldest stored), and the query
        also attends the other ``W − 1`` stored keys and its own
        (:func:`~dtr_compile.linear.window.window_attention_step`). O(``Dk·Dv + W·D``) per head."""
        q, k, v = first_token(q, 2), first_token(k, 2), first_token(v, 2)
        valid = first_token(key_valid, 1)  # [B, 1]
        if not self.window:
            q_, k_, v_, g, beta = self._step_inputs(q, k, v, valid)
            out, s = recurrence(q_, k_, v_, g, beta, update_rule=self.update_rule,
                                chunk_size=self.chunk_size, initial_state=state["recurrent"],
                                step=True)
            return self.norm(out), {"recurrent": s}
        win_k, win_v = state["window_key"], state["window_value"]  # [B, Hkv, W, D]
        win_valid = state["window_valid"].float()  # [B, W]
        q_, k_, v_, g, beta = self._step_inputs(q, win_k[:, :, :1].to(k.dtype),
                                                win_v[:, :, :1].to(v.dtype), win_valid[:, :1])
        out, s = recurrence(q_, k_, v_, g, beta, update_rule=self.update_rule,
                            chunk_size=self.chunk_size, initial_state=state["recurrent"], step=True)
        keys = torch.cat([win_k[:, :, 1:].to(k.dtype), k], dim=2)  # [B, Hkv, W, Dk]
        values = torch.cat([win_v[:, :, 1:].to(v.dtype), v], dim=2)
        keys_valid = torch.cat([win_valid[:, 1:], valid], dim=1)  # [B, W]
        kh, vh = self._heads(keys, values)
        sw, lse = window_attention_step(q, kh, vh, keys_valid, scale=self.scale)
        out = self._mix(out, sw, lse, q)
        return out, {
            "recurrent": s,
            "window_key": keys.to(win_k.dtype),
            "window_value": values.to(win_v.dtype),
            "window_valid": keys_valid.to(state["window_valid"].dtype),
        }

    def extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_valid: torch.Tensor, state: dict[str, torch.Tensor],
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``t`` tokens after ``state``: the chunked form from the state (prefill). With a
        window the recurrence takes the first ``t`` of ``[stored window; new keys]`` (the keys
        leaving the window) and the new queries attend ``[stored window; new keys]`` by
        :func:`~dtr_compile.linear.window.sliding_window_attention`; the last ``W`` positions
        become the new window."""
        t = q.shape[-2]
        if not self.window:
            q_, k_, v_, g, beta = self._step_inputs(q, k, v, key_valid)
            out, s = recurrence(q_, k_, v_, g, beta, update_rule=self.update_rule,
                                chunk_size=self.chunk_size, initial_state=state["recurrent"])
            return self.norm(out), {"recurrent": s}
        W = self.window
        C, win_k, win_v, win_valid = stored_window(state, W, self.chunk_size, k.dtype)
        lead = C - W
        k_all, v_all = torch.cat([win_k, k], dim=2), torch.cat([win_v, v], dim=2)  # [B, Hkv, C+t, D]
        valid_all = torch.cat([win_valid, key_valid], dim=1)  # [B, C+t]
        # gathers, not slices: torch.export cannot prove slice bounds of C + t for every t
        leave = torch.arange(lead, lead + t, device=q.device)  # [t]: they enter the state
        keep = torch.arange(lead + t, C + t, device=q.device)  # [W]: the new window
        q_, k_, v_, g, beta = self._step_inputs(q, k_all.index_select(2, leave),
                                                v_all.index_select(2, leave),
                                                valid_all.index_select(1, leave))
        out, s = recurrence(q_, k_, v_, g, beta, update_rule=self.update_rule,
                            chunk_size=self.chunk_size, initial_state=state["recurrent"])
        q_all = torch.cat([q.new_zeros(q.shape[0], q.shape[1], C, q.shape[-1]), q], dim=2)
        # heads repeated before concatenating: repeating a length C + t makes torch.export guard
        kh = torch.cat([repeat_kv(win_k, self.num_heads), repeat_kv(k, self.num_heads)], dim=2)
        vh = torch.cat([repeat_kv(win_v, self.num_heads), repeat_kv(v, self.num_heads)], dim=2)
        sw, lse = sliding_window_attention_lse(q_all, kh, vh, valid_all, window=W,
                                               scale=self.scale, chunk_size=self.chunk_size)
        new = torch.arange(C, C + t, device=q.device)  # [B, H, C+t, Dv] → the new positions
        out = self._mix(out, sw.index_select(2, new), lse.index_select(2, new), q)
        return out, {
            "recurrent": s,
            "window_key": k_all.index_select(2, keep).to(state["window_key"].dtype),
            "window_value": v_all.index_select(2, keep).to(state["window_value"].dtype),
            "window_valid": valid_all.index_select(1, keep).to(state["window_valid"].dtype),
        }
