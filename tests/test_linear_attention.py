"""Linear-attention operators (issue 4): feature maps pinned by golden values, every form equal to
its quadratic reference, SDPA's causal alignment, fp16/bf16 numerics, and ONNX export.

Errors are reported as max-abs and relative RMS (‖out − ref‖₂ / ‖ref‖₂), as in
flash-linear-attention's tests. Test ids read ``B2-T37-S37-H4-Hkv2-D16-fp32-hedgehog-causal-bool``.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dtr_compile.errors import InputError
from dtr_compile.linear.feature_maps import FEATURE_MAPS, elu_plus_one, make_feature_map
from dtr_compile.linear.kernel import (
    LinearAttention,
    SiteSwitch,
    SoftmaxAttention,
    key_valid_from_mask,
    linear_attention,
    naive_linear_attention,
    naive_sliding_window_linear_attention,
    repeat_kv,
    sliding_window_linear_attention,
)

TOL = 1e-5
FORMS = ("bidirectional", "causal", "window")
MASK_KINDS = ("none", "bool", "additive")


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float = TOL, what: str = "") -> None:
    """max-abs and relative RMS error both ``<= tol``."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out, ref = out.detach().double(), ref.detach().double()
    diff = out - ref
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    rel_rms = float(diff.norm() / ref.norm().clamp_min(1e-30))
    assert max_abs <= tol and rel_rms <= tol, (
        f"{what} max_abs={max_abs:.3g} rel_rms={rel_rms:.3g} (tol {tol})"
    )


