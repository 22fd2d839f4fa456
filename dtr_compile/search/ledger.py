"""The search ledger: every evaluation of the schedule stage, one JSON line each, as it finishes.

The first line is a header with a fingerprint of everything a measured metric depends on (the
model file, the validation data, the distilled weights, the metric, the evaluation batch size and
the tool's version). Each further line is one evaluation::

    {"linear": ["site0", "site3"], "metric": 0.9713, "seconds": 12.4, "step": 2, ..., "sha256": ...}

(``sha256`` covers the rest of the line: a corrupt or edited line is skipped as unreadable, and
``--resume`` re-measures the committed set once before export).

Lines are flushed and fsynced one by one, so an interrupted search (Ctrl-C, a killed CI job) loses
at most the evaluation in flight. ``--resume`` reads the ledger back and replays its measurements
(:func:`dtr_compile.search.schedule.schedule`'s ``known``) when the fingerprint matches; a ledger written
for other inputs is never reused. Since a metric depends only on the set of linear sites, a
ledger can be resumed with another budget, strategy or limit.

Beside it, :func:`save_students` keeps the distilled weights that the measurements were made
with, so that a resumed run evaluates exactly the same modules.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from dtr_compile.fileio import atomic_path, write_text_atomic
from dtr_compile.search.schedule import Evaluation

LEDGER_FORMAT = "dtr-compile search ledger"
LEDGER_VERSION = 2  # 2: each evaluation line carries its checksum


def hash_path(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, or of a folder's files (relative names and contents, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def hash_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes), in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


#: how a resume note names the fingerprint's parts (the keys of :func:`fingerprint`'s ``parts``)
_INPUT_NAMES = {"students": "distilled weights", "eval_batch": "--eval-batch",
                "confidence": "--confidence / --seed", "runtime": "--device / --dtype",
                "dtr_compile": "dtr-compile version", "torch": "torch version"}


def fingerprint(parts: Mapping[str, str]) -> str:
    """One SHA-256 over named parts (each already a hash or a short string)."""
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True).encode()).hexdigest()


def line_checksum(record: Mapping[str, Any]) -> str:
    """SHA-256 of a ledger record without its ``sha256`` field (canonical JSON)."""
    body = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_ledger(path: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, list[dict[str, Any]], int]:
    """``(header, evaluations, unreadable lines)`` of a ledger file; header None if not a ledger.

    A torn last line (the process was killed while writing it), and a line whose ``sha256``
    does not match its content (corrupt or edited), count as unreadable.
    """
    header: dict[str, Any] | None = None
    entries: list[dict[str, Any]] = []
    bad = 0
    with Path(path).open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if i == 0:
                if isinstance(obj, dict) and obj.get("format") == LEDGER_FORMAT:
                    header = obj
                    continue
                return None, [], 0
            if (isinstance(obj, dict) and isinstance(obj.get("linear"), list) and "metric" in obj
                    and obj.get("sha256") == line_checksum(obj)):
                entries.append(obj)
            else:
                bad += 1
    return header, entries, bad


class Ledger:
    """An open ledger file, appended to one evaluation at a time. Use :meth:`open`."""

    def __init__(self, path: Path, fingerprint: str, fh: IO[str]) -> None:
        self.path, self.fingerprint, self._fh = path, fingerprint, fh
        #: the replayed evaluations' whole records (e.g. their ``interval``), by site set
        self.recorded: dict[frozenset[str], dict[str, Any]] = {}

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        fingerprint: str,
        *,
        resume: bool,
        inputs: Mapping[str, str] | None = None,
    ) -> tuple[Ledger, dict[frozenset[str], tuple[float, float]], str]:
        """Open ``path`` for appending; with ``resume``, first read back its evaluations.

        Returns:
            ``(ledger, known, note)``: ``known`` maps each recorded site set to ``(metric,
            seconds)`` (empty unless resuming from a ledger with the same fingerprint); ``note``
            says in one line what was reused or why nothing was.
        """
        p = Path(path)
        known: dict[frozenset[str], tuple[float, float]] = {}
        note = f"new ledger {p}"
        if resume and p.is_file():
            header, entries, bad = read_ledger(p)
            if header is None:
                note = f"{p} is not a dtr-compile ledger; starting a new one"
            elif header.get("version") != LEDGER_VERSION:
                note = (f"{p} is a version {header.get('version')} ledger (this dtr-compile "
                        f"writes version {LEDGER_VERSION}); starting a new one")
            elif header.get("fingerprint") != fingerprint:
                old = header.get("inputs") or {}
                changed = [k for k in sorted(inputs or {}) if old.get(k) != (inputs or {})[k]]
                what = ", ".join(_INPUT_NAMES.get(k, k) for k in changed) if old and changed \
                    else "model, data, distilled weights, metric, batch size, device or dtype"
                note = f"{p} was written for other inputs ({what} differ); starting a new ledger"
            else:
                for e in entries:
                    known[frozenset(e["linear"])] = (float(e["metric"]), float(e.get("seconds", 0.0)))
                note = (f"resuming from {p}: {len(known)} evaluations replayed"
                        + (f", {bad} unreadable lines skipped (torn, corrupt or edited: their "
                           "checksums do not match)" if bad else ""))
                torn = p.stat().st_size > 0 and not p.read_bytes().endswith(b"\n")
                fh = p.open("a", encoding="utf-8")
                if torn:  # killed mid-line: start the next record on a line of its own
                    fh.write("\n")
                ledger = cls(p, fingerprint, fh)
                ledger.recorded = {frozenset(e["linear"]): e for e in entries}
                return ledger, known, note
        elif resume:
            note = f"no ledger at {p} to resume; starting a new one"
        header = {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "fingerprint": fingerprint,
                  "inputs": dict(inputs or {})}
        write_text_atomic(p, json.dumps(header, sort_keys=True) + "\n")
        return cls(p, fingerprint, p.open("a", encoding="utf-8")), known, note

    def append(self, ev: Evaluation, **extra: Any) -> None:
        """Write one evaluation and force it to disk."""
        rec = {"linear": list(ev.linear), "metric": ev.metric, "seconds": round(ev.seconds, 4),
               "step": ev.step, "candidate": ev.candidate, "phase": ev.phase, **extra}
        rec["sha256"] = line_checksum(rec)
        self._fh.write(json.dumps(rec, sort_keys=True) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def students_digest(fingerprint: str, sites: Mapping[str, Mapping[str, Any]]) -> str:
    """SHA-256 of saved students: the fingerprint, and per site (sorted) its weights
    (:func:`hash_tensors`) and its distillation result (canonical JSON)."""
    h = hashlib.sha256(fingerprint.encode() + b"\0")
    for sid in sorted(sites):
        entry = sites[sid]
        h.update(f"{sid}\0{hash_tensors(entry['state_dict'])}\0".encode())
        h.update(json.dumps(entry["result"], sort_keys=True, default=str).encode() + b"\0")
    return h.hexdigest()


def save_students(path: str | os.PathLike[str], fingerprint: str,
                  students: Mapping[str, torch.nn.Module],
                  results: Mapping[str, Mapping[str, Any]]) -> None:
    """Keep the distilled modules' weights and results beside the ledger (atomically), with
    their digest (:func:`students_digest`).

    Distillation is not bitwise reproducible across processes on a busy CPU, and the ledger's
    measurements are only valid for the exact weights they were measured with; ``--resume``
    therefore reloads these instead of distilling again (which also saves its time).
    """
    sites = {sid: {"state_dict": m.state_dict(), "result": dict(results[sid])}
             for sid, m in students.items()}
    state = {"format": LEDGER_FORMAT + " students", "fingerprint": fingerprint, "sites": sites,
             "digest": students_digest(fingerprint, sites)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_students(
    path: str | os.PathLike[str],
    fingerprint: str,
    build: Callable[[str], torch.nn.Module],
) -> tuple[dict[str, torch.nn.Module], dict[str, dict[str, Any]]] | str:
    """The modules saved by :func:`save_students` if written for ``fingerprint`` and their
    weights and results match the digest saved with them, else a reason (distil again).

    Args:
        build: makes the empty module of a site id (its weights are then loaded, strictly).
    """
    p = Path(path)
    if not p.is_file():
        return f"no distilled weights at {p}"
    try:
        state = torch.load(p, weights_only=True, map_location="cpu")
        if state.get("fingerprint") != fingerprint:
            return f"{p} was distilled from other inputs or settings"
        if not state.get("digest") or state["digest"] != students_digest(fingerprint,
                                                                         state["sites"]):
            return (f"{p} does not match its digest (edited, corrupt, or written by an older "
                    "dtr-compile): its weights are not the ones the ledger measured")
        modules, results = {}, {}
        for sid, entry in state["sites"].items():
            m = build(sid)
            m.load_state_dict(entry["state_dict"], strict=True)
            modules[sid], results[sid] = m.eval(), dict(entry["result"])
    except Exception as exc:  # noqa: BLE001 - any unreadable file means: distil again
        return f"{p} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return modules, results
