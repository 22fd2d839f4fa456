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
"""

from __future__ import annotations

import torch
from torch import nn


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
        """``t`` new tokens after the past in ``state``.

        Args:
            q: [B, H, t, Dk]; k: [B, Hkv, t, Dk]; v: [B, Hkv, t, Dv] — the new tokens only.
            key_valid: [B, t] of the new tokens (left padding: leading zeros), or None.
            state: as returned by :meth:`init_state` or a previous call.

        Returns:
            ``(out: [B, H, t, Dv], new state)`` — the state has the same names, shapes and dtypes.
        """
        raise NotImplementedError