def seeded(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


@dataclass(frozen=True)
class Shape:
    B: int
    T: int
    S: int
    H: int
    Hkv: int
    Dk: int
    Dv: int
    chunk: int = 64
    window: int = 5

    @property
    def id(self) -> str:
        return f"B{self.B}-T{self.T}-S{self.S}-H{self.H}-Hkv{self.Hkv}-D{self.Dk}"


SHAPES = [
    Shape(2, 37, 37, 4, 2, 16, 8, chunk=8, window=5),  # several chunks, the last one partial
    Shape(3, 131, 131, 6, 3, 8, 16, chunk=64, window=64),  # window == chunk
    Shape(2, 1, 1, 2, 1, 8, 8, chunk=64, window=3),  # one position
]


def make_inputs(
    s: Shape, name: str, dtype: torch.dtype = torch.float32, *, mask_kind: str = "none"
):
    """q, k, v and a site mask ``[B, 1, 1, S]`` with random padding (batch 1 all padding)."""
    g = seeded(name)
    q = torch.randn(s.B, s.H, s.T, s.Dk, generator=g).to(dtype)
    k = torch.randn(s.B, s.Hkv, s.S, s.Dk, generator=g).to(dtype)
    v = torch.randn(s.B, s.Hkv, s.S, s.Dv, generator=g).to(dtype)
    valid = torch.rand(s.B, s.S, generator=g) > 0.3
    valid[0, 0] = True
    if s.B > 1:
        valid[1] = False  # an all-padding sequence
    if mask_kind == "bool":
        return q, k, v, valid[:, None, None, :]
    if mask_kind == "additive":
        return q, k, v, torch.where(valid, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    return q, k, v, None


def make_module(
    s: Shape, feature_map: str, form: str, mask_kind: str, name: str
) -> LinearAttention:
    """A module with its learnable weights moved away from their initial values."""
    m = LinearAttention(
        s.H,
        s.Hkv,
        s.Dk,
        mask_kind=mask_kind,
        causal=form != "bidirectional",
        feature_map=feature_map,
        window=s.window if form == "window" else 0,
        chunk_size=s.chunk,
    )
    g = seeded("weights-" + name)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m.eval()


def reference(m: LinearAttention, q, k, v, mask) -> torch.Tensor:
    """The naive quadratic reference of module ``m`` (its own feature maps, fp64 inside)."""
    k, v = repeat_kv(k, m.num_heads), repeat_kv(v, m.num_heads)
    key_valid = key_valid_from_mask(mask, m.mask_kind) if mask is not None else None
    phi_q, phi_k = m.feature_map_q(q), m.feature_map_k(k)
    if m.window:
        return naive_sliding_window_linear_attention(
            q,
            k,
            v,
            phi_q,
            phi_k,
            key_valid,
            window=m.window,
            scale=m.scale,
            softmax_weight=torch.sigmoid(m.window_factor),
            eps=m.eps,
        )
    return naive_linear_attention(phi_q, phi_k, v, key_valid, m.causal, m.eps)


# --- feature maps ----------------------------------------------------------------------------

GOLDEN_X = torch.tensor([[[[-8.0, 0.5, 2.0], [1.0, -1.0, 0.25]]]])  # [B=1, H=1, T=2, Dk=3]
# φ(GOLDEN_X)[0, 0], computed independently in float64 numpy from the formulas in the docstrings.
GOLDEN = {
    "elu": [[3.3546263e-04, 1.5, 3.0], [2.0, 3.6787944e-01, 1.25]],
    "relu": [[0.0, 0.5, 2.0], [1.0, 0.0, 0.25]],
    "hedgehog": [
        [3.7116446e-05, 1.8241875e-01, 8.1754413e-01, 9.9975119e-01, 2.0341774e-04, 4.5388634e-05],
        [6.2200588e-01, 8.4179342e-02, 2.9381477e-01, 9.5183196e-02, 7.0331398e-01, 2.0150283e-01],
    ],
    "t2r": [[0.0, 0.5, 2.0], [1.0, 0.0, 0.25]],
    "taylor": [
        [
            1.0,
            -6.0786855,
            3.7991784e-01,
            1.5196714,
            2.6127891e01,
            -2.3094011,
            -9.2376043,
            1.0206207e-01,
            5.7735027e-01,
            1.6329932,
        ],
        [
            1.0,
            7.5983569e-01,
            -7.5983569e-01,
            1.8995892e-01,
            4.0824829e-01,
            -5.7735027e-01,
            1.4433757e-01,
            4.0824829e-01,
            -1.4433757e-01,
            2.5515518e-02,
        ],
    ],
    "performer": [
        [3.0002242e-02, 1.0945208e-01, 7.0830525e-07, 9.2622641e-09, 4.4652809e-07, 4.0824829e-01],
        [1.3644767e-01, 2.6202318e-02, 2.4536256e-01, 3.3381993e-01, 4.0824829e-01, 6.4471570e-02],
    ],
}
GOLDEN_PERFORMER_KEY = [
    [6.5174372e-06, 2.3776459e-05, 1.5386633e-10, 2.0120571e-12, 9.7000044e-11, 8.8684458e-05],
    [1.3644767e-01, 2.6202318e-02, 2.4536256e-01, 3.3381993e-01, 4.0824829e-01, 6.4471570e-02],
]


def test_registry_is_complete() -> None:
    assert (
        set(FEATURE_MAPS)
        == set(GOLDEN)
        == {"elu", "relu", "hedgehog", "t2r", "taylor", "performer"}
    )


@pytest.mark.parametrize("name", list(GOLDEN))
def test_feature_map_golden_values(name: str) -> None:
    fm = make_feature_map(name, 1, 3)
    with torch.no_grad():
        out = fm(GOLDEN_X)
    assert out.dtype == torch.float32 and out.shape == (1, 1, 2, fm.feature_dim)
    torch.testing.assert_close(out[0, 0], torch.tensor(GOLDEN[name]), rtol=1e-5, atol=1e-7)


def test_performer_key_map_uses_a_per_sequence_stabiliser() -> None:
    fm = make_feature_map("performer", 1, 3, role="key")
    torch.testing.assert_close(
        fm(GOLDEN_X)[0, 0], torch.tensor(GOLDEN_PERFORMER_KEY), rtol=1e-5, atol=1e-12
    )


@pytest.mark.parametrize("name", list(FEATURE_MAPS))
def test_feature_map_is_non_negative(name: str) -> None:
    x = 6 * torch.randn(2, 3, 17, 8, generator=seeded(name))
    fm = make_feature_map(name, 3, 8)
    out = fm(x)
    if name == "taylor":  # the taylor features have signs; its kernel is positive
        out = (out[:, :, :, None] * out[:, :, None, :]).sum(-1)
    assert torch.isfinite(out).all() and (out >= 0).all()


def test_taylor_kernel_is_second_order_exp() -> None:
    g = seeded("taylor-kernel")
    q, k = torch.randn(1, 1, 9, 16, generator=g), torch.randn(1, 1, 9, 16, generator=g)
    fm = make_feature_map("taylor", 1, 16)
    s = (q * k).sum(-1) / 4.0  # q·k / √Dk
    assert fm.feature_dim == 1 + 16 + 16 * 17 // 2
    torch.testing.assert_close((fm(q) * fm(k)).sum(-1), 1 + s + s * s / 2, rtol=1e-5, atol=1e-5)


def test_hedgehog_halves_are_distributions_at_init() -> None:
    x = torch.randn(2, 3, 5, 8, generator=seeded("hh"))
    out = make_feature_map("hedgehog", 3, 8)(x)
    torch.testing.assert_close(out[..., :8], torch.softmax(x, -1))
    torch.testing.assert_close(out[..., 8:], torch.softmax(-x, -1))


def test_elu_plus_one_never_cancels_in_bf16() -> None:
    x = torch.tensor([-8.0, -30.0, 0.0, 3.0], dtype=torch.bfloat16)
    assert (F.elu(x[:1]) + 1).item() == 0.0  # the literal form cancels
    out = elu_plus_one(x)
    assert out.dtype == torch.bfloat16 and (out > 0).all()
    assert make_feature_map("elu", 1, 4)(x.reshape(1, 1, 1, 4)).min() > 0


def test_unknown_feature_map_is_an_input_error() -> None:
    with pytest.raises(InputError, match="unknown feature map 'softmax'"):
        LinearAttention(2, 2, 8, feature_map="softmax")


# --- every form against its quadratic reference ------------------------------------------------


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("feature_map", list(FEATURE_MAPS))
@pytest.mark.parametrize("s", SHAPES, ids=lambda s: f"{s.id}-fp32")
def test_module_matches_naive_reference(
    s: Shape, feature_map: str, form: str, mask_kind: str
) -> None:
    name = f"{s.id}-{feature_map}-{form}-{mask_kind}"
    m = make_module(s, feature_map, form, mask_kind, name)
    q, k, v, mask = make_inputs(s, name, mask_kind=mask_kind)
    with torch.no_grad():
        out, ref = m(q, k, v, mask), reference(m, q, k, v, mask)
    assert out.shape == (s.B, s.H, s.T, s.Dv) and out.dtype == torch.float32
    assert_close(out, ref)
    if mask is not None and s.B > 1:
        assert (out[1] == 0).all()  # the all-padding sequence


# Query length T != key length S (the functional operators take H key heads).
UNEQUAL = [
    Shape(2, 29, 41, 3, 3, 8, 8, chunk=8, window=4),
    Shape(2, 41, 29, 3, 3, 8, 8, chunk=8, window=4),
    Shape(2, 5, 70, 3, 3, 8, 8, chunk=16, window=16),
    Shape(2, 70, 5, 3, 3, 8, 8, chunk=16, window=16),
]


@pytest.mark.parametrize("s", UNEQUAL, ids=lambda s: f"{s.id}-fp32")
@pytest.mark.parametrize("feature_map", ["hedgehog", "performer"])
def test_operators_with_unequal_lengths(s: Shape, feature_map: str) -> None:
    name = f"{s.id}-{feature_map}-unequal"
    q, k, v, _ = make_inputs(s, name)
    key_valid = (torch.rand(s.B, s.S, generator=seeded(name)) > 0.2).float()
    fq, fk = (
        make_feature_map(feature_map, s.H, s.Dk),
        make_feature_map(feature_map, s.H, s.Dk, role="key"),
    )
    phi_q, phi_k = fq(q), fk(k)
    for causal in (False, True):
        assert_close(
            linear_attention(phi_q, phi_k, v, key_valid, causal, chunk_size=s.chunk),
            naive_linear_attention(phi_q, phi_k, v, key_valid, causal),
        )
    w = torch.rand(s.H, generator=seeded(name))
    assert_close(
        sliding_window_linear_attention(
            q,
            k,
            v,
            phi_q,
            phi_k,
            key_valid,
            window=s.window,
            scale=0.4,
            softmax_weight=w,
            chunk_size=s.chunk,
        ),
        naive_sliding_window_linear_attention(
            q, k, v, phi_q, phi_k, key_valid, window=s.window, scale=0.4, softmax_weight=w
        ),
    )


def sdpa_causal_mask(T: int, S: int) -> torch.Tensor:
    """The ``[T, S]`` mask SDPA's ``is_causal=True`` applies, read off its output: with ``v = I``
    the output row ``t`` is the attention distribution of query ``t``."""
    q, k = torch.zeros(1, 1, T, 4), torch.zeros(1, 1, S, 4)
    return F.scaled_dot_product_attention(q, k, torch.eye(S)[None, None], is_causal=True)[0, 0] > 0


@pytest.mark.parametrize(("T", "S"), [(5, 9), (9, 5), (7, 7)], ids=lambda n: str(n))
def test_causal_alignment_is_sdpas(T: int, S: int) -> None:
    mask = sdpa_causal_mask(T, S)
    assert torch.equal(mask, torch.ones(T, S, dtype=torch.bool).tril())  # top-left, in torch
    g = seeded(f"align-{T}-{S}")
    phi_q, phi_k = torch.rand(2, 3, T, 6, generator=g), torch.rand(2, 3, S, 6, generator=g)
    v = torch.randn(2, 3, S, 4, generator=g)
    a = (phi_q @ phi_k.transpose(-1, -2)) * mask  # [B, H, T, S]
    assert_close(
        linear_attention(phi_q, phi_k, v, causal=True, chunk_size=4),
        (a @ v) / (a.sum(-1, keepdim=True) + 1e-6),
    )


@pytest.mark.parametrize(("T", "S"), [(37, 37), (20, 45), (45, 20)], ids=lambda n: str(n))
def test_window_covering_every_key_is_the_softmax_teacher(T: int, S: int) -> None:
    """With ``W >= T`` and no linear part, the window form is SDPA's causal softmax attention."""
    g = seeded(f"teacher-{T}-{S}")
    q, k, v = (
        torch.randn(2, 4, T, 8, generator=g),
        torch.randn(2, 2, S, 8, generator=g),
        torch.randn(2, 2, S, 8, generator=g),
    )
    teacher = SoftmaxAttention(4, 2, scale=0.3, causal=True)(q, k, v)
    kr, vr = repeat_kv(k, 4), repeat_kv(v, 4)
    phi = torch.zeros(2, 4, max(T, S), 1)
    out = sliding_window_linear_attention(
        q, kr, vr, phi[:, :, :T], phi[:, :, :S], window=T, scale=0.3, eps=1e-12, chunk_size=8
    )
    assert_close(out, teacher)


def test_repeat_kv_groups_like_sdpa_enable_gqa() -> None:
    g = seeded("gqa")
    q, k, v = (
        torch.randn(2, 6, 5, 8, generator=g),
        torch.randn(2, 2, 5, 8, generator=g),
        torch.randn(2, 2, 5, 8, generator=g),
    )
    gqa = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(
        gqa, F.scaled_dot_product_attention(q, repeat_kv(k, 6), repeat_kv(v, 6))
    )


def test_key_valid_from_mask() -> None:
    valid = torch.tensor([[True, True, False], [False, False, False]])
    additive = torch.where(valid, 0.0, torch.finfo(torch.float32).min)
    expected = valid.float()
    assert torch.equal(key_valid_from_mask(valid[:, None, None, :], "bool"), expected)
    assert torch.equal(
        key_valid_from_mask(additive[:, None, None, :].expand(2, 4, 3, 3), "additive"), expected
    )
    assert torch.equal(key_valid_from_mask(additive[0], "additive"), expected[:1])  # [S] → [1, S]


def test_chunked_causal_has_no_per_position_state() -> None:
    """The causal form at T = 8192 never materialises ``[B, H, T, F, Dv]`` (or anything near)."""

    class LargestTensor(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    T, F_, Dv = 8192, 64, 32
    g = seeded("blowup")
    phi_q, phi_k, v = (
        torch.rand(1, 1, T, F_, generator=g),
        torch.rand(1, 1, T, F_, generator=g),
        torch.randn(1, 1, T, Dv, generator=g),
    )
    with torch.no_grad(), LargestTensor() as mode:
        linear_attention(phi_q, phi_k, v, causal=True)
    assert mode.numel <= 2 * T * F_, (
        f"largest intermediate {mode.numel} elements, T·F·Dv = {T * F_ * Dv}"
    )


# --- numerics --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("feature_map", list(FEATURE_MAPS))
def test_finite_at_8k_in_half_precision(feature_map: str, dtype: torch.dtype) -> None:
    s = Shape(1, 8192, 8192, 2, 1, 8, 8, window=64)
    name = f"{s.id}-{feature_map}-8k"
    q, k, v, mask = make_inputs(s, name, mask_kind="bool")
    q, k, v = 3 * q.to(dtype), 3 * k.to(dtype), v.to(dtype)
    for form in FORMS:
        m = make_module(s, feature_map, form, "bool", f"{name}-{form}")
        with torch.no_grad():
            out = m(q, k, v, mask)
        assert out.dtype == dtype and torch.isfinite(out).all(), form


@pytest.mark.parametrize("form", FORMS)
def test_state_is_fp32_for_half_inputs(form: str) -> None:
    """Half inputs give the fp32 computation on the same values, rounded once at the end."""
    s = Shape(2, 300, 300, 4, 2, 16, 16, window=32)
    q, k, v, _ = make_inputs(s, f"fp32-state-{form}", torch.float16)
    m = make_module(s, "hedgehog", form, "none", f"fp32-state-{form}")
    with torch.no_grad():
        out = m(q, k, v)
        ref = m(q.float(), k.float(), v.float()).half()
    assert out.dtype == torch.float16
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("feature_map", list(FEATURE_MAPS))
def test_all_padding_gives_zeros_and_finite_gradients(
    feature_map: str, form: str, dtype: torch.dtype
) -> None:
    s = Shape(2, 20, 20, 2, 1, 8, 8, chunk=8, window=4)
    q, k, v, _ = make_inputs(s, "pad", dtype)
    mask = torch.zeros(2, 1, 1, 20, dtype=torch.bool)
    m = make_module(s, feature_map, form, "bool", f"pad-{feature_map}-{form}")
    out = m(q, k, v, mask)
    assert torch.equal(out, torch.zeros_like(out))
    if dtype == torch.float32:  # one sequence all padding, the other with three keys
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        mask[0, ..., :3] = True
        m(q, k, v, mask).square().sum().backward()
        grads = [q.grad, k.grad, v.grad] + [p.grad for p in m.parameters()]
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)


def test_eps_is_not_zero_in_half_precision() -> None:
    m = LinearAttention(2, 2, 8)
    assert (
        torch.tensor(m.eps, dtype=torch.float16) > 0
        and torch.tensor(m.eps, dtype=torch.bfloat16) > 0
    )
    with pytest.raises(ValueError, match="eps"):
        LinearAttention(2, 2, 8, eps=0.0)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="causal"):
        LinearAttention(2, 2, 8, window=8)
    with pytest.raises(ValueError, match="multiple"):
        LinearAttention(6, 4, 8)
    with pytest.raises(ValueError, match="mask_kind"):
        LinearAttention(2, 2, 8, mask_kind="causal")


def test_site_switch_is_an_exact_swap() -> None:
    s = SHAPES[0]
    q, k, v, mask = make_inputs(s, "switch", mask_kind="additive")
    teacher = SoftmaxAttention(s.H, s.Hkv, scale=s.Dk**-0.5)
    student = make_module(s, "hedgehog", "bidirectional", "additive", "switch")
    sw = SiteSwitch(teacher, student)
    with torch.no_grad():
        before = sw(q, k, v, mask)
        sw.use_linear = True
        assert torch.equal(sw(q, k, v, mask), student(q, k, v, mask))
        sw.use_linear = False
        assert torch.equal(sw(q, k, v, mask), before)


# --- ONNX export -----------------------------------------------------------------------------


class _Bundle(nn.Module):
    """Several variants in one graph, on flat inputs ``(q, k, v, bool_mask, additive_mask)``: one
    export instead of one per variant (torch.onnx.export costs seconds each)."""

    def __init__(self, variants: list[LinearAttention]) -> None:
        super().__init__()
        self.variants = nn.ModuleList(variants)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bool_mask: torch.Tensor,
        additive_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        masks = {"none": None, "bool": bool_mask, "additive": additive_mask}
        return tuple(m(q, k, v, masks[m.mask_kind]) for m in self.variants)


def tensorrt_problems(model) -> list[str]:  # noqa: ANN001
    """What TensorRT's ONNX parser would reject: Einsum nodes, CumSum axes that are not initializers."""
    inits = {i.name for i in model.graph.initializer}
    problems = []
    for node in model.graph.node:
        if node.op_type == "Einsum":
            problems.append(f"Einsum node {node.name}")
        if node.op_type == "CumSum" and node.input[1] not in inits:
            problems.append(f"CumSum {node.name} axis {node.input[1]!r} is not an initializer")
    return problems


def export_and_compare(
    variants: list[LinearAttention], tmp_path, *, separate_key_length: bool = False
) -> None:
    """Export with dynamic B and T (and S), check the graph for TensorRT, compare every output in
    onnxruntime with PyTorch at three shapes."""
    import onnx
    import onnxruntime as ort
    from torch.export import Dim

    bundle = _Bundle(variants).eval()
    H, Hkv, Dk, Dv = variants[0].num_heads, variants[0].num_kv_heads, variants[0].head_dim, 8
    batch, t = Dim("batch"), Dim("T", min=1)
    s = Dim("S", min=1) if separate_key_length else t

    def inputs(B: int, T: int, S: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        valid = torch.rand(B, 1, 1, S, generator=g) > 0.25
        return {
            "q": torch.randn(B, H, T, Dk, generator=g),
            "k": torch.randn(B, Hkv, S, Dk, generator=g),
            "v": torch.randn(B, Hkv, S, Dv, generator=g),
            "bool_mask": valid,
            "additive_mask": torch.where(valid, 0.0, torch.finfo(torch.float32).min),
        }

    g = seeded("export")
    example = inputs(2, 37, 45 if separate_key_length else 37, g)
    dyn = {
        "q": {0: batch, 2: t},
        "k": {0: batch, 2: s},
        "v": {0: batch, 2: s},
        "bool_mask": {0: batch, 3: s},
        "additive_mask": {0: batch, 3: s},
    }
    path = tmp_path / "variants.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            bundle, tuple(example.values()), dynamo=True, dynamic_shapes=dyn, verbose=False
        )
    prog.save(str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert tensorrt_problems(model) == []
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shapes = (
        [(1, 5, 9), (3, 64, 17), (2, 130, 130)]
        if separate_key_length
        else [(1, 5, 5), (3, 64, 64), (2, 200, 200)]
    )
    for B, T, S in shapes:
        x = inputs(B, T, S, g)
        got = sess.run(None, {i.name: x[i.name].numpy() for i in sess.get_inputs()})
        with torch.no_grad():
            want = bundle(*x.values())
        for m, o, w in zip(variants, got, want, strict=True):
            assert_close(torch.from_numpy(o), w, what=f"{m.feature_map_name} B{B}-T{T}-S{S}")


def export_module(feature_map: str, form: str, mask_kind: str) -> LinearAttention:
    s = Shape(2, 37, 37, 4, 2, 16, 8, chunk=16, window=8)
    return make_module(s, feature_map, form, mask_kind, f"export-{feature_map}-{form}-{mask_kind}")


def test_onnx_export_matches_pytorch(tmp_path) -> None:
    """One variant per form, each with a different feature map and mask kind, in one graph. The
    full matrix, one export per variant, is marked slow."""
    export_and_compare(
        [
            export_module("performer", "bidirectional", "bool"),
            export_module("taylor", "causal", "additive"),
            export_module("hedgehog", "window", "none"),
        ],
        tmp_path,
    )


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("feature_map", list(FEATURE_MAPS))
def test_onnx_export_every_variant(feature_map: str, form: str, tmp_path) -> None:
    export_and_compare([export_module(feature_map, form, "bool")], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_onnx_export_with_unequal_lengths(form: str, tmp_path) -> None:
    export_and_compare([export_module("elu", form, "bool")], tmp_path, separate_key_length=True)


def test_tensorrt_check_sees_problems() -> None:
    """Negative test of :func:`tensorrt_problems` on a hand-written graph."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Einsum", ["a", "a"], ["b"], equation="ij,ij->ij", name="e"),
        helper.make_node("Constant", [], ["axis"], value_int=0, name="c"),
        helper.make_node("CumSum", ["b", "axis"], ["y"], name="s"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
    )
    assert len(tensorrt_problems(helper.make_model(graph))) == 2


def test_feature_dims_at_benchmark_size() -> None:
    """The feature sizes ``F`` the benchmark runs with (``Dk = 32``)."""
    sizes = {n: make_feature_map(n, 12, 32).feature_dim for n in FEATURE_MAPS}
    assert sizes == {
        "elu": 32,
        "relu": 32,
        "hedgehog": 64,
        "t2r": 32,
        "taylor": 561,
        "performer": 64,
    }
