"""``genai_config.json`` for a stateful decoder ONNX, in onnxruntime-genai's format.

onnxruntime-genai (PyPI ``onnxruntime-genai``) runs a folder holding the decoder ONNX, a
``genai_config.json`` and the tokenizer files. Its model builder writes, for hybrid models such as
LFM2 or Qwen3.5 (Gated DeltaNet + attention), ``model.decoder.inputs`` / ``outputs`` with
``%d`` name patterns (``past_key_values.%d.key``, ``past.%d.recurrent``, ``present.%d.*``) and
``layer_types`` (``full_attention`` / ``linear_attention`` per layer). :func:`genai_config` builds
the same from the model's own interface (:func:`~dtr_compile.runtime.generate.read_signature`).
Whether onnxruntime-genai can then *run* our decoder is a separate question: see
docs/exporters.md, "onnxruntime-genai".
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from dtr_compile.errors import InputError
from dtr_compile.fileio import (
    OutputLock,
    Staging,
    check_copied_links,
    check_write_plan,
    clean_stale_temporaries,
    copy_artifact,
    data_path,
    has_external_data,
    save_onnx,
    write_json_atomic,
)
from dtr_compile.runtime.generate import Signature, decoder_info, open_session, read_signature

#: onnxruntime-genai 0.18 ``model.type`` values that run a decoder with dtr-compile's interface
#: (its generic decoder-only model; each checked on the test fixture's KV + recurrent decoder).
#: Its ``gpt2`` type expects its own builder's inputs; ``lfm2``, ``qwen3_5`` and the multimodal
#: types give their states other meanings; others it does not know.
GENAI_DECODER_TYPES = ("decoder", "llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma",
                       "gemma2", "gemma3_text", "granite", "olmo", "nemotron", "smollm3",
                       "ernie4_5", "chatglm")

#: context_length when neither the user nor the decoder's record gives one
DEFAULT_CONTEXT = 4096


def genai_config(
    model_path: str | os.PathLike[str],
    *,
    model_type: str | None = None,
    context_length: int | None = None,
    num_attention_heads: int | None = None,
    hidden_size: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    sig: Signature | None = None,
    info: dict[str, Any] | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """The ``genai_config.json`` dict for the stateful decoder at ``model_path``.

    Layer i is ``full_attention`` when it has ``past_key_values.i.*``, ``linear_attention`` when
    it has ``past.i.*``; the vocabulary comes from ``logits [B, t, V]``, head size and KV heads
    from the KV inputs ``[B, Hkv, P, D]``. The rest comes from the model's own description,
    which dtr-compile records in the decoders it writes (``info``, default
    :func:`~dtr_compile.runtime.generate.decoder_info`): ``num_attention_heads`` and
    ``hidden_size`` (a GQA model's query heads are not its KV inputs' heads), the head size of
    a decoder without a KV cache, ``model.type`` (the source's, when onnxruntime-genai runs it
    as a plain decoder, :data:`GENAI_DECODER_TYPES`, else ``decoder``) and ``context_length``
    (a learned position table's rows, else the model's max positions, else
    :data:`DEFAULT_CONTEXT`). Explicit arguments override it. A decoder without a record
    falls back to the KV inputs (heads = KV heads, hidden = heads × head size); each such
    guess is appended to ``notes``.

    Raises:
        InputError: as :func:`read_signature` (not a stateful decoder); a linear layer state
            other than ``recurrent`` (genai has no name pattern for window tensors); no head
            size (no KV cache and no record: genai refuses nulls); ``model_type`` that genai
            does not run as a decoder; ``context_length`` < 1 or beyond a learned position table.
    """
    path = Path(model_path)
    if sig is None or info is None:
        session = open_session(path)
        sig = read_signature(session, path) if sig is None else sig
        info = decoder_info(session) if info is None else info
    notes = [] if notes is None else notes

    def recorded(key: str) -> int | None:
        value = info.get(key) if info else None
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
            else None

    layers = max(s.layer for s in sig.states) + 1
    kinds: dict[int, str] = {}
    for s in sig.states:
        if s.kind == "recurrent" and s.name not in ("recurrent", "conv"):
            raise InputError(f"{path.name}: state {s.past} has no onnxruntime-genai name pattern "
                             "(it knows past.%d.recurrent and past.%d.conv only)")
        kinds[s.layer] = "full_attention" if s.kind == "kv" else "linear_attention"
    kv = [s for s in sig.states if s.kind == "kv"]
    kv_heads = kv[0].shape[1] if kv else recorded("num_key_value_heads")
    head_size = kv[0].shape[3] if kv else recorded("head_size")
    if head_size is None or kv_heads is None:
        raise InputError(f"{path.name}: no KV cache and no record of the model's head size and "
                         "KV heads (onnxruntime-genai needs both): use a decoder written by this "
                         "dtr-compile (it records them)")
    heads = num_attention_heads or recorded("num_attention_heads")
    if heads is None:
        heads = kv_heads
        notes.append(f"num_attention_heads not recorded in {path.name}: set to the KV heads "
                     f"({kv_heads}), wrong for a GQA model; recompile with this dtr-compile")
    hidden = hidden_size or recorded("hidden_size")
    if hidden is None:
        hidden = heads * head_size
        notes.append(f"hidden_size not recorded in {path.name}: set to heads x head size "
                     f"({hidden})")
    table = recorded("position_table")
    if context_length is None:
        context_length = table or recorded("max_position_embeddings") or DEFAULT_CONTEXT
        if not (table or recorded("max_position_embeddings")):
            notes.append(f"context_length not recorded in {path.name}: {DEFAULT_CONTEXT}")
    elif context_length < 1:
        raise InputError(f"--context-length {context_length}: must be >= 1")
    elif table is not None and context_length > table:
        raise InputError(f"--context-length {context_length}: {path.name} has a learned position "
                         f"table of {table} positions and cannot see a later one; give at most "
                         f"{table}")
    if model_type is None:
        source = info.get("model_type") if info else None
        model_type = source if source in GENAI_DECODER_TYPES else "decoder"
    elif model_type not in GENAI_DECODER_TYPES:
        raise InputError(f"--model-type {model_type}: onnxruntime-genai 0.18 does not run this "
                         "decoder as that type; one of " + ", ".join(GENAI_DECODER_TYPES) +
                         " (default: the model's own when listed, else decoder)")
    inputs: dict[str, str] = {"input_ids": sig.input_ids}
    outputs: dict[str, str] = {"logits": sig.logits}
    if sig.attention_mask:
        inputs["attention_mask"] = sig.attention_mask
    if sig.position_ids:
        inputs["position_ids"] = sig.position_ids
    if kv:
        inputs["past_key_names"] = "past_key_values.%d.key"
        inputs["past_value_names"] = "past_key_values.%d.value"
        outputs["present_key_names"] = "present.%d.key"
        outputs["present_value_names"] = "present.%d.value"
    for name in ("recurrent", "conv"):
        if any(s.kind == "recurrent" and s.name == name for s in sig.states):
            inputs[f"past_{name}_names"] = f"past.%d.{name}"
            outputs[f"present_{name}_names"] = f"present.%d.{name}"
    vocab = _vocab(path) or recorded("vocab_size")
    return {
        "model": {
            "bos_token_id": bos_token_id,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": path.name,
                "head_size": head_size,
                "hidden_size": hidden,
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": kv_heads,
                "layer_types": [kinds.get(i, "full_attention") for i in range(layers)],
            },
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id if pad_token_id is not None else 0,
            "type": model_type,
            "vocab_size": vocab,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True,
            "length_penalty": 1.0, "max_length": context_length, "min_length": 0,
            "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
            "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0,
            "top_k": 1, "top_p": 1.0,
        },
    }


def _vocab(path: Path) -> int | None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for o in proto.graph.output:
        if o.name == "logits":
            dims = o.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value"):
                return int(dims[-1].dim_value)
    return None


def write_genai_config(model_path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                       **kwargs: Any) -> Path:
    """Write :func:`genai_config` as ``genai_config.json`` beside the model (or at ``out``),
    atomically. Returns the path written."""
    target = Path(out) if out is not None else Path(model_path).with_name("genai_config.json")
    write_json_atomic(target, genai_config(model_path, **kwargs))
    return target


def add_conv_passthrough(proto: Any) -> list[int]:
    """Give every ``linear_attention`` layer of a stateful decoder ``proto`` (an ``onnx``
    ModelProto, changed in place) a pass-through ``past.{i}.conv`` → ``present.{i}.conv``
    ``[B, 1, 1]`` (fp32, an Identity): onnxruntime-genai 0.18 binds a rank-3 conv state beside
    every ``past.%d.recurrent`` (its Gated DeltaNet layout) and refuses a model without one. The
    tensor carries nothing; the decoder's outputs are unchanged. Returns the layers given one."""
    import onnx
    from onnx import TensorProto, helper

    names = {i.name for i in proto.graph.input}
    batch = None
    for i in proto.graph.input:
        if i.name == "input_ids":
            d0 = i.type.tensor_type.shape.dim[0]
            batch = d0.dim_param or None
    layers = sorted({int(m.group(1)) for n in names
                     if (m := _RECURRENT.match(n)) and f"past.{m.group(1)}.conv" not in names})
    for layer in layers:
        past, present = f"past.{layer}.conv", f"present.{layer}.conv"
        shape: list[Any] = [batch or "batch_size", 1, 1]
        proto.graph.input.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, shape))
        proto.graph.output.append(helper.make_tensor_value_info(present, TensorProto.FLOAT, shape))
        proto.graph.node.append(helper.make_node("Identity", [past], [present],
                                                 name=f"genai_conv_passthrough_{layer}"))
    onnx.checker.check_model(proto)
    return layers


