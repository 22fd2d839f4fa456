"""``--heal`` in a compile: the rounds in the report (JSON and Markdown) and the ledgers, the
healed students with adapters exported (prefill ONNX and stateful decoder, both verified), and a
compile killed (SIGKILL) in the middle of its heal that ``--resume`` finishes with the artifacts
of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dtr_compile.config import CompileConfig
from dtr_compile.errors import InputError
from dtr_compile.pipeline import compile_model
from dtr_compile.report import report_paths
from dtr_compile.search.ledger import read_ledger
from tests.test_heal import VOCAB, SharpLlama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sharp tiny Llama exported, 8 validation and 16 calibration rows of 32 tokens."""
    d = tmp_path_factory.mktemp("heal_llm")
    ids = torch.randint(1, VOCAB, (24, 32), generator=torch.Generator().manual_seed(1))
    auto = torch.export.Dim.AUTO
    prog = torch.export.export(SharpLlama(), (), kwargs={"input_ids": ids[:2, :16].clone()},
                               dynamic_shapes={"input_ids": {0: auto, 1: auto}})
    torch.export.save(prog, d / "model.pt2")
    torch.save({"input_ids": ids[:8]}, d / "val.pt")
    torch.save({"input_ids": ids[8:]}, d / "calib.pt")
    return d


