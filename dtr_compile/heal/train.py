"""The recovery stage's training: the hybrid's linear students, trained jointly, end to end.

After the search has committed sites, the hybrid (the captured graph with those sites' students)
is trained against the original model's outputs on the calibration set (:mod:`~dtr_compile.heal.
loss`): every committed student's own parameters (feature maps, gates, a window's softmax
weight, a block student's q/k/v/o copies) and, with ``rank > 0``, low-rank adapters on each
student's q, k, v and output (:mod:`~dtr_compile.heal.adapters`). The teacher's weights never
change: they are frozen for the training and the students are copies, so the distilled students
stay available to the search.

A step (Adam, cosine learning rate; Loshchilov & Hutter's SGDR schedule without restarts) draws
``rows_per_step`` training rows with a seeded generator; the last ``N // 8`` calibration rows (1
to 16) are held out, and their loss, measured before the first step and every ``eval_every``
steps, keeps the best weights and stops the training after ``patience`` evaluations without a
0.1 % improvement (or when ``time_limit_s`` is spent, or after ``steps`` steps).

**One row per forward, summed in row order.** Each row's loss numerator is differentiated alone
(``torch.autograd.grad``) and the step's gradient is ``Σ_rows ∇num_r / Σ_rows den_r``, summed in
row order. Over the ranks of a distributed run (:mod:`dtr_compile.parallel`) the step's rows are
dealt in contiguous runs, every rank sends its rows' gradients, and every rank sums all of them
in the same row order: the same floating-point operations as one process, so the same weights on
every rank and as a one-process run (on the CPU, bitwise; on CUDA each rank agrees with the
others). The alternative, rank 0 trains and broadcasts, leaves the other ranks idle; dealing
rows costs one gather of the trainable parameters' gradients per step (hedgehog on SmolLM2: 2.2
M floats), and a row of 1024 tokens is a forward large enough to keep a core (or a GPU) busy.

**Resumable.** With a ``checkpoint`` path the whole training state (weights, Adam's moments,
the schedule, the row generator, the best weights and the held-out history) is written
atomically after each held-out evaluation, under the key of everything the training depends on;
a rerun with the same key continues from it and ends with the very weights an uninterrupted run
gives (a CPU run is deterministic step by step).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from dtr_compile.data import Dataset, _first_tensor
from dtr_compile.device import Placement
from dtr_compile.errors import InputError
from dtr_compile.fileio import atomic_path
from dtr_compile.heal.adapters import adapt
from dtr_compile.heal.loss import LOSS_KINDS, Targets, row_loss
from dtr_compile.parallel import Group, batch_rows
from dtr_compile.passes.attention_block import AttentionBlock
from dtr_compile.passes.find_attention import AttentionSite
from dtr_compile.passes.linearize import rewrite_sites
from dtr_compile.timelimit import TIME_LIMIT_STOP

#: Held-out rows are the last ``N // 8`` calibration rows, at most this many (as distillation).
MAX_HOLDOUT_ROWS = 16
CHECKPOINT_FORMAT = "dtr-compile heal checkpoint v1"


@dataclass(frozen=True)
class HealSettings:
    """Everything a heal depends on besides its model, students and data (all in its key).

    Attributes:
        steps: optimiser steps per round, at most (early stopping may end sooner).
        rows_per_step: calibration rows per step (each its own forward, see the module
            docstring).
        lr: Adam's learning rate of the students' parameters and the adapters (cosine-annealed).
        rank: rank of the low-rank adapters on each student's q, k, v and output; 0: none.
        top_k: teacher log-probabilities kept per position for ``token-kl``.
        eval_every: steps between held-out evaluations.
        patience: held-out evaluations without improvement before stopping (0: never stop).
        seed: the row draws and the adapters' initialisation.
        loss: ``"auto"`` (from the metric, :func:`~dtr_compile.heal.loss.loss_kind`) or a
            :data:`~dtr_compile.heal.loss.LOSS_KINDS` name.
    """

    steps: int = 60
    rows_per_step: int = 2
    lr: float = 1e-3
    rank: int = 0
    top_k: int = 64
    eval_every: int = 10
    patience: int = 2
    seed: int = 0
    loss: str = "auto"

    def check(self) -> None:
        """Raises :class:`InputError` naming the bad setting and its flag."""
        for name, flag in (("steps", "--heal-steps"), ("rank", "--heal-rank"),
                           ("patience", "heal patience")):
            if getattr(self, name) < 0:
                raise InputError(f"{flag} {getattr(self, name)}: must be >= 0")
        for name, flag in (("rows_per_step", "--heal-rows"), ("top_k", "heal top-k"),
                           ("eval_every", "heal eval-every")):
            if getattr(self, name) < 1:
                raise InputError(f"{flag} {getattr(self, name)}: must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"--heal-lr {self.lr}: must be a number > 0 (e.g. 1e-3)")
        if self.loss != "auto" and self.loss not in LOSS_KINDS:
            raise InputError(f"heal loss {self.loss!r}: expected auto or one of "
                             f"{', '.join(LOSS_KINDS)}")


@dataclass
class HealRecord:
    """One heal: what was trained, on what, and how the held-out loss moved.

    Losses are the mean per held-out position (token-kl), row (class-kl) or the relative MSE
    (mse), see :mod:`~dtr_compile.heal.loss`.
    """

    linear: list[str]
    loss: str
    init_loss: float
    final_loss: float
    steps: int
    best_step: int
    tokens: int
    seconds: float
    stop_reason: str
    rows_train: int
    rows_heldout: int
    trainable_params: int
    adapter_rank: int
    train_loss_history: list[float] = field(default_factory=list)
    heldout_history: list[list[float]] = field(default_factory=list)  # [step, loss]
    ok: bool = True
    cached: bool = False
    resumed_from_step: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Healed:
    """The healed students of the committed sites (CPU, eval mode) and the record."""

    students: dict[str, nn.Module]
    record: HealRecord


def split_rows(n: int) -> tuple[list[int], list[int]]:
    """``(training rows, held-out rows)``: the last ``N // 8`` rows (1 to 16) are held out; a
    single row is both."""
    if n < 2:
        return list(range(n)), list(range(n))
    hold = min(max(1, n // 8), MAX_HOLDOUT_ROWS)
    return list(range(n - hold)), list(range(n - hold, n))


def site_seed(seed: int, site_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"heal:{seed}:{site_id}".encode()).digest()[:4], "little")


def trainable_students(
    sites: Sequence[AttentionSite], students: Mapping[str, nn.Module], linear: Sequence[str],
    settings: HealSettings,
) -> dict[str, nn.Module]:
    """Copies of the ``linear`` sites' students, with adapters when ``settings.rank > 0``, in
    eval mode (a heal's starting point; the given students are never changed)."""
    by_id = {s.id: s for s in sites}
    out: dict[str, nn.Module] = {}
    for sid in linear:
        site = by_id[sid]
        out[sid] = adapt(copy.deepcopy(students[sid]).cpu(), head_dim=site.head_dim,
                         head_dim_v=site.head_dim_v, rank=settings.rank,
                         seed=site_seed(settings.seed, sid)).eval()
    return out


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Every parameter of ``module`` without gradients for the duration (the teacher's)."""
    params = list(module.parameters())
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, rg in zip(params, before, strict=True):
            p.requires_grad_(rg)


def _flat(grads: Sequence[torch.Tensor | None], params: Sequence[nn.Parameter]) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float().cpu()
                      for g, p in zip(grads, params, strict=True)])


