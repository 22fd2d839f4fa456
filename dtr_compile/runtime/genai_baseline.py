"""The baseline a decoder user already has: onnxruntime-genai's model builder run on the original.

A hybrid only matters if it beats the best way to run the original model on the same runtime;
for a decoder on onnxruntime that is onnxruntime-genai's model builder (GroupQueryAttention over
a KV buffer shared between steps, fused norms, ``MatMulNBits`` in int4). This module

* builds the builder's exports of a Hugging Face folder (:func:`build_genai`, i.e. ``python -m
  onnxruntime_genai.models.builder -m NAME -i FOLDER -o OUT -p fp32|int4 -e cpu``, offline,
  which needs ``onnx_ir``), reusing an earlier build of the same folder, precision and genai
  version (:func:`builder_baselines` for several precisions);
* times a genai folder the way :func:`dtr_compile.runtime.bench_decode.time_decode` times our
  decoders (:func:`time_genai`, run alone in its own process by
  :func:`~dtr_compile.runtime.bench_decode.bench_decode`): genai's own ``Generator``, a real
  prefill of C random tokens through ``append_tokens``, then greedy ``generate_next_token``
  steps. The first ``generate_next_token`` after ``append_tokens`` only picks the token from the
  prefill's logits (no model run), so it is not timed.

Requires the ``genai`` extra (``pip install dtr-compile[genai]``: onnxruntime-genai, onnx-ir).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dtr_compile.errors import DependencyError, DtrError, InputError, first_line

#: the builder's precisions we time (its CPU defaults: int4 = MatMulNBits, block 32,
#: symmetric, accuracy level 4)
PRECISIONS = ("fp32", "int4", "int8")
#: what :func:`build_genai` writes beside the model: the inputs it was built from
STAMP = "dtr-build.json"
#: tokens per ``append_tokens`` call of a prefill that is not timed (above ``max_prefill``):
#: genai's CPU attention holds a ``[H, chunk, C]`` score buffer
UNTIMED_CHUNK = 2048


def require_genai() -> Any:  # noqa: ANN401 - the module
    """``onnxruntime_genai``, imported.

    Raises:
        DependencyError: it is not installed.
    """
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise DependencyError("onnxruntime-genai is not installed: pip install "
                              "'dtr-compile[genai]' (onnxruntime-genai, onnx-ir)") from exc
    return onnxruntime_genai


def genai_state_bytes(folder: str | os.PathLike[str], batch: int,
                      context: int) -> dict[str, int]:
    """``{"kv", "recurrent"}`` bytes of ``batch`` streams' state after ``context`` tokens of the
    genai model in ``folder``, from its decoder's state inputs: each ``past_key_values.*`` KV
    cache ``[B, Hkv, P, D]`` (a dim the file leaves symbolic, such as the builder's
    ``kv_cache_dim``, from ``genai_config.json``'s ``num_key_value_heads`` / ``head_size``),
    and each other ``past.*`` state at its fixed shape.

    Raises:
        InputError: no readable ``genai_config.json`` or decoder file.
    """
    import onnx
    from onnx import helper

    cfg = _config(folder)
    dec = cfg["model"]["decoder"]
    try:
        proto = onnx.load(str(Path(folder) / dec["filename"]), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - missing file, key or not protobuf
        raise InputError(f"{folder}: its decoder cannot be read ({first_line(exc)})") from exc
    out = {"kv": 0, "recurrent": 0}
    for i in proto.graph.input:
        tt = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        item = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
        if i.name.startswith("past_key_values.") and len(dims) == 4:
            hkv = dims[1] or dec["num_key_value_heads"]
            out["kv"] += batch * hkv * context * (dims[3] or dec["head_size"]) * item
        elif i.name.startswith("past.") and all(d for d in dims[1:]):
            out["recurrent"] += batch * math.prod(int(d or 0) for d in dims[1:]) * item
    return {k: int(v) for k, v in out.items()}


def _config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / "genai_config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable genai_config.json ({first_line(exc)})") from exc


def time_genai(folder: str, context: int, tokens: int, prefill_repeats: int, max_prefill: int,
               warmup: int, seed: int) -> dict[str, Any]:
    """One round of a genai model alone (in its own process): ``prefill_repeats`` + 1 prefills
    of ``context`` random tokens through ``append_tokens`` (the first untimed; above
    ``max_prefill`` a single untimed prefill in chunks of :data:`UNTIMED_CHUNK`), the untimed
    first ``generate_next_token`` (it only picks a token from the prefill's logits), ``warmup``
    untimed decode steps, then ``tokens`` timed ``generate_next_token`` steps (one model run and
    a greedy pick each). EOS is suppressed (``min_length``) so that every step runs.

    Returns:
        as :func:`dtr_compile.runtime.bench_decode.time_decode` (``synthesised`` is always
        False: genai decodes from its own real prefill), with ``"error"`` when the context
        exceeds the model's ``context_length`` or a step fails.
    """
    og = require_genai()
    out: dict[str, Any] = {"decode_runs_ms": [], "prefill_runs_ms": [], "synthesised": False}
    cfg = _config(folder)
    total = context + 1 + warmup + tokens
    limit = int(cfg["model"].get("context_length") or total)
    if total > limit:
        out["error"] = (f"C={context}: {total} tokens exceed the model's context_length {limit} "
                        "(build it from a config with a larger max_position_embeddings)")
        return out
    model = og.Model(folder)
    vocab = int(cfg["model"]["vocab_size"])
    ids = np.random.default_rng(seed).integers(0, vocab, (1, context)).astype(np.int32)

    def generator() -> Any:  # noqa: ANN401
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        return og.Generator(model, params)

    try:
        if context <= max_prefill:
            for r in range(prefill_repeats + 1):
                gen = generator()
                t0 = time.perf_counter()
                gen.append_tokens(ids)
                if r:  # the first prefill warms the session up
                    out["prefill_runs_ms"].append((time.perf_counter() - t0) * 1000.0)
        else:
            gen = generator()
            for start in range(0, context, UNTIMED_CHUNK):
                gen.append_tokens(ids[:, start : start + UNTIMED_CHUNK])
        gen.generate_next_token()  # picks from the prefill's logits: no model run
        for _ in range(warmup):
            gen.generate_next_token()
        for _ in range(tokens):
            t0 = time.perf_counter()
            gen.generate_next_token()
            out["decode_runs_ms"].append((time.perf_counter() - t0) * 1000.0)
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"genai fails at C={context}: {first_line(exc)[:200]}"
    return out


@dataclass
class GenaiBuild:
    """One builder export: ``folder`` (``genai_config.json``, ``model.onnx``…), how long the
    builder ran (``seconds``; of the build that wrote it, when ``reused``)."""

    folder: str
    precision: str
    seconds: float
    reused: bool
    genai_version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fingerprint(hf_folder: Path, precision: str, extra: Sequence[str], version: str) -> str:
    """What a build depends on: the folder's config and weight files (names, sizes, mtimes), the
    precision, extra options and the genai version."""
    h = hashlib.sha256()
    for p in sorted(hf_folder.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(f"{precision}|{'|'.join(extra)}|{version}".encode())
    return h.hexdigest()


def build_genai(hf_folder: str | os.PathLike[str], out: str | os.PathLike[str], precision: str,
                *, extra_options: Sequence[str] = (), timeout_s: float = 3600,
                log: Callable[[str], None] | None = None) -> GenaiBuild:
    """The model builder's CPU export of the Hugging Face folder ``hf_folder`` at ``precision``
    into ``out``, reused when ``out`` holds a build of the same inputs (:data:`STAMP`).

    Runs ``python -m onnxruntime_genai.models.builder -m NAME -i hf_folder -o TMP -p precision -e
    cpu`` with the Hugging Face hub offline (nothing is downloaded), then moves ``TMP`` to
    ``out`` (an older ``out`` is replaced whole).

    Raises:
        DependencyError: onnxruntime-genai or onnx-ir is not installed.
        InputError: ``hf_folder`` has no ``config.json`` or no tokenizer (the builder loads
            one); an unknown precision.
        DtrError: the builder failed (its last error line) or timed out.
    """
    og = require_genai()
    try:
        import onnx_ir  # noqa: F401 - the builder imports it
    except ImportError as exc:
        raise DependencyError("onnxruntime-genai's model builder needs onnx-ir: pip install "
                              "onnx-ir") from exc
    src, dst = Path(hf_folder), Path(out)
    if precision not in PRECISIONS:
        raise InputError(f"builder precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if not (src / "config.json").is_file():
        raise InputError(f"{src}: not a Hugging Face model folder (no config.json)")
    if not any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise InputError(f"{src}: no tokenizer (tokenizer.json): the model builder loads one; "
                         "save the model's tokenizer into the folder with save_pretrained")
    version = getattr(og, "__version__", "?")
    key = _fingerprint(src, precision, extra_options, version)
    stamp = dst / STAMP
    if stamp.is_file():
        try:
            old = json.loads(stamp.read_text())
        except ValueError:
            old = {}
        if old.get("fingerprint") == key and is_built(dst):
            return GenaiBuild(str(dst), precision, float(old.get("seconds", 0.0)), True, version)
    tmp = dst.with_name(f".{dst.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", src.name, "-i",
           str(src), "-o", str(tmp), "-p", precision, "-e", "cpu", "-c", str(tmp / "cache")]
    if extra_options:
        cmd += ["--extra_options", *extra_options]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if log is not None:
        log(f"building the onnxruntime-genai {precision} export of {src} (model builder)")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DtrError(f"the model builder timed out after {timeout_s:.0f} s") from exc
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not is_built(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        errs = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        last = next((ln for ln in reversed(errs) if "Error" in ln), errs[-1] if errs else "?")
        raise DtrError(f"the model builder failed on {src} ({precision}): {last.strip()}")
    shutil.rmtree(tmp / "cache", ignore_errors=True)
    (tmp / STAMP).write_text(json.dumps({"fingerprint": key, "seconds": round(seconds, 1),
                                         "precision": precision, "source": str(src),
                                         "genai": version, "command": cmd}, indent=2))
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return GenaiBuild(str(dst), precision, seconds, False, version)


def is_built(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a genai model (its config and decoder file)."""
    try:
        cfg = json.loads((Path(folder) / "genai_config.json").read_text())
        return (Path(folder) / cfg["model"]["decoder"]["filename"]).is_file()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def builder_baselines(hf_folder: str | os.PathLike[str], root: str | os.PathLike[str],
                      precisions: Sequence[str] = ("fp32", "int4"), *,
                      log: Callable[[str], None] | None = None) -> dict[str, GenaiBuild]:
    """:func:`build_genai` of ``hf_folder`` at each of ``precisions``, into
    ``root/genai-<precision>``; ``{precision: build}``.

    Raises:
        as :func:`build_genai`.
    """
    return {p: build_genai(hf_folder, Path(root) / f"genai-{p}", p, log=log) for p in precisions}
