"""The delta rule's own checks (issue 14); the shared ones are in tests/test_linear_gated.py."""

from __future__ import annotations

import torch

from dtr_compile.linear.delta import (
    BETA_INIT_LOGIT,
    DeltaNet,
    delta_chunked,
    delta_recurrent,
    l2_normalise,
    naive_delta,
)
from dtr_compile.linear.recurrence import unit_lower_inverse
from tests.matrix_state_checks import assert_close, functional_inputs, seeded


def test_unit_lower_inverse_is_the_inverse() -> None:
    """On the delta rule's own matrices ``A_ij = β_j k_i·k_j`` (unit keys, ``j < i``), against
    an fp64 triangular solve, for chunk sizes that are and are not powers of two."""
    g = seeded("inverse")
    for c in (1, 2, 5, 16, 33, 64):
        k = l2_normalise(torch.randn(3, c, 8, generator=g))
        beta = torch.rand(3, 1, c, generator=g)
        a = ((k @ k.transpose(-1, -2)) * beta).tril(-1)
        x = unit_lower_inverse(a)
        eye = torch.eye(c, dtype=torch.float64)
        want = torch.linalg.solve_triangular(eye + a.double(), eye.expand(3, c, c), upper=False)
        assert_close(x, want, tol=1e-5, what=f"C={c}")
        assert torch.equal(x.triu(1), torch.zeros_like(x))  # lower triangular


def test_named_forms_agree() -> None:
    g = seeded("delta-named")
    q, k, v, la, beta = functional_inputs("gated-deltanet", 2, 2, 77, 8, 8, g)
    for log_alpha in (la, None):
        ref, s = naive_delta(q, k, v, beta, log_alpha)
        assert_close(delta_chunked(q, k, v, beta, log_alpha, chunk_size=16)[0], ref)
        assert_close(delta_recurrent(q, k, v, beta, log_alpha, torch.zeros(2, 2, 8, 8))[1], s)


def test_beta_one_overwrites_the_stored_value() -> None:
    """The delta rule's defining property: with β = 1 and no decay, writing v' under a key
    already holding v makes the read-out exactly v' (linear attention would give v + v')."""
    k = l2_normalise(torch.tensor([[[[1.0, 2.0, 0.0]]]])).expand(1, 1, 2, 3)
    v = torch.tensor([[[[1.0, 0.0], [0.0, 5.0]]]])
    out, _ = delta_chunked(k, k, v, torch.ones(1, 1, 2), chunk_size=4)
    assert torch.allclose(out[0, 0, 1], torch.tensor([0.0, 5.0]), atol=1e-6)


def test_state_stays_bounded_over_long_sequences() -> None:
    """With β <= 1 and unit keys, (I − β k kᵀ) is a contraction: the state's norm stays at the
    scale of the values even after 8192 tokens (plain linear attention's would grow)."""
    g = seeded("bounded")
    q, k, v, la, beta = functional_inputs("deltanet", 1, 1, 8192, 8, 8, g)
    _, s = delta_chunked(q, k, v, beta, None, chunk_size=64)
    assert torch.isfinite(s).all() and float(s.norm()) < 10 * float(v.abs().max()) * 8


def test_initial_beta_and_gates() -> None:
    m = DeltaNet(4, 2, 8, 8, gated=True)
    assert torch.allclose(m.beta.bias, torch.full((4,), BETA_INIT_LOGIT))
    assert float(torch.sigmoid(m.gate.bias).min()) > 0.94
    assert not hasattr(DeltaNet(4, 2, 8, 8), "gate")
    assert m.kind == "gated-deltanet" and DeltaNet(4, 2, 8, 8).kind == "deltanet"


def test_extra_scan_rounds_change_nothing() -> None:
    """The exported graph runs MAX_SCAN_ROUNDS rounds whatever N; rounds past ceil(log2 N)
    compose with the identity. (The export tests lower the count to keep export fast.)"""
    from dtr_compile.linear.recurrence import MAX_SCAN_ROUNDS, affine_scan

    g = seeded("rounds")
    for n in (1, 2, 5, 9):
        p = torch.randn(1, 2, n, 4, 4, generator=g) * 0.5
        r = torch.randn(1, 2, n, 4, 3, generator=g)
        want = affine_scan(p, r, matrix=True)
        assert_close(affine_scan(p, r, matrix=True, rounds=MAX_SCAN_ROUNDS), want, tol=1e-6)
        # the sequential definition
        s, seq = torch.zeros(1, 2, 4, 3), []
        for i in range(n):
            s = p[:, :, i] @ s + r[:, :, i]
            seq.append(s)
        assert_close(want, torch.stack(seq, 2), tol=1e-5)


def test_scan_rounds_never_allocate_past_n_chunks() -> None:
    """Every tensor the 16-round scan makes is at most the size of its inputs: the shift by
    ``d = 2**15`` chunks must not pad to ``N + d`` chunks (the exported graph takes 1.5 GiB at
    T = 512 if it does)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dtr_compile.linear.recurrence import MAX_SCAN_ROUNDS, affine_scan

    class Largest(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    p, r = torch.randn(1, 2, 3, 4, 4), torch.randn(1, 2, 3, 4, 5)
    with Largest() as mode:
        affine_scan(p, r, matrix=True, rounds=MAX_SCAN_ROUNDS)
    assert mode.numel <= r.numel(), mode.numel
