"""One site's training in stage 5: the student, its loss, and the optimisation loop.

A :class:`SiteTask` trains a site's student (:mod:`dtr_compile.linear`, any kind) on the
teacher's ``q, k, v`` (target ``site``); a :class:`BlockTask` trains the site's attention block,
teacher-initialised, on the block's input and output (target ``block``). :func:`train_task` runs
Adam with a cosine schedule, evaluates held-out rows every ``eval_every`` steps, keeps the best
weights and stops early (see :mod:`dtr_compile.distill.run` for the losses).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from dtr_compile.distill.activations import RecordData, SiteRecord, TeacherData
from dtr_compile.distill.plan import MAX_HOLDOUT_ROWS, DistillResult, DistillSettings, new_student
from dtr_compile.linear.base import LinearStudent
from dtr_compile.linear.kernel import (
    LinearAttention,
    key_valid_from_mask,
    linear_attention,
    repeat_kv,
    sliding_window_linear_attention,
)
from dtr_compile.linear.recurrence import MatrixStateStudent
from dtr_compile.passes.attention_block import ATTENTION_MODULE, AttentionBlock, block_module
from dtr_compile.passes.find_attention import AttentionSite

_EPS = 1e-6


def query_weights(key_valid: torch.Tensor | None, rows: int, t: int,
                  device: torch.device | None = None) -> torch.Tensor:
    """``[rows, T]`` weight of each query position: 0 for padding (a key padding vector marks
    queries too when T == S), else 1."""
    if key_valid is None or key_valid.shape[-1] != t:
        return torch.ones(rows, t, device=device)
    return key_valid.float().expand(rows, -1)



@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- students and their forward passes -------------------------------------------------------


def _site_forward(m: LinearStudent, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_valid: torch.Tensor | None, positions: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``m(q, k, v, mask)`` from the mask's key padding vector ``[B|1, S]``, at query
    ``positions`` only (bidirectional feature maps, no window) or at all of them.

    Returns ``(out: [B, H, T', Dv], φ(q): [B, H, T', F], φ(k): [B, H, S, F])``; the features
    are None for students that are not feature maps (their own ``forward_valid``).
    """
    if not isinstance(m, LinearAttention):
        assert positions is None, "query subsampling is for bidirectional feature maps"
        assert isinstance(m, MatrixStateStudent), type(m)
        return m.forward_valid(q, k, v, key_valid), None, None
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
    allowed = torch.ones(1, 1, T, S, dtype=torch.bool, device=q.device)
    if key_valid is not None:
        allowed = allowed & (key_valid[:, None, None, :] > 0)
    if causal:
        allowed = allowed & torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, T', S]
    log_p = torch.log_softmax(scores.masked_fill(~allowed, -1e9), dim=-1)
    a = torch.matmul(phi_q, phi_k.transpose(-1, -2)) * allowed  # [B, H, T', S]
    log_a = torch.log(a + 1e-12) - torch.log(a.sum(-1, keepdim=True) + _EPS)
    kl = (log_p.exp() * (log_p - log_a) * allowed).sum(-1)  # [B, H, T']
    return (kl * w[:, None, :]).sum() / (w.sum() * q.shape[1]).clamp_min(1.0)


class SiteTask:
    """Training of a ``site`` target: the student (any kind) on the teacher's q, k, v."""

    def __init__(self, site: AttentionSite, settings: DistillSettings, data: TeacherData) -> None:
        self.site, self.settings, self.data = site, settings, data
        self.module = new_student(site, settings).to(data.device)
        self.subsample = (settings.query_positions > 0 and not site.causal
                          and not self.module.window and isinstance(self.module, LinearAttention))

    @property
    def student(self) -> LinearStudent:
        return self.module

    def row_tokens(self) -> int:
        """Tokens per calibration row (the site's query length)."""
        return int(self.data.get("q", torch.arange(1)).shape[2])

    def init_output_scale(self, idx: torch.Tensor) -> None:
        """Matrix-state students: gates and output scale from the teacher on rows ``idx``
        (:meth:`~dtr_compile.linear.recurrence.MatrixStateStudent.init_from_teacher`)."""
        if isinstance(self.module, MatrixStateStudent):
            d = self.data
            self.module.init_from_teacher(d.get("q", idx), d.get("k", idx), d.get("v", idx),
                                          d.get("key_valid", idx),
                                          statistics=self.settings.init == "attention")

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
        w = query_weights(key_valid, len(idx), T, q.device)  # [b, T]
        if positions is not None:
            out, w = out[:, :, positions], w[:, positions]
        wq = w[:, None, :, None]
        loss = ((pred - out) ** 2 * wq).sum() / (out**2 * wq).sum().clamp_min(1e-30)
        if s.loss == "mse+ce":
            assert phi_q is not None and phi_k is not None  # feature maps only (settings.check)
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
            w = query_weights(key_valid, len(part), q.shape[2], q.device)[:, None, :, None]
            num += float(((pred - out) ** 2 * w).sum())
            den += float((out**2 * w).sum())
        return math.sqrt(num / max(den, 1e-30))

    @torch.no_grad()
    def linear_contribution(self, idx: torch.Tensor) -> float:
        """``‖ŷ − ŷ₀‖ / ‖ŷ‖`` on rows ``idx``: ``ŷ`` the student's output, ``ŷ₀`` the same
        without its linear branch (:meth:`LinearStudent.without_linear`)."""
        num = den = 0.0
        for part in idx.split(8):
            d = self.data
            q, k, v = (d.get(n, part) for n in ("q", "k", "v"))
            key_valid = d.get("key_valid", part)
            pred = _site_forward(self.module, q, k, v, key_valid)[0].float()
            alone = self.module.without_linear(q, k, v, key_valid)
            w = query_weights(key_valid, len(part), q.shape[2], q.device)[:, None, :, None]
            num += float(((pred - alone) ** 2 * w).sum())
            den += float((pred**2 * w).sum())
        return math.sqrt(num / max(den, 1e-30))


