"""The contract every linear-attention student meets: prefill form and stateful (decode) form.

A *student* replaces one softmax attention site. The rewrite passes only rely on this contract, so
a new kind (feature-map attention, gated linear attention, (gated) DeltaNet, …) is one new module
in :mod:`dtr_compile.linear` that subclasses :class:`LinearStudent`.

Shapes: ``q: [B, H, T, Dk]``, ``k: [B, Hkv, T, Dk]``, ``v: [B, Hkv, T, Dv]``; ``key_valid: [B, T]``
(1 = a real token, 0 = padding; ``None``: all valid); outputs ``[B, H, T, Dv]`` in ``q``'s dtype.

Two forms, which must agree (tested against each other and against an fp32 naive reference):

* :meth:`LinearStudent.forward` — the whole sequence at once (prefill, training, the search);
  takes the site's own mask, as the teacher did.
* :meth:`LinearStudent.forward_stateful` — ``t >= 1`` new tokens after a past summarised in a
  fixed-size *recurrent state* (a dict of tensors, names from :meth:`state_names`). Prefill of
  ``P`` tokens then ``forward_stateful`` on the next ``t`` equals :meth:`forward` on ``P + t``
  tokens at the last ``t`` positions. Padding tokens (``key_valid == 0``) never enter a state.
  Causal sites only; the stateful export (``passes/stateful``) names the tensors
  ``past.{layer}.{name}`` / ``present.{layer}.{name}`` (onnxruntime-genai's convention).

The stateful form has two phases, chosen per call by :func:`by_phase`: *decode* (``t == 1``,
:meth:`LinearStudent.decode_step`: the recurrence for one token, O(state) work) and *extend*
(``t > 1``, :meth:`LinearStudent.extend`: the chunked form from the state, the prefill). Under
``torch.export`` with a dynamic ``t`` both are traced into one ``torch.cond`` (ONNX ``If``), so
one decoder graph serves prefill and decode and a decode step never pays for a padded chunk; a
student whose extend is one fused op for every ``t`` (:meth:`LinearStudent.one_form`) skips it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

#: A form of the stateful step on flat tensors: ``(q, k, v, key_valid, *state) → (out, *state)``.
StepFn = Callable[..., tuple[torch.Tensor, ...]]


def align_length(x: torch.Tensor, length: int | torch.SymInt, dim: int) -> torch.Tensor:
    """``x`` with axis ``dim`` of size ``length`` (cut, or zero-padded at the end); ``x`` itself
    when the sizes are provably equal.

    The captured graph may spell the new tokens' length differently for ``q``, ``k`` and the mask
    (the same value, different symbols); expressing ``k``, ``v`` and the mask in ``q``'s length
    keeps torch.export from adding guards that pin the length (``t <= 64``) when they meet.
    """
    if statically_known_true(x.shape[dim] == length):
        return x
    d = dim % x.dim()
    pad: list[Any] = [0, 0] * (x.dim() - 1 - d) + [0, length]  # ints or SymInts
    return F.pad(x, pad).narrow(d, 0, length)


def first_token(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Position 0 of ``x`` along ``dim``, kept as an axis of static size 1.

    A gather with a constant index, not ``x[:, :1]``: under ``torch.export`` the slice of a
    symbolic length has a symbolic size (``min(1, t)``), and a ``torch.cond`` branch cannot add
    the guard that would tie it to a static axis it is concatenated or broadcast with. ``x``
    itself when the axis is statically 1 (a graph traced at ``t = 1``: no op at all).
    """
    if isinstance(x.shape[dim], int) and x.shape[dim] == 1:
        return x
    return x.index_select(dim, torch.zeros(1, dtype=torch.long, device=x.device))


