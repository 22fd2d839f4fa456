"""The teacher's activations that stage 5 trains on.

:func:`record_teacher` runs the teacher once per calibration batch and streams the tensors each
site needs into an :class:`ActivationStore`, which holds at most ``max_calib_tokens`` tokens in
memory and spills the rest to memory-mapped files. Masks are kept as key padding vectors
``[B, S]``, computed once. :func:`record_sites` keeps every site's tensors in memory instead (small
calibration sets: tests, benchmarks). A training reads either through a :class:`TeacherData` view.
"""

from __future__ import annotations

import bisect
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.fx import GraphModule

from dtr_compile.data import Dataset, record_nodes
from dtr_compile.device import Placement, to_device
from dtr_compile.distill.plan import DistillPlan
from dtr_compile.linear.kernel import key_valid_from_mask
from dtr_compile.passes.attention_block import AttentionBlock
from dtr_compile.passes.find_attention import AttentionSite


@dataclass
class SiteRecord:
    """Teacher tensors of one site over the calibration set (rows = calibration sequences)."""

    q: torch.Tensor  # [N, H, T, Dk]
    k: torch.Tensor  # [N, Hkv, S, Dk]
    v: torch.Tensor  # [N, Hkv, S, Dv]
    mask: torch.Tensor | None  # broadcastable to [N, H, T, S]
    out: torch.Tensor  # [N, H, T, Dv]



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


def key_valid_name(mask: str, kind: str) -> str:
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
    placement: Placement | None = None,
) -> None:
    """Run the teacher over ``calib`` once, batch by batch, into ``store``.

    With a ``placement`` (see :mod:`dtr_compile.device`), ``gm`` is its graph: batches run on its
    device under its autocast, and the tensors are stored on the CPU in the dtype they came in
    (``bf16`` activations take half the memory of fp32; trainings up-cast them).
    """
    cpu = torch.device("cpu")
    raw: set[str] = set()
    masks: dict[str, str] = {}
    for site in plan.sites:
        r, m = _needed_nodes(site, plan.blocks.get(site.id))
        raw |= r
        masks.update({name: site.mask_kind for name in m})
    for batch in calib.batches(batch_size):
        args = [batch[n] for n in input_names]
        if placement is None or placement.is_default:
            rec = record_nodes(gm, args, raw | set(masks))
        else:
            with placement.autocast():
                rec = record_nodes(gm, to_device(args, placement.device), raw | set(masks))
            rec = to_device(rec, cpu)
        rows = int(batch[input_names[0]].shape[0])
        values = {n: rec[n] for n in raw}
        # tokens = rows × the longest sequence among the recorded activations (q: [B, H, T, Dk],
        # a block's output: [B, T, C]), whatever the model's inputs are (ids, pixels)
        tokens = rows * max((int(t.shape[-2]) for t in values.values() if t.dim() >= 3),
                            default=1)
        for name, kind in masks.items():
            values[key_valid_name(name, kind)] = key_valid_from_mask(rec[name], kind)  # [B|1, S]
        store.append(values, rows, tokens)
        if on_batch is not None:
            on_batch(rows)


# --- the views a training reads --------------------------------------------------------------


class TeacherData:
    """Named teacher tensors by row: ``get(name, idx)``; ``n`` rows; on ``device``, floating
    tensors in fp32 (a store in bf16/fp16 is up-cast as it is read)."""

    n: int
    device: torch.device = torch.device("cpu")

    def get(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class StoreData(TeacherData):
    def __init__(self, store: ActivationStore, names: Mapping[str, str | None],
                 device: torch.device | None = None) -> None:
        self.store, self.names, self.n = store, names, store.rows
        if device is not None:
            self.device = device

    def get(self, name: str, idx: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        node = self.names.get(name)
        if node is None:
            return None
        t = self.store.get(node, idx)
        if t.is_floating_point() and t.dtype != torch.float32:
            t = t.float()
        return t.to(self.device)


class RecordData(TeacherData):
    def __init__(self, rec: SiteRecord, mask_kind: str) -> None:
        self.n = rec.q.shape[0]
        kv = key_valid_from_mask(rec.mask, mask_kind) if rec.mask is not None else None
        self.tensors = {"q": rec.q, "k": rec.k, "v": rec.v, "out": rec.out, "key_valid": kv}

    def get(self, name: str, idx: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        t = self.tensors[name]
        if t is None:
            return None
        return t if t.shape[0] != self.n else t[idx]


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

