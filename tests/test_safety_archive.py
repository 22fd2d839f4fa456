"""Nothing run, nothing silently wrong (issue 12): a crafted torch.export archive never runs
code without --trust-pickle; distillation cache entries and ledger lines are verified before
they are trusted; a Hugging Face model exported with its ModelOutput loads."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dtr_compile.config import CompileConfig
from dtr_compile.distill.cache import CACHE_FORMAT, DistillCache, state_digest
from dtr_compile.errors import InputError
from dtr_compile.load import load_model
from dtr_compile.pipeline import compile_model
from dtr_compile.report import report_paths
from dtr_compile.search.ledger import Ledger, line_checksum, read_ledger
from dtr_compile.search.schedule import Evaluation

REPO = str(Path(__file__).resolve().parents[1])


class _Touch:
    """Unpickling this creates ``path``: the stand-in for arbitrary code in a crafted file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _rewrite(src: Path, dst: Path, edit) -> None:
    """Copy the zip ``src`` to ``dst``; ``edit(name, data, add)`` returns a member's new bytes
    (None drops it) and may ``add(name, data)`` members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        extra: list[tuple[str, bytes]] = []
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename), lambda n, d: extra.append((n, d)))
            if data is not None:
                zout.writestr(info.filename, data)
        for name, data in extra:
            zout.writestr(name, data)


def _crafted(tiny_task, tmp_path: Path, kind: str, marker: Path) -> Path:
    src = Path(tiny_task["model"])
    dst = tmp_path / f"{kind}.pt2"
    evil = pickle.dumps(_Touch(str(marker)))
    buf = io.BytesIO()
    torch.save(_Touch(str(marker)), buf)
    evil_torch = buf.getvalue()

    def edit(name: str, data: bytes, add):
        root, _, rel = name.partition("/")
        if kind == "use-pickle" and rel.endswith("data/weights/model_weights_config.json"):
            cfg = json.loads(data)
            fqn = next(iter(cfg["config"]))
            cfg["config"][fqn]["use_pickle"] = True
            cfg["config"][fqn]["path_name"] = "weight_evil"
            add(f"{root}/data/weights/weight_evil", evil_torch)
            return json.dumps(cfg).encode()
        if kind == "opaque" and rel.endswith("data/constants/model_constants_config.json"):
            cfg = json.loads(data)
            cfg["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False,
                                     "use_pickle": True, "tensor_meta": None}
            add(f"{root}/data/constants/opaque_obj_0", evil)
            return json.dumps(cfg).encode()
        if kind == "sample-inputs" and rel.startswith("data/sample_inputs/"):
            return evil_torch
        return data

    _rewrite(src, dst, edit)
    return dst


@pytest.mark.parametrize("kind", ["use-pickle", "opaque", "sample-inputs"])
def test_crafted_archive_runs_no_code_without_trust_pickle(tiny_task, tmp_path, kind) -> None:
    marker = tmp_path / "pwned"
    crafted = _crafted(tiny_task, tmp_path, kind, marker)
    # the archive is live: torch.export.load itself runs its pickle (in a child process)
    subprocess.run([sys.executable, "-c", "import sys, torch\ntry:\n    torch.export.load("
                    f"{str(crafted)!r})\nexcept Exception:\n    pass"], check=True,
                   capture_output=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert marker.exists(), "the crafted archive should run code under plain torch.export.load"
    marker.unlink()

    with pytest.raises(InputError, match="--trust-pickle") as info:
        load_model(crafted)
    assert "runs code" in str(info.value)
    assert not marker.exists()
    # the CLI: exit 2, one line, nothing run
    out = tmp_path / "o" / "h.onnx"
    res = subprocess.run([sys.executable, "-m", "dtr_compile", str(crafted), "--data",
                          tiny_task["val"], "-o", str(out)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert res.returncode == 2 and "--trust-pickle" in res.stderr, res.stderr
    assert not marker.exists() and not out.exists()


def _ambiguous(tiny_task, tmp_path: Path, kind: str, marker: Path) -> Path:
    """An archive whose members are read differently by Python's zipfile and torch's reader
    (miniz: the first of two equal names, names compared case-insensitively), or that takes
    torch.export.load's legacy (pre-pt2) path, with a pickle where torch reads it."""
    from torch._export.serde.schema import SCHEMA_VERSION

    src = Path(tiny_task["model"])
    dst = tmp_path / f"{kind}.pt2"
    buf = io.BytesIO()
    torch.save(_Touch(str(marker)), buf)
    evil = buf.getvalue()
    legacy = {"version": ".".join(map(str, SCHEMA_VERSION)).encode(),
              "serialized_state_dict.pt": evil, "serialized_constants.pt": evil,
              "serialized_example_inputs.pt": evil}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/")[0]
        program = zin.read(f"{root}/models/model.json")
        if kind == "legacy":  # the old format alone: every member top-level
            zout.writestr("serialized_exported_program.json", program)
            for name, data in legacy.items():
                zout.writestr(name, data)
            return dst
        for info in zin.infolist():
            data = zin.read(info.filename)
            if "/data/sample_inputs/" in info.filename:
                if kind == "duplicate":  # torch reads the first, zipfile the last
                    zout.writestr(info.filename, evil)
                elif kind == "case":  # torch's lookup of .../sample_inputs/model.pt finds it
                    zout.writestr(info.filename.replace("sample_inputs", "SAMPLE_INPUTS"), evil)
                    continue
            zout.writestr(info.filename, data)
        if kind == "hybrid":  # a pt2 archive torch cannot list, then its legacy fallback
            zout.writestr("serialized_exported_program.json", program)
            for name, data in legacy.items():
                zout.writestr(name, data)
    return dst


