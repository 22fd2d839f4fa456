"""The stateful (decode) form of the feature-map student: prefill of P tokens then ``t`` more
equals one prefill of ``P + t`` (across chunk and window boundaries), left padding never enters
the state, and states stay finite at 16K context in fp32 and fp16."""

from __future__ import annotations

import pytest
import torch

from dtr_compile.linear.kernel import LinearAttention


def _student(window: int, *, chunk: int = 64, seed: int = 0, fmap: str = "hedgehog") -> LinearAttention:
    torch.manual_seed(seed)
    m = LinearAttention(4, 2, 8, mask_kind="bool", causal=True, feature_map=fmap, window=window,
                        chunk_size=chunk)
    with torch.no_grad():  # non-trivial maps and window weights
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.eval()


def _qkv(b: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, t, 8, generator=g), torch.randn(b, 2, t, 8, generator=g),
            torch.randn(b, 2, t, 8, generator=g))


def _run_stateful(m: LinearAttention, q, k, v, valid, splits: list[int]) -> torch.Tensor:
    """Feed the sequence in pieces of the given lengths; concatenated outputs."""
    state = m.init_state(q.shape[0])
    outs, start = [], 0
    for n in splits:
        sl = slice(start, start + n)
        out, state = m.forward_stateful(q[:, :, sl], k[:, :, sl], v[:, :, sl],
                                        None if valid is None else valid[:, sl], state)
        assert set(state) == set(m.state_names())
        outs.append(out)
        start += n
    return torch.cat(outs, dim=2)


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("window", [0, 8, 64], ids=["linear", "window8", "window64"])
@pytest.mark.parametrize("P", [1, 7, 63, 64, 65, 130], ids=lambda p: f"P{p}")
def test_prefill_then_decode_equals_one_prefill(window, P):
    m = _student(window)
    q, k, v = _qkv(2, P + 3, seed=P)
    with torch.no_grad():
        ref = m(q, k, v)  # [B, H, P+3, Dv]
        got = _run_stateful(m, q, k, v, None, [P, 1, 1, 1])
        got2 = _run_stateful(m, q, k, v, None, [P, 3])
    for g in (got, got2):
        assert (g - ref).abs().max() < 1e-4, (g - ref).abs().max()
        assert _rel_rms(g, ref) < 1e-5


@pytest.mark.parametrize("window", [0, 8], ids=["linear", "window8"])
def test_left_padding_never_enters_the_state(window):
    m = _student(window)
    pad, n = 70, 20  # padding longer than a chunk
    q, k, v = _qkv(1, pad + n, seed=5)
    # garbage (huge) keys and values at the padding positions
    k[:, :, :pad] *= 1e3
    v[:, :, :pad] = 1e4
    valid = torch.cat([torch.zeros(1, pad), torch.ones(1, n)], dim=1)
    with torch.no_grad():
        alone = _run_stateful(m, q[:, :, pad:], k[:, :, pad:], v[:, :, pad:], None, [n - 2, 1, 1])
        padded = _run_stateful(m, q, k, v, valid, [pad + n - 2, 1, 1])[:, :, pad:]
        state = m.init_state(1)
        _, state = m.forward_stateful(q[:, :, :pad], k[:, :, :pad], v[:, :, :pad],
                                      valid[:, :pad], state)
    assert (padded - alone).abs().max() < 1e-4
    assert state["recurrent"].abs().max() == 0  # only padding so far: nothing in the state
    if window:
        assert state["window_valid"].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("window", [0, 8], ids=["linear", "window8"])
def test_states_finite_at_16k_context(dtype, window):
    torch.manual_seed(0)
    m = LinearAttention(2, 1, 4, mask_kind="bool", causal=True, window=window).eval()
    T = 16384
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, T, 4, generator=g).to(dtype) for h in (2, 1, 1))
    with torch.no_grad():
        state = {n: s.to(dtype) if n.startswith("window_k") or n == "window_value" else s
                 for n, s in m.init_state(1, dtype=dtype).items()}
        out, state = m.forward_stateful(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], None, state)
        step, state = m.forward_stateful(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], None, state)
    assert state["recurrent"].dtype == torch.float32
    for x in (out, step, *state.values()):
        assert torch.isfinite(x.float()).all()
    # the normaliser counts every key: the state's ones column sums φ(k) over 16K keys
    assert state["recurrent"][..., -1].sum() > 0
    assert step.dtype == dtype


@pytest.mark.parametrize("window", [0, 1, 8], ids=["linear", "window1", "window8"])
def test_decode_step_equals_chunked_form_at_one_token(window):
    """The t = 1 fast path (recurrent form) against the chunked form it replaces in a decode
    step, from a random state of 40 tokens with padding in the window, for a real and a padding
    token."""
    m = _student(window, seed=3)
    q, k, v = _qkv(2, 41, seed=11)
    valid = torch.ones(2, 41)
    valid[1, :5] = 0  # row 1 left-padded: the padding is in the recurrent state by now
    valid[0, 36:38] = 0  # padding inside the last window
    with torch.no_grad():
        _, state = m.forward_stateful(q[:, :, :40], k[:, :, :40], v[:, :, :40], valid[:, :40],
                                      m.init_state(2))
        for last in (1.0, 0.0):
            kv = valid[:, 40:].clone().fill_(last)
            fast, s_fast = m.decode_step(q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], kv, state)
            ref, s_ref = m.extend(q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], kv, state)
            assert fast.shape == ref.shape == (2, 4, 1, 8)
            assert (fast - ref).abs().max() < 1e-5
            assert set(s_fast) == set(s_ref)
            for n in s_ref:
                assert s_fast[n].dtype == s_ref[n].dtype and s_fast[n].shape == s_ref[n].shape
                assert (s_fast[n].float() - s_ref[n].float()).abs().max() < 1e-5, n
