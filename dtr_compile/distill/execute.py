"""Running stage 5's trainings: in this process or in forked worker processes.

Each worker uses one thread, so results do not depend on the worker count; the weights come back
as safetensors bytes through the result pipe, with per-step progress through a queue.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_mod
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save as safetensors_save
from torch.fx import GraphModule

from dtr_compile.device import usable_cpus
from dtr_compile.distill.activations import ActivationStore, StoreData, key_valid_name
from dtr_compile.distill.plan import DistillPlan, DistillResult
from dtr_compile.distill.train import BlockTask, SiteTask, torch_threads, train_task
from dtr_compile.timelimit import site_seconds


@dataclass
class _Context:
    """What a training process needs (inherited through fork)."""

    gm: GraphModule
    plan: DistillPlan
    store: ActivationStore
    threads: int
    progress: Any = None  # a multiprocessing queue of (site id, step, loss)
    device: torch.device = torch.device("cpu")  # where students train
    deadline: float | None = None  # time.perf_counter() at which the trainings' time is spent
    sites: int = 0  # trainings in all
    workers: int = 1
    started: Any = None  # a shared count of the trainings started (multiprocessing.Value)

    def site_limit(self) -> float | None:
        """This training's seconds of the time left (:func:`~dtr_compile.timelimit.
        site_seconds`), counting it as started; None without a deadline."""
        if self.deadline is None:
            return None
        with self.started.get_lock():
            waiting = self.sites - self.started.value
            self.started.value += 1
        return site_seconds(self.deadline - time.perf_counter(), waiting, self.workers)


_CONTEXT: _Context | None = None


def _task(ctx: _Context, site_id: str) -> SiteTask | BlockTask:
    site = ctx.plan.site(site_id)
    settings = ctx.plan.settings.for_target(ctx.plan.targets[site_id])
    kv = key_valid_name(site.mask, site.mask_kind) if site.mask else None
    block = ctx.plan.blocks.get(site_id)
    if block is None:
        names = {"q": site.q, "k": site.k, "v": site.v, "out": site.output, "key_valid": kv}
        return SiteTask(site, settings, StoreData(ctx.store, names, ctx.device))
    inputs: dict[str, str | None] = {f"in{i}": n for i, n in enumerate(block.inputs)}
    return BlockTask(ctx.gm, site, block, settings,
                      StoreData(ctx.store, inputs | {"out": block.output, "key_valid": kv},
                                ctx.device))


def _run_one(site_id: str) -> tuple[str, bytes, DistillResult]:
    """One site's training, in this process or a forked worker (whose thread count is set
    once, by :func:`_init_worker`). The weights come back as safetensors bytes: plain bytes
    through the result pipe, no shared-memory tensors."""
    ctx = _CONTEXT
    assert ctx is not None
    task = _task(ctx, site_id)
    last = [0.0]
    final = task.settings.steps_for(task.row_tokens())

    def on_step(step: int, loss: float) -> None:
        now = time.perf_counter()
        if ctx.progress is not None and (now - last[0] > 0.2 or step == final):
            last[0] = now
            ctx.progress.put((site_id, step, loss))

    if ctx.plan.site(site_id).layout != "BHTD":
        res = DistillResult(site_id, False, float("nan"), float("nan"), float("nan"), 0, 0.0,
                            reason=ctx.plan.notes[site_id], target=ctx.plan.targets[site_id])
    else:
        res = train_task(task, site_id, on_step, time_limit_s=ctx.site_limit())
    res.note = "; ".join(x for x in (ctx.plan.notes.get(site_id, ""), res.note) if x)
    state = {k: v.detach().cpu().contiguous() for k, v in task.module.state_dict().items()}
    return site_id, safetensors_save(state), res


def _init_worker(threads: int) -> None:
    """A forked worker: its own intra-op thread count, for good (a forked OpenMP pool must not
    be re-entered with more threads)."""
    torch.set_num_threads(threads)


def default_workers(n_sites: int) -> int:
    """One worker per available CPU, at most one per site."""
    return max(1, min(usable_cpus(), n_sites))



def run_trainings(
    gm: GraphModule,
    plan: DistillPlan,
    store: ActivationStore,
    todo: Sequence[str],
    workers: int,
    on_step: Callable[[str, int, float], None] | None = None,
    device: torch.device | None = None,
    deadline: float | None = None,
) -> Generator[tuple[str, bytes, DistillResult], None, None]:
    """Train the sites ``todo`` of ``plan`` on ``store`` in ``workers`` processes (1: here).

    ``deadline``: the ``time.perf_counter()`` (one clock for this machine's processes) at which
    the trainings' share of ``--time-limit`` is spent; each training, as it starts, gets its part
    of the time left (:func:`~dtr_compile.timelimit.site_seconds`) and stops when that is spent.

    On a CUDA ``device`` the trainings run here, one after the other (a forked process cannot
    use its parent's CUDA context). Yields ``(site id, safetensors bytes of the student's state, result)`` as trainings finish;
    ``on_step(site id, step, loss)`` reports progress. Close the generator to cancel the rest.
    """
    global _CONTEXT
    device = device or torch.device("cpu")
    workers = 1 if device.type != "cpu" else max(1, min(workers, len(todo)))
    try:
        if workers == 1:
            _CONTEXT = _Context(gm, plan, store, threads=1, device=device, deadline=deadline,
                                sites=len(todo), started=multiprocessing.Value("i", 0))
            for sid in todo:
                yield _run_one_local(sid, on_step)
            return
        ctx = multiprocessing.get_context("fork")
        progress = ctx.Queue()
        _CONTEXT = _Context(gm, plan, store, threads=1, progress=progress, deadline=deadline,
                            sites=len(todo), workers=workers, started=ctx.Value("i", 0))
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                 initializer=_init_worker, initargs=(1,)) as pool:
            pending = {pool.submit(_run_one, sid) for sid in todo}
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    _drain(progress, on_step)
                    for fut in done:
                        yield fut.result()
                _drain(progress, on_step)
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
    finally:
        _CONTEXT = None


def _run_one_local(site_id: str, on_step: Callable[[str, int, float], None] | None
                   ) -> tuple[str, bytes, DistillResult]:
    """:func:`_run_one` in this process, with the progress callback called directly."""

    class _Direct:
        def put(self, item: tuple[str, int, float]) -> None:
            if on_step is not None:
                on_step(*item)

    assert _CONTEXT is not None
    _CONTEXT.progress = _Direct()
    with torch_threads(_CONTEXT.threads):
        return _run_one(site_id)


def _drain(progress: Any, on_step: Callable[[str, int, float], None] | None) -> None:
    while True:
        try:
            item = progress.get_nowait()
        except queue_mod.Empty:
            return
        if on_step is not None:
            on_step(*item)