class BlockTask:
    """Training of a ``block`` target: the student is the block with its own weights."""

    def __init__(self, gm: GraphModule, site: AttentionSite, block: AttentionBlock,
                 settings: DistillSettings, data: TeacherData) -> None:
        self.site, self.block, self.settings, self.data = site, block, settings, data
        self.module = block_module(gm, block, site, new_student(site, settings),
                                   copy_weights=True).to(data.device)

    @property
    def student(self) -> LinearStudent:
        return getattr(self.module, ATTENTION_MODULE)  # type: ignore[no-any-return]

    def row_tokens(self) -> int:
        """Tokens per calibration row (the block output's sequence length)."""
        return int(self.data.get("out", torch.arange(1)).shape[1])

    def init_output_scale(self, idx: torch.Tensor) -> None:
        """Matrix-state students: gates and output scale from softmax attention on the q, k, v
        the block computes for ``idx`` (caught by a pre-hook on one forward)."""
        student = getattr(self.module, ATTENTION_MODULE, None)
        if not isinstance(student, MatrixStateStudent):
            return
        statistics = self.settings.init == "attention"

        def hook(mod: MatrixStateStudent, args: tuple[Any, ...]) -> None:
            q, k, v = args[:3]
            mask = args[3] if len(args) > 3 else None
            key_valid = None if mask is None else key_valid_from_mask(mask, mod.mask_kind)
            mod.init_from_teacher(q, k, v, key_valid, statistics=statistics)

        handle = student.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                self.module(*self._batch(idx)[0])
        finally:
            handle.remove()

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
        w = query_weights(self.data.get("key_valid", idx), len(idx), out.shape[1], out.device)
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

    @torch.no_grad()
    def linear_contribution(self, idx: torch.Tensor) -> float:
        """As :meth:`SiteTask.linear_contribution`, at the block's output: the student inside
        answers with :meth:`LinearStudent.without_linear` (a forward hook) for ``ŷ₀``."""

        def alone(mod: LinearStudent, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            q, k, v = args[:3]
            mask = args[3] if len(args) > 3 else None
            kind = str(getattr(mod, "mask_kind", "none"))
            key_valid = None if mask is None else key_valid_from_mask(mask, kind)
            return mod.without_linear(q, k, v, key_valid).to(out.dtype)

        num = den = 0.0
        for part in idx.split(8):
            inputs, _, w = self._batch(part)
            pred = self.module(*inputs)
            handle = self.student.register_forward_hook(alone)
            try:
                without = self.module(*inputs)
            finally:
                handle.remove()
            num += float(((pred - without) ** 2 * w).sum())
            den += float((pred**2 * w).sum())
        return math.sqrt(num / max(den, 1e-30))


@contextlib.contextmanager
def window_dropped(student: LinearStudent, drop: bool) -> Iterator[None]:
    """While active with ``drop``, ``student`` runs without its sliding window: its linear
    branch covers every key (feature maps: plain causal linear attention; matrix states: the
    recurrence over every key, undelayed) and carries the whole output. One training step of
    window dropout (:func:`dropout_probability`)."""
    before = student.window
    if drop:
        student.window = 0
    try:
        yield
    finally:
        student.window = before


def dropout_probability(p0: float, step: int, steps: int) -> float:
    """Scheduled sliding-window dropout (arXiv 2510.05901; SWAX, arXiv 2509.24552, varies the
    window the same way): step ``step`` of ``steps`` (from 1) drops the window with probability
    ``p0 · (1 − 2(step − 1)/steps)``, annealed linearly to 0 at half the steps, so the second
    half trains the student as it is deployed (with its window) and the best held-out weights,
    always measured with the window, come from it or later."""
    return max(0.0, p0 * (1.0 - 2.0 * (step - 1) / max(1, steps)))


def _site_seed(seed: int, site_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{site_id}".encode()).digest()[:4], "little")


def _split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train rows, held-out rows)``: the last ``N // 8`` rows (1 to 16) are held out."""
    if n < 2:
        return torch.arange(n), torch.arange(n)
    hold = min(max(1, n // 8), MAX_HOLDOUT_ROWS)
    return torch.arange(n - hold), torch.arange(n - hold, n)


def train_task(task: SiteTask | BlockTask, site_id: str,
               on_step: Callable[[int, float], None] | None = None, *,
               time_limit_s: float | None = None,
               clock: Callable[[], float] = time.perf_counter) -> DistillResult:
    """Train ``task.module`` in place; it ends with the best held-out weights.

    ``time_limit_s``: this site's share of ``--time-limit`` (seconds on ``clock``, from the
    call): checked before each step; when it is spent the training stops, the weights reached
    are measured on the held-out rows and the best so far kept, and the result says so
    (``time_limited``, ``tokens`` actually trained on, a note).
    """
    s = task.settings
    t0 = clock()
    seed = _site_seed(s.seed, site_id)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_idx, hold_idx = _split(task.data.n)
    module = task.module
    module.train()
    task.init_output_scale(train_idx[: s.batch_rows])
    init_error = task.error(hold_idx)
    groups = task.param_groups()
    row_tokens = task.row_tokens()
    steps = s.steps_for(row_tokens)
    if not groups or steps == 0:
        why = (f"{s.kind} has no trainable parameters: nothing to distill for target "
               f"{s.target}" if not groups else "0 steps")
        ok = math.isfinite(init_error)
        module.eval()
        return DistillResult(site_id, ok, init_error, init_error, float("nan"), 0,
                             clock() - t0, "" if ok else "non-finite error",
                             target=s.target, note=why,
                             linear_contribution=task.linear_contribution(hold_idx))
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    student = task.student
    dropout = s.window_dropout if student.window else 0.0
    best_error, best_step = init_error, 0
    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    history: list[float] = []
    stale = 0
    loss_val = float("nan")
    step = 0
    rows = min(s.rows_for(row_tokens), len(train_idx))
    cut = False
    for step in range(1, steps + 1):
        if time_limit_s is not None and clock() - t0 >= time_limit_s:
            cut, step = True, step - 1
            break
        idx = train_idx[torch.randperm(len(train_idx), generator=gen)[:rows]]
        drop = dropout > 0 and float(torch.rand(1, generator=gen)) < dropout_probability(
            dropout, step, steps)
        with window_dropped(student, drop):
            loss = task.loss(idx, gen)
        loss_val = float(loss.detach())
        if not math.isfinite(loss_val):
            module.load_state_dict(best_state)
            module.eval()
            return DistillResult(site_id, False, init_error, float("nan"), loss_val, step,
                                 clock() - t0,
                                 reason=f"loss became {loss_val} at step {step}",
                                 loss_history=history, target=s.target,
                                 tokens=step * rows * row_tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0 or step == 1:
            history.append(loss_val)
        if on_step is not None:
            on_step(step, loss_val)
        if step % s.eval_every == 0 or step == steps:
            err = task.error(hold_idx)
            if err < best_error * (1 - 1e-3):
                best_error, best_step, stale = err, step, 0
                best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            else:
                stale += 1
                if s.patience and stale >= s.patience:
                    break
    if cut and step > 0 and step % s.eval_every:  # the steps since the last held-out error
        err = task.error(hold_idx)
        if err < best_error * (1 - 1e-3):
            best_error, best_step = err, step
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    module.load_state_dict(best_state)
    module.eval()
    ok = math.isfinite(best_error)
    note = f"stopped by --time-limit after {step} of {steps} steps ({time_limit_s:.3g} s)" \
        if cut else "" if step == steps else f"stopped early at step {step}"
    contribution = task.linear_contribution(hold_idx)
    return DistillResult(site_id, ok, init_error, best_error, loss_val, step,
                         clock() - t0, reason="" if ok else "non-finite held-out error",
                         loss_history=history, target=s.target, best_step=best_step, note=note,
                         linear_contribution=contribution, tokens=step * rows * row_tokens,
                         time_limited=cut)



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
    time_limit_s: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[LinearStudent, DistillResult]:
    """Train one site's student (target ``site``) on an in-memory record.

    ``settings`` gives every hyper-parameter; the keyword arguments override its fields.
    ``time_limit_s`` and ``clock``: as for :func:`train_task`.
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
    task = SiteTask(site, s, RecordData(rec, site.mask_kind))
    with torch_threads(1):
        res = train_task(task, site.id, on_step, time_limit_s=time_limit_s, clock=clock)
    return task.module, res
