"""Issue 12, Hugging Face folders: missing weights, a malformed config.json and a bad data file
are one clear exit-2 error before any expensive stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dtr_compile.errors import InputError
from dtr_compile.load import load_model

from .conftest import make_token_data

CLI = [sys.executable, "-m", "dtr_compile"]
FAST = ["--distill-steps", "5", "--max-calib-samples", "8", "--no-progress", "--no-bench"]


def run_cli(*args: str, cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3,
                     architectures=["BertForSequenceClassification"])
    d = tmp_path_factory.mktemp("hf") / "bert"
    BertForSequenceClassification(cfg).eval().save_pretrained(d)
    return d


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_complete_folder_loads(hf_folder: Path) -> None:
    loaded = load_model(hf_folder)
    assert loaded.format == "huggingface" and loaded.module is not None


def test_missing_weights_are_refused(hf_folder: Path, tmp_path: Path) -> None:
    import safetensors.torch as st

    d = _copy(hf_folder, tmp_path / "partial")
    sd = st.load_file(d / "model.safetensors")
    dropped = [k for k in sd if ".layer.1." in k]
    st.save_file({k: v for k, v in sd.items() if k not in dropped}, d / "model.safetensors",
                 metadata={"format": "pt"})
    with pytest.raises(InputError, match=rf"lacks {len(dropped)} of the model's \d+ tensors "
                                         r"\(bert\.encoder\.layer\.1\..*, …\)"):
        load_model(d)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_malformed_config_json(hf_folder: Path, tmp_path: Path, text: str) -> None:
    d = _copy(hf_folder, tmp_path / "badcfg")
    (d / "config.json").write_text(text)
    with pytest.raises(InputError, match="config.json"):
        load_model(d)
    res = run_cli("inspect", str(d))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "config.json" in res.stderr


def test_empty_data_file_with_hf_model_is_exit_2(hf_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "val.pt").write_bytes(b"")
    res = run_cli(str(hf_folder), "--budget", "1%", "--data", str(tmp_path / "val.pt"),
                  "-o", str(tmp_path / "out.onnx"), *FAST)
    assert res.returncode == 2, res.stderr
    assert "val.pt" in res.stderr and "empty" in res.stderr and "Aborted" not in res.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_out_of_vocabulary_ids_with_hf_model_are_exit_2(hf_folder: Path, tmp_path: Path) -> None:
    data = make_token_data(6, 8, vocab=128)
    data["input_ids"][4, 3] = 500
    torch.save(data, tmp_path / "val.pt")
    res = run_cli(str(hf_folder), "--budget", "1%", "--data", str(tmp_path / "val.pt"),
                  "-o", str(tmp_path / "out.onnx"), "--metric", "agreement", *FAST)
    assert res.returncode == 2, res.stderr
    assert "'input_ids'" in res.stderr and "row 4" in res.stderr and "128" in res.stderr
    assert "distilled site" not in res.stderr


# --- issue 25: unexpected tensors (item 7) and a folder's own code (item 16) -------------------


def test_unexpected_weights_are_refused(hf_folder: Path, tmp_path: Path) -> None:
    """A 3-layer checkpoint under the 2-layer config: transformers would drop layer 2 and the
    compile optimise a truncated model; refused, naming the unexpected tensors."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig.from_pretrained(hf_folder)
    cfg.num_hidden_layers = 3
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "three")
    d = _copy(hf_folder, tmp_path / "extra")
    (d / "model.safetensors").write_bytes((tmp_path / "three" / "model.safetensors").read_bytes())
    with pytest.raises(InputError, match=r"holds \d+ tensors the model built from its "
                                         r"config\.json .*bert\.encoder\.layer\.2\."):
        load_model(d)
    res = run_cli("inspect", str(d))
    assert res.returncode == 2 and "layer.2" in res.stderr, res.stderr


_EVIL = """import pathlib
pathlib.Path({marker!r}).touch()
from transformers import BertConfig, BertModel
class EvilConfig(BertConfig):
    model_type = {model_type!r}
class EvilModel(BertModel):
    config_class = EvilConfig
"""


