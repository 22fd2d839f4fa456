"""int4 / int8 weights for the exported models (``--quantize int4|int8``), with onnxruntime's own
weight-only quantizer.

Each ``MatMul`` whose weight is a constant ``[K, N]`` becomes a ``com.microsoft.MatMulNBits``
node (``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``): the weight is
stored in blocks of ``block_size`` values along ``K`` with one scale per block, round to nearest,
symmetric, and the product is computed with the activations quantized to int8
(``accuracy_level`` 4). These are onnxruntime-genai's model-builder defaults for the CPU (``-p
int4 -e cpu``: block 32, symmetric, accuracy level 4), so the quantized hybrid and the
builder's int4 export of the original are like for like. MatMuls inside ``If`` branches (the
stateful decoder's linear layers) are quantized too; the attention products of activations and
``Gather`` tables (embeddings) keep fp32.

For ``-o hybrid.onnx`` and ``--quantize int4`` the extra artifacts are (:func:`quantized_paths`):

=================================  ==================================================
``hybrid.int4.onnx``               the hybrid (prefill)
``hybrid.int4.decoder.onnx``       the hybrid's stateful decoder
``hybrid.original.int4.onnx``      ``--export-original``: the original (prefill)
``hybrid.original.int4.decoder.onnx``  ``--export-original``: the original's decoder
=================================  ==================================================

They are not checked for parity (quantization changes the outputs by design); their quality is
the test-set metric of the quantized prefill models (:mod:`dtr_compile.search.quantized`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dtr_compile.errors import DtrError, InputError, first_line
from dtr_compile.fileio import data_path, read_onnx, save_onnx

#: ``--quantize`` choices and their bits per weight
SCHEMES = {"int4": 4, "int8": 8}
#: block sizes MatMulNBits takes (a power of two >= 16); 32 is the builder's CPU default
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 32
#: activations quantized to int8 inside MatMulNBits (the builder's CPU default)
ACCURACY_LEVEL = 4


def check_quantize_options(scheme: str | None, block_size: int) -> None:
    """Raises:
        InputError: an unknown scheme or block size."""
    if scheme is not None and scheme not in SCHEMES:
        raise InputError(f"--quantize {scheme!r}: choose one of {', '.join(SCHEMES)}")
    if block_size not in BLOCK_SIZES:
        raise InputError(f"--quantize-block-size {block_size}: choose one of "
                         f"{', '.join(map(str, BLOCK_SIZES))} (onnxruntime's MatMulNBits)")


def quantized_path(path: str | os.PathLike[str], scheme: str) -> Path:
    """``x.onnx`` → ``x.int4.onnx``, ``x.decoder.onnx`` → ``x.int4.decoder.onnx``."""
    p = Path(path)
    if p.name.endswith(".decoder.onnx"):
        return p.with_name(p.name.removesuffix(".decoder.onnx") + f".{scheme}.decoder.onnx")
    return p.with_name(p.name.removesuffix(".onnx") + f".{scheme}.onnx")


#: the artifacts (by the report's names) that get a quantized copy
QUANTIZED_ARTIFACTS = ("onnx", "original_onnx", "hybrid_decoder_onnx", "original_decoder_onnx")


def quantized_paths(artifacts: Mapping[str, str | os.PathLike[str]],
                    scheme: str) -> dict[str, Path]:
    """``{name: quantized path}`` for each of :data:`QUANTIZED_ARTIFACTS` in ``artifacts``
    (``{name: path}``, as the report lists them)."""
    return {k: quantized_path(artifacts[k], scheme) for k in QUANTIZED_ARTIFACTS
            if k in artifacts}


def quantize_plan(scheme: str | None, output: str | os.PathLike[str], *, original: bool,
                  decoders: bool) -> dict[str, Path]:
    """The quantized files a compile with ``-o output`` may write (for its write plan, by a
    name for messages): the hybrid's, and the original's with ``--export-original``; prefill
    and (for causal models) decoders. Empty without ``--quantize``."""
    if not scheme:
        return {}
    from dtr_compile.exporters.artifacts import export_paths
    from dtr_compile.exporters.stateful import decoder_paths

    exp, dec = export_paths(Path(output)), decoder_paths(Path(output))
    names = {"onnx": exp["onnx"], "hybrid_decoder_onnx": dec["hybrid"],
             "original_onnx": exp["original_onnx"], "original_decoder_onnx": dec["original"]}
    keep = [k for k in names if (original or "original" not in k)
            and (decoders or "decoder" not in k)]
    return {f"{k} {scheme}": v for k, v in quantized_paths({k: names[k] for k in keep},
                                                           scheme).items()}


@dataclass
class Quantized:
    """One quantized model: ``matmuls`` MatMuls became MatMulNBits of the ``matmuls_total``
    MatMuls with a constant weight; sizes are the initializers' bytes."""

    source: str
    path: str
    scheme: str
    block_size: int
    matmuls: int
    matmuls_total: int
    weight_bytes_before: int
    weight_bytes_after: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _graphs(graph: Any) -> Iterator[Any]:  # noqa: ANN401 - onnx.GraphProto
    """``graph`` and every subgraph (``If`` branches, ``Loop`` bodies) below it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.g.node:
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def _count(proto: Any) -> tuple[int, int]:  # noqa: ANN401
    """``(MatMuls whose second input is a constant, MatMulNBits)`` over all graphs."""
    consts = {t.name for g in _graphs(proto.graph) for t in g.initializer}
    consts |= {n.output[0] for g in _graphs(proto.graph) for n in g.node
               if n.op_type == "Constant"}
    mm = nbits = 0
    for g in _graphs(proto.graph):
        for n in g.node:
            mm += n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in consts
            nbits += n.op_type == "MatMulNBits"
    return mm, nbits


def _weight_bytes(proto: Any) -> int:  # noqa: ANN401
    from dtr_compile.fileio import onnx_weight_bytes

    total = 0
    for g in _graphs(proto.graph):
        shell = type(proto)()
        shell.graph.initializer.extend(g.initializer)
        total += onnx_weight_bytes(shell)
    return total


def _quantizer_class() -> Any:  # noqa: ANN401
    """onnxruntime's ``MatMulNBitsQuantizer``, imported without its side effects: the module
    calls ``logging.basicConfig(level=INFO)`` on import (which would turn on INFO logs of
    every library in this process) and logs a line per node; both are undone here."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer as mod

    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    mod.logger.setLevel(logging.WARNING)
    return mod.MatMulNBitsQuantizer


