"""Peak memory of the sliding-window forms (issue 24: the hybrid's prefill peak in onnxruntime
must not exceed the original's).

The forms are traced with ``torch.export`` and their intermediates walked in graph order, each
freed after its last use (views are not counted: they share their input's storage; onnxruntime
frees a value after its last consumer too). The peak of the live intermediates, in units of
one ``[B, H, T, 64]`` fp32 tensor, must stay a small constant: ``O(T·W)``, not ``O(T²)``, and
without the ``[N, 2C, D]`` concatenations of the previous and own chunk's keys, values and
features that each held a second copy of them (6.9 units for the softmax window and 11.2 for
the feature-map one before; 3.7 and 7.2 after).
"""

from __future__ import annotations

import torch

from dtr_compile.linear.kernel import sliding_window_linear_attention
from dtr_compile.linear.window import sliding_window_attention_lse

B, H, D, W = 1, 1, 64, 64


def peak_live_bytes(fn, *args: torch.Tensor) -> int:  # noqa: ANN001
    """Peak bytes of ``fn(*args)``'s live intermediates in its exported graph's order (inputs
    and views not counted)."""

    class Wrap(torch.nn.Module):
        def forward(self, *a: torch.Tensor):  # noqa: ANN202
            return fn(*a)

    nodes = list(torch.export.export(Wrap(), args).graph.nodes)
    last = {a: i for i, n in enumerate(nodes) for a in n.all_input_nodes}
    live: dict[torch.fx.Node, int] = {}
    cur = peak = 0
    for i, n in enumerate(nodes):
        if n.op == "call_function" and not getattr(n.target, "is_view", False):
            val = n.meta.get("val")
            vals = val if isinstance(val, (list, tuple)) else [val]
            live[n] = sum(t.numel() * t.element_size() for t in vals if isinstance(t, torch.Tensor))
            cur += live[n]
            peak = max(peak, cur)
        for a in n.all_input_nodes:
            if last[a] == i and a in live:
                cur -= live.pop(a)
    return peak


def _inputs(T: int, n: int) -> list[torch.Tensor]:
    """q, k, v ``[B, H, T, D]`` and (``n = 5``) positive features ``[B, H, T, 2D]``."""
    g = torch.Generator().manual_seed(T)
    qkv = [torch.randn(B, H, T, D, generator=g) for _ in range(3)]
    return qkv + [torch.rand(B, H, T, 2 * D, generator=g) for _ in range(n - 3)]


def _window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return sliding_window_attention_lse(q, k, v, None, window=W, scale=D**-0.5)[0]


def _feature_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi_q: torch.Tensor,
                    phi_k: torch.Tensor) -> torch.Tensor:
    return sliding_window_linear_attention(q, k, v, phi_q, phi_k, None, window=W,
                                           scale=D**-0.5)


def test_window_forms_peak_is_a_few_sequence_tensors() -> None:
    """At T = 1024 the softmax window's peak is under 5 and the feature-map window's (features
    of width 2D) under 9 ``[B, H, T, D]`` tensors, and both grow linearly with ``T``."""
    unit = B * H * 1024 * D * 4
    for name, fn, n_in, bound in (("softmax window", _window, 3, 5.0),
                                  ("feature-map window", _feature_window, 5, 9.0)):
        peaks = {}
        for T in (1024, 2048):
            peaks[T] = peak_live_bytes(fn, *_inputs(T, n_in))
        assert peaks[1024] <= bound * unit, (name, peaks[1024] / unit)
        assert peaks[2048] <= 2.1 * peaks[1024], (name, peaks)  # O(T), no T² term