def group_heads(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``x: [B, H, 1, D]`` (one token) → ``[B, Hkv, H/Hkv, D]``: the query heads of each key/value
    head side by side, so one matmul against ``[B, Hkv, W, D]`` keys serves the group (GQA's
    layout, no repeated keys)."""
    return x.reshape(x.shape[0], num_kv_heads, x.shape[1] // num_kv_heads, x.shape[-1])


def window_terms_step(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      keys_valid: torch.Tensor, *, scale: float,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """One query per row against its stored window, unnormalised (decode).

    Args:
        q: ``[B, H, 1, Dk]``; keys: ``[B, Hkv, W, Dk]``; values: ``[B, Hkv, W, Dv]`` — the
            window including the query's own key (key/value heads not repeated: each group of
            ``H / Hkv`` query heads is one matmul against its key head); keys_valid: ``[B, W]``
            (1 = real key).
        scale: the softmax scale.
        weight: ``[H]`` factor of each head's weights, or None.

    Returns:
        ``[B, H, 1, Dv + 1]`` fp32: ``Σ_s a_s [v_s, 1]`` over the valid keys, with
        ``a_s = weight · exp(q·k_s·scale − max_s q·k_s·scale)``: the numerator and the weight sum
        of softmax attention in one matmul (0 for a window with no valid key).
    """
    b, h = q.shape[0], q.shape[1]
    hkv = keys.shape[1]
    qg = group_heads(q.float(), hkv)  # [B, Hkv, g, Dk]
    scores = torch.matmul(qg, keys.float().transpose(-1, -2)) * scale  # [B, Hkv, g, W]
    allowed = (keys_valid > 0)[:, None, None, :]  # [B, 1, 1, W]
    scores = torch.where(allowed, scores, -1.0e9)
    a = torch.exp(scores - scores.amax(dim=-1, keepdim=True)) * allowed.float()
    if weight is not None:
        a = a * weight.float().reshape(hkv, h // hkv, 1)
    v1 = F.pad(values.float(), (0, 1), value=1.0)  # [B, Hkv, W, Dv+1]: [v, 1]
    return torch.matmul(a, v1).reshape(b, h, 1, v1.shape[-1])  # [B, H, 1, Dv+1]


# A plain global, not a ContextVar: torch.export reads module globals while tracing. Exports run
# one at a time.
_EXTEND_ONLY = [False]


@contextlib.contextmanager
def extend_only() -> Iterator[None]:
    """While active, :func:`by_phase` calls ``extend`` whatever ``t``: a trace with a symbolic
    ``t`` then holds the chunked form alone, no ``torch.cond`` (the prefill graph of a decoder
    whose one-token steps are traced separately, at a static ``t = 1``)."""
    before, _EXTEND_ONLY[0] = _EXTEND_ONLY[0], True
    try:
        yield
    finally:
        _EXTEND_ONLY[0] = before


def by_phase(t: int | torch.SymInt, decode: StepFn, extend: StepFn,
             operands: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``decode(*operands)`` when ``t == 1``, else ``extend(*operands)``.

    A plain ``if`` when ``t`` is a Python int (eager PyTorch, or a static export); ``extend``
    under :func:`extend_only`; else ``torch.cond`` (``torch.export`` with a dynamic sequence
    axis), which exports as one ONNX ``If`` whose two branches are both in the graph. Both forms
    must return tensors of the same shapes and dtypes (``torch.cond``'s rule).
    """
    if isinstance(t, int):
        return (decode if t == 1 else extend)(*operands)
    if _EXTEND_ONLY[0]:
        return extend(*operands)

    def dense(form: StepFn) -> StepFn:
        # torch.cond merges the branches' outputs only when their strides and storage offsets
        # agree (a state sliced off a scan has an offset): fresh dense tensors
        def run(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(x.clone(memory_format=torch.contiguous_format) for x in form(*xs))
        return run

    # torch.cond refuses operands that alias each other (GPT-2's q, k, v are views of one
    # projection); clones cost nothing in the exported graph (Identity), and eager never gets here
    return torch.cond(t == 1, dense(decode), dense(extend), tuple(x.clone() for x in operands))


def stored_window(state: dict[str, torch.Tensor], window: int, chunk_size: int,
                  dtype: torch.dtype) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A state's stored window as one leading chunk for the chunked forms' ``extend``.

    ``[lead zeros; last W keys]`` with ``C = max(chunk_size, W)`` positions, so ``[window; new]``
    has length ``C + t`` and torch.export sees a whole number of chunks (no guard on ``t``).

    Returns:
        ``(C, keys: [B, Hkv, C, Dk], values: [B, Hkv, C, Dv]`` in ``dtype``, ``valid: [B, C]``
        fp32) from ``state["window_key" | "window_value" | "window_valid"]``.
    """
    C = max(chunk_size, window)
    lead = C - window

    def front(x: torch.Tensor, dim: int) -> torch.Tensor:
        pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [lead, 0]
        return F.pad(x, pad) if lead else x

    return (C, front(state["window_key"].to(dtype), 2), front(state["window_value"].to(dtype), 2),
            front(state["window_valid"].float(), 1))


class LinearStudent(nn.Module):
    """Base class of linear-attention students (see the module docstring for the contract).

    Attributes:
        num_heads: ``H``.
        num_kv_heads: ``Hkv``.
        causal: whether the site is causal (only causal students have a stateful form).
        window: ``W > 0``: exact softmax over the last ``W`` keys beside the linear part.
    """

    num_heads: int
    num_kv_heads: int
    causal: bool
    window: int = 0

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q: [B, H, T, Dk], k: [B, Hkv, S, Dk], v: [B, Hkv, S, Dv], mask as the site's
        → [B, H, T, Dv]."""
        raise NotImplementedError

    def without_linear(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       key_valid: torch.Tensor | None) -> torch.Tensor:
        """The output with the linear branch removed: the sliding window's exact softmax alone
        (as the student weighs it), zeros without a window. Shapes as :meth:`forward`, with a key
        padding vector ``key_valid: [B|1, S]`` instead of the mask; fp32. Distillation's
        diagnostic of how much the linear branch contributes (``DistillResult.
        linear_contribution``)."""
        raise NotImplementedError

    def state_names(self) -> tuple[str, ...]:
        """Names of the recurrent-state tensors, in a fixed order (e.g. ``("recurrent",)``)."""
        raise NotImplementedError

    def init_state(
        self, batch: int, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """The state of an empty past (``P = 0``) for ``batch`` sequences."""
        raise NotImplementedError

    def forward_stateful(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_valid: torch.Tensor | None,
        state: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``t`` new tokens after the past in ``state``: :meth:`decode_step` when ``t == 1``,
        else :meth:`extend` (see :func:`by_phase`).

        Args:
            q: [B, H, t, Dk]; k: [B, Hkv, t, Dk]; v: [B, Hkv, t, Dv] — the new tokens only.
            key_valid: [B, t] of the new tokens (left padding: leading zeros), or None.
            state: as returned by :meth:`init_state` or a previous call.

        Returns:
            ``(out: [B, H, t, Dv]`` in q's dtype``, new state)`` — the state has the same names,
            shapes and dtypes.

        Raises:
            ValueError: the site is not causal (a bidirectional site has no past/future split).
        """
        if not self.causal:
            raise ValueError("forward_stateful needs a causal site (a bidirectional site has no "
                             "past/future split)")
        names = self.state_names()
        shapes = {n: tuple(x.shape[1:]) for n, x in  # static, per stream; meta: no allocation
                  self.init_state(1, device=torch.device("meta")).items()}
        t = q.shape[-2]
        # static head counts: the captured graph may compute them (a view with -1), and inside
        # torch.cond's branches such an expression stays symbolic and the branches disagree
        b = q.shape[0]
        q = q.reshape(b, self.num_heads, t, q.shape[-1])
        k = align_length(k, t, 2).reshape(b, self.num_kv_heads, t, k.shape[-1])
        v = align_length(v, t, 2).reshape(b, self.num_kv_heads, t, v.shape[-1])
        valid = (torch.ones_like(k[:, 0, :, 0], dtype=torch.float32) if key_valid is None
                 else align_length(key_valid.to(torch.float32), t, 1).expand(k.shape[0], -1))

        def flat(form: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]],
                 expand: bool) -> StepFn:
            def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                    *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
                out, new = form(q, k, v, valid, dict(zip(names, past, strict=True)))
                if expand:  # one token computed; t == 1 whenever this branch runs
                    # static head count and dense strides: torch.cond needs both branches'
                    # outputs alike, and q's head axis may be a symbolic expression in the graph
                    dv = out.shape[-1]
                    out = out.reshape(q.shape[0], self.num_heads, 1, dv).expand(
                        q.shape[0], self.num_heads, q.shape[-2], dv)
                # static shapes: head axes computed in the graph are symbolic expressions, and
                # torch.cond needs both branches' outputs alike
                b = q.shape[0]  # the branch's own: a closure over an outer SymInt breaks tracing
                return (out.to(q.dtype), *(new[n].to(past[i].dtype).reshape(b, *shapes[n])
                                           for i, n in enumerate(names)))
            return run

        operands = (q, k, v, valid, *(state[n] for n in names))
        if self.one_form():
            outs = flat(self.extend, False)(*operands)
        else:
            outs = by_phase(t, flat(self.decode_step, True), flat(self.extend, False), operands)
        return outs[0], dict(zip(names, outs[1:], strict=True))

    def one_form(self) -> bool:
        """Whether :meth:`extend` serves ``t == 1`` as cheaply as :meth:`decode_step` (a fused
        op with its own per-length kernels): then :meth:`forward_stateful` calls it alone, with
        no ``torch.cond``. False here."""
        return False

    def decode_step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor,
        state: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One new token (position 0 of ``q, k, v, key_valid``; any later positions are ignored)
        after ``state``: the recurrent form. Shapes as :meth:`forward_stateful` with ``t = 1``,
        ``key_valid: [B, t]`` fp32; ``out: [B, H, 1, Dv]``."""
        raise NotImplementedError

    def extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor,
        state: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``t >= 1`` new tokens after ``state``: the chunked form (prefill). Shapes as
        :meth:`forward_stateful`, ``key_valid: [B, t]`` fp32."""
        raise NotImplementedError
