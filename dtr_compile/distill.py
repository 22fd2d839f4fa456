"""Stage 5, distill: train each site's linear attention to reproduce its softmax teacher.

Two targets (``--distill-target``):

* ``site`` (LoLCATs' attention transfer): from the teacher's own ``q, k, v`` (and mask) at the
  site to the site's output ``[B, H, T, Dv]``; trains the feature map's parameters. Maps without
  parameters (``elu``, ``relu``, ``taylor``, ``performer``) have nothing to train here.
* ``block`` (DtR's blockwise form): the site's attention block (see
  :mod:`dtr_compile.passes.attention_block`), from the owner module's input hidden states to the
  output of its output projection ``[B, T, C]``; the q/k/v/o weights start as copies of the
  teacher's and train with the feature map (the teacher's own tensors are never touched). A site
  without a block is distilled as ``site`` and says why.

Losses: relative MSE ``Σ w (y − ŷ)² / Σ w y²`` over valid query positions ``w`` (queries that are
padding get 0), and for ``site`` optionally Hedgehog's attention-weight loss, the KL divergence
from the teacher's softmax weights to the student's normalised ``φ(q)·φ(k)`` (``mse+ce``).

How (one pass of the teacher, then independent trainings):

1. :func:`record_teacher` runs the teacher once per calibration batch and streams the tensors
   each site needs into an :class:`ActivationStore`, which holds at most ``max_calib_tokens``
   tokens in memory and spills the rest to memory-mapped files. Masks are kept as key padding
   vectors ``[B, S]``, computed once.
2. Each site trains on random rows, and for bidirectional ``site`` training on a random subset of
   query positions per step (keys stay complete), with Adam and a cosine schedule. The last
   ``N // 8`` calibration rows (at most 16) are held out: their error is measured every
   ``eval_every`` steps, the best weights are kept, and training stops after ``patience``
   evaluations without improvement. A non-finite loss stops the site: it is reported and left
   softmax.
3. Sites train in ``workers`` processes (forked; one thread each, so results do not depend on the
   worker count), with progress reported per site.
4. With a :class:`~dtr_compile.distill_cache.DistillCache`, each site's weights are looked up by
   key first and stored after training; a hit gives the stored weights bit for bit.

Everything is deterministic for a given seed.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import queue as queue_mod
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn
from torch.fx import GraphModule

from dtr_compile.data import Dataset, record_nodes
from dtr_compile.distill_cache import DistillCache, cache_key, code_digest, node_hashes
from dtr_compile.errors import InputError
from dtr_compile.feature_maps import FEATURE_MAPS
from dtr_compile.ledger import hash_tensors
from dtr_compile.linear_attention import (
    LinearAttention,
    SiteSwitch,
    SoftmaxAttention,
    key_valid_from_mask,
    linear_attention,
    repeat_kv,
    sliding_window_linear_attention,
)
from dtr_compile.passes.attention_block import (
    ATTENTION_MODULE,
    AttentionBlock,
    BlockMiss,
    BlockSwitch,
    block_module,
    find_block,
)
from dtr_compile.passes.find_attention import AttentionSite

TARGETS = ("site", "block")
LOSSES = ("mse", "mse+ce")
#: Held-out rows are the last ``N // 8`` calibration rows, at most this many.
MAX_HOLDOUT_ROWS = 16
_EPS = 1e-6


@dataclass(frozen=True)
class DistillSettings:
    """Everything a site's training depends on besides its teacher and data (all in the cache key).

    Attributes:
        target: ``"site"`` or ``"block"``.
        feature_map: a name in :data:`~dtr_compile.feature_maps.FEATURE_MAPS`.
        steps: optimiser steps per site (at most; early stopping may end sooner).
        lr: Adam learning rate of the feature map's parameters (cosine-annealed).
        block_lr: learning rate of a block's teacher-initialised weights (q/k/v/o), relative to
            their RMS (Adam moves each weight by about ``block_lr · RMS`` per step).
        batch_rows: calibration rows per step.
        query_positions: query positions per row and step for bidirectional ``site`` training
            (0: all); keys are always complete.
        loss: ``"mse"`` or ``"mse+ce"`` (``site`` only).
        eval_every: steps between held-out evaluations.
        patience: held-out evaluations without improvement before stopping (0: never stop).
        seed: random seed.
        window: ``W > 0``: causal sites keep softmax over their last ``W`` keys beside the linear
            attention (LoLCATs' sliding window, :func:`~dtr_compile.linear_attention.
            sliding_window_linear_attention`); bidirectional sites ignore it.
    """

    target: str = "site"
    feature_map: str = "hedgehog"
    steps: int = 400
    lr: float = 3e-2
    block_lr: float = 3e-3
    batch_rows: int = 4
    query_positions: int = 64
    loss: str = "mse"
    eval_every: int = 50
    patience: int = 3
    seed: int = 0
    window: int = 0

    def check(self) -> None:
        """Raises :class:`InputError` naming the bad setting."""
        if self.target not in TARGETS:
            raise InputError(f"unknown distillation target {self.target!r}: expected one of "
                             f"{', '.join(TARGETS)}")
        if self.feature_map not in FEATURE_MAPS:
            raise InputError(f"unknown feature map {self.feature_map!r}: expected one of "
                             f"{', '.join(FEATURE_MAPS)}; pick one with --feature-map")
        if self.loss not in LOSSES:
            raise InputError(f"unknown distillation loss {self.loss!r}: expected one of "
                             f"{', '.join(LOSSES)}")
        if self.loss != "mse" and self.target != "site":
            raise InputError(f"--distill-loss {self.loss} needs --distill-target site (the "
                             "block's attention weights are not the teacher's)")
        for name in ("steps", "query_positions", "patience"):
            if getattr(self, name) < 0:
                raise InputError(f"distillation {name.replace('_', ' ')} must be >= 0")
        if self.window < 0:
            raise InputError(f"--window {self.window}: the sliding window must be >= 0 tokens "
                             "(0: none)")
        for name in ("batch_rows", "eval_every"):
            if getattr(self, name) < 1:
                raise InputError(f"distillation {name.replace('_', ' ')} must be >= 1")
        if not (self.lr > 0 and self.block_lr >= 0):
            raise InputError("distillation learning rates must be > 0")

    def for_target(self, target: str) -> DistillSettings:
        return dataclasses.replace(self, target=target,
                                   loss=self.loss if target == "site" else "mse")


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
    """Outcome for one site. Errors are relative RMS ``‖y − ŷ‖₂ / ‖y‖₂`` on held-out rows, of
    the site's output (target ``site``) or of the block's output (target ``block``)."""

    site_id: str
    ok: bool
    init_error: float
    final_error: float
    final_loss: float
    steps: int
    seconds: float
    reason: str = ""
    loss_history: list[float] = field(default_factory=list)
    target: str = "site"
    best_step: int = 0
    cached: bool = False
    note: str = ""


# --- teacher activations ---------------------------------------------------------------------


class ActivationStore:
    """Teacher activations by name, appended one calibration batch at a time.

    Rows of the first ``max_tokens // T`` tokens' worth stay in memory; later batches are saved
    to ``spill_dir`` and memory-mapped. A tensor whose first dim is not the batch's row count
    (a mask broadcast over the batch) is kept once, as a constant.
    """

    def __init__(self, max_tokens: int, spill_dir: str | Path | None = None) -> None:
        self.max_tokens = max_tokens
        self._spill_root = spill_dir
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._starts: list[int] = []
        self._chunks: list[dict[str, torch.Tensor]] = []
        self.constants: dict[str, torch.Tensor] = {}
        self._batched: set[str] | None = None
        self.rows = 0
        self.tokens_in_memory = 0
        self.bytes_in_memory = 0
        self.bytes_spilled = 0

    def append(self, values: Mapping[str, torch.Tensor], rows: int, tokens: int) -> None:
        """Add one batch: ``values`` by name, ``rows`` sequences of ``tokens`` tokens in all."""
        if self._batched is None:
            self._batched = {n for n, t in values.items() if t.dim() and t.shape[0] == rows}
            self.constants = {n: t for n, t in values.items() if n not in self._batched}
            self.bytes_in_memory += sum(t.numel() * t.element_size()
                                        for t in self.constants.values())
        chunk = {n: t for n, t in values.items() if n in self._batched}
        nbytes = sum(t.numel() * t.element_size() for t in chunk.values())
        if self.tokens_in_memory + tokens > self.max_tokens and self._chunks:
            chunk = self._spill(chunk)
            self.bytes_spilled += nbytes
        else:
            self.tokens_in_memory += tokens
            self.bytes_in_memory += nbytes
        self._starts.append(self.rows)
        self._chunks.append(chunk)
        self.rows += rows

    def _spill(self, chunk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="dtr-distill-", dir=self._spill_root)
        path = Path(self._tmp.name) / f"chunk{len(self._chunks)}.pt"
        torch.save({n: t.contiguous() for n, t in chunk.items()}, path)
        return torch.load(path, mmap=True, weights_only=True)

    def get(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of ``name`` (``[len(idx), ...]``), or the constant itself."""
        if name in self.constants:
            return self.constants[name]
        parts = []
        for i in idx.tolist():
            c = bisect.bisect_right(self._starts, i) - 1
            parts.append(self._chunks[c][name][i - self._starts[c]])
        return torch.stack(parts)

    @property
    def spilled(self) -> bool:
        return self._tmp is not None

    def close(self) -> None:
        """Drop everything and delete the spill files."""
        self._chunks.clear()
        self.constants.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _key_valid_name(mask: str, kind: str) -> str:
    return f"{mask}#key_valid:{kind}"


def _needed_nodes(site: AttentionSite, block: AttentionBlock | None) -> tuple[set[str], set[str]]:
    """``(raw node names, mask nodes turned into key padding vectors)`` a site trains on."""
    raw = set(block.inputs) | {block.output} if block else {site.q, site.k, site.v, site.output}
    return raw, ({site.mask} if site.mask else set())


def record_teacher(
    gm: GraphModule,
    plan: DistillPlan,
    calib: Dataset,
    input_names: Sequence[str],
    batch_size: int,
    store: ActivationStore,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Run the teacher over ``calib`` once, batch by batch, into ``store``."""
    raw: set[str] = set()
    masks: dict[str, str] = {}
    for site in plan.sites:
        r, m = _needed_nodes(site, plan.blocks.get(site.id))
        raw |= r
        masks.update({name: site.mask_kind for name in m})
    for batch in calib.batches(batch_size):
        rec = record_nodes(gm, [batch[n] for n in input_names], raw | set(masks))
        rows = int(batch[input_names[0]].shape[0])
        values = {n: rec[n] for n in raw}
        # tokens = rows × the longest sequence among the recorded activations (q: [B, H, T, Dk],
        # a block's output: [B, T, C]), whatever the model's inputs are (ids, pixels)
        tokens = rows * max((int(t.shape[-2]) for t in values.values() if t.dim() >= 3),
                            default=1)
        for name, kind in masks.items():
            values[_key_valid_name(name, kind)] = key_valid_from_mask(rec[name], kind)  # [B|1, S]
        store.append(values, rows, tokens)
        if on_batch is not None:
            on_batch(rows)


# --- the views a training reads --------------------------------------------------------------


class _Data:
    """Named teacher tensors by row: ``get(name, idx)``; ``n`` rows."""

    n: int

    def get(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _StoreData(_Data):
    def __init__(self, store: ActivationStore, names: Mapping[str, str | None]) -> None:
        self.store, self.names, self.n = store, names, store.rows

    def get(self, name: str, idx: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        node = self.names.get(name)
        return None if node is None else self.store.get(node, idx)


class _RecordData(_Data):
    def __init__(self, rec: SiteRecord, mask_kind: str) -> None:
        self.n = rec.q.shape[0]
        kv = key_valid_from_mask(rec.mask, mask_kind) if rec.mask is not None else None
        self.tensors = {"q": rec.q, "k": rec.k, "v": rec.v, "out": rec.out, "key_valid": kv}

    def get(self, name: str, idx: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        t = self.tensors[name]
        if t is None:
            return None
        return t if t.shape[0] != self.n else t[idx]


def _query_weights(key_valid: torch.Tensor | None, rows: int, t: int) -> torch.Tensor:
    """``[rows, T]`` weight of each query position: 0 for padding (a key padding vector marks
    queries too when T == S), else 1."""
    if key_valid is None or key_valid.shape[-1] != t:
        return torch.ones(rows, t)
    return key_valid.float().expand(rows, -1)


# --- students and their forward passes -------------------------------------------------------


def _new_linear(site: AttentionSite, settings: DistillSettings) -> LinearAttention:
    """The untrained student of ``site``; ``settings.window`` applies to causal sites only."""
    return LinearAttention(site.num_heads, site.num_kv_heads, site.head_dim,
                           mask_kind=site.mask_kind, causal=site.causal,
                           feature_map=settings.feature_map, scale=site.scale,
                           window=settings.window if site.causal else 0)


def _site_forward(m: LinearAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_valid: torch.Tensor | None,
                  positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``m(q, k, v, mask)`` from the mask's key padding vector ``[B|1, S]``, at query
    ``positions`` only (bidirectional, no window) or at all of them.

    Returns ``(out: [B, H, T', Dv], φ(q): [B, H, T', F], φ(k): [B, H, S, F])``.
    """
    k, v = repeat_kv(k, m.num_heads), repeat_kv(v, m.num_heads)  # [B, H, S, *]
    if positions is not None:
        q = q[:, :, positions]  # [B, H, T', Dk]
    phi_q, phi_k = m.feature_map_q(q), m.feature_map_k(k)
    if m.window:
        out = sliding_window_linear_attention(
            q, k, v, phi_q, phi_k, key_valid, window=m.window, scale=m.scale,
            softmax_weight=torch.sigmoid(m.window_factor), eps=m.eps, chunk_size=m.chunk_size)
    else:
        out = linear_attention(phi_q, phi_k, v, key_valid, causal=m.causal, eps=m.eps,
                               chunk_size=m.chunk_size)
    return out.to(q.dtype), phi_q, phi_k


def _attention_kl(q: torch.Tensor, k: torch.Tensor, phi_q: torch.Tensor, phi_k: torch.Tensor,
                  key_valid: torch.Tensor | None, causal: bool, scale: float,
                  w: torch.Tensor) -> torch.Tensor:
    """Hedgehog's loss: mean over valid queries of KL(softmax weights ‖ linear weights).

    ``q: [B, H, T', Dk]``, ``k: [B, H, S, Dk]``, ``phi_q: [B, H, T', F]``, ``phi_k: [B, H, S, F]``,
    ``w: [B, T']`` query weights.
    """
    T, S = q.shape[-2], k.shape[-2]
    allowed = torch.ones(1, 1, T, S, dtype=torch.bool)
    if key_valid is not None:
        allowed = allowed & (key_valid[:, None, None, :] > 0)
    if causal:
        allowed = allowed & torch.ones(T, S, dtype=torch.bool).tril()
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, T', S]
    log_p = torch.log_softmax(scores.masked_fill(~allowed, -1e9), dim=-1)
    a = torch.matmul(phi_q, phi_k.transpose(-1, -2)) * allowed  # [B, H, T', S]
    log_a = torch.log(a + 1e-12) - torch.log(a.sum(-1, keepdim=True) + _EPS)
    kl = (log_p.exp() * (log_p - log_a) * allowed).sum(-1)  # [B, H, T']
    return (kl * w[:, None, :]).sum() / (w.sum() * q.shape[1]).clamp_min(1.0)


class _SiteTask:
    """Training of a ``site`` target: the student is a :class:`LinearAttention`."""

    def __init__(self, site: AttentionSite, settings: DistillSettings, data: _Data) -> None:
        self.site, self.settings, self.data = site, settings, data
        self.module = _new_linear(site, settings)
        self.subsample = (settings.query_positions > 0 and not site.causal
                          and not self.module.window)

    def param_groups(self) -> list[dict[str, Any]]:
        params = [p for p in self.module.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.settings.lr}] if params else []

    def loss(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        d, s = self.data, self.settings
        q, k, v, out = (d.get(n, idx) for n in ("q", "k", "v", "out"))
        key_valid = d.get("key_valid", idx)
        T = q.shape[2]
        positions = None
        if self.subsample and s.query_positions < T:
            positions = torch.randperm(T, generator=gen)[: s.query_positions]
        pred, phi_q, phi_k = _site_forward(self.module, q, k, v, key_valid, positions)
        w = _query_weights(key_valid, len(idx), T)  # [b, T]
        if positions is not None:
            out, w = out[:, :, positions], w[:, positions]
        wq = w[:, None, :, None]
        loss = ((pred - out) ** 2 * wq).sum() / (out**2 * wq).sum().clamp_min(1e-30)
        if s.loss == "mse+ce":
            qs = q if positions is None else q[:, :, positions]
            loss = loss + _attention_kl(qs, repeat_kv(k, self.module.num_heads), phi_q, phi_k,
                                        key_valid, self.site.causal, self.site.scale, w)
        return loss

    @torch.no_grad()
    def error(self, idx: torch.Tensor) -> float:
        num = den = 0.0
        for part in idx.split(8):
            d = self.data
            q, k, v, out = (d.get(n, part) for n in ("q", "k", "v", "out"))
            key_valid = d.get("key_valid", part)
            pred = _site_forward(self.module, q, k, v, key_valid)[0]
            w = _query_weights(key_valid, len(part), q.shape[2])[:, None, :, None]
            num += float(((pred - out) ** 2 * w).sum())
            den += float((out**2 * w).sum())
        return math.sqrt(num / max(den, 1e-30))


class _BlockTask:
    """Training of a ``block`` target: the student is the block with its own weights."""

    def __init__(self, gm: GraphModule, site: AttentionSite, block: AttentionBlock,
                 settings: DistillSettings, data: _Data) -> None:
        self.site, self.block, self.settings, self.data = site, block, settings, data
        self.module = block_module(gm, block, site, _new_linear(site, settings),
                                   copy_weights=True)

    def param_groups(self) -> list[dict[str, Any]]:
        fmap: list[nn.Parameter] = []
        weights: list[nn.Parameter] = []
        for name, p in self.module.named_parameters():
            (fmap if name.startswith(ATTENTION_MODULE + ".") else weights).append(p)
        groups = [{"params": fmap, "lr": self.settings.lr}] if fmap else []
        matrices = [p for p in weights if p.dim() >= 2]
        if matrices and self.settings.block_lr > 0:
            # relative to the weights' own scale: a step moves each by ~block_lr of their RMS
            rms = torch.cat([p.detach().reshape(-1) for p in matrices]).square().mean().sqrt()
            groups.append({"params": weights, "lr": self.settings.block_lr * float(rms)})
        return groups

    def _batch(self, idx: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        inputs = [self.data.get(f"in{i}", idx) for i in range(len(self.block.inputs))]
        out = self.data.get("out", idx)  # [b, T, C]
        w = _query_weights(self.data.get("key_valid", idx), len(idx), out.shape[1])
        return inputs, out, w.reshape(len(idx), out.shape[1], *([1] * (out.dim() - 2)))

    def loss(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        inputs, out, w = self._batch(idx)
        pred = self.module(*inputs)
        return ((pred - out) ** 2 * w).sum() / (out**2 * w).sum().clamp_min(1e-30)

    @torch.no_grad()
    def error(self, idx: torch.Tensor) -> float:
        num = den = 0.0
        for part in idx.split(8):
            inputs, out, w = self._batch(part)
            pred = self.module(*inputs)
            num += float(((pred - out) ** 2 * w).sum())
            den += float((out**2 * w).sum())
        return math.sqrt(num / max(den, 1e-30))


def _site_seed(seed: int, site_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{site_id}".encode()).digest()[:4], "little")


def _split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train rows, held-out rows)``: the last ``N // 8`` rows (1 to 16) are held out."""
    if n < 2:
        return torch.arange(n), torch.arange(n)
    hold = min(max(1, n // 8), MAX_HOLDOUT_ROWS)
    return torch.arange(n - hold), torch.arange(n - hold, n)


def _train(task: _SiteTask | _BlockTask, site_id: str,
           on_step: Callable[[int, float], None] | None = None) -> DistillResult:
    """Train ``task.module`` in place; it ends with the best held-out weights."""
    s = task.settings
    t0 = time.perf_counter()
    seed = _site_seed(s.seed, site_id)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_idx, hold_idx = _split(task.data.n)
    module = task.module
    module.train()
    init_error = task.error(hold_idx)
    groups = task.param_groups()
    if not groups or s.steps == 0:
        why = (f"{s.feature_map} has no trainable parameters: nothing to distill for target "
               f"{s.target}" if not groups else "0 steps")
        ok = math.isfinite(init_error)
        module.eval()
        return DistillResult(site_id, ok, init_error, init_error, float("nan"), 0,
                             time.perf_counter() - t0, "" if ok else "non-finite error",
                             target=s.target, note=why)
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.steps)
    best_error, best_step = init_error, 0
    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    history: list[float] = []
    stale = 0
    loss_val = float("nan")
    step = 0
    rows = min(s.batch_rows, len(train_idx))
    for step in range(1, s.steps + 1):
        idx = train_idx[torch.randperm(len(train_idx), generator=gen)[:rows]]
        loss = task.loss(idx, gen)
        loss_val = float(loss.detach())
        if not math.isfinite(loss_val):
            module.load_state_dict(best_state)
            module.eval()
            return DistillResult(site_id, False, init_error, float("nan"), loss_val, step,
                                 time.perf_counter() - t0,
                                 reason=f"loss became {loss_val} at step {step}",
                                 loss_history=history, target=s.target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0 or step == 1:
            history.append(loss_val)
        if on_step is not None:
            on_step(step, loss_val)
        if step % s.eval_every == 0 or step == s.steps:
            err = task.error(hold_idx)
            if err < best_error * (1 - 1e-3):
                best_error, best_step, stale = err, step, 0
                best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            else:
                stale += 1
                if s.patience and stale >= s.patience:
                    break
    module.load_state_dict(best_state)
    module.eval()
    ok = math.isfinite(best_error)
    note = "" if step == s.steps else f"stopped early at step {step}"
    return DistillResult(site_id, ok, init_error, best_error, loss_val, step,
                         time.perf_counter() - t0, reason="" if ok else "non-finite held-out error",
                         loss_history=history, target=s.target, best_step=best_step, note=note)


# --- the plan: what each site trains, and its cache key --------------------------------------


@dataclass
class DistillPlan:
    """What each site is trained as (target, block) and its cache key.

    Attributes:
        sites: every site.
        settings: as requested; a site's own settings are ``settings.for_target(targets[id])``.
        targets: effective target per site (``block`` falls back to ``site`` without a block).
        blocks: the block of each ``block``-target site.
        notes: why a site does not train as requested.
        keys: cache key per site; ``key_parts``: what each key hashes.
    """

    sites: tuple[AttentionSite, ...]
    settings: DistillSettings
    targets: dict[str, str]
    blocks: dict[str, AttentionBlock]
    notes: dict[str, str]
    keys: dict[str, str]
    key_parts: dict[str, dict[str, str]]

    def site(self, site_id: str) -> AttentionSite:
        return next(s for s in self.sites if s.id == site_id)

    def empty_student(self, gm: GraphModule, site_id: str) -> nn.Module:
        """An untrained student of ``site_id`` (to load saved weights into)."""
        site = self.site(site_id)
        lin = _new_linear(site, self.settings)
        block = self.blocks.get(site_id)
        return lin if block is None else block_module(gm, block, site, lin, copy_weights=True)

    def switch(self, gm: GraphModule, site_id: str, student: nn.Module) -> SiteSwitch:
        """The search's switch between a site's teacher and ``student``: the softmax core
        (``site``) or the teacher's own block sharing its weights (``block``)."""
        site = self.site(site_id)
        block = self.blocks.get(site_id)
        if block is None:
            return SiteSwitch(SoftmaxAttention(site.num_heads, site.num_kv_heads, scale=site.scale,
                                               causal=site.sdpa_is_causal), student)  # type: ignore[arg-type]
        return BlockSwitch(block_module(gm, block, site), student)  # type: ignore[arg-type]


def plan_distillation(
    gm: GraphModule,
    sites: Sequence[AttentionSite],
    settings: DistillSettings,
    calib: Dataset,
    record_batch: int,
) -> DistillPlan:
    """Find each site's block (target ``block``) and compute every site's cache key."""
    settings.check()
    targets, blocks, notes = {}, {}, {}
    for site in sites:
        target = settings.target
        if site.layout != "BHTD":
            notes[site.id] = f"layout {site.layout} is not supported by LinearAttention"
        if target == "block":
            found = find_block(gm, site)
            if isinstance(found, BlockMiss):
                target = "site"
                notes[site.id] = f"no attention block ({found}); distilled as target site"
            else:
                blocks[site.id] = found
        targets[site.id] = target
    hashes = node_hashes(gm)
    common = {"code": code_digest(), "calib": hash_tensors(calib.inputs),
              "record_batch": str(record_batch)}
    keys, parts = {}, {}
    for site in sites:
        block = blocks.get(site.id)
        shape = {k: v for k, v in dataclasses.asdict(site).items()
                 if k in ("num_heads", "num_kv_heads", "head_dim", "head_dim_v", "causal",
                          "mask_kind", "scale", "layout", "kind")}
        if block is None:
            teacher = [hashes[n] for n in (site.q, site.k, site.v, site.output)]
        else:
            teacher = [hashes[n] for n in (*block.inputs, block.output)] + [block.owner]
        if site.mask:
            teacher.append(hashes[site.mask])
        own = dataclasses.asdict(settings.for_target(targets[site.id]))
        if not (site.causal and own["window"]):
            del own["window"]  # no window here: the key stays that of a run without --window
        p = dict(common, teacher=hashlib.sha256("|".join(teacher).encode()).hexdigest(),
                 site=json.dumps(shape, sort_keys=True), settings=json.dumps(own, sort_keys=True))
        parts[site.id], keys[site.id] = p, cache_key(p)
    return DistillPlan(tuple(sites), settings, targets, blocks, notes, keys, parts)


# --- running the trainings -------------------------------------------------------------------


@dataclass
class _Context:
    """What a training process needs (inherited through fork)."""

    gm: GraphModule
    plan: DistillPlan
    store: ActivationStore
    threads: int
    progress: Any = None  # a multiprocessing queue of (site id, step, loss)


_CONTEXT: _Context | None = None


def _task(ctx: _Context, site_id: str) -> _SiteTask | _BlockTask:
    site = ctx.plan.site(site_id)
    settings = ctx.plan.settings.for_target(ctx.plan.targets[site_id])
    kv = _key_valid_name(site.mask, site.mask_kind) if site.mask else None
    block = ctx.plan.blocks.get(site_id)
    if block is None:
        names = {"q": site.q, "k": site.k, "v": site.v, "out": site.output, "key_valid": kv}
        return _SiteTask(site, settings, _StoreData(ctx.store, names))
    inputs: dict[str, str | None] = {f"in{i}": n for i, n in enumerate(block.inputs)}
    return _BlockTask(ctx.gm, site, block, settings,
                      _StoreData(ctx.store, inputs | {"out": block.output, "key_valid": kv}))


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_one(site_id: str) -> tuple[str, bytes, DistillResult]:
    """One site's training, in this process or a forked worker (whose thread count is set
    once, by :func:`_init_worker`). The weights come back as safetensors bytes: plain bytes
    through the result pipe, no shared-memory tensors."""
    ctx = _CONTEXT
    assert ctx is not None
    task = _task(ctx, site_id)
    last = [0.0]

    def on_step(step: int, loss: float) -> None:
        now = time.perf_counter()
        if ctx.progress is not None and (now - last[0] > 0.2 or step == task.settings.steps):
            last[0] = now
            ctx.progress.put((site_id, step, loss))

    if ctx.plan.site(site_id).layout != "BHTD":
        res = DistillResult(site_id, False, float("nan"), float("nan"), float("nan"), 0, 0.0,
                            reason=ctx.plan.notes[site_id], target=ctx.plan.targets[site_id])
    else:
        res = _train(task, site_id, on_step)
    res.note = "; ".join(x for x in (ctx.plan.notes.get(site_id, ""), res.note) if x)
    state = {k: v.detach().contiguous() for k, v in task.module.state_dict().items()}
    return site_id, safetensors_save(state), res


def _init_worker(threads: int) -> None:
    """A forked worker: its own intra-op thread count, for good (a forked OpenMP pool must not
    be re-entered with more threads)."""
    torch.set_num_threads(threads)


def default_workers(n_sites: int) -> int:
    """One worker per available CPU, at most one per site."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, n_sites))


def distill(
    gm: GraphModule,
    plan: DistillPlan,
    calib: Dataset,
    input_names: Sequence[str],
    *,
    record_batch: int,
    max_calib_tokens: int,
    workers: int = 1,
    cache: DistillCache | None = None,
    spill_dir: str | Path | None = None,
    on_record: Callable[[int], None] | None = None,
    on_step: Callable[[str, int, float], None] | None = None,
    on_done: Callable[[str, DistillResult], None] | None = None,
) -> tuple[dict[str, nn.Module], dict[str, DistillResult]]:
    """Distil every site of ``plan``: cached weights first, then one teacher pass and the
    trainings of the rest in ``workers`` processes.

    Returns ``({site id: student}, {site id: result})``; students are in eval mode. A result
    with ``ok=False`` (non-finite loss or error) must stay softmax. Only successful trainings
    are cached.
    """
    global _CONTEXT
    students: dict[str, nn.Module] = {}
    results: dict[str, DistillResult] = {}
    todo = []
    for site in plan.sites:
        hit = cache.load(plan.keys[site.id]) if cache is not None else None
        if hit is None:
            todo.append(site.id)
            continue
        state, res_dict = hit
        module = plan.empty_student(gm, site.id)
        module.load_state_dict(state, strict=True)
        res = DistillResult(**res_dict)
        res.cached = True
        students[site.id], results[site.id] = module.eval(), res
        if on_done is not None:
            on_done(site.id, res)
    if not todo:
        return students, results

    sub = dataclasses.replace(plan, sites=tuple(s for s in plan.sites if s.id in todo))
    store = ActivationStore(max_calib_tokens, spill_dir)
    try:
        record_teacher(gm, sub, calib, input_names, record_batch, store, on_record)
        workers = max(1, min(workers, len(todo)))
        if workers == 1:
            _CONTEXT = _Context(gm, plan, store, threads=1)
            for sid in todo:
                _collect(plan, gm, _run_one_local(sid, on_step), students, results, cache,
                         on_done)
        else:
            ctx = multiprocessing.get_context("fork")
            progress = ctx.Queue()
            _CONTEXT = _Context(gm, plan, store, threads=1, progress=progress)
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                     initializer=_init_worker, initargs=(1,)) as pool:
                pending = {pool.submit(_run_one, sid) for sid in todo}
                try:
                    while pending:
                        done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                        _drain(progress, on_step)
                        for fut in done:
                            _collect(plan, gm, fut.result(), students, results, cache, on_done)
                    _drain(progress, on_step)
                except BaseException:
                    for fut in pending:
                        fut.cancel()
                    raise
    finally:
        _CONTEXT = None
        store.close()
    return ({s.id: students[s.id] for s in plan.sites},
            {s.id: results[s.id] for s in plan.sites})


def _run_one_local(site_id: str, on_step: Callable[[str, int, float], None] | None
                   ) -> tuple[str, bytes, DistillResult]:
    """:func:`_run_one` in this process, with the progress callback called directly."""

    class _Direct:
        def put(self, item: tuple[str, int, float]) -> None:
            if on_step is not None:
                on_step(*item)

    assert _CONTEXT is not None
    _CONTEXT.progress = _Direct()
    with _threads(_CONTEXT.threads):
        return _run_one(site_id)


def _drain(progress: Any, on_step: Callable[[str, int, float], None] | None) -> None:
    while True:
        try:
            item = progress.get_nowait()
        except queue_mod.Empty:
            return
        if on_step is not None:
            on_step(*item)


def _collect(plan: DistillPlan, gm: GraphModule,
             out: tuple[str, bytes, DistillResult],
             students: dict[str, nn.Module], results: dict[str, DistillResult],
             cache: DistillCache | None,
             on_done: Callable[[str, DistillResult], None] | None) -> None:
    sid, state, res = out
    module = plan.empty_student(gm, sid)
    module.load_state_dict(safetensors_load(state), strict=True)
    students[sid], results[sid] = module.eval(), res
    if cache is not None and res.ok:
        cache.save(plan.keys[sid], module.state_dict(), dataclasses.asdict(res),
                   plan.key_parts[sid])
    if on_done is not None:
        on_done(sid, res)


# --- in-memory records (tests, benchmarks) ---------------------------------------------------


def record_sites(
    gm: GraphModule,
    sites: Sequence[AttentionSite],
    calib: Dataset,
    input_names: Sequence[str],
    batch_size: int,
) -> dict[str, SiteRecord]:
    """Run the teacher over ``calib`` once and keep every site's q, k, v, mask and output
    in memory (all of them: for small calibration sets; :func:`distill` streams instead)."""
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
        s.id: SiteRecord(cat(s.q), cat(s.k), cat(s.v), cat(s.mask) if s.mask else None,
                         cat(s.output))
        for s in sites
    }


def distill_site(
    site: AttentionSite,
    rec: SiteRecord,
    *,
    feature_map: str = "hedgehog",
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    settings: DistillSettings | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[LinearAttention, DistillResult]:
    """Train one site's :class:`LinearAttention` (target ``site``) on an in-memory record.

    ``settings`` gives every hyper-parameter; the keyword arguments override its fields.
    """
    s = dataclasses.replace(settings or DistillSettings(feature_map=feature_map), target="site",
                            seed=seed)
    if steps is not None:
        s = dataclasses.replace(s, steps=steps)
    if lr is not None:
        s = dataclasses.replace(s, lr=lr)
    if batch_size is not None:
        s = dataclasses.replace(s, batch_rows=batch_size)
    s.check()
    task = _SiteTask(site, s, _RecordData(rec, site.mask_kind))
    with _threads(1):
        res = _train(task, site.id, on_step)
    return task.module, res
