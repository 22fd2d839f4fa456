"""One compile over several processes with ``torch.distributed`` (``torchrun``).

``torchrun --nproc-per-node N [--nnodes M …] -m dtr_compile MODEL …`` starts ``N·M`` ranks that
each load and capture the model and then share the two expensive stages:

* distillation: the sites are dealt round-robin in graph order (rank ``r`` takes sites
  ``r, r + W, r + 2W …``, :func:`shard`); each rank runs the teacher for its own sites only
  (activations are recomputed per rank, no rank holds the whole store), trains them, and the
  weights are gathered to every rank as safetensors bytes;
* search: every evaluation's validation rows are split into contiguous runs of whole
  ``--eval-batch`` batches, one per rank (:func:`batch_rows`); each rank evaluates its run and
  the metric-reduced rows are gathered in rank order. The batches are the very batches of a
  one-process run, so the gathered rows, the metric and every search decision are bitwise equal
  to it, for any metric (user metrics included). What travels is what a one-process run keeps
  per row anyway: ``[n, C]`` logits for accuracy, F1 and agreement, ``(NLL, tokens)`` per row for
  perplexity (:meth:`~dtr_compile.metrics.Metric.reduce`). Metrics with per-row statistics
  (issue 16's ``Metric.stats``) could send those instead; the sums are then formed from the
  same rows in the same order. The baseline is computed the same way.

Rank 0 alone writes the cache, the ledger, the artifacts and the report; the others log nothing
and leave with exit code 0 after the search while rank 0 exports: the run's exit code (3: no
site fits, 4: parity) is rank 0's, since torchrun stops every rank as soon as one exits non-zero.
Every exchange is guarded (:meth:`Group.exchange`): a rank that raises sends its error to the
others and every rank stops with it (:class:`RankError`); a rank that dies makes the others' next
exchange fail, at the latest after ``DTR_DIST_TIMEOUT`` seconds (default 3600, the longest a rank
may wait for the others, e.g. while they distil). The backend is ``nccl`` on CUDA, ``gloo`` on the
CPU.
"""

from __future__ import annotations

import datetime
import math
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from dtr_compile.errors import DtrError, InputError

T = TypeVar("T")
TIMEOUT_ENV = "DTR_DIST_TIMEOUT"
MAX_TIMEOUT_S = 10**9  # ~32 years; datetime.timedelta overflows far above


class RankError(DtrError):
    """A rank of a distributed run failed (or was lost); every rank stops with this error, and
    with the failed rank's exit code (2 for its bad input, 130 when it was interrupted, else 1)."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Group:
    """The ranks of this run; ``world == 1`` is a plain one-process run (every call local)."""

    rank: int = 0
    world: int = 1
    local_world: int = 1
    backend: str = ""
    owns: bool = False  # this object initialised the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def exchange(self, fn: Callable[[], T]) -> list[T]:
        """Run ``fn`` here and gather every rank's result, in rank order.

        Raises:
            RankError: ``fn`` raised on some rank (the lowest such rank's error is named), or a
                rank could not be reached (died, or did not answer within the timeout).
        """
        local_exc: BaseException | None = None
        value: Any = None
        try:
            value = fn()
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - sent to the other ranks
            if not self.distributed:
                raise
            local_exc = exc
        if not self.distributed:
            return [value]
        if local_exc is None:
            got = self.all_gather((True, value))
        else:
            code = _exit_code(local_exc)
            why = ("terminated (SIGTERM)" if code == 143 else "interrupted") \
                if isinstance(local_exc, KeyboardInterrupt) else _describe(local_exc)
            got = self.all_gather((False, (why, code)))
        failed = [(r, v) for r, (o, v) in enumerate(got) if not o]
        if failed:
            r, (why, code) = failed[0]
            if local_exc is not None:
                raise local_exc  # this rank's own error, with its own exit code
            raise RankError(f"rank {r} of {self.world} failed: {why}", code)
        return [v for _, v in got]

    def guard(self, fn: Callable[[], T]) -> T:
        """``fn()`` here, and stop every rank if it raised on any (:meth:`exchange`)."""
        return self.exchange(fn)[self.rank]

    def all_gather(self, obj: Any) -> list[Any]:
        """``all_gather_object``, with a lost rank turned into :class:`RankError`."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(out, obj)
        except RuntimeError as exc:
            why = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__).split(
                ". This is typically")[0][:240]
            raise RankError(f"rank {self.rank}: lost contact with the other ranks (one died or "
                            f"did not answer within {timeout_s():g} s; see its log): {why}; "
                            "rerun the same command with --resume to continue") from exc
        return out

    def broadcast(self, make: Callable[[], T]) -> T:
        """``make()`` on rank 0, given to every rank (errors on rank 0 reach every rank)."""
        if not self.distributed:
            return make()
        got = self.exchange(lambda: make() if self.is_main else None)
        return got[0]  # type: ignore[return-value]

    def close(self) -> None:
        if self.owns:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns = False