_LIVE = ("import sys, torch\nfrom pathlib import Path\nfor p, m in zip(sys.argv[1::2], "
         "sys.argv[2::2]):\n    try:\n        torch.export.load(p)\n    except Exception:\n"
         "        pass\n    print(p, Path(m).exists())\n")


def test_ambiguous_or_legacy_archive_runs_no_code(tiny_task, tmp_path) -> None:
    """Issue 25 item 1: duplicate member names, names equal but for case, and the legacy
    format torch.export.load falls back to are judged as torch reads them: refused, no code."""
    kinds = ["duplicate", "case", "legacy", "hybrid"]
    crafted = {k: _ambiguous(tiny_task, tmp_path, k, tmp_path / f"pwned-{k}") for k in kinds}
    args = [a for k in kinds for a in (str(crafted[k]), str(tmp_path / f"pwned-{k}"))]
    live = subprocess.run([sys.executable, "-c", _LIVE, *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert live.stdout.count(" True") == len(kinds), live.stdout + live.stderr  # all are live
    for k in kinds:
        (tmp_path / f"pwned-{k}").unlink()
        with pytest.raises(InputError) as info:
            load_model(crafted[k])
        assert "--trust-pickle" in str(info.value) or "ambiguous" in str(info.value), k
        assert not (tmp_path / f"pwned-{k}").exists(), k
    res = subprocess.run([sys.executable, "-m", "dtr_compile", "inspect",
                          str(crafted["duplicate"])], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert res.returncode == 2 and "model.pt" in res.stderr, res.stderr
    assert not (tmp_path / "pwned-duplicate").exists()


def test_plain_archive_still_loads(tiny_task) -> None:
    loaded = load_model(tiny_task["model"])
    assert loaded.format == "torch.export" and loaded.program is not None


def test_hf_model_output_archive_loads_in_a_fresh_process(tmp_path) -> None:
    """An archive whose output is a transformers ModelOutput: loads without the user importing
    transformers first (torch.export.load alone fails in a fresh process)."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 64, (2, 8))
    prog = torch.export.export(model, (), {"input_ids": ids,
                                           "attention_mask": torch.ones_like(ids)})
    path = tmp_path / "hf.pt2"
    torch.export.save(prog, path)
    code = ("import sys, torch\n"
            "try:\n    torch.export.load(sys.argv[1]); print('plain: ok')\n"
            "except Exception:\n    print('plain: failed')\n")
    plain = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                           text=True, timeout=300)
    assert "plain: failed" in plain.stdout  # what users met before
    code = ("import sys\nfrom dtr_compile.load import load_model\n"
            "p = load_model(sys.argv[1]).program\nprint(type(p.call_spec.out_spec).__name__, "
            "p.call_spec.out_spec.type.__name__)\n")
    ours = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert ours.returncode == 0, ours.stderr
    assert "SequenceClassifierOutput" in ours.stdout


# --- the distillation cache -------------------------------------------------------------------


def _entry(cache: DistillCache, key: str, state: dict[str, torch.Tensor], ok: bool = True,
           digest: str | None = None, fmt: str = CACHE_FORMAT) -> Path:
    cache.dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": fmt, "result": json.dumps({"ok": ok, "final_error": 0.01}), "parts": "{}",
            "digest": digest if digest is not None else state_digest(state)}
    save_file(state, str(cache.path(key)), metadata=meta)
    return cache.path(key)


def test_cache_entries_are_verified(tmp_path) -> None:
    warnings: list[str] = []
    cache = DistillCache(tmp_path, on_warning=warnings.append)
    state = {"w": torch.randn(4, 4), "b": torch.randn(4)}
    cache.save("good", state, {"ok": True}, {"site": "x"})
    got = cache.load("good")
    assert got is not None and torch.equal(got[0]["w"], state["w"]) and warnings == []

    nan = {"w": torch.full((4, 4), float("nan")), "b": torch.randn(4)}
    _entry(cache, "nan", nan)  # valid format, valid digest, NaN weights
    inf = {"w": torch.randn(4, 4), "b": torch.tensor([1.0, float("inf"), 0.0, 0.0])}
    _entry(cache, "inf", inf)
    _entry(cache, "altered", state, digest=state_digest({"w": state["w"] + 1, "b": state["b"]}))
    _entry(cache, "nodigest", state, digest="")
    _entry(cache, "foreign", state, fmt="someone else's v1")
    _entry(cache, "failed", state, ok=False)
    cache.path("torn").write_bytes(cache.path("good").read_bytes()[:50])
    for key in ("nan", "inf", "altered", "nodigest", "foreign", "failed", "torn"):
        warnings.clear()
        assert cache.load(key) is None, key
        assert len(warnings) == 1 and "distilling again" in warnings[0], (key, warnings)
    assert cache.load("absent") is None


def test_cache_tampered_bytes_are_a_miss(tmp_path) -> None:
    cache = DistillCache(tmp_path)
    state = {"w": torch.ones(8)}
    p = cache.save("k", state, {"ok": True}, {})
    raw = bytearray(p.read_bytes())
    raw[-4:] = b"\x00\x00\xc0\x7f"  # the last float becomes NaN; header untouched
    p.write_bytes(bytes(raw))
    assert cache.load("k") is None


# --- the ledger ---------------------------------------------------------------------------------


def _ev(linear: tuple[str, ...], metric: float, step: int) -> Evaluation:
    return Evaluation(step=step, candidate=linear[-1], linear=linear, metric=metric, seconds=0.1,
                      within_budget=True, index=step - 1)


def test_edited_or_corrupt_ledger_lines_are_skipped(tmp_path) -> None:
    path = tmp_path / "l.jsonl"
    ledger, _, _ = Ledger.open(path, "fp", resume=False)
    ledger.append(_ev(("s0",), 0.9, 1))
    ledger.append(_ev(("s1",), 0.8, 1))
    ledger.append(_ev(("s0", "s1"), 0.7, 2))
    ledger.close()
    lines = path.read_text().splitlines()
    edited = json.loads(lines[2])
    edited["metric"] = 0.99  # edited without fixing the checksum
    lines[2] = json.dumps(edited, sort_keys=True)
    lines[3] = lines[3][:20] + "X" + lines[3][21:]  # a corrupt byte
    path.write_text("\n".join(lines) + "\n")
    _, entries, bad = read_ledger(path)
    assert [e["linear"] for e in entries] == [["s0"]] and bad == 2
    ledger, known, note = Ledger.open(path, "fp", resume=True)
    ledger.close()
    assert set(known) == {frozenset({"s0"})} and "2 unreadable lines skipped" in note


def test_resume_remeasures_a_forged_ledger(tiny_task, tmp_path) -> None:
    """A ledger edited to claim every set fits (checksums recomputed, as a forger would) must not
    ship: --resume re-measures the committed set, finds it beyond the threshold and searches
    again without the ledger."""
    out = tmp_path / "h.onnx"
    # mse against the original with an absolute budget of 0: no linear site can fit
    config = CompileConfig(model=tiny_task["model"], output=str(out), data=tiny_task["val"],
                           budget="0", metric="mse", distill_steps=2, max_calib_samples=4,
                           progress=False, max_linear=2, bench=False)
    first = compile_model(config)
    assert first.report["replaced"] == [] and first.exit_code == 3
    ledger = report_paths(out.with_suffix(".report.json")).ledger
    lines = ledger.read_text().splitlines()
    forged = [lines[0]]
    for line in lines[1:]:
        rec = json.loads(line)
        rec["metric"] = 0.0  # "exactly the original"
        rec["sha256"] = line_checksum(rec)
        forged.append(json.dumps(rec, sort_keys=True))
    ledger.write_text("\n".join(forged) + "\n")
    res = compile_model(dataclasses.replace(config, resume=True))
    check = res.report["search"]["resume_check"]
    assert check is not None and not check["trusted"]
    assert check["ledger_metric"] == 0.0 and check["measured_metric"] > 0.0
    # what ships is the honest search's result: nothing linear, exit 3, every step measured
    assert res.report["replaced"] == [] and res.exit_code == 3
    assert res.report["search"]["evaluations_replayed"] == 0
    assert "discarded" in res.report["search"]["resume"]


# --- the saved students (issue 25 item 5) ------------------------------------------------------


def test_resume_distils_again_when_saved_students_were_edited(tmp_path) -> None:
    """`--resume` reloads `*.report.students.pt` only when it matches the digest saved with
    it: weights edited in place (the file still loads, its fingerprint still matches) are
    distilled again, never exported."""
    from dtr_compile.search.ledger import load_students, save_students

    path = tmp_path / "h.report.students.pt"
    torch.manual_seed(0)
    students = {"site0": torch.nn.Linear(4, 4), "site1": torch.nn.Linear(4, 4)}
    save_students(path, "fp", students, {sid: {"ok": True, "final_error": 0.01}
                                         for sid in students})
    def build(sid: str) -> torch.nn.Module:
        return torch.nn.Linear(4, 4)

    got = load_students(path, "fp", build)
    assert not isinstance(got, str), got
    assert torch.equal(got[0]["site1"].weight, students["site1"].weight)

    state = torch.load(path, weights_only=True)
    state["sites"]["site1"]["state_dict"]["weight"] += 0.5  # an edit that keeps the format
    torch.save(state, path)
    got = load_students(path, "fp", build)
    assert isinstance(got, str) and "digest" in got, got

    state["sites"]["site1"]["state_dict"]["weight"] -= 0.5  # weights back, result edited
    state["sites"]["site1"]["result"]["final_error"] = 0.0
    torch.save(state, path)
    assert isinstance(load_students(path, "fp", build), str)
    state["sites"]["site1"]["result"]["final_error"] = 0.01
    del state["digest"]  # no digest at all (an older file, or one stripped of it)
    torch.save(state, path)
    got = load_students(path, "fp", build)
    assert isinstance(got, str) and "digest" in got, got
