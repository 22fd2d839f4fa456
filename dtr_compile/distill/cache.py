"""The distillation cache: distilled weights on disk, keyed by everything they depend on.

A site's key is a SHA-256 over named parts (:func:`site_key_parts`):

* ``teacher``: a Merkle hash of the graph nodes the site is trained on (its ``q, k, v, mask`` and
  output, or its block's inputs and output): each node's hash covers its op, its arguments and,
  through them, every node and weight before it (:func:`node_hashes`). Changing the weights of
  layer 5 therefore changes the keys of the sites that read layer 5's output, and no other;
* ``site`` / ``block``: the site's shape fields and the block's owner module;
* ``settings``: the target, feature map and every training hyper-parameter;
* ``calib``: the calibration rows (their bytes) and the batch size they were recorded with;
* ``code``: the source of the modules that define the training and the student modules, and the
  torch version, so that a changed algorithm never reuses stale weights.

Weights are stored as ``<dir>/distill/<key>.safetensors`` (the result of the training in the
file's metadata, with a digest of the tensors) and loaded back bit for bit, after the digest is
verified and the tensors are checked finite. Writes are atomic; an unreadable, foreign, altered
or non-finite entry is a miss (with a warning), never a hit.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.fx import GraphModule, Node

from dtr_compile.fileio import atomic_path

CACHE_FORMAT = "dtr-compile distilled weights v2"  # v2: tensor digest in the metadata
_CODE_MODULES = ("distill/*.py", "linear/*.py", "passes/attention_block.py")


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}\0".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _canon(x: object, hashes: Mapping[str, str]) -> str:
    """A canonical string of a node argument, nodes replaced by their hashes."""
    if isinstance(x, Node):
        return hashes[x.name]
    if isinstance(x, (list, tuple)):
        return "(" + ",".join(_canon(a, hashes) for a in x) + ")"
    if isinstance(x, dict):
        return "{" + ",".join(f"{k}:{_canon(v, hashes)}" for k, v in sorted(x.items())) + "}"
    if isinstance(x, float):
        return repr(x) if math.isfinite(x) else str(x)
    if isinstance(x, torch.Tensor):
        return tensor_digest(x)
    return f"{type(x).__name__}:{x}"


def node_hashes(gm: GraphModule) -> dict[str, str]:
    """Merkle hash of every node of ``gm``: op, target and arguments, weights by their bytes.

    Placeholders hash as their position and name (the data they receive is keyed separately).
    """
    hashes: dict[str, str] = {}
    digests: dict[str, str] = {}
    index = 0
    for n in gm.graph.nodes:
        h = hashlib.sha256(n.op.encode() + b"\0")
        if n.op == "placeholder":
            h.update(f"{index}:{n.name}".encode())
            index += 1
        elif n.op == "get_attr":
            target = str(n.target)
            if target not in digests:
                value = operator.attrgetter(target)(gm)
                digests[target] = (tensor_digest(value) if isinstance(value, torch.Tensor)
                                   else f"{type(value).__name__}")
            h.update(digests[target].encode())
        elif n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            h.update(type(mod).__qualname__.encode())
            for k, v in sorted(mod.state_dict().items()):
                h.update(f"{k}:{tensor_digest(v)}".encode())
        else:
            h.update(str(n.target).encode())
        h.update(_canon(n.args, hashes).encode() + b"\0" + _canon(n.kwargs, hashes).encode())
        hashes[n.name] = h.hexdigest()
    return hashes


def code_digest() -> str:
    """SHA-256 of the sources that define distillation and the student modules."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(torch.__version__.encode())
    for pattern in _CODE_MODULES:
        for path in sorted(root.glob(pattern)):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def cache_key(parts: Mapping[str, str]) -> str:
    """One SHA-256 over named parts."""
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True).encode()).hexdigest()


def state_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors (sorted names, each with :func:`tensor_digest`)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(f"{name}\0{tensor_digest(tensors[name])}\0".encode())
    return h.hexdigest()


class DistillCache:
    """Distilled weights by key under ``root/distill/``.

    An entry is used only if it is ours (format), its tensors match the digest stored beside
    them, they are all finite, and its result says the training succeeded; anything else is a
    miss, reported through ``on_warning`` (the site is distilled again and the entry replaced).
    """

    def __init__(self, root: str | Path,
                 on_warning: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.dir = self.root / "distill"
        self.on_warning = on_warning

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def _miss(self, p: Path, why: str) -> None:
        if self.on_warning is not None:
            self.on_warning(f"distillation cache entry {p.name} ignored: {why}; distilling again")

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """``(state dict, result dict)`` stored under ``key``, or None: absent, unreadable,
        foreign, altered (digest mismatch), non-finite or a failed training."""
        return read_entry(self.path(key), CACHE_FORMAT, lambda p, why: self._miss(p, why),
                          failed="a failed training")

    def save(self, key: str, state: Mapping[str, torch.Tensor], result: Mapping[str, Any],
             parts: Mapping[str, str]) -> Path:
        """Store ``state`` (atomically) with the training result and the key's parts."""
        return write_entry(self.path(key), CACHE_FORMAT, state, result, parts)


def read_entry(p: Path, fmt: str, miss: Callable[[Path, str], None], *, failed: str,
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """``(state dict, result dict)`` of the cache file ``p`` written by :func:`write_entry` in
    format ``fmt``, or None: absent, or (each told to ``miss(p, why)``) unreadable, foreign,
    altered (digest mismatch), non-finite, or recording ``failed`` (``result["ok"]`` false)."""
    if not p.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != fmt:
            miss(p, f"not a {fmt!r} file")
            return None
        state, result = load_file(str(p)), json.loads(meta["result"])
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file is a miss
        miss(p, f"unreadable ({type(exc).__name__})")
        return None
    if meta.get("digest") != state_digest(state):
        miss(p, "its tensors do not match their stored digest (altered or corrupt)")
        return None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        miss(p, f"tensor {bad[0]!r} holds NaN or inf")
        return None
    if not isinstance(result, dict) or not result.get("ok", False):
        miss(p, f"it records {failed}")
        return None
    return state, result


def write_entry(p: Path, fmt: str, state: Mapping[str, torch.Tensor], result: Mapping[str, Any],
                parts: Mapping[str, str]) -> Path:
    """Store ``state`` at ``p`` atomically (safetensors, CPU copies) with ``result``, the key's
    ``parts``, the format ``fmt`` and a digest of the tensors (checked by :func:`read_entry`)."""
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    meta = {"format": fmt, "result": json.dumps(dict(result)),
            "parts": json.dumps(dict(parts), sort_keys=True), "digest": state_digest(tensors)}
    with atomic_path(p) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return p