def quantize_onnx(src: str | os.PathLike[str], dst: str | os.PathLike[str], scheme: str, *,
                  block_size: int = DEFAULT_BLOCK_SIZE, external: bool | None = None) -> Quantized:
    """Write ``src`` with its constant-weight MatMuls quantized to ``scheme`` at ``dst`` (see
    the module docstring); ``external``: weights in ``dst``'s ``NAME.data`` (default: when
    large, as every artifact).

    Raises:
        InputError: ``src`` missing or not ONNX; an unknown scheme or block size.
        DtrError: the quantizer failed or quantized no MatMul.
    """
    MatMulNBitsQuantizer = _quantizer_class()  # noqa: N806
    check_quantize_options(scheme, block_size)
    t0 = time.perf_counter()
    proto = read_onnx(src, with_data=True)
    total, _ = _count(proto)
    before = _weight_bytes(proto)
    try:
        quantizer = MatMulNBitsQuantizer(proto, bits=SCHEMES[scheme], block_size=block_size,
                                         is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                         op_types_to_quantize=("MatMul",))
        quantizer.process()
    except Exception as exc:  # noqa: BLE001 - the quantizer raises many kinds
        raise DtrError(f"quantizing {src} to {scheme} failed: {first_line(exc)}") from exc
    out = quantizer.model.model
    _, done = _count(out)
    if total and not done:
        raise DtrError(f"quantizing {src} to {scheme}: none of its {total} MatMuls with a "
                       "constant weight was quantized")
    save_onnx(out, dst, external=external)
    return Quantized(str(src), str(dst), scheme, block_size, done, total, before,
                     _weight_bytes(out), round(time.perf_counter() - t0, 3))


def quantize_artifacts(artifacts: Mapping[str, str | os.PathLike[str]], scheme: str, *,
                       block_size: int = DEFAULT_BLOCK_SIZE,
                       write_to: Callable[[Path], Path] = lambda p: p,
                       locate: Callable[[str], str] = str,
                       external: bool | None = None,
                       log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Quantize each ``.onnx`` artifact by name (as the report lists them: ``onnx``,
    ``original_onnx``, ``hybrid_decoder_onnx``, ``original_decoder_onnx``) to its
    :func:`quantized_path`. ``locate`` maps an artifact's final path to where it is now (a
    staging folder), ``write_to`` a final path to where to write it.

    Returns:
        ``{"scheme", "block_size", "accuracy_level", "models": {name: Quantized.to_dict()},
        "artifacts": {"<name>_<scheme>": path}}``; a model the quantizer fails on has
        ``{"error": ..., "path": ...}`` in ``models`` and is not in ``artifacts``.
    """
    out: dict[str, Any] = {"scheme": scheme, "block_size": block_size,
                           "accuracy_level": ACCURACY_LEVEL, "models": {}, "artifacts": {}}
    for name, final in quantized_paths(artifacts, scheme).items():
        target = write_to(final)
        try:
            q = quantize_onnx(locate(str(artifacts[name])), target, scheme,
                              block_size=block_size, external=external)
        except DtrError as exc:
            out["models"][name] = {"error": str(exc), "path": str(final)}
            if log is not None:
                log(f"[yellow]not quantized[/yellow] {name}: {exc}")
            continue
        q.source, q.path = str(artifacts[name]), str(final)
        out["models"][name] = q.to_dict()
        out["artifacts"][f"{name}_{scheme}"] = str(final)
        if data_path(target).exists():
            out["artifacts"][f"{name}_{scheme}_data"] = str(data_path(final))
        if log is not None:
            log(f"wrote {final.name}: {q.matmuls}/{q.matmuls_total} MatMuls {scheme} (block "
                f"{block_size}), weights {q.weight_bytes_before / 2**20:.0f} → "
                f"{q.weight_bytes_after / 2**20:.0f} MiB in {q.seconds:.1f} s")
    return out
