"""The heal cache: healed students on disk, keyed by everything a heal depends on.

A heal's key is a SHA-256 over named parts (:func:`heal_key_parts`): the teacher graph (a Merkle
hash of its output node, which covers every weight, see :func:`~dtr_compile.distill.cache.
node_hashes`), the calibration rows, the batch size the teacher's targets were recorded with, the
committed sites, the weights of the students it starts from (distilled, or healed by an earlier
round), the settings and loss, the device and dtype, and the source of the code that defines the
training and the students. Entries are ``<dir>/heal/<key>.safetensors``: the healed students'
tensors as ``<site id>.<name>``, with the :class:`~dtr_compile.heal.train.HealRecord` in the
metadata and a digest of the tensors; read back bit for bit, verified as the distillation cache's
(as :class:`~dtr_compile.distill.cache.DistillCache` does).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from dtr_compile.distill.cache import cache_key, node_hashes, read_entry, write_entry
from dtr_compile.search.ledger import hash_tensors

HEAL_FORMAT = "dtr-compile healed weights v1"
_CODE_MODULES = ("heal/*.py", "linear/*.py", "passes/linearize.py", "passes/attention_block.py")


def code_digest() -> str:
    """SHA-256 of the sources that define healing and the student modules, and torch's version."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(torch.__version__.encode())
    for pattern in _CODE_MODULES:
        for path in sorted(root.glob(pattern)):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def graph_digest(gm: GraphModule) -> str:
    """The Merkle hash of ``gm``'s output node: its ops and every weight it reads."""
    hashes = node_hashes(gm)
    return hashes[gm.graph.output_node().name]


def students_digest(students: Mapping[str, nn.Module], sites: Sequence[str]) -> str:
    """SHA-256 of the ``sites``' students' weights (``<site>.<name>``)."""
    return hash_tensors({f"{sid}.{k}": v for sid in sites
                         for k, v in students[sid].state_dict().items()})


def heal_key_parts(*, teacher: str, calib: str, record_batch: int, linear: Sequence[str],
                   students: str, settings: Mapping[str, object], loss: str,
                   runtime: str) -> dict[str, str]:
    """The named parts of a heal's key (see the module docstring)."""
    return {"code": code_digest(), "teacher": teacher, "calib": calib,
            "record_batch": str(record_batch), "linear": json.dumps(sorted(linear)),
            "students": students, "settings": json.dumps(dict(settings), sort_keys=True),
            "loss": loss, "runtime": runtime}


def heal_key(parts: Mapping[str, str]) -> str:
    return cache_key(parts)


class HealCache:
    """Healed students by key under ``root/heal/``.

    An entry is used only if it is ours (format), its tensors match the digest stored beside
    them, they are all finite, its record says the heal succeeded and its tensors fit the
    students; anything else is a miss, reported through ``on_warning`` (the heal runs again and
    the entry is replaced). Writes are atomic.
    """

    def __init__(self, root: str | Path, on_warning: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.dir = self.root / "heal"
        self.on_warning = on_warning

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def _miss(self, p: Path, why: str) -> None:
        if self.on_warning is not None:
            self.on_warning(f"heal cache entry {p.name} ignored: {why}; healing again")

    def load(self, key: str, empty: Mapping[str, nn.Module],
             ) -> tuple[dict[str, nn.Module], dict[str, Any]] | None:
        """``empty`` (modules of the right shapes, e.g. :func:`~dtr_compile.heal.train.
        trainable_students`) with the stored weights, and the stored record; None on a miss."""
        p = self.path(key)
        entry = read_entry(p, HEAL_FORMAT, lambda q, why: self._miss(q, why), failed="a failed heal")
        if entry is None:
            return None
        state, result = entry
        out: dict[str, nn.Module] = {}
        try:
            for sid, module in empty.items():
                prefix = f"{sid}."
                own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                module.load_state_dict(own, strict=True)
                out[sid] = module.eval()
        except (RuntimeError, KeyError) as exc:
            self._miss(p, f"its tensors do not fit the students ({str(exc).splitlines()[0]})")
            return None
        return out, result

    def save(self, key: str, students: Mapping[str, nn.Module], result: Mapping[str, Any],
             parts: Mapping[str, str]) -> Path:
        """Store the students' weights (atomically) with the record and the key's parts."""
        state = {f"{sid}.{k}": v for sid, m in students.items() for k, v in m.state_dict().items()}
        return write_entry(self.path(key), HEAL_FORMAT, state, result, parts)