def _onnx_weights(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_compile_with_heal_reports_rounds_and_exports_adapters(llm: Path, tmp_path: Path) -> None:
    out = tmp_path / "h.onnx"
    res = compile_model(CompileConfig(
        model=str(llm / "model.pt2"), output=str(out), data=str(llm / "val.pt"),
        calib=str(llm / "calib.pt"), metric="perplexity", budget="3%", window=4,
        distill_steps=10, heal=True, heal_steps=10, heal_lr=1e-3, heal_rank=2, bench=False,
        decode_steps=8, progress=False, workers=1, cache_dir=str(tmp_path / "cache"),
        time_limit="1h"))
    rep = res.report
    _check_time_limit_section(rep, out)
    heal = rep["heal"]
    assert heal["loss"] == "token-kl" and heal["settings"]["rank"] == 2
    r1 = heal["rounds"][0]
    assert r1["round"] == 1 and r1["linear"] and r1["heal"]["steps"] >= 1
    assert r1["tokens"] == r1["heal"]["tokens"] > 0 and r1["heal_seconds"] > 0
    assert r1["metric_after_heal"] is not None
    assert heal["stop_reason"]
    if r1["heal_kept"]:
        # the delivered hybrid is the healed one: its students carry the adapters
        from dtr_compile.heal.adapters import AdaptedStudent

        assert rep["final_metric"] == pytest.approx(r1["metric_after_heal"]) or \
            len(heal["rounds"]) > 1
        assert "m_best" not in rep["outputs"]
        assert rep["schedule"]["evaluations"][-1]["phase"] in ("heal",) or len(heal["rounds"]) > 1
        hybrid_students = [m for name, m in res.hybrid.named_modules()
                           if isinstance(m, AdaptedStudent)]
        assert len(hybrid_students) == len(rep["replaced"])
    assert rep["parity_ok"], rep["parity"]
    assert rep["stateful"]["hybrid"]["parity"]["tokens_equal"], rep["stateful"]
    md = report_paths(out.with_suffix(".report.json")).markdown.read_text()
    assert "## Heal (search → heal rounds)" in md and "| round | linear | added |" in md
    assert "heal round 1" in rep["timings_s"] and "heal targets" in rep["timings_s"]
    # round 1's ledger is the search's; a later round has its own, based on the earlier sites
    for r, info in heal["searches"].items():
        header, _, _ = read_ledger(info["ledger"])
        assert header is not None
        if int(r) > 1:
            assert header["inputs"]["base"] == ",".join(heal["rounds"][int(r) - 2]["linear"])
    # a heal of the same inputs comes from the cache
    res2 = compile_model(CompileConfig(
        model=str(llm / "model.pt2"), output=str(tmp_path / "again" / "h.onnx"),
        data=str(llm / "val.pt"), calib=str(llm / "calib.pt"), metric="perplexity",
        budget="3%", window=4, distill_steps=10, heal=True, heal_steps=10, heal_lr=1e-3,
        heal_rank=2, bench=False, decoder=False, progress=False, workers=1,
        cache_dir=str(tmp_path / "cache")))
    assert res2.report["heal"]["rounds"][0]["heal"]["cached"]
    assert res2.report["replaced"] == rep["replaced"]
    assert res2.report["final_metric"] == pytest.approx(rep["final_metric"], abs=0)


def _check_time_limit_section(rep: dict, out: Path) -> None:
    """--time-limit 1h: the report's ``time_limit`` section gives each stoppable stage's share,
    computed when it started, counted from the run's start (the search starts after load and
    distillation); the search's limit is its share (2/3 of what is left after the export's
    reserve, with --heal), the heal gets the rest; report.md shows the split."""
    from dtr_compile.timelimit import EXPORT_RESERVE

    tl = rep["time_limit"]
    limit, reserve = 3600.0, 3600.0 * EXPORT_RESERVE
    assert tl["limit_s"] == limit and tl["export_reserve_s"] == pytest.approx(reserve)
    st = tl["stages"]
    assert list(st) == ["distill", "search", "heal"]
    assert 0 < st["distill"]["started_s"] < st["search"]["started_s"] < st["heal"]["started_s"]
    assert st["distill"]["share_s"] == pytest.approx(0.4 * limit)
    avail = limit - st["search"]["started_s"] - reserve
    assert st["search"]["share_s"] == pytest.approx(avail * 2 / 3, abs=0.01)
    assert rep["search"]["limits"]["time_limit_s"] == pytest.approx(st["search"]["share_s"],
                                                                    abs=0.001)
    assert st["heal"]["share_s"] == pytest.approx(limit - st["heal"]["started_s"] - reserve,
                                                  abs=0.01)
    assert st["heal"]["share_s"] >= avail / 3
    for s in st.values():
        assert s["used_s"] is not None and s["used_s"] >= 0 and not s["stopped_by_limit"]
    assert 0 < tl["elapsed_s"] < limit
    md = report_paths(out.with_suffix(".report.json")).markdown.read_text()
    assert "## Time limit" in md and "| search |" in md


def test_heal_flags_are_checked_before_any_work(llm: Path, tmp_path: Path) -> None:
    base = dict(model=str(llm / "model.pt2"), output=str(tmp_path / "h.onnx"),
                data=str(llm / "val.pt"), progress=False)
    for bad, match in ((dict(heal_steps=-1), "--heal-steps -1"),
                       (dict(heal_rank=-2), "--heal-rank -2"),
                       (dict(heal_lr=0.0), "--heal-lr 0.0"),
                       (dict(heal_rows=0), "--heal-rows 0"),
                       (dict(heal_rounds=0), "--heal-rounds 0"),
                       (dict(heal=True, select="best"), "--select most-linear")):
        with pytest.raises(InputError, match=match):
            compile_model(CompileConfig(**base, **bad))  # type: ignore[arg-type]
    assert not (tmp_path / "h.onnx").exists()


def _cli(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    return subprocess.Popen([sys.executable, "-m", "dtr_compile", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # two full compiles (~2 min on 2 cores); the heal's own resume is tested in test_heal.py
def test_heal_killed_then_resumed_gives_the_same_artifacts(llm: Path, tmp_path: Path) -> None:
    """An uninterrupted compile (A) and one killed with SIGKILL once its heal has written a
    checkpoint (B), then rerun with ``--resume``: B's distilled students come from its saved
    students file (the distillation cache is A's), its heal continues from the checkpoint (the
    heal cache is emptied), and the two deliver the same sites, metrics and ONNX weights."""
    cache = tmp_path / "cache"
    flags = ["--data", str(llm / "val.pt"), "--calib", str(llm / "calib.pt"), "--metric",
             "perplexity", "--budget", "3%", "--window", "4", "--distill-steps", "10",
             "--heal", "--heal-steps", "60", "--heal-lr", "1e-3", "--heal-rank", "2",
             "--no-bench", "--no-decoder", "--no-progress", "--workers", "1",
             "--cache-dir", str(cache)]
    a = _cli([str(llm / "model.pt2"), "-o", str(tmp_path / "a" / "h.onnx"), *flags], tmp_path)
    _, err = a.communicate(timeout=900)
    assert a.returncode == 0, err[-3000:]
    shutil.rmtree(cache / "heal")

    out = tmp_path / "b" / "h.onnx"
    ckpt = out.with_suffix(".report.heal1.pt")
    b = _cli([str(llm / "model.pt2"), "-o", str(out), *flags], tmp_path)
    deadline = time.monotonic() + 900
    while not ckpt.exists() and b.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.poll() is None, "the compile ended before its heal wrote a checkpoint"
    b.send_signal(signal.SIGKILL)
    b.communicate(timeout=60)
    assert b.returncode == -signal.SIGKILL
    assert not out.exists()
    resumed = _cli([str(llm / "model.pt2"), "-o", str(out), *flags, "--resume"], tmp_path)
    _, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-3000:]

    ra = json.loads((tmp_path / "a" / "h.report.json").read_text())
    rb = json.loads(out.with_suffix(".report.json").read_text())
    assert rb["search"]["students"]["reused"]
    ha, hb = ra["heal"]["rounds"][0]["heal"], rb["heal"]["rounds"][0]["heal"]
    assert not hb["cached"] and hb["resumed_from_step"] >= 10, hb
    for k in ("steps", "best_step", "init_loss", "final_loss", "tokens", "heldout_history"):
        assert ha[k] == hb[k], k
    assert ra["replaced"] == rb["replaced"]
    assert ra["final_metric"] == rb["final_metric"]
    wa, wb = _onnx_weights(tmp_path / "a" / "h.onnx"), _onnx_weights(out)
    assert wa.keys() == wb.keys()
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