def genai_write_plan(model: Path, out: Path, tok_dir: Path) -> list[Path]:
    """Check what :func:`write_genai_folder` writes into ``out`` (``model.onnx`` and its
    ``model.onnx.data``, ``genai_config.json``, the tokenizer files, the lock) against what it
    reads (the decoder and its ``NAME.data``, the tokenizer files), as the compile's write plan
    does (:func:`dtr_compile.fileio.check_write_plan`). Returns the tokenizer files to copy: a
    file that already is the one in ``out`` (``--tokenizer OUT``) is left where it is.

    Raises:
        InputError: ``out`` is a file; a file written would be the decoder or its weights; a
            path cannot be written; a tokenizer file links out of its folder.
    """
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {str(out)!r} is a file; give the folder to write (it is created "
                         "if missing)")
    target = out / "model.onnx"
    writes = {"model": target, "model weights": data_path(target),
              "genai config": out / "genai_config.json", "lock": Path(str(target) + ".lock")}
    # the tokenizer folder may be an onnxruntime-genai folder itself (find_tokenizer's last
    # choice): its model, weights and config are not tokenizer files, and never copied
    skip = {w.name for w in writes.values()} | {model.name, data_path(model).name}
    files = [f for f in sorted(tok_dir.iterdir()) if f.is_file() and f.name not in skip
             and not f.name.startswith(".") and f.suffix not in (".onnx", ".data", ".lock")]
    check_copied_links(files, tok_dir)
    copies = [f for f in files if not (out / f.name).exists()
              or not os.path.samefile(f, out / f.name)]
    writes |= {f"tokenizer file {f.name}": out / f.name for f in copies}
    check_write_plan(writes, {"MODEL": model, "MODEL weights": data_path(model)}, hint="-o")
    return copies