def _exit_code(exc: BaseException) -> int:
    """The exit code ``exc`` ends a run with (:mod:`dtr_compile.errors`)."""
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or the CLI's SIGTERM (exit_code 143)
        return int(getattr(exc, "exit_code", 130))
    return int(getattr(exc, "exit_code", 1)) if isinstance(exc, DtrError) else 1


def _describe(exc: BaseException) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, DtrError):
        return msg
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    at = f" (at {where[0].filename.rsplit('/', 1)[-1]}:{where[0].lineno})" if where else ""
    return f"{type(exc).__name__}: {msg}{at}"


def timeout_s() -> float:
    """Seconds a collective waits for the other ranks (``DTR_DIST_TIMEOUT``, default 3600).

    Raises:
        InputError: the variable is set to something other than a positive number of seconds.
    """
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return 3600.0
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0 or value > MAX_TIMEOUT_S:
        raise InputError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds in (0, 1e9]: set "
                         "it to how long a rank may wait for the others (e.g. 3600), or unset it")
    return value


def from_env(device: torch.device) -> Group:
    """The group torchrun describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``…), its process group initialised (``nccl`` for CUDA, else ``gloo``); a
    one-process :class:`Group` when ``WORLD_SIZE`` is unset or 1.

    On CUDA each rank takes device ``LOCAL_RANK`` (``--device cuda`` means "this node's GPUs").
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Group()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend,
                                timeout=datetime.timedelta(seconds=timeout_s()))
    return Group(rank=rank, world=world, local_world=local_world, backend=backend, owns=owns)


def rank_device(device: torch.device, group: Group) -> torch.device:
    """``cuda`` on a multi-rank run → ``cuda:LOCAL_RANK``; anything else unchanged."""
    if device.type == "cuda" and group.distributed and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard(items: Sequence[T], group: Group) -> list[T]:
    """Rank ``r``'s share of ``items``: ``items[r::world]`` (round-robin in their order)."""
    return list(items[group.rank::group.world])


def batch_rows(n_rows: int, batch_size: int, group: Group) -> tuple[int, int]:
    """``(start, stop)``: rank ``r``'s contiguous run of whole ``batch_size`` batches of
    ``n_rows`` rows (the ``B`` batches dealt as evenly as whole batches allow, in order; a rank
    may get none when ``B < world``)."""
    batches = -(-n_rows // batch_size)
    lo = batches * group.rank // group.world
    hi = batches * (group.rank + 1) // group.world
    return min(lo * batch_size, n_rows), min(hi * batch_size, n_rows)


def gather_rows(compute: Callable[[], torch.Tensor | None], group: Group) -> torch.Tensor:
    """Every rank's ``compute()`` rows ``[n_r, ...]`` concatenated in rank order (a rank without
    rows returns None); an error on any rank stops every rank (:meth:`Group.exchange`)."""
    parts = group.exchange(compute)
    return torch.cat([p for p in parts if p is not None])
