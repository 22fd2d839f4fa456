"""--device / --dtype, and one compile over 2 CPU ranks (gloo) against a one-process run.

The ranks are started as torchrun starts them: processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment. A user metric
(``failmetric:metric``, written into the run's folder) injects failures on one rank: it raises,
or kills its own process, at its N-th call (``DTR_TEST_FAIL=rank:call:raise|kill``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dtr_compile.cli import main
from dtr_compile.device import Placement, move_graph, resolve_device
from dtr_compile.errors import DependencyError, InputError
from dtr_compile.parallel import TIMEOUT_ENV, Group, batch_rows, shard, timeout_s
from dtr_compile.report import report_paths
from dtr_compile.search.ledger import read_ledger

CLI = [sys.executable, "-m", "dtr_compile"]
FAST = ["--no-bench", "--distill-steps", "10", "--max-calib-samples", "8", "--no-progress", "--budget", "10%",
        "--device", "cpu"]

FAIL_METRIC = '''
import os, signal
from dtr_compile.metrics import agreement

_calls = [0]


def metric(outputs, labels, reference):
    """agreement, failing on one rank at one call when DTR_TEST_FAIL=rank:call:how says so."""
    _calls[0] += 1
    spec = os.environ.get("DTR_TEST_FAIL", "")
    if spec:
        rank, call, how = spec.split(":")
        if os.environ.get("RANK", "0") == rank and _calls[0] == int(call):
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError("injected failure")
    return agreement(outputs, labels, reference)


metric.bounds = (0.0, 1.0)
'''


# --- units ------------------------------------------------------------------------------------


def test_shard_and_batch_rows_cover_everything_once() -> None:
    sites = [f"site{i}" for i in range(7)]
    for world in (1, 2, 3, 8):
        got = [shard(sites, Group(r, world)) for r in range(world)]
        assert sorted(s for part in got for s in part) == sorted(sites)
        assert got[0][0] == "site0" and (world == 1 or got[1][0] == "site1")
        for n, batch in ((48, 32), (48, 7), (5, 32), (100, 10)):
            spans = [batch_rows(n, batch, Group(r, world)) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            for (a, b), (c, _) in zip(spans, spans[1:], strict=False):
                assert b == c and a <= b
            # whole batches only: every boundary but the end is a multiple of the batch size
            assert all(a % batch == 0 or a == n for a, _ in spans)


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf", "1e15"])
def test_dist_timeout_must_be_positive_seconds(monkeypatch, value) -> None:
    monkeypatch.setenv(TIMEOUT_ENV, value)
    with pytest.raises(InputError, match=f"{TIMEOUT_ENV}='{value}' is not a number of seconds in"):
        timeout_s()
    monkeypatch.setenv(TIMEOUT_ENV, "12.5")
    assert timeout_s() == 12.5
    monkeypatch.delenv(TIMEOUT_ENV)
    assert timeout_s() == 3600.0


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="unknown --device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(InputError, match="unknown --dtype"):
        Placement.parse("cpu", "int8")
    if not torch.cuda.is_available():
        with pytest.raises(DependencyError, match="no CUDA device"):
            resolve_device("cuda:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cli_device_cuda_without_cuda_exits_2(tiny_task, tmp_path) -> None:
    res = CliRunner().invoke(main, [tiny_task["model"], "--data", tiny_task["val"],
                                    "-o", str(tmp_path / "h.onnx"), "--device", "cuda"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--device cuda: no CUDA device" in lines[0], res.output
    assert not any(tmp_path.iterdir())  # nothing written


def test_move_graph_bf16_keeps_the_original(tiny_task) -> None:
    from dtr_compile.capture import capture
    from dtr_compile.load import load_model

    from .conftest import make_token_data

    gm = capture(load_model(tiny_task["model"])).gm
    data = make_token_data(4, 12, seed=3)
    ref = gm(data["input_ids"], data["attention_mask"])
    placement = Placement(torch.device("cpu"), torch.bfloat16)
    moved = placement.graph(gm)
    assert moved is not gm and Placement().graph(gm) is gm
    assert all(p.dtype == torch.float32 for p in gm.parameters())  # the original is untouched
    assert all(p.dtype == torch.bfloat16 for p in moved.parameters())
    assert not any(n.target is torch.ops.aten._assert_tensor_metadata.default
                   for n in moved.graph.nodes)
    with placement.autocast():
        out = moved(data["input_ids"], data["attention_mask"])
    r = ref[0] if isinstance(ref, (tuple, list)) else ref
    o = out[0] if isinstance(out, (tuple, list)) else out
    assert o.dtype == torch.bfloat16
    err = (o.float() - r).abs().max().item()
    assert 0 < err < 0.05 * max(1.0, r.abs().max().item())  # bf16-close, not bitwise fp32
    # the device arguments of the graph are retargeted (to the same cpu here)
    same = move_graph(gm, torch.device("cpu"), torch.float32)
    out32 = same(data["input_ids"], data["attention_mask"])
    o32 = out32[0] if isinstance(out32, (tuple, list)) else out32
    assert torch.equal(o32, r)


# --- whole runs -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DTR_DIST_TIMEOUT="300")
    # this checkout's package, whatever the working directory (the runs' folder)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "DTR_TEST_FAIL"):
        env.pop(k, None)
    env.update(extra)
    return env


def _compile(args: list[str], cwd: Path, world: int = 1,
             **extra: str) -> list[subprocess.CompletedProcess[str]]:
    """Run one compile as ``world`` ranks (1: a plain process); their results by rank."""
    if world == 1:
        return [subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd,
                               env=_env(**extra), timeout=600)]
    port = str(_free_port())
    procs = [subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=cwd,
                              env=_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                                       LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, **extra))
             for r in range(world)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.fixture(scope="module")
def task(tiny_task, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dist")
    (d / "failmetric.py").write_text(FAIL_METRIC)
    return d


def _args(tiny_task: dict[str, str], out: Path) -> list[str]:
    return [tiny_task["model"], "--data", tiny_task["val"], "-o", str(out), "--metric",
            "failmetric:metric", "--eval-batch", "8", "--cache-dir", str(out.parent / "cache"),
            *FAST]


def _report(out: Path) -> dict:
    return json.loads(out.with_suffix(".report.json").read_text())


def test_two_ranks_equal_one_process(tiny_task, task) -> None:
    one, two = task / "one" / "h.onnx", task / "two" / "h.onnx"
    [r1] = _compile(_args(tiny_task, one), task)
    assert r1.returncode in (0, 3), r1.stderr
    # --time-limit: every rank asks rank 0 for each stage's share (a collective), none stops
    runs = _compile([*_args(tiny_task, two), "--time-limit", "1h"], task, world=2)
    # rank 0 has the run's exit code; the others leave with 0 (see the torchrun test below)
    assert [r.returncode for r in runs] == [r1.returncode, 0], runs[0].stderr + runs[1].stderr
    assert runs[1].stdout == ""  # rank 1 prints no summary, rank 0 does
    assert "linear sites" in runs[0].stdout
    # rank 0's log names every site, those the other rank distilled too
    for site in _report(one)["distill"]:
        assert f"distilled {site} " in runs[0].stderr, runs[0].stderr
    assert " on rank 1: rel. error" in runs[0].stderr
    a, b = _report(one), _report(two)
    assert b["runtime"]["ranks"] == 2 and a["runtime"]["ranks"] == 1
    assert len(b["runtime"]["memory"]) == 2 and b["runtime"]["memory"][1]["peak_rss_mib"] > 0
    assert b["search"]["ranks"] == 2
    assert list(b["time_limit"]["stages"]) == ["distill", "search"]
    assert b["search"]["limits"]["time_limit_s"] == pytest.approx(
        b["time_limit"]["stages"]["search"]["share_s"], abs=1e-3)
    md = report_paths(two.with_suffix(".report.json")).markdown.read_text()
    assert "on **cpu** in **fp32**, **2 ranks** (gloo)." in md, md
    assert "| rank | peak RSS (MiB)" in md and "\n| 1 | " in md
    assert [r["site"] for r in a["replaced"]] == [r["site"] for r in b["replaced"]]
    assert a["baseline_metric"] == pytest.approx(b["baseline_metric"], abs=1e-6)
    ea, eb = a["schedule"]["evaluations"], b["schedule"]["evaluations"]
    assert [e["linear"] for e in ea] == [e["linear"] for e in eb]
    for x, y in zip(ea, eb, strict=True):
        assert x["metric"] == pytest.approx(y["metric"], abs=1e-6)
    # the students are the same weights: sharded distillation changed nothing
    for sid, res in a["distill"].items():
        assert res["final_error"] == pytest.approx(b["distill"][sid]["final_error"], abs=1e-6)
    assert a["parity_ok"] and b["parity_ok"]
    for pa, pb in zip(a["parity"], b["parity"], strict=True):
        assert pa["max_abs"] == pytest.approx(pb["max_abs"], abs=1e-6)
    # rank 0 stored every site in the cache, the other rank's too
    assert len(list((two.parent / "cache" / "distill").glob("*.safetensors"))) == len(a["sites"])


def test_torchrun_nothing_fits_still_writes_the_original(tiny_task, task) -> None:
    """Exit 3 under torchrun: rank 1 must not leave non-zero (torchrun would stop rank 0 before
    it writes the original and the report); torchrun then says rank 0 exited with 3."""
    out = task / "torchrun" / "h.onnx"
    args = [tiny_task["model"], "--data", tiny_task["val"], "-o", str(out), "--metric", "mse",
            "--budget", "1e-13", "--no-bench", *FAST[:-4], "--device", "cpu"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "dtr_compile", *args],
                         capture_output=True, text=True, cwd=task, env=_env(), timeout=600)
    assert run.returncode == 1, run.stderr  # torchrun's own code for any rank's non-zero exit
    assert "exitcode  : 3" in run.stderr and "SIGTERM" not in run.stderr, run.stderr[-3000:]
    rep = _report(out)
    assert rep["exit_code"] == 3 and rep["runtime"]["ranks"] == 2 and not rep["replaced"]
    assert out.is_file()  # the original model, as a one-process run writes it


def test_a_raising_rank_fails_every_rank_with_its_error(tiny_task, task) -> None:
    out = task / "raise" / "h.onnx"
    # call 1 is the baseline: rank 1 raises before distillation starts
    runs = _compile(_args(tiny_task, out), task, world=2, DTR_TEST_FAIL="1:1:raise")
    # a failing user metric is bad input (exit 2) in one process; every rank stops with that code
    assert [r.returncode for r in runs] == [2, 2], [r.returncode for r in runs]
    for r in runs:
        assert "injected failure" in r.stderr, r.stderr
    assert "rank 1 of 2 failed" in runs[0].stderr
    assert not out.exists()


@pytest.mark.slow
def test_killed_rank_then_resume(tiny_task, task) -> None:
    out = task / "kill" / "h.onnx"
    args = _args(tiny_task, out)
    # call 4: the baseline and two evaluations are done; rank 1 dies in the third
    runs = _compile(args, task, world=2, DTR_TEST_FAIL="1:4:kill")
    assert runs[1].returncode == -signal.SIGKILL
    assert runs[0].returncode not in (0, 3), runs[0].stderr
    assert "lost contact with the other ranks" in runs[0].stderr and "--resume" in runs[0].stderr
    assert not out.exists()
    _, entries, _ = read_ledger(report_paths(out.with_suffix(".report.json")).ledger)
    assert len(entries) >= 2
    runs = _compile([*args, "--resume"], task, world=2)
    assert [r.returncode for r in runs][0] in (0, 3), runs[0].stderr
    rep = _report(out)
    assert rep["search"]["evaluations_replayed"] == len(entries)
    assert rep["search"]["students"]["reused"]
    assert rep["parity_ok"]


def test_bf16_on_cpu(tiny_task, tmp_path) -> None:
    from dtr_compile.config import CompileConfig
    from dtr_compile.pipeline import compile_model

    base = dict(model=tiny_task["model"], data=tiny_task["val"], budget="10%",
                metric="agreement", distill_steps=10, max_calib_samples=8, progress=False,
                device="cpu", cache_dir=str(tmp_path / "cache"), max_linear=1)
    res = compile_model(CompileConfig(output=str(tmp_path / "bf16" / "h.onnx"), dtype="bf16",
                                      **base))
    rep = res.report
    assert rep["runtime"]["dtype"] == "bf16" and rep["runtime"]["device"] == "cpu"
    assert rep["parity_ok"]  # the export is fp32 whatever the teacher ran in
    assert all(r["ok"] for r in rep["distill"].values())
    assert rep["search"]["inputs"]["runtime"] == "cpu/bf16"
    assert rep["runtime"]["memory"][0]["peak_rss_mib"] > 0
    assert rep["runtime"]["memory"][0]["peak_gpu_mib"] is None  # no CUDA in this run
    # the cache keys cover the teacher's device type and dtype: an fp32 run never reuses these
    from safetensors import safe_open

    from dtr_compile.distill.cache import cache_key

    entries = sorted((tmp_path / "cache" / "distill").glob("*.safetensors"))
    assert len(entries) == len(rep["sites"])
    for path in entries:
        with safe_open(str(path), framework="pt") as fh:
            parts = json.loads((fh.metadata() or {})["parts"])
        assert parts["runtime"] == "cpu/bf16" and cache_key(parts) == path.stem
        parts.pop("runtime")
        assert cache_key(parts) != path.stem  # the fp32 key of the same site


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_compile(tiny_task, tmp_path) -> None:
    from dtr_compile.config import CompileConfig
    from dtr_compile.pipeline import compile_model

    res = compile_model(CompileConfig(
        model=tiny_task["model"], output=str(tmp_path / "h.onnx"), data=tiny_task["val"],
        budget="10%", metric="agreement", distill_steps=20, max_calib_samples=8, progress=False,
        device="cuda", dtype="bf16", no_cache=True))
    rep = res.report
    assert rep["runtime"]["device"].startswith("cuda") and rep["runtime"]["dtype"] == "bf16"
    assert rep["runtime"]["memory"][0]["peak_gpu_mib"] > 0
    assert rep["parity_ok"] and all(r["ok"] for r in rep["distill"].values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_moved_graph_on_cuda_matches_cpu(tiny_task) -> None:
    from dtr_compile.capture import capture
    from dtr_compile.device import OnDevice
    from dtr_compile.load import load_model

    from .conftest import make_token_data

    gm = capture(load_model(tiny_task["model"])).gm
    data = make_token_data(4, 12, seed=3)
    ref = gm(data["input_ids"], data["attention_mask"])
    placement = Placement(torch.device("cuda"), torch.float32)
    out = OnDevice(placement.graph(gm), placement)(data["input_ids"], data["attention_mask"])
    r = ref[0] if isinstance(ref, (tuple, list)) else ref
    o = out[0] if isinstance(out, (tuple, list)) else out
    assert o.device.type == "cpu" and (o - r).abs().max().item() < 1e-4


def test_a_rank_error_keeps_the_failed_ranks_exit_code() -> None:
    from dtr_compile.cli import Terminated
    from dtr_compile.parallel import RankError, _exit_code

    assert [_exit_code(e) for e in (Terminated(), KeyboardInterrupt(), InputError("x"),
                                    ValueError("y"))] == [143, 130, 2, 1]
    assert RankError("rank 1 of 2 failed: x", 2).exit_code == 2