_RECURRENT = re.compile(r"^past\.(\d+)\.recurrent$")


def write_genai_folder(model_path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                       tokenizer: str | os.PathLike[str] | None = None, **kwargs: Any) -> Path:
    """Write a folder onnxruntime-genai can open (``onnxruntime_genai.Model(out_dir)``): the
    decoder as ``model.onnx`` with a pass-through conv state per linear layer
    (:func:`add_conv_passthrough`), ``genai_config.json`` (:func:`genai_config`, ``kwargs``
    passed on), and the tokenizer files from ``tokenizer`` (a Hugging Face tokenizer folder;
    default: the one :func:`~dtr_compile.runtime.generate.find_tokenizer` finds beside the
    model). EOS / BOS / pad ids default to the tokenizer's. ``notes`` (a list) receives what
    :func:`genai_config` had to guess. Returns ``out_dir``.

    Raises:
        InputError: as :func:`genai_config`; the model is missing; no tokenizer found; as
            :func:`genai_write_plan` (``out`` a file, ``out/model.onnx`` the model itself…),
            before anything is written.
    """
    import onnx

    from dtr_compile.runtime.generate import find_tokenizer, load_tokenizer

    src = Path(model_path)
    if not src.is_file():
        raise InputError(f"model not found: {src}" if not src.exists() else
                         f"{src} is a folder; give the stateful decoder's .onnx file")
    tok_dir = find_tokenizer(src, tokenizer)
    if tok_dir is None:
        raise InputError(f"no tokenizer for {src.name}: onnxruntime-genai needs the tokenizer "
                         "files in its folder; give one")
    tok = load_tokenizer(tok_dir)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if kwargs.get(key) is None and getattr(tok, key, None) is not None:
            kwargs[key] = int(getattr(tok, key))
    notes = kwargs.pop("notes", None)
    out = Path(out_dir)
    target = out / "model.onnx"
    tok_files = genai_write_plan(src, out, tok_dir)  # before anything is read or written
    genai_config(src, notes=notes, **kwargs)  # the decoder's checks, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(Path(str(target) + ".lock")):
        clean_stale_temporaries([target])  # an interrupted run's staging folder
        proto = onnx.load(str(src), load_external_data=False)
        external = has_external_data(proto)  # the decoder's NAME.data: model.onnx.data here
        onnx.load_external_data_for_model(proto, str(src.parent))
        add_conv_passthrough(proto)
        # the whole folder is staged and moved into place together: an interrupted or failed
        # run leaves what stood there, never a new model beside an old config
        staging = Staging(target)
        try:
            model = staging.path(target)
            save_onnx(proto, model, external=external or None)
            del proto
            write_json_atomic(staging.path(out / "genai_config.json"),
                              genai_config(model, **kwargs))
            for f in tok_files:
                copy_artifact(f, staging.path(out / f.name), like=out / f.name)
            staging.commit()
        finally:
            staging.discard()
    return out
