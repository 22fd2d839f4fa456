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
from pathlib import Path
from typing import Any

from dtr_compile.errors import InputError
from dtr_compile.fileio import write_json_atomic
from dtr_compile.runtime.generate import Signature, open_session, read_signature


def genai_config(
    model_path: str | os.PathLike[str],
    *,
    model_type: str = "llama",
    context_length: int = 4096,
    num_attention_heads: int | None = None,
    hidden_size: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    sig: Signature | None = None,
) -> dict[str, Any]:
    """The ``genai_config.json`` dict for the stateful decoder at ``model_path``.

    Layer i is ``full_attention`` when it has ``past_key_values.i.*``, ``linear_attention`` when
    it has ``past.i.*``; head size and KV heads come from the KV inputs ``[B, Hkv, P, D]``, the
    vocabulary from ``logits [B, t, V]``. ``num_attention_heads`` / ``hidden_size`` default to
    the KV heads / heads × head size when not given (genai reads them only for its own caches).

    Raises:
        InputError: as :func:`read_signature` (not a stateful decoder); a linear layer state
            other than ``recurrent`` (genai has no name pattern for window tensors).
    """
    path = Path(model_path)
    if sig is None:
        sig = read_signature(open_session(path), path)
    layers = max(s.layer for s in sig.states) + 1
    kinds: dict[int, str] = {}
    for s in sig.states:
        if s.kind == "recurrent" and s.name != "recurrent":
            raise InputError(f"{path.name}: state {s.past} has no onnxruntime-genai name pattern "
                             "(it knows past.%d.recurrent and past.%d.conv only)")
        kinds[s.layer] = "full_attention" if s.kind == "kv" else "linear_attention"
    kv = [s for s in sig.states if s.kind == "kv"]
    kv_heads = kv[0].shape[1] if kv else None
    head_size = kv[0].shape[3] if kv else None
    heads = num_attention_heads or kv_heads
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
    if any(s.kind == "recurrent" for s in sig.states):
        inputs["past_recurrent_names"] = "past.%d.recurrent"
        outputs["present_recurrent_names"] = "present.%d.recurrent"
    vocab = _vocab(path)
    return {
        "model": {
            "bos_token_id": bos_token_id,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": path.name,
                "head_size": head_size,
                "hidden_size": hidden_size or ((heads or 0) * (head_size or 0)) or None,
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
