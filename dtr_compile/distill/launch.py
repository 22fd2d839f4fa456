"""Stage 5 over the ranks of a distributed run (see :mod:`dtr_compile.parallel`).

:func:`distill_sharded` deals the plan's sites round-robin over the ranks, runs each rank's share
through the ordinary one-process path (its own teacher pass over the calibration set, recording
only its sites' tensors, and its own trainings) and gathers every student to every rank as
safetensors bytes, so that all ranks search with the same weights. Only rank 0 writes the
distillation cache: the other ranks read it (:class:`ReadOnlyCache`) and their new weights are
stored by rank 0 after the gather.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn
from torch.fx import GraphModule

from dtr_compile.distill.cache import DistillCache
from dtr_compile.distill.plan import DistillPlan, DistillResult
from dtr_compile.parallel import Group, shard

Students = tuple[dict[str, nn.Module], dict[str, DistillResult]]
#: ``{site id: (safetensors bytes of the student's state, DistillResult as a dict)}``
Packed = dict[str, tuple[bytes, dict[str, Any]]]


class ReadOnlyCache(DistillCache):
    """A :class:`DistillCache` that reads but never writes (ranks other than 0)."""

    def save(self, key: str, state: Mapping[str, torch.Tensor], result: Mapping[str, Any],
             parts: Mapping[str, str]) -> Path:
        return self.path(key)


def pack(students: Mapping[str, nn.Module], results: Mapping[str, DistillResult]) -> Packed:
    """Students as plain bytes (safe to pickle between ranks: no tensors, no code)."""
    return {sid: (safetensors_save({k: v.detach().cpu().contiguous()
                                    for k, v in m.state_dict().items()}),
                  dataclasses.asdict(results[sid]))
            for sid, m in students.items()}


def unpack(packed: Packed, plan: DistillPlan, gm: GraphModule) -> Students:
    """:func:`pack`'s inverse, in the plan's site order; modules in eval mode."""
    students: dict[str, nn.Module] = {}
    results: dict[str, DistillResult] = {}
    for site in plan.sites:
        if site.id not in packed:
            continue
        state, res = packed[site.id]
        module = plan.empty_student(gm, site.id)
        module.load_state_dict(safetensors_load(state), strict=True)
        students[site.id], results[site.id] = module.eval(), DistillResult(**res)
    return students, results


def distill_sharded(
    group: Group,
    plan: DistillPlan,
    gm: GraphModule,
    run: Callable[[DistillPlan], Students],
    cache: DistillCache | None = None,
    on_other: Callable[[str, int, DistillResult], None] | None = None,
) -> Students:
    """Distil ``plan`` with each rank running ``run`` on its share of the sites.

    Args:
        run: the one-process distillation of a (sub-)plan (records the teacher for the plan's
            sites only, trains them; caches new weights on rank 0 only).
        cache: rank 0's cache: it stores the other ranks' new weights after the gather.
        on_other: called on rank 0 with ``(site, rank, result)`` for each site another rank
            distilled (rank 0's log names every site).

    Returns:
        every site's student and result, the same on every rank.

    Raises:
        RankError: a rank failed (its error is named).
    """
    if not group.distributed:
        return run(plan)
    mine = dataclasses.replace(plan, sites=tuple(shard(plan.sites, group)))

    def local() -> Packed:
        return pack(*run(mine)) if mine.sites else {}

    merged: Packed = {}
    rank_of: dict[str, int] = {}
    for rank, part in enumerate(group.exchange(local)):
        merged.update(part)
        rank_of.update(dict.fromkeys(part, rank))
    students, results = unpack(merged, plan, gm)
    if on_other is not None and group.is_main:
        for site in plan.sites:
            if rank_of.get(site.id, 0) != 0:
                on_other(site.id, rank_of[site.id], results[site.id])
    if cache is not None and group.is_main:
        own = {s.id for s in mine.sites}
        for sid, res in results.items():
            if sid not in own and res.cacheable and not res.cached:
                cache.save(plan.keys[sid], students[sid].state_dict(), dataclasses.asdict(res),
                           plan.key_parts[sid])
    return students, results


def share(group: Group, make: Callable[[], Students | None], plan: DistillPlan,
          gm: GraphModule) -> Students | None:
    """``make()`` on rank 0 (e.g. the students of ``--resume``), given to every rank."""
    if not group.distributed:
        return make()

    def packed() -> Packed | None:
        got = make()
        return None if got is None else pack(*got)

    got = group.broadcast(packed)
    return None if got is None else unpack(got, plan, gm)
