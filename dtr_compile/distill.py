"""Stage 5, distill: train each site's linear attention to reproduce its softmax teacher.

Target ``site`` (LoLCATs' attention transfer): from the teacher's own ``q, k, v`` (and mask) at the
site, minimise the MSE between the linear module's output and the teacher site's output
``[B, H, T, Dv]`` over valid query positions. Sites are independent of one another: each is
trained only on its own recorded teacher tensors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dtr_compile.data import Dataset, record_nodes
from dtr_compile.linear_attention import LinearAttention, key_valid_from_mask
from dtr_compile.passes.find_attention import AttentionSite


@dataclass
class SiteRecord:
    """Teacher tensors of one site over the calibration set (rows = calibration sequences)."""

    q: torch.Tensor  # [N, H, T, Dk]
    k: torch.Tensor  # [N, Hkv, S, Dk]
    v: torch.Tensor  # [N, Hkv, S, Dv]
    mask: torch.Tensor | None  # broadcastable to [N, H, T, S]
    out: torch.Tensor  # [N, H, T, Dv]


@dataclass
class DistillResult:
    """Outcome for one site. Errors are relative RMS ``‖y − ŷ‖₂ / ‖y‖₂`` on held-out rows."""

    site_id: str
    ok: bool
    init_error: float
    final_error: float
    final_loss: float
    steps: int
    seconds: float
    reason: str = ""
    loss_history: list[float] = field(default_factory=list)


def record_sites(
    gm: torch.fx.GraphModule,
    sites: Sequence[AttentionSite],
    calib: Dataset,
    input_names: Sequence[str],
    batch_size: int,
) -> dict[str, SiteRecord]:
    """Run the teacher over ``calib`` once and keep every site's q, k, v, mask and output."""
    names = set()
    for s in sites:
        names |= {s.q, s.k, s.v, s.output} | ({s.mask} if s.mask else set())
    chunks: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for batch in calib.batches(batch_size):
        rec = record_nodes(gm, [batch[n] for n in input_names], names)
        for n in names:
            chunks[n].append(rec[n])

    def cat(name: str) -> torch.Tensor:
        parts = chunks[name]
        if parts[0].dim() == 4 and parts[0].shape[0] == 1 and len(parts) > 1:
            return parts[0]  # a mask broadcast over the batch
        return torch.cat(parts)

    return {
        s.id: SiteRecord(cat(s.q), cat(s.k), cat(s.v), cat(s.mask) if s.mask else None, cat(s.output))
        for s in sites
    }


def _query_weights(module: LinearAttention, rec_mask: torch.Tensor | None, idx: torch.Tensor,
                   n: int, t: int) -> torch.Tensor:
    """Weight ``[b, 1, T, 1]`` of each query position in the loss: padded positions (when the
    key padding mask also marks queries, T == S) get 0."""
    if rec_mask is None:
        return torch.ones(len(idx), 1, t, 1)
    m = rec_mask[idx] if rec_mask.shape[0] == n else rec_mask
    valid = key_valid_from_mask(m, module.mask_kind)  # [b|1, S]
    if valid.shape[-1] != t:
        return torch.ones(len(idx), 1, t, 1)
    return valid.expand(len(idx), -1)[:, None, :, None]


def _rel_error(module: LinearAttention, rec: SiteRecord, idx: torch.Tensor, n: int) -> float:
    with torch.no_grad():
        mask = None if rec.mask is None else (rec.mask[idx] if rec.mask.shape[0] == n else rec.mask)
        pred = module(rec.q[idx], rec.k[idx], rec.v[idx], mask)
        w = _query_weights(module, rec.mask, idx, n, rec.q.shape[2])
        ref = rec.out[idx]
        num = ((pred - ref) ** 2 * w).sum()
        den = (ref**2 * w).sum().clamp_min(1e-30)
        return math.sqrt(float(num / den))


def distill_site(
    site: AttentionSite,
    rec: SiteRecord,
    *,
    feature_map: str = "hedgehog",
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 8,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[LinearAttention, DistillResult]:
    """Train one site's :class:`LinearAttention` on its teacher record (Adam, output MSE).

    The last ``max(1, N // 8)`` calibration rows are held out to measure the error before and
    after training. A loss that becomes non-finite stops training and marks the site not ok:
    such a site is never offered to the scheduler.
    """
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = LinearAttention(site.num_heads, site.num_kv_heads, site.head_dim,
                             mask_kind=site.mask_kind, causal=site.causal, feature_map=feature_map)
    n = rec.q.shape[0]
    n_hold = max(1, n // 8) if n > 1 else 0
    train_idx = torch.arange(0, n - n_hold) if n_hold else torch.arange(n)
    hold_idx = torch.arange(n - n_hold, n) if n_hold else torch.arange(n)
    init_error = _rel_error(module, rec, hold_idx, n)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    history: list[float] = []
    loss_val = float("nan")
    for step in range(steps):
        idx = train_idx[torch.randint(len(train_idx), (min(batch_size, len(train_idx)),), generator=gen)]
        mask = None if rec.mask is None else (rec.mask[idx] if rec.mask.shape[0] == n else rec.mask)
        pred = module(rec.q[idx], rec.k[idx], rec.v[idx], mask)
        w = _query_weights(module, rec.mask, idx, n, rec.q.shape[2])
        loss = ((pred - rec.out[idx]) ** 2 * w).sum() / (w.sum() * pred.shape[1] * pred.shape[-1])
        loss_val = float(loss)
        if not math.isfinite(loss_val):
            return module, DistillResult(site.id, False, init_error, float("nan"), loss_val, step,
                                         time.perf_counter() - t0,
                                         reason=f"loss became {loss_val} at step {step}",
                                         loss_history=history)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0 or step == steps - 1:
            history.append(loss_val)
        if on_step is not None:
            on_step(step, loss_val)
    final_error = _rel_error(module, rec, hold_idx, n)
    ok = math.isfinite(final_error)
    return module, DistillResult(site.id, ok, init_error, final_error, loss_val, steps,
                                 time.perf_counter() - t0,
                                 reason="" if ok else "non-finite held-out error",
                                 loss_history=history)
