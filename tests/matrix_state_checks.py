"""Checks shared by tests/test_linear_gated.py and tests/test_linear_delta.py: every form of a
matrix-state student (chunked, token-by-token, the module's prefill and stateful forms) against
the fp64 sequential reference, as max-abs and relative RMS errors."""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

from dtr_compile.linear.delta import DeltaNet, l2_normalise
from dtr_compile.linear.gated import GatedLinearAttention
from dtr_compile.linear.recurrence import (
    MatrixStateStudent,
    chunked_recurrence,
    delay,
    naive_recurrence,
    recurrent_steps,
)
from dtr_compile.linear.window import naive_sliding_window_attention, naive_window_lse

TOL = 2e-5


def seeded(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max-abs relative to ref's max-abs, rel-RMS)."""
    out, ref = out.detach().double(), ref.detach().double()
    diff = out - ref
    scale = float(ref.abs().max().clamp_min(1.0))
    return float(diff.abs().max()) / scale, float(diff.norm() / ref.norm().clamp_min(1e-30))


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float = TOL, what: str = "") -> None:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    max_abs, rel_rms = errors(out, ref)
    assert max_abs <= tol and rel_rms <= tol, f"{what} max_abs={max_abs:.3g} rel_rms={rel_rms:.3g}"


def functional_inputs(kind: str, B: int, H: int, T: int, dk: int, dv: int, g: torch.Generator,
                      ) -> tuple[torch.Tensor, ...]:
    """(q, k, v, log α, β or None) as the students feed them: unit q/k for the delta rule,
    decays in (0.5, 1), β in (0, 1)."""
    q, k = torch.randn(B, H, T, dk, generator=g), torch.randn(B, H, T, dk, generator=g)
    v = torch.randn(B, H, T, dv, generator=g)
    log_alpha = F.logsigmoid(torch.randn(B, H, T, generator=g) + 3.0)
    if kind == "deltanet":
        log_alpha = torch.zeros_like(log_alpha)
    if kind == "gla":
        return q * dk**-0.5, k, v, log_alpha, None
    beta = torch.sigmoid(torch.randn(B, H, T, generator=g))
    return l2_normalise(q), l2_normalise(k), v, log_alpha, beta


def make_student(kind: str, H: int = 4, Hkv: int = 2, dk: int = 8, dv: int = 8, *,
                 mask_kind: str = "none", chunk_size: int = 16, seed: str = "",
                 window: int = 0) -> MatrixStateStudent:
    """A student with randomised (not initial) gate, β and norm parameters."""
    if kind == "gla":
        m: MatrixStateStudent = GatedLinearAttention(H, Hkv, dk, dv, mask_kind=mask_kind,
                                                     chunk_size=chunk_size, window=window)
    else:
        m = DeltaNet(H, Hkv, dk, dv, gated=kind == "gated-deltanet", mask_kind=mask_kind,
                     chunk_size=chunk_size, window=window)
    g = seeded(f"params-{kind}-{seed}")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m.eval()


def module_reference(m: MatrixStateStudent, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     valid: torch.Tensor | None) -> torch.Tensor:
    """The module's output through :func:`naive_recurrence` (its own gate/β/q/k transforms); with
    a window, the recurrence on inputs delayed by ``W`` plus the quadratic window softmax."""
    k, v = m._heads(k, v)
    valid_ = torch.ones(1, k.shape[2]) if valid is None else valid.float()
    kd, vd, valid_d = k, v, valid_
    if m.window:
        kd, vd, valid_d = delay(k, m.window, 2), delay(v, m.window, 2), delay(valid_, m.window, 1)
    q_, k_, g, beta = m._inputs(q, kd, vd, valid_d)
    o, _ = naive_recurrence(q_, k_, vd.float() * valid_d[:, None, :, None], g, beta)
    out = m.norm(o).double()
    if m.window:
        # π = σ(lse − c − u·q − log r), r = ms / (ms + eps): the window's share (fp64)
        sw = naive_sliding_window_attention(q, k, v, valid_, window=m.window, scale=m.scale)
        lse = naive_window_lse(q, k, valid_, window=m.window, scale=m.scale).double()
        lse = lse.clamp_min(-1e4)  # a query without a real key in its window: π = 0
        ms = o.double().square().mean(-1)
        far = (q.double() * m.far_gate.detach().double()[None, :, None, :]).sum(-1)
        logit = (lse - m.far_bias.detach().double()[None, :, None] - far
                 - torch.log(ms + 1e-30) + torch.log(ms + m.norm.eps))
        pi = torch.sigmoid(logit)[..., None]
        out = pi * sw.double() + (1 - pi) * out
    return out.float()


__all__ = [
    "TOL",
    "assert_close",
    "chunked_recurrence",
    "errors",
    "functional_inputs",
    "make_student",
    "module_reference",
    "naive_recurrence",
    "recurrent_steps",
    "seeded",
]
