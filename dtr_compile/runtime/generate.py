"""Text generation with a stateful decoder ONNX in onnxruntime (``dtr-compile generate``).

A stateful decoder (LINEAR_CONTRACT.md, onnxruntime-genai's naming) has inputs ``input_ids
[B, t]``, ``attention_mask [B, P + t]`` and, per model layer ``i``, its past: softmax layers
``past_key_values.{i}.key`` / ``.value`` ``[B, Hkv, P, D]``, linear layers ``past.{i}.{name}``
(e.g. ``recurrent [B, H, F, Dv + 1]``); its outputs are ``logits [B, t, V]`` and the matching
``present.*``. One graph does the prefill (P = 0, t = prompt length) and each decode step (t = 1).

* :func:`read_signature` — the model's state tensors and how to build their empty past.
* :class:`Generator` — prefill then decode steps: greedy, or seeded temperature / top-k sampling;
  batches of prompts of different lengths are left-padded and the attention mask carries it.
* :func:`find_tokenizer` — ``--tokenizer``, else ``<model stem>.tokenizer/`` or ``tokenizer/``
  beside the model (or its own folder, as onnxruntime-genai lays it out).
* :class:`TextStream` — incremental detokenization for streaming: each new token costs the
  decoding of a few tokens, not of the whole continuation.
* :func:`decoder_info` — what dtr-compile recorded about the decoder in its metadata
  (:data:`DECODER_KEY`): the source model's heads, sizes and position table.

The state a decode step needs is exactly the previous step's ``present.*``; nothing is recomputed.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dtr_compile.errors import DependencyError, InputError, first_line
from dtr_compile.fileio import unloadable

_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(bfloat16)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
}
#: ``metadata_props`` key of a stateful decoder saying how its KV caches may be bound:
#: ``shared`` (one buffer as past and present, written in place; onnxruntime's
#: ``GroupQueryAttention``) or ``concat`` (each step returns a new, longer present).
KV_CACHE_KEY = "dtr_compile.kv_cache"
_KV = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PAST = re.compile(r"^past\.(\d+)\.(\w+)$")

PREFILL_ONLY_HINT = (
    "it is a prefill-only model (input_ids, attention_mask → logits, no past_key_values.* / "
    "past.* inputs with matching present.* outputs), so every new token would re-run the whole "
    "prefix. Use the stateful decoder dtr-compile writes beside the hybrid for causal models "
    "(see README, Generation)")


#: ``metadata_props`` key of the stateful decoders dtr-compile writes: a JSON object describing
#: the source model (written by :func:`dtr_compile.exporters.stateful.decoder_metadata`):
#: ``num_attention_heads``, ``num_key_value_heads``, ``head_size``, ``hidden_size``,
#: ``num_hidden_layers``, ``vocab_size``, ``model_type``, ``max_position_embeddings`` (None where
#: unknown) and ``position_table``: the rows of a learned position embedding, the positions the
#: decoder can see at all (None: positions are computed, e.g. RoPE).
DECODER_KEY = "dtr_compile.decoder"


def decoder_info(session: Any) -> dict[str, Any]:
    """The :data:`DECODER_KEY` record of an onnxruntime ``session``'s model; ``{}`` when the
    model has none (not written by dtr-compile) or it is not a JSON object."""
    import json

    try:
        text = session.get_modelmeta().custom_metadata_map.get(DECODER_KEY)
        info = json.loads(text) if text else {}
    except (ValueError, AttributeError):
        return {}
    return info if isinstance(info, dict) else {}


@dataclass(frozen=True)
class StateSpec:
    """One state tensor: input ``past`` fed from output ``present`` of the previous step.

    ``kind``: ``"kv"`` (softmax layer key/value cache, ``[B, Hkv, P, D]``, grows by t per step)
    or ``"recurrent"`` (a linear layer's fixed-size state, ``past.{i}.{name}``). ``shape`` holds
    ints for fixed dims and None for the batch dim (0) and, for ``kv``, the past length (2).
    """

    past: str
    present: str
    layer: int
    name: str
    kind: str
    dtype: Any
    shape: tuple[int | None, ...]

    def empty(self, batch: int) -> np.ndarray:
        """The state before any token: ``[B, Hkv, 0, D]`` for a KV cache, zeros for a recurrent
        state (an empty sum; a window with no valid entry)."""
        return np.zeros(self.at(batch, 0), dtype=self.dtype)

    def at(self, batch: int, past_len: int) -> tuple[int, ...]:
        """The shape of this state for ``batch`` streams after ``past_len`` tokens."""
        dims = [batch if i == 0 else (past_len if d is None else d)
                for i, d in enumerate(self.shape)]
        return tuple(dims)

    def nbytes(self, batch: int, past_len: int) -> int:
        """Bytes of this state for ``batch`` streams after ``past_len`` tokens."""
        return int(np.prod(self.at(batch, past_len))) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Signature:
    """The decoder's interface: token and mask inputs, the logits output, the states."""

    input_ids: str
    attention_mask: str | None
    logits: str
    states: tuple[StateSpec, ...]
    ids_dtype: Any = np.int64
    mask_dtype: Any = np.int64
    position_ids: str | None = None
    vocab: int | None = None  # logits' last dim when fixed

    def state_bytes(self, batch: int, past_len: int) -> dict[str, int]:
        """``{"kv": bytes, "recurrent": bytes}`` of the state of ``batch`` streams after
        ``past_len`` tokens (from the declared shapes and dtypes)."""
        out = {"kv": 0, "recurrent": 0}
        for s in self.states:
            out[s.kind] += s.nbytes(batch, past_len)
        return out


def _dims(shape: Sequence[Any]) -> tuple[int | str | None, ...]:
    return tuple(d if isinstance(d, int) else (d or None) for d in shape)


def read_signature(session: Any, path: str | os.PathLike[str] = "model") -> Signature:
    """Read a stateful decoder's interface from an onnxruntime ``session``.

    Raises:
        InputError: no ``input_ids`` / ``logits``; no state pairs (a prefill-only model); a past
            without its present; a state dim other than batch (and a KV cache's length) that is
            not fixed.
    """
    ins = {i.name: i for i in session.get_inputs()}
    outs = {o.name: o for o in session.get_outputs()}
    name = Path(path).name
    if "input_ids" not in ins:
        raise InputError(f"{name}: no input_ids input (inputs: {', '.join(ins)}); "
                         "generate needs a causal language model")
    logits = "logits" if "logits" in outs else next(iter(outs))
    states: list[StateSpec] = []
    for n, spec in ins.items():
        m = _KV.match(n) or _PAST.match(n)
        if not m:
            continue
        layer, sub = int(m.group(1)), m.group(2)
        present = f"present.{layer}.{sub}"
        if present not in outs:
            raise InputError(f"{name}: state input {n} has no matching output {present}")
        kind = "kv" if _KV.match(n) else "recurrent"
        dims = _dims(spec.shape)
        shape: list[int | None] = []
        for i, d in enumerate(dims):
            if i == 0 or (kind == "kv" and i == 2):
                if isinstance(d, int) and i == 0 and d != 1:
                    raise InputError(f"{name}: {n} has a fixed batch of {d}; expected a "
                                     "dynamic batch dim")
                shape.append(None)
            elif isinstance(d, int):
                shape.append(d)
            else:
                raise InputError(f"{name}: dim {i} of {n} ({d}) is not fixed; only the batch "
                                 "(and a KV cache's past length) may vary")
        states.append(StateSpec(n, present, layer, sub, kind,
                                _ORT_DTYPES.get(spec.type, np.float32), tuple(shape)))
    if not states:
        raise InputError(f"{name}: {PREFILL_ONLY_HINT}")
    unknown = [n for n in ins if n not in ("input_ids", "attention_mask", "position_ids")
               and not (_KV.match(n) or _PAST.match(n))]
    if unknown:
        raise InputError(f"{name}: inputs the runner does not know how to feed: "
                         f"{', '.join(unknown)}")
    mask = "attention_mask" if "attention_mask" in ins else None
    vocab = _dims(outs[logits].shape)[-1] if outs[logits].shape else None
    return Signature(
        "input_ids", mask, logits, tuple(sorted(states, key=lambda s: (s.layer, s.past))),
        _ORT_DTYPES.get(ins["input_ids"].type, np.int64),
        _ORT_DTYPES.get(ins[mask].type, np.int64) if mask else np.int64,
        "position_ids" if "position_ids" in ins else None,
        vocab if isinstance(vocab, int) and vocab > 0 else None)


def open_session(path: str | os.PathLike[str], threads: int | None = None,
                 profile_prefix: str | None = None, *, prepack: bool = True) -> Any:
    """A CPU onnxruntime session of ``path`` (profiling to ``profile_prefix``*.json if given).
    ``prepack=False`` turns off onnxruntime's weight prepacking (``session.disable_prepacking``:
    no second copy of the MatMul weights, slower MatMuls).

    Raises:
        InputError: the file is missing or onnxruntime cannot load it; ``threads`` < 1.
    """
    import onnxruntime as ort

    p = Path(path)
    if not p.is_file():
        raise InputError(f"ONNX file not found: {p}")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    try:
        return ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise unloadable(p, exc) from exc


def _length(x: Any) -> int:
    """Dim 2 (a KV cache's positions) of a numpy array or an OrtValue."""
    return int((x.shape if isinstance(x, np.ndarray) else x.shape())[2])


class StatefulSession:
    """A stateful decoder in onnxruntime: :meth:`step` runs t tokens on top of a past.

    A decoder whose metadata says its KV caches may be shared (:data:`KV_CACHE_KEY` =
    ``shared``: onnxruntime's ``GroupQueryAttention``, which writes the new keys into a past
    buffer bound as its present too) is run over one preallocated buffer per KV cache
    (``empty_state(batch, capacity)``): each step binds it as both past and present with
    onnxruntime's IO binding, so the cache is written in place, ``t`` positions per step, and
    never copied (every other decoder, and this one without a capacity, returns a present of
    ``P + t`` positions, a copy of the past plus the new keys).

    Attributes:
        kv_shared: whether the decoder's KV caches may be shared buffers.

    Raises:
        InputError: as :func:`open_session` and :func:`read_signature`.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None,
                 profile_prefix: str | None = None, *, prepack: bool = True) -> None:
        self.path = Path(path)
        self.session = open_session(path, threads, profile_prefix, prepack=prepack)
        self.sig = read_signature(self.session, path)
        self.info = decoder_info(self.session)
        self._outputs = [self.sig.logits] + [s.present for s in self.sig.states]
        meta = self.session.get_modelmeta().custom_metadata_map
        self.kv_shared = meta.get(KV_CACHE_KEY) == "shared"

    def empty_state(self, batch: int, capacity: int | None = None) -> dict[str, Any]:
        """``{past name: array}`` of an empty past (P = 0) for ``batch`` streams.

        ``capacity``: for a decoder with :attr:`kv_shared`, each KV cache is one buffer of
        ``capacity`` positions ``[B, Hkv, capacity, D]`` (an OrtValue; positions past the
        attention mask's length are never read) that :meth:`step` fills in place; a longer
        sequence moves to a buffer twice as large. Ignored for other decoders.
        """
        if capacity is None or not self.kv_shared:
            return {s.past: s.empty(batch) for s in self.sig.states}
        return {s.past: self._buffer(s, batch, capacity) if s.kind == "kv" else s.empty(batch)
                for s in self.sig.states}

    def _buffer(self, spec: StateSpec, batch: int, capacity: int,
                content: Any = None) -> Any:  # noqa: ANN401 - an OrtValue
        """An OrtValue ``[B, Hkv, capacity, D]`` holding ``content`` (``[B, Hkv, P, D]``) at
        positions ``0 … P − 1``."""
        import onnxruntime as ort

        buf = np.zeros(spec.at(batch, capacity), dtype=spec.dtype)
        if content is not None:
            arr = content if isinstance(content, np.ndarray) else content.numpy()
            buf[:, :, :arr.shape[2]] = arr
        return ort.OrtValue.ortvalue_from_numpy(buf)

    def with_capacity(self, past: Mapping[str, Any], past_len: int,
                      capacity: int) -> dict[str, Any]:
        """``past`` (exact KV caches of ``past_len`` positions) with each KV cache copied into a
        shared buffer of ``capacity`` positions (see :meth:`empty_state`); ``past`` itself for a
        decoder without :attr:`kv_shared`."""
        if not self.kv_shared:
            return dict(past)
        out = dict(past)
        for s in self.sig.states:
            if s.kind == "kv":
                x = past[s.past]
                arr = x if isinstance(x, np.ndarray) else x.numpy()
                out[s.past] = self._buffer(s, arr.shape[0], capacity, arr[:, :, :past_len])
        return out

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             past: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """Run ``input_ids [B, t]`` with ``attention_mask [B, P + t]`` on ``past`` (numpy arrays
        or onnxruntime OrtValues by past name).

        Returns ``(logits [B, t, V], present)``: ``present`` holds OrtValues keyed by the *past*
        names, fed as they are to the next step — the state stays in onnxruntime's memory, with
        no copy to numpy and back per step (a 16K-token KV cache is hundreds of MB);
        :func:`state_arrays` turns it into numpy arrays. With shared KV buffers (see
        :meth:`empty_state`) the KV entries of ``present`` are the same buffers, written in
        place: positions ``P … P + t − 1`` now hold the new keys and values.
        """
        import onnxruntime as ort

        sig = self.sig

        def val(x: Any) -> Any:
            return x if isinstance(x, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(x))

        feed: dict[str, Any] = {sig.input_ids: val(input_ids.astype(sig.ids_dtype, copy=False))}
        if sig.attention_mask:
            feed[sig.attention_mask] = val(attention_mask.astype(sig.mask_dtype, copy=False))
        if sig.position_ids:
            t = input_ids.shape[1]
            pos = np.clip(np.cumsum(attention_mask, axis=-1) - 1, 0, None)[:, -t:]
            feed[sig.position_ids] = val(pos.astype(np.int64))
        total = attention_mask.shape[1]
        past_len = total - input_ids.shape[1]
        kv = [s for s in sig.states if s.kind == "kv"]
        shared = self.kv_shared and bool(kv) and all(_length(past[s.past]) > past_len
                                                     for s in kv)
        if shared and any(_length(past[s.past]) < total for s in kv):  # full: a larger buffer
            past = dict(past)
            for s in kv:
                x = past[s.past]
                grown = max(total, 2 * _length(x))
                past[s.past] = self._buffer(s, input_ids.shape[0], grown,
                                            (x if isinstance(x, np.ndarray)
                                             else x.numpy())[:, :, :past_len])
        for name, x in past.items():
            feed[name] = val(x)
        if not shared:
            res = self.session.run_with_ort_values(self._outputs, feed)
            return res[0].numpy(), {s.past: r for s, r in zip(sig.states, res[1:], strict=True)}
        io = self.session.io_binding()
        for name, x in feed.items():
            io.bind_ortvalue_input(name, x)
        io.bind_output(sig.logits, "cpu")
        for s in sig.states:
            if s.kind == "kv":
                io.bind_ortvalue_output(s.present, feed[s.past])
            else:
                io.bind_output(s.present, "cpu")
        self.session.run_with_iobinding(io)
        res = io.get_outputs()  # in binding order: logits, then the states
        return res[0].numpy(), {s.past: feed[s.past] if s.kind == "kv" else r
                                for s, r in zip(sig.states, res[1:], strict=True)}


def state_arrays(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{past name: numpy array}`` of a state from :meth:`StatefulSession.step`."""
    return {k: v if isinstance(v, np.ndarray) else v.numpy() for k, v in state.items()}


@dataclass
class Generation:
    """What :meth:`Generator.generate` produced, one row per prompt.

    ``tokens[r]``: the new token ids of row r (ending with EOS if it stopped there);
    ``text[r]``: their decoding (None without a tokenizer); ``prefill_s`` / ``decode_s``: wall
    time of the prefill and of all decode steps (seconds); ``steps``: decode steps run.
    """

    prompts: list[list[int]]
    tokens: list[list[int]]
    text: list[str] | None
    prefill_s: float
    decode_s: float
    steps: int
    stopped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "tokens": self.tokens, "text": self.text,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s, "steps": self.steps,
                "stopped": self.stopped,
                "ms_per_token": 1000.0 * self.decode_s / self.steps if self.steps else None}


def find_tokenizer(model_path: str | os.PathLike[str],
                   tokenizer: str | os.PathLike[str] | None = None) -> Path | None:
    """The tokenizer folder for ``model_path``: ``tokenizer`` if given, else beside the model
    ``<model stem>.tokenizer/``, ``<name up to its first dot>.tokenizer/`` (``hybrid.tokenizer/``
    for ``hybrid.decoder.onnx``), ``tokenizer/``, then the model's own folder
    when it holds ``tokenizer.json`` (an onnxruntime-genai folder); None when there is none.

    Raises:
        InputError: ``tokenizer`` was given but is not a folder.
    """
    if tokenizer is not None:
        p = Path(tokenizer)
        if not p.is_dir():
            raise InputError(f"--tokenizer {p}: not a folder (expected a Hugging Face tokenizer "
                             "folder with tokenizer.json / tokenizer_config.json)")
        return p
    model = Path(model_path)
    base = model.name.split(".")[0]  # hybrid.decoder.onnx, hybrid.original.decoder.onnx → hybrid
    for cand in (model.with_name(model.stem + ".tokenizer"), model.with_name(base + ".tokenizer"),
                 model.parent / "tokenizer"):
        if cand.is_dir():
            return cand
    if (model.parent / "tokenizer.json").is_file():  # an onnxruntime-genai folder
        return model.parent
    return None


def load_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """``transformers.AutoTokenizer.from_pretrained(folder)``, local files only.

    Raises:
        InputError: the folder holds no loadable tokenizer.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise DependencyError("loading a tokenizer needs transformers") from exc
    try:
        # never the folder's own code (auto_map), and never transformers' prompt to run it
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                             trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"tokenizer folder {folder}: cannot load it with "
                         f"transformers.AutoTokenizer ({first_line(exc)[:200]})") from exc


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to ``ids [B, T]`` and ``mask [B, T]`` (0 on padding, 1 on tokens)."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for r, p in enumerate(prompts):
        if p:
            ids[r, width - len(p):] = p
            mask[r, width - len(p):] = 1
    return ids, mask


def choose(logits: np.ndarray, temperature: float, top_k: int | None,
           rng: np.random.Generator) -> np.ndarray:
    """Next tokens ``[B]`` from last-position logits ``[B, V]``: argmax when ``temperature`` is
    0, else a draw from softmax(logits / temperature) restricted to the ``top_k`` largest.

    The logits are shifted by their maximum *before* the division, ``(z − max z) / T <= 0``, so
    a tiny ``T`` (1e-310) gives ``exp(0) = 1`` at the maxima and ``exp(−inf) = 0`` elsewhere:
    the greedy limit (a draw among tied maxima) instead of ``inf − inf = NaN``."""
    if temperature == 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64)
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z >= kth, z, -np.inf)
    with np.errstate(over="ignore", under="ignore"):
        z = (z - z.max(-1, keepdims=True)) / temperature  # <= 0: -inf, never NaN
        p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    u = rng.random(z.shape[0])
    return np.minimum((p.cumsum(-1) < u[:, None]).sum(-1), z.shape[-1] - 1)


class TextStream:
    """Incremental detokenization of a token stream: :meth:`push` each new id, get the text it
    completes (``""`` while a character or word is still incomplete), :meth:`flush` at the end.

    Decoding ids one by one is wrong for byte-level and SentencePiece tokenizers (a character
    can span tokens; a word's leading space depends on what precedes it), and decoding the
    whole continuation for every new token is quadratic. As text-generation servers do (vLLM's
    ``detokenize_incrementally``), two offsets into the ids are kept: text is emitted as
    ``decode(ids[prefix:]) − decode(ids[prefix:read])`` once it does not end in U+FFFD (an
    incomplete UTF-8 sequence), then both offsets move up. Each push decodes the ids since the
    last emitted piece and the piece before it: linear work in the tokens. The pieces add up to
    ``tokenizer.decode(ids, skip_special_tokens=True)``.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were emitted last: context for the next piece
        self.read = 0  # ids[:read] are emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def push(self, token: int) -> str:
        """Add ``token``; return the text it completes (maybe ``""``)."""
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """The text of ids not yet emitted (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class Generator:
    """Generate with a stateful decoder ONNX (see the module docstring).

    ``tokenizer``: a Hugging Face tokenizer object or folder; None looks beside the model
    (:func:`find_tokenizer`) and works without one for token-id prompts.

    Raises:
        InputError: the model is missing, not loadable, or not stateful (a prefill-only model);
            a tokenizer folder that cannot be loaded.
    """

    def __init__(self, model_path: str | os.PathLike[str], tokenizer: Any = None,
                 threads: int | None = None) -> None:
        self.model = StatefulSession(model_path, threads)
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            folder = find_tokenizer(model_path, tokenizer)
            tokenizer = load_tokenizer(folder) if folder is not None else None
        self.tokenizer = tokenizer

    @property
    def signature(self) -> Signature:
        return self.model.sig

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of text prompts.

        Raises:
            InputError: there is no tokenizer.
        """
        if self.tokenizer is None:
            raise InputError(
                f"no tokenizer for {self.model.path.name}: give --tokenizer DIR (a Hugging Face "
                f"tokenizer folder), put one at {self.model.path.stem}.tokenizer/ or tokenizer/ "
                "beside the model, or pass token ids (--prompt-ids 1,2,3)")
        return [list(self.tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(i) for i in ids)
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _eos(self, eos_token_id: int | Sequence[int] | None) -> set[int]:
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = getattr(self.tokenizer, "eos_token_id", None)
        if eos_token_id is None:
            return set()
        return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in
                                                                           eos_token_id}

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        on_token: Callable[[int, int], None] | None = None,
    ) -> Generation:
        """Continue each prompt by up to ``max_new_tokens`` tokens.

        ``prompts``: a text, texts, a token-id list, or token-id lists (rows of different lengths
        are left-padded). Greedy when ``temperature`` is 0, else sampling from
        softmax(logits / temperature) over the ``top_k`` most likely tokens, with a numpy
        generator seeded by ``seed`` (same seed → same tokens). A row stops at an EOS id
        (``eos_token_id``, default the tokenizer's); the run stops when every row has.
        ``on_token(row, token_id)`` is called for every new token as it is chosen.

        A decoder with a learned position table of ``P`` rows (:func:`decoder_info`) sees
        positions ``0 … P − 1`` only: a row stops when its prompt and new tokens fill them (stop
        reason ``max_positions``).

        Raises:
            InputError: an empty prompt, a token id outside the model's vocabulary, a prompt
                that fills the position table, ``max_new_tokens`` < 1, ``temperature`` < 0,
                ``top_k`` < 1, text prompts without a tokenizer.
        """
        rows = self._rows(prompts)
        self._check_ids(rows)
        table = self.model.info.get("position_table")
        table = table if type(table) is int and table > 0 else None  # not a bool
        longest = max(len(r) for r in rows)
        if table is not None and longest >= table:
            raise InputError(f"a prompt of {longest} tokens fills the {table} positions of "
                             f"{self.model.path.name} (a learned position table of {table} rows): "
                             f"give at most {table - 1} prompt tokens")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not (temperature >= 0 and np.isfinite(temperature)):
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise InputError(f"top_k must be >= 1, got {top_k}")
        eos = self._eos(eos_token_id)
        if pad_token_id is None:
            pad = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer else None
            pad_token_id = pad if pad is not None else (min(eos) if eos else 0)
        rng = np.random.default_rng(seed)
        batch = len(rows)
        ids, mask = left_pad(rows, pad_token_id)
        t0 = time.perf_counter()
        logits, state = self.model.step(ids, mask, self.model.empty_state(
            batch, capacity=ids.shape[1] + max_new_tokens))
        prefill_s = time.perf_counter() - t0
        out: list[list[int]] = [[] for _ in rows]
        done = np.zeros(batch, dtype=bool)
        stopped = ["max_new_tokens"] * batch
        steps, t1 = 0, time.perf_counter()
        while True:
            nxt = choose(logits[:, -1, :], temperature, top_k, rng)
            for r in range(batch):
                if done[r]:
                    continue
                tok = int(nxt[r])
                out[r].append(tok)
                if on_token is not None:
                    on_token(r, tok)
                if tok in eos:
                    done[r], stopped[r] = True, "eos"
                elif len(out[r]) >= max_new_tokens:
                    done[r] = True
                elif table is not None and len(rows[r]) + len(out[r]) >= table:
                    done[r], stopped[r] = True, "max_positions"
            if done.all():
                break
            # finished rows keep running (a batch moves together) on pad tokens, masked out:
            # their positions stop (a learned position table's last row is never passed)
            feed = np.where(done, pad_token_id, nxt).astype(np.int64)[:, None]
            mask = np.concatenate([mask, (~done).astype(mask.dtype)[:, None]], axis=1)
            logits, state = self.model.step(feed, mask, state)
            steps += 1
        decode_s = time.perf_counter() - t1
        text = [self.decode(o) for o in out] if self.tokenizer is not None else None
        return Generation(rows, out, text, prefill_s, decode_s, steps, stopped)

    def _check_ids(self, rows: Sequence[Sequence[int]]) -> None:
        """Refuse a token id the model cannot embed: negative, or at least its vocabulary size
        (the logits' last dim); without a fixed vocabulary, at least 2^63.

        Raises:
            InputError: naming the id, its row and position, and the vocabulary size.
        """
        vocab = self.model.sig.vocab
        top = vocab if vocab is not None else 2 ** 63
        for r, row in enumerate(rows):
            for i, tok in enumerate(row):
                if not 0 <= tok < top:
                    where = f"row {r}, position {i}" if len(rows) > 1 else f"position {i}"
                    size = (f"the model's vocabulary of {vocab} ids (0..{vocab - 1})"
                            if vocab is not None else "int64 token ids")
                    raise InputError(f"prompt token id {tok} ({where}) is outside {size}; "
                                     "check the ids or the tokenizer (it should be the model's)")

    def _rows(self, prompts: Any) -> list[list[int]]:
        if isinstance(prompts, str):
            rows = self.encode([prompts])
        elif isinstance(prompts, Sequence) and prompts and all(isinstance(p, str)
                                                               for p in prompts):
            rows = self.encode(list(prompts))
        elif isinstance(prompts, Sequence) and prompts and all(
                isinstance(p, (int, np.integer)) for p in prompts):
            rows = [[int(p) for p in prompts]]
        elif isinstance(prompts, Sequence) and prompts:
            rows = [[int(t) for t in p] for p in prompts]
        else:
            raise InputError("no prompt given")
        if any(len(r) == 0 for r in rows):
            raise InputError("a prompt is empty (0 tokens); give at least one token")
        return rows
