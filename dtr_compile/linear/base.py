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
one decoder graph serves prefill and decode and a decode step never pays for a padded chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: A form of the stateful step on flat tensors: ``(q, k, v, key_valid, *state) → (out, *state)``.
StepFn = Callable[..., tuple[torch.Tensor, ...]]


def by_phase(t: int | torch.SymInt, decode: StepFn, extend: StepFn,
             operands: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``decode(*operands)`` when ``t == 1``, else ``extend(*operands)``.

    A plain ``if`` when ``t`` is a Python int (eager PyTorch, or a static export); ``torch.cond``
    when it is symbolic (``torch.export`` with a dynamic sequence axis), which exports as one ONNX
    ``If`` whose two branches are both in the graph. Both forms must return tensors of the same
    shapes and dtypes (``torch.cond``'s rule).
    """
    if isinstance(t, int):
        return (decode if t == 1 else extend)(*operands)
    return torch.cond(t == 1, decode, extend, operands)


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
        valid = (torch.ones_like(k[:, 0, :, 0], dtype=torch.float32) if key_valid is None
                 else key_valid.to(torch.float32).expand(k.shape[0], -1))  # [B, t]

        def flat(form: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]],
                 expand: bool) -> StepFn:
            def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                    *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
                out, new = form(q, k, v, valid, dict(zip(names, past, strict=True)))
                if expand:  # one token computed; t == 1 whenever this branch runs
                    out = out.expand(-1, -1, q.shape[-2], -1).clone()
                return (out.to(q.dtype), *(new[n].to(past[i].dtype) for i, n in enumerate(names)))
            return run

        outs = by_phase(q.shape[-2], flat(self.decode_step, True), flat(self.extend, False),
                        (q, k, v, valid, *(state[n] for n in names)))
        return outs[0], dict(zip(names, outs[1:], strict=True))

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
