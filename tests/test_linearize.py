"""Stage 4: the rewrite pass is functional, keeps meta, and swaps exactly the given sites."""

from __future__ import annotations

import torch

from dtr_compile.capture import capture
from dtr_compile.linear.kernel import LinearAttention, SoftmaxAttention
from dtr_compile.load import load_model
from dtr_compile.passes.find_attention import find_attention
from dtr_compile.passes.linearize import linearize, rewrite_sites

from .conftest import make_token_data


def _captured(tiny_task):
    cap = capture(load_model(tiny_task["model"]))
    return cap, find_attention(cap.gm).sites


def test_sites_named_by_module_path(tiny_task) -> None:
    _, sites = _captured(tiny_task)
    assert [s.module_path for s in sites] == [
        f"backbone.encoder.layer.{i}.attention.self" for i in range(3)]
    assert all(s.kind == "sdpa" and s.mask_kind == "bool" for s in sites)
    assert [(s.num_heads, s.num_kv_heads, s.head_dim) for s in sites] == [(4, 4, 8)] * 3


def test_softmax_reference_swap_is_exact(tiny_task) -> None:
    cap, sites = _captured(tiny_task)
    mods = {s.id: SoftmaxAttention(s.num_heads, s.num_kv_heads, scale=s.scale) for s in sites}
    swapped = rewrite_sites(cap.gm, sites, mods)
    data = make_token_data(3, 13, seed=9)
    ref = cap.gm(data["input_ids"], data["attention_mask"])[0]
    got = swapped(data["input_ids"], data["attention_mask"])[0]
    assert (got - ref).abs().max().item() <= 1e-5


def test_linearize_is_functional_and_shares_weights(tiny_task) -> None:
    cap, sites = _captured(tiny_task)
    before = cap.gm.code
    lin = LinearAttention(4, 4, 8, mask_kind="bool")
    with torch.no_grad():  # move it away from identity so the swap changes the output
        lin.feature_map_q.weight.mul_(3.0)
    hybrid = linearize(cap.gm, sites, {sites[1].id: lin})
    assert cap.gm.code == before  # the input graph is untouched
    targets = [n.target for n in hybrid.graph.nodes if n.op == "call_module"]
    assert "dtr.site1" in targets and "dtr.site0" not in targets
    sdpa = [n for n in hybrid.graph.nodes if n.op == "call_function"
            and n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 2
    call = next(n for n in hybrid.graph.nodes if n.target == "dtr.site1")
    assert call.meta["nn_module_stack"] and call.meta["val"].shape[1] == 4
    w = "backbone.encoder.layer.0.attention.self.query.weight"
    assert hybrid.get_parameter(w).data_ptr() == cap.gm.get_parameter(w).data_ptr()
    data = make_token_data(2, 9, seed=3)
    out_h = hybrid(data["input_ids"], data["attention_mask"])[0]
    out_o = cap.gm(data["input_ids"], data["attention_mask"])[0]
    assert out_h.shape == out_o.shape and not torch.allclose(out_h, out_o)
