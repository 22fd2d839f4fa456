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
4. With a :class:`~dtr_compile.distill.cache.DistillCache`, each site's weights are looked up by
   key first and stored after training; a hit gives the stored weights bit for bit.

Everything is deterministic for a given seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from safetensors.torch import load as safetensors_load
from torch import nn
from torch.fx import GraphModule

from dtr_compile.data import Dataset
from dtr_compile.device import Placement
from dtr_compile.distill.activations import ActivationStore, record_teacher
from dtr_compile.distill.cache import DistillCache
from dtr_compile.distill.execute import run_trainings
from dtr_compile.distill.plan import DistillPlan, DistillResult


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
    placement: Placement | None = None,
    teacher: GraphModule | None = None,
    time_limit_s: float | None = None,
) -> tuple[dict[str, nn.Module], dict[str, DistillResult]]:
    """Distil every site of ``plan``: cached weights first, then one teacher pass and the
    trainings of the rest in ``workers`` processes.

    ``placement``: the teacher runs as ``teacher`` (``placement.graph(gm)``, built here when not
    given) on its device and dtype, and the students train on its device in fp32 (see
    :mod:`dtr_compile.device`); students come back on the CPU.

    Returns ``({site id: student}, {site id: result})``; students are in eval mode. A result
    with ``ok=False`` (non-finite loss or error) must stay softmax. Only successful trainings
    are cached, and only those that ran to their budget.

    ``time_limit_s``: the distillation's share of ``--time-limit``, from this call: the
    teacher's pass spends it too, and each site trains for its part of what is left (see
    :func:`~dtr_compile.distill.execute.run_trainings`); a site cut short keeps its best weights
    so far, says so in its result (``time_limited``) and is not cached.
    """
    deadline = None if time_limit_s is None else time.perf_counter() + time_limit_s
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
        if placement is not None and not placement.is_default:
            record_teacher(teacher if teacher is not None else placement.graph(gm), sub, calib,
                           input_names, record_batch, store, on_record, placement)
        else:
            record_teacher(gm, sub, calib, input_names, record_batch, store, on_record)
        device = placement.device if placement is not None else None
        with contextlib.closing(run_trainings(gm, plan, store, todo, workers, on_step,
                                              device, deadline)) as done:
            for out in done:
                _collect(plan, gm, out, students, results, cache, on_done)
    finally:
        store.close()
    return ({s.id: students[s.id] for s in plan.sites},
            {s.id: results[s.id] for s in plan.sites})


def _collect(plan: DistillPlan, gm: GraphModule,
             out: tuple[str, bytes, DistillResult],
             students: dict[str, nn.Module], results: dict[str, DistillResult],
             cache: DistillCache | None,
             on_done: Callable[[str, DistillResult], None] | None) -> None:
    sid, state, res = out
    module = plan.empty_student(gm, sid)
    module.load_state_dict(safetensors_load(state), strict=True)
    students[sid], results[sid] = module.eval(), res
    if cache is not None and res.cacheable:
        cache.save(plan.keys[sid], module.state_dict(), dataclasses.asdict(res),
                   plan.key_parts[sid])
    if on_done is not None:
        on_done(sid, res)