class _Trainer:
    """One heal's hybrid, rows and optimiser state (see :func:`heal`)."""

    def __init__(self, teacher: GraphModule, sites: Sequence[AttentionSite],
                 modules: dict[str, nn.Module], calib: Dataset, names: Sequence[str],
                 targets: Targets, placement: Placement, group: Group,
                 blocks: Mapping[str, AttentionBlock] | None) -> None:
        self.modules, self.calib, self.names = modules, calib, list(names)
        self.targets, self.placement, self.group = targets, placement, group
        dev = placement.device
        self.on_device = {sid: m.to(dev) for sid, m in modules.items()}
        self.hybrid = rewrite_sites(teacher, sites, self.on_device, class_name="HealGraph",
                                    blocks=blocks)
        self.params = [p for sid in sorted(self.on_device)
                       for p in self.on_device[sid].parameters() if p.requires_grad]

    def _row(self, i: int, grad: bool) -> tuple[float, float, torch.Tensor | None, int]:
        """Row ``i``: ``(numerator, denominator, flat gradient of the numerator or None,
        tokens)``."""
        dev = self.placement.device
        inputs = [self.calib.inputs[n][i:i + 1].clone().to(dev) for n in self.names]
        tokens = int(inputs[0].numel())
        with torch.set_grad_enabled(grad), self.placement.autocast():
            out = _first_tensor(self.hybrid(*inputs))
        num, den = row_loss(self.targets.kind, out, self.targets.row(i, dev))
        g = None
        if grad:
            g = _flat(torch.autograd.grad(num, self.params, allow_unused=True), self.params)
        return float(num.detach()), float(den), g, tokens

    def rows(self, idx: Sequence[int], grad: bool,
             ) -> list[tuple[float, float, torch.Tensor | None, int]]:
        """Every row of ``idx`` (dealt over the ranks in contiguous runs), in ``idx`` order."""
        lo, hi = batch_rows(len(idx), 1, self.group)

        def mine() -> list[tuple[float, float, torch.Tensor | None, int]]:
            return [self._row(i, grad) for i in idx[lo:hi]]

        return [r for part in self.group.exchange(mine) for r in part]

    def loss(self, idx: Sequence[int]) -> float:
        """The held-out loss ``Σ num / Σ den`` over ``idx`` (summed in row order, float64)."""
        num = den = 0.0
        for n, d, _, _ in self.rows(idx, grad=False):
            num += n
            den += d
        return num / den if den > 0 else math.nan

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {sid: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                for sid, m in self.on_device.items()}

    def load(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        for sid, m in self.on_device.items():
            m.load_state_dict(state[sid], strict=True)


def heal(
    teacher: GraphModule,
    sites: Sequence[AttentionSite],
    students: Mapping[str, nn.Module],
    linear: Sequence[str],
    calib: Dataset,
    input_names: Sequence[str],
    targets: Targets,
    settings: HealSettings,
    *,
    blocks: Mapping[str, AttentionBlock] | None = None,
    placement: Placement | None = None,
    group: Group | None = None,
    checkpoint: str | Path | None = None,
    key: str = "",
    resume: bool = True,
    time_limit_s: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_eval: Callable[[int, float], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Healed:
    """Train the ``linear`` sites' students of the hybrid end to end (module docstring).

    Args:
        teacher: the graph the students are put into: the captured graph, or its
            :meth:`Placement.graph` on the device. Its parameters are frozen while this runs
            (and restored after); it is never changed.
        sites: every site of the graph.
        students: ``{site id: student}``, at least those of ``linear`` (not changed: the
            training works on copies, see :func:`trainable_students`).
        linear: the committed sites.
        calib: the calibration rows ``targets`` were recorded on.
        targets: the teacher's outputs on ``calib`` (:func:`~dtr_compile.heal.loss.
            record_targets`).
        blocks: ``{site id: block}`` of whole-block students.
        group: the ranks sharing the work (module docstring); every rank calls this.
        checkpoint: where to keep the training state (rank 0 writes; every rank reads).
        key: what ``checkpoint`` must have been written for (e.g. the heal's cache key).
        resume: continue from ``checkpoint`` when it holds ``key``'s state (else start afresh
            and overwrite it).
        time_limit_s: stop before a step once this many seconds have passed.
        on_step: ``(step, training loss)`` after each step; ``on_eval``: ``(step, held-out
            loss)`` after each held-out evaluation.

    Returns:
        the healed students (the best held-out weights) and a :class:`HealRecord`.
    """
    settings.check()
    group = group or Group()
    placement = placement or Placement()
    t0 = clock()
    modules = trainable_students(sites, students, linear, settings)
    train_idx, hold_idx = split_rows(len(calib))
    if len(targets) != len(calib):
        raise ValueError(f"targets hold {len(targets)} rows, the calibration set {len(calib)}")
    with frozen(teacher):
        tr = _Trainer(teacher, sites, modules, calib, input_names, targets, placement, group,
                      blocks)
        n_params = sum(p.numel() for p in tr.params)
        rec = HealRecord(list(linear), targets.kind, math.nan, math.nan, 0, 0, 0, 0.0, "",
                         len(train_idx), len(hold_idx), n_params, settings.rank)
        if not tr.params or settings.steps == 0:
            rec.init_loss = rec.final_loss = tr.loss(hold_idx)
            rec.stop_reason = "nothing to train" if not tr.params else "0 steps"
            rec.seconds = clock() - t0
            return Healed(_back(modules), rec)

        opt = torch.optim.Adam(tr.params, lr=settings.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.steps)
        gen = torch.Generator().manual_seed(settings.seed)
        step, stale = 0, 0
        best_state = tr.state()
        spent_before = 0.0
        ckpt = _read_checkpoint(checkpoint, key, group) if checkpoint is not None and resume \
            else None
        if ckpt is not None and ckpt.get("done"):  # finished before: its best weights, as they were
            tr.load(ckpt["best_state"])
            done = HealRecord(**ckpt["record"])
            done.resumed_from_step = done.steps
            return Healed(_back(modules), done)
        if ckpt is not None:
            tr.load(ckpt["state"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            gen.set_state(ckpt["generator"])
            best_state = ckpt["best_state"]
            for k in ("steps", "best_step", "tokens", "init_loss", "final_loss",
                      "train_loss_history", "heldout_history"):
                setattr(rec, k, ckpt["record"][k])
            step, stale = rec.steps, ckpt["stale"]
            spent_before = float(ckpt["record"]["seconds"])
            rec.resumed_from_step = step
        else:
            rec.init_loss = rec.final_loss = tr.loss(hold_idx)
            rec.heldout_history.append([0, rec.init_loss])
            if on_eval is not None:
                on_eval(0, rec.init_loss)
        rows = min(settings.rows_per_step, len(train_idx))
        reason = f"reached --heal-steps {settings.steps}"
        while step < settings.steps:
            if time_limit_s is not None and clock() - t0 + spent_before >= time_limit_s:
                reason = f"{TIME_LIMIT_STOP} ({time_limit_s:g} s) after {step} steps"
                break
            pick = torch.randperm(len(train_idx), generator=gen)[:rows].tolist()
            got = tr.rows([train_idx[i] for i in pick], grad=True)
            den = sum(d for _, d, _, _ in got)
            grads = [g for _, _, g, _ in got if g is not None]
            total = grads[0]
            for g in grads[1:]:  # in row order, on every rank alike
                total = total + g
            total = total / den
            if not bool(torch.isfinite(total).all()):
                reason = f"non-finite gradient at step {step + 1}; kept the best weights"
                break
            offset = 0
            for p in tr.params:
                n = p.numel()
                p.grad = total[offset:offset + n].view_as(p).to(p.device, p.dtype)
                offset += n
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            rec.steps = step
            rec.tokens += sum(t for _, _, _, t in got)
            train_loss = sum(n for n, _, _, _ in got) / den
            if step % 5 == 0 or step == 1:
                rec.train_loss_history.append(train_loss)
            if on_step is not None:
                on_step(step, train_loss)
            if step % settings.eval_every == 0 or step == settings.steps:
                held = tr.loss(hold_idx)
                rec.heldout_history.append([step, held])
                if on_eval is not None:
                    on_eval(step, held)
                if held < rec.final_loss * (1 - 1e-3):
                    rec.final_loss, rec.best_step, stale = held, step, 0
                    best_state = tr.state()
                else:
                    stale += 1
                rec.seconds = spent_before + clock() - t0
                if checkpoint is not None:
                    _write_checkpoint(checkpoint, key, group, tr, opt, sched, gen, best_state,
                                      stale, rec)
                if settings.patience and stale >= settings.patience:
                    reason = (f"stopped early at step {step}: no held-out improvement in "
                              f"{settings.patience} evaluations")
                    break
        tr.load(best_state)
        rec.stop_reason = reason
        rec.seconds = spent_before + clock() - t0
        rec.ok = math.isfinite(rec.final_loss)
        if checkpoint is not None:
            _write_checkpoint(checkpoint, key, group, tr, opt, sched, gen, best_state, stale, rec,
                              done=True)
    return Healed(_back(modules), rec)


def _back(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    return {sid: m.cpu().eval() for sid, m in modules.items()}


def _read_checkpoint(path: str | Path, key: str, group: Group) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if written for ``key`` (rank 0 reads, every rank gets it)."""
    def read() -> dict[str, Any] | None:
        p = Path(path)
        if not p.is_file():
            return None
        try:
            ckpt = torch.load(p, weights_only=True, map_location="cpu")
        except Exception:  # noqa: BLE001 - a torn or foreign file: start afresh
            return None
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT \
                or ckpt.get("key") != key:
            return None
        return ckpt

    return group.broadcast(read)


def _write_checkpoint(path: str | Path, key: str, group: Group, tr: _Trainer,
                      opt: torch.optim.Optimizer, sched: Any, gen: torch.Generator,
                      best_state: dict[str, dict[str, torch.Tensor]], stale: int,
                      rec: HealRecord, done: bool = False) -> None:
    """The training state after a held-out evaluation (``done``: the heal has finished, and
    ``best_state`` is its result)."""
    if not group.is_main:
        return
    ckpt = {"format": CHECKPOINT_FORMAT, "key": key, "done": done, "state": tr.state(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "generator": gen.get_state(), "best_state": best_state, "stale": stale,
            "record": rec.to_dict()}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