@pytest.mark.parametrize("model_type", ["bert", "evil-bert"], ids=["known-type", "own-type"])
def test_a_folders_own_code_is_never_run(hf_folder: Path, tmp_path: Path, model_type: str) -> None:
    """config.json with auto_map: refused with a message (exit 2), even when the user would
    answer transformers' prompt with "y"; --ignore-auto-map loads the built-in class of a
    known model_type, and refuses an unknown one. The folder's code never runs."""
    import json

    marker = tmp_path / "ran"
    d = _copy(hf_folder, tmp_path / "custom")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                       "AutoModelForSequenceClassification": "evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil.py").write_text(_EVIL.format(marker=str(marker), model_type=model_type))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run([*CLI, "inspect", str(d)], capture_output=True, text=True, env=env,
                         input="y\ny\n", timeout=600)
    assert res.returncode == 2 and "auto_map" in res.stderr, res.stderr
    assert "--ignore-auto-map" in res.stderr and not marker.exists()
    res = subprocess.run([*CLI, "inspect", str(d), "--ignore-auto-map"], capture_output=True,
                         text=True, env=env, input="y\ny\n", timeout=600)
    assert not marker.exists()
    if model_type == "bert":
        assert res.returncode == 0 and "site1" in res.stdout, res.stderr
    else:
        assert res.returncode == 2 and "internal error" not in res.stderr, res.stderr


# Issue 25 item 6: a folder is loaded as the class its config's `architectures` names.

def _tiny_gpt2_lm(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=1, eos_token_id=2)
    GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_lm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_gpt2_lm(tmp_path_factory.mktemp("hf") / "gpt2")


def test_lm_head_folder_loads_its_architecture_with_the_head(gpt2_lm_folder: Path) -> None:
    from transformers import GPT2LMHeadModel

    loaded = load_model(gpt2_lm_folder)
    assert type(loaded.module) is GPT2LMHeadModel
    ids = torch.randint(3, 64, (2, 7))
    out = loaded.module(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.logits.shape == (2, 7, 64)  # over the vocabulary, not the 32 hidden units


def test_unknown_architecture_is_refused_not_loaded_as_the_base(gpt2_lm_folder: Path,
                                                                tmp_path: Path) -> None:
    import json

    d = _copy(gpt2_lm_folder, tmp_path / "custom")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MyGPT2WithValueHead"]  # no auto_map: that is refused before
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"MyGPT2WithValueHead.*not a transformers class"):
        load_model(d)


def test_architecture_of_another_model_type_is_refused(gpt2_lm_folder: Path,
                                                       tmp_path: Path) -> None:
    import json

    d = _copy(gpt2_lm_folder, tmp_path / "mixed")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["BertForSequenceClassification"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"BertForSequenceClassification.*'bert'.*'gpt2'"):
        load_model(d)


@pytest.mark.slow  # a compile with the decoder export: minutes
def test_lm_head_folder_compiles_to_logits_over_the_vocabulary(gpt2_lm_folder: Path,
                                                               tmp_path: Path) -> None:
    """The LM head survives (logits over the vocabulary, in the hybrid and its decoder), and
    the decoder's parity check stays inside GPT-2's 64 learned positions (its 64 greedy steps
    after 12-token prompts used to index position 76: an internal error, nothing written)."""
    import json

    import onnx

    ids = torch.randint(3, 64, (12, 12), generator=torch.Generator().manual_seed(0))
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "val.pt")
    out = tmp_path / "h.onnx"
    res = run_cli(str(gpt2_lm_folder), "--budget", "50%", "--data", str(tmp_path / "val.pt"),
                  "-o", str(out), "--no-bench", "--max-linear", "1", *FAST)
    assert res.returncode == 0, res.stderr
    graph = onnx.load(out).graph
    assert graph.output[0].name == "logits"
    assert graph.output[0].type.tensor_type.shape.dim[-1].dim_value == 64
    report = json.loads(out.with_suffix(".report.json").read_text())
    parity = report["stateful"]["hybrid"]["parity"]
    assert parity["tokens_equal"] and 12 + parity["steps"] <= 64, parity
    meta = {m.key: m.value for m in onnx.load(out.with_suffix(".decoder.onnx")).metadata_props}
    info = json.loads(meta["dtr_compile.decoder"])
    assert info["position_table"] == 64 and info["model_type"] == "gpt2"
