"""Nothing lost (issue 12): outputs never overwrite inputs or each other, bad flags and paths
fail with exit 2 before the model is loaded, one run at a time per output, artifacts staged
and moved together, modes from the umask, SIGTERM handled like Ctrl-C, plain CI logs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtr_compile.config import CompileConfig
from dtr_compile.errors import InputError
from dtr_compile.fileio import (
    OutputLock,
    Staging,
    atomic_model_path,
    atomic_path,
    clean_stale_temporaries,
    signals_deferred,
)
from dtr_compile.pipeline import compile_model

CLI = [sys.executable, "-m", "dtr_compile"]
FAST = ["--distill-steps", "10", "--max-calib-samples", "8", "--no-progress", "--no-bench"]
ROOT = os.geteuid() == 0
# the package under test, also when a test runs the CLI from another folder
REPO = str(Path(__file__).resolve().parents[1])


def run_cli(*args: str, cwd: str | Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO, **(env or {}))
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=full,
                          timeout=600)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def task(tiny_task, tmp_path) -> dict[str, Path]:
    """A private copy of the tiny task (model.pt2 + val.pt + test.pt) in ``tmp_path``."""
    d = tmp_path / "task"
    d.mkdir()
    shutil.copy(tiny_task["model"], d / "model.pt2")
    shutil.copy(tiny_task["val"], d / "val.pt")
    shutil.copy(tiny_task["test"], d / "test.pt")
    return {"dir": d, "model": d / "model.pt2", "val": d / "val.pt", "test": d / "test.pt"}


def one_line_exit_2(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# --- outputs never overwrite inputs -----------------------------------------------------------


@pytest.mark.parametrize("args, needles", [
    # the most natural command: -o model.onnx beside model.pt2 would write model.pt2
    (["-o", "{d}/model.onnx"], ["pt2 path", "is the model"]),
    (["-o", "{d}/h.onnx", "--report", "{d}/val.pt"], ["must end in .json"]),
    (["-o", "{d}/h.onnx", "--report", "{d}/h.onnx"], ["must end in .json"]),
    (["-o", "{d}/h.onnx", "--report", "{d}/h.config.json"], ["is also the report path"]),
    (["-o", "{d}/val.onnx", "--calib", "{d}/val.pt2"], ["is the --calib"]),
    (["-o", "{d}/h.onnx", "--report", "{d}/r.json", "--calib", "{d}/r.students.pt"],
     ["students path", "is the --calib"]),
    # the ONNX file's external weights (NAME.data) would replace a data file of that name
    (["-o", "{d}/h.onnx", "--calib", "{d}/h.onnx.data"], ["output weights path", "is the --calib"]),
    # the cache folder at an artifact's path would make the final move fail after all the work
    (["-o", "{d}/h.onnx", "--cache-dir", "{d}/h.onnx.data"],
     ["--cache-dir", "is also the output weights path"]),
    (["-o", "{d}/h.onnx", "--cache-dir", "{d}/h.pt2"], ["is also the pt2 path"]),
], ids=["o-beside-model", "report-over-data", "report-over-onnx", "report-over-config",
        "pt2-over-calib", "report-sibling-over-calib", "weights-over-calib", "cache-over-weights",
        "cache-over-pt2"])
def test_outputs_never_overwrite_inputs(task, args, needles) -> None:
    d = task["dir"]
    # inputs named like the artifacts these commands would write
    shutil.copy(task["model"], d / "val.pt2")
    shutil.copy(task["val"], d / "r.students.pt")
    shutil.copy(task["val"], d / "h.onnx.data")
    before = {p: sha(p) for p in d.iterdir()}
    res = run_cli(str(task["model"]), "--data", str(task["val"]), "--budget", "1%",
                  *[a.format(d=d) for a in args])
    one_line_exit_2(res, *needles)
    assert {p: sha(p) for p in d.iterdir()} == before  # nothing written, nothing lost


def test_symlinked_and_hard_linked_outputs_are_the_input(task, tmp_path) -> None:
    d = task["dir"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.pt2").symlink_to(task["model"])  # -o out/m.onnx writes out/m.pt2 = the model
    res = run_cli(str(task["model"]), "--data", str(task["val"]), "-o", str(out / "m.onnx"))
    one_line_exit_2(res, "is the model")
    os.link(task["val"], out / "h.report.json")  # a hard link to the data
    before = sha(task["val"])
    res = run_cli(str(task["model"]), "--data", str(task["val"]), "-o", str(out / "h.onnx"))
    one_line_exit_2(res, "the report path", "is the --data")
    assert sha(task["val"]) == before and sha(d / "model.pt2") == sha(task["model"])


def test_cache_dir_inside_a_model_folder_is_refused(tmp_path) -> None:
    """Issue 25 item 16: the distillation cache never writes into the input model's folder."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    data = tmp_path / "val.pt"
    data.write_bytes(b"x")
    res = run_cli(str(hf), "--data", str(data), "-o", str(tmp_path / "h.onnx"),
                  "--cache-dir", str(hf / "cache"))
    one_line_exit_2(res, "--cache-dir", "inside the model")
    assert sorted(p.name for p in hf.iterdir()) == ["config.json"]


def test_output_inside_a_model_folder_is_refused(tmp_path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    data = tmp_path / "val.pt"
    data.write_bytes(b"x")
    res = run_cli(str(hf), "--data", str(data), "-o", str(hf / "config.onnx"))
    one_line_exit_2(res, "inside the model folder")


# --- bad flags and paths: exit 2, one line, before the model is loaded ------------------------


@pytest.mark.parametrize("flags, needle", [
    (["--eval-batch", "0"], "--eval-batch 0"),
    (["--max-calib-samples", "0"], "--max-calib-samples 0"),
    (["--atol", "-1"], "--atol -1"),
    (["--atol", "nan"], "--atol nan"),
    (["--max-linear", "0"], "--max-linear 0"),
    (["--opset", "30"], "writes opset 27 at most"),
    (["--target", "tensorrt", "--opset", "27"], "LinearAttention, which TensorRT does not import"),
    (["--target", "tensorrt", "--linear-attention", "fused"], "TensorRT does not import"),
    # issue 25 item 16: values torch / numpy refuse deep inside the run
    (["--seed", "18446744073709551616"], "--seed 18446744073709551616"),
    (["--seed", "-1"], "--seed -1"),
    (["--deploy-seq", "100000000000000000000"], "--deploy-seq"),
], ids=["eval-batch-0", "calib-0", "atol-neg", "atol-nan", "max-linear-0", "opset-30",
        "tensorrt-opset-27", "tensorrt-fused", "seed-2-64", "seed-negative", "deploy-seq-1e20"])
def test_bad_flags_fail_before_loading(task, tmp_path, flags, needle) -> None:
    out = tmp_path / "o" / "h.onnx"
    res = run_cli(str(task["model"]), "--data", str(task["val"]), "-o", str(out), *flags)
    one_line_exit_2(res, needle)
    assert not out.parent.exists()


def test_threads_must_be_positive(task, tmp_path) -> None:
    res = run_cli("run", str(tmp_path / "m.onnx"), "--data", str(task["val"]), "--threads", "-3")
    one_line_exit_2(res, "--threads -3")
    res = run_cli("bench", str(tmp_path / "m.onnx"), "--threads", "-3")
    one_line_exit_2(res, "--threads -3")


@pytest.mark.parametrize("case", ["folder", "under-file", "symlink-loop", "cache-dir-file",
                                  "read-only", "proc", "sys"])
def test_unwritable_outputs_fail_up_front(task, tmp_path, case) -> None:
    if case == "read-only" and ROOT:
        pytest.skip("root writes into read-only folders")
    extra: list[str] = []
    if case in ("proc", "sys"):  # issue 25 item 16: even root cannot create files there
        out = Path("/proc/h.onnx") if case == "proc" else Path("/sys/kernel/h.onnx")
        needle = "not writable"
    elif case == "folder":
        out = tmp_path / "h.onnx"
        out.mkdir()
        needle = "is a folder"
    elif case == "under-file":
        (tmp_path / "afile").write_text("x")
        out, needle = tmp_path / "afile" / "h.onnx", "is a file, not a folder"
    elif case == "symlink-loop":
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        out, needle = tmp_path / "loop" / "h.onnx", "loop"
    elif case == "cache-dir-file":
        (tmp_path / "cache").write_text("x")
        out, needle = tmp_path / "h.onnx", "--cache-dir"
        extra = ["--cache-dir", str(tmp_path / "cache")]
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out, needle = ro / "h.onnx", "not writable"
    res = run_cli(str(task["model"]), "--data", str(task["val"]), "-o", str(out), *extra)
    one_line_exit_2(res, needle)


@pytest.mark.parametrize("toml, needle", [
    ("trust_pickle = true\n", "only be given on the command line"),
    ("trust-pickle = true\n", "--trust-pickle"),
    ('export_original = "no"\n', "export_original"),
    ('eval-batch = "8"\n', "expected an integer"),
    ("atol = true\n", "expected a number"),
    ('external-data = "sometimes"\n', "--external-data 'sometimes': choose one of auto, always"),
], ids=["trust-pickle", "trust-pickle-dash", "bool-as-string", "int-as-string", "float-as-bool",
        "unknown-choice"])
def test_config_file_values_are_checked(task, tmp_path, toml, needle) -> None:
    (tmp_path / "dtr.toml").write_text(f'data = "{task["val"]}"\n' + toml)
    res = run_cli(str(task["model"]), "-o", "h.onnx", cwd=tmp_path)
    one_line_exit_2(res, needle)
    # the same in pyproject.toml
    (tmp_path / "dtr.toml").unlink()
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.dtr-compile]\ndata = "{task["val"]}"\n' + toml)
    res = run_cli(str(task["model"]), "-o", "h.onnx", cwd=tmp_path)
    one_line_exit_2(res, needle)


# --- one run per output; staged artifacts; modes -------------------------------------------------


def test_a_live_lock_refuses_a_second_run(task, tmp_path) -> None:
    out = tmp_path / "h.onnx"
    lock = Path(str(out) + ".lock")
    lock.write_text(f"{os.getpid()} {os.uname().nodename}\n")  # this test process is alive
    res = run_cli(str(task["model"]), "--data", str(task["val"]), "-o", str(out))
    one_line_exit_2(res, str(lock), f"pid {os.getpid()}")
    assert lock.exists()  # not ours to remove


def test_stale_lock_is_taken_over_and_released(tmp_path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "h.onnx.lock"
    lock.write_text(f"{dead.pid} {os.uname().nodename}\n")
    with OutputLock(lock):
        assert lock.read_text().split()[0] == str(os.getpid())
        with pytest.raises(InputError, match="another dtr-compile run"):
            OutputLock(lock).acquire()
    assert not lock.exists()


def test_stale_temporaries_are_cleaned(tmp_path) -> None:
    out = tmp_path / "h.onnx"
    junk = [tmp_path / ".h.onnx.abc123.tmp", tmp_path / ".h.onnx.dtr-stage-xyz"]
    junk[0].write_text("half")
    junk[1].mkdir()
    other = tmp_path / ".other.onnx.abc.tmp"  # another output's temporary: left alone
    other.write_text("x")
    assert sorted(clean_stale_temporaries([out])) == sorted(junk)
    assert not any(j.exists() for j in junk) and other.exists()


def test_a_model_moves_with_its_weights_file(tmp_path) -> None:
    """An ONNX model written with external data (``NAME.data``) is placed as a pair, by
    atomic_model_path and by Staging; a failed write leaves the previous pair; a model without
    weights file replaces one that had it (the old ``NAME.data`` goes with it)."""
    out = tmp_path / "h.onnx"
    with atomic_model_path(out) as tmp:
        assert tmp.name == "h.onnx" and tmp.parent != tmp_path  # NAME.data gets the final name
        tmp.write_bytes(b"model-1")
        tmp.with_name("h.onnx.data").write_bytes(b"weights-1")
    assert (out.read_bytes(), (tmp_path / "h.onnx.data").read_bytes()) == (b"model-1", b"weights-1")
    with pytest.raises(RuntimeError), atomic_model_path(out) as tmp:
        tmp.write_bytes(b"model-2")
        tmp.with_name("h.onnx.data").write_bytes(b"weights-2")
        raise RuntimeError("export failed")
    assert (out.read_bytes(), (tmp_path / "h.onnx.data").read_bytes()) == (b"model-1", b"weights-1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.onnx", "h.onnx.data"]

    staging = Staging(out)
    staged = staging.path(out)
    staged.write_bytes(b"model-3")
    staged.with_name("h.onnx.data").write_bytes(b"weights-3")
    staging.commit()
    assert (out.read_bytes(), (tmp_path / "h.onnx.data").read_bytes()) == (b"model-3", b"weights-3")
    assert stat.S_IMODE((tmp_path / "h.onnx.data").stat().st_mode) == \
        stat.S_IMODE(out.stat().st_mode)
    staging = Staging(out)
    staging.path(out).write_bytes(b"model-4, weights inside")
    staging.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.onnx"]


def test_weights_file_takes_its_models_mode(tmp_path) -> None:
    out = tmp_path / "h.onnx"
    out.write_bytes(b"model-1")
    out.chmod(0o600)  # the user made the model private: the new weights beside it stay private
    (tmp_path / "h.onnx.data").write_bytes(b"weights-1")
    (tmp_path / "h.onnx.data").chmod(0o644)
    staging = Staging(out)
    staged = staging.path(out)
    staged.write_bytes(b"model-2")
    staged.with_name("h.onnx.data").write_bytes(b"weights-2")
    staging.commit()
    assert [stat.S_IMODE(p.stat().st_mode) for p in (out, tmp_path / "h.onnx.data")] == [0o600] * 2


@pytest.mark.parametrize("signum, exc", [(signal.SIGINT, KeyboardInterrupt),
                                         (signal.SIGTERM, SystemExit)], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_during_the_moves_waits_for_the_whole_set(tmp_path, monkeypatch, signum,
                                                               exc) -> None:
    """Ctrl-C / SIGTERM between the renames of a commit takes effect once every file is in
    place: never an old model beside new weights, nor a new ONNX beside an old report."""
    def on_term(*_: object) -> None:
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        out = tmp_path / "h.onnx"
        for name, body in (("h.onnx", b"model-1"), ("h.onnx.data", b"weights-1"),
                           ("h.report.json", b"report-1")):
            (tmp_path / name).write_bytes(body)
        staging = Staging(out)
        staged = staging.path(out)
        staged.write_bytes(b"model-2")
        staged.with_name("h.onnx.data").write_bytes(b"weights-2")
        staging.path(tmp_path / "h.report.json").write_bytes(b"report-2")
        real_replace, calls = os.replace, []

        def replace(src, dst):  # the signal arrives right after the first rename (the weights)
            real_replace(src, dst)
            calls.append(dst)
            if len(calls) == 1:
                os.kill(os.getpid(), signum)

        monkeypatch.setattr(os, "replace", replace)
        handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
        with pytest.raises(exc):
            staging.commit()
        assert len(calls) == 3  # every move ran before the interrupt took effect
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
        assert [(tmp_path / n).read_bytes() for n in ("h.onnx", "h.onnx.data", "h.report.json")] \
            == [b"model-2", b"weights-2", b"report-2"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_held_signals_are_delivered_once_and_sigterm_wins(monkeypatch) -> None:
    """Both signals held: SIGTERM's handler runs (a stop beats a Ctrl-C); with none, the body
    runs as is and the handlers are back."""
    got: list[int] = []

    def on_term(*_: object) -> None:
        got.append(signal.SIGTERM)
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        with pytest.raises(SystemExit), signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            got.append(0)  # the body goes on
        assert got == [0, signal.SIGTERM]
        with signals_deferred():
            pass
        assert signal.getsignal(signal.SIGTERM) is on_term
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_stale_model_folder_is_cleaned(tmp_path) -> None:
    folder = tmp_path / ".h.onnx.abc123.tmp"  # atomic_model_path's, from a killed run
    folder.mkdir()
    (folder / "h.onnx.data").write_bytes(b"half")
    assert clean_stale_temporaries([tmp_path / "h.onnx"]) == [folder]
    assert not folder.exists()


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_artifact_modes_follow_the_umask(tmp_path, mask, mode) -> None:
    old = os.umask(mask)
    try:
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("{}")
        staging = Staging(tmp_path / "h.onnx")
        staging.path(tmp_path / "h.onnx").write_bytes(b"onnx")
        staging.commit()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "h.onnx").stat().st_mode) == mode
    # a replaced file keeps its own mode
    (tmp_path / "a.json").chmod(0o640)
    with atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640


@pytest.fixture(scope="module")
def compiled(tiny_task, tmp_path_factory) -> tuple[CompileConfig, Path]:
    """One real compile under umask 022, in-process (its distilled weights cached)."""
    out = tmp_path_factory.mktemp("safe") / "h.onnx"
    config = CompileConfig(model=tiny_task["model"], output=str(out), data=tiny_task["val"],
                           budget="10%", metric="agreement", distill_steps=10,
                           max_calib_samples=8, progress=False)
    old = os.umask(0o022)
    try:
        compile_model(config)
    finally:
        os.umask(old)
    return config, out


def test_artifacts_are_readable_by_others(compiled) -> None:
    _config, out = compiled
    files = [out, out.with_suffix(".pt2"), out.with_suffix(".report.json"),
             out.with_suffix(".config.json"), out.with_suffix(".report.md")]
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == \
        {f.name: "0o644" for f in files}
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".h.onnx")]
    assert leftovers == [] and not Path(str(out) + ".lock").exists()


def test_an_interrupted_run_leaves_the_previous_set_whole(compiled, monkeypatch) -> None:
    config, out = compiled
    before = {p.name: sha(p) for p in out.parent.iterdir() if p.is_file()
              and not p.name.endswith((".ledger.jsonl", ".students.pt"))}
    import dtr_compile.pipeline as pipeline

    def killed(*a, **k):
        raise KeyboardInterrupt  # after the ONNX files were exported (staged), before the move

    monkeypatch.setattr(pipeline, "write_report", killed)
    with pytest.raises(KeyboardInterrupt):
        compile_model(dataclasses.replace(config, budget="50%", seed=1))
    after = {p.name: sha(p) for p in out.parent.iterdir() if p.is_file()
             and not p.name.endswith((".ledger.jsonl", ".students.pt"))}
    assert after == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".h.onnx")]
    assert not Path(str(out) + ".lock").exists()


# --- SIGTERM and CI logs ----------------------------------------------------------------------


SLOW_METRIC = '''
import time
import torch

def agreement(outputs, labels, reference):
    time.sleep(1.0)
    return float((outputs.argmax(-1) == reference.argmax(-1)).float().mean())
'''


def test_sigterm_prints_the_resume_hint_and_exits_143(tiny_task, tmp_path) -> None:
    (tmp_path / "slowmetric.py").write_text(SLOW_METRIC)
    out = tmp_path / "h.onnx"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}")
    proc = subprocess.Popen([*CLI, tiny_task["model"], "--data", tiny_task["val"], "-o", str(out),
                             "--budget", "10%", "--metric", "slowmetric:agreement", *FAST],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ledger = out.with_suffix(".report.ledger.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ledger.is_file() and len(ledger.read_text().splitlines()) >= 2:  # one evaluation done
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "terminated (SIGTERM)" in stderr and "--resume" in stderr
    assert "rerun with --resume" in " ".join(stderr.split())  # the search's own hint
    assert not out.exists() and not Path(str(out) + ".lock").exists()


def test_ci_logs_are_plain_lines(task, tmp_path) -> None:
    """stderr is a pipe here, as in CI: no wrapping at 80 columns, no ``file.py:123`` column."""
    long_dir = tmp_path / ("d" * 120)
    long_dir.mkdir()
    res = run_cli(str(task["model"]), "--data", str(task["val"]), "-o",
                  str(long_dir / "h.onnx"), "--budget", "10%", "--metric", "agreement",
                  "--max-linear", "1", *FAST)
    assert res.returncode in (0, 3), res.stderr
    lines = res.stderr.splitlines()
    assert not any(".py:" in ln for ln in lines), res.stderr
    found = [ln for ln in lines if "found site0" in ln]
    assert len(found) == 1 and found[0].startswith("[") and found[0].rstrip() == found[0]
    # a long message stays on one line
    assert any(str(long_dir) in ln for ln in lines if "removed" in ln or "resum" in ln
               or "ledger" in ln), res.stderr
    report = json.loads((long_dir / "h.report.json").read_text())
    assert report["artifacts"]["onnx"] == str(long_dir / "h.onnx")


# --- every artifact is locked; the tokenizer folder is a staged artifact (issue 25) ------------


@pytest.mark.parametrize("shared", ["report", "decoder"])
def test_two_runs_sharing_an_artifact_cannot_both_write(task, tmp_path, monkeypatch,
                                                        shared) -> None:
    """Issue 25 item 3: run B (another -o) while run A holds its locks: the same --report (so
    ledger and students), or B's -o is A's decoder path. B exits 2 naming the shared path
    instead of replacing A's files; once A is done, B runs."""
    import dtr_compile.pipeline as pipeline

    a = CompileConfig(model=str(task["model"]), output=str(tmp_path / "a.onnx"),
                      data=str(task["val"]), report=str(tmp_path / "shared.report.json"),
                      progress=False)
    b = dataclasses.replace(a, output=str(tmp_path / "b.onnx"))
    needle = "shared.report.json"
    if shared == "decoder":
        b = dataclasses.replace(a, output=str(tmp_path / "a.decoder.onnx"), report=None)
        needle = "a.decoder.onnx"
    seen: list[str] = []

    def fake_compile(config, *args, **kwargs):  # stands for the whole compile
        seen.append(config.output)
        if config.output == a.output:  # while A holds its locks
            with pytest.raises(InputError, match="another dtr-compile run") as info:
                compile_model(b)
            assert needle in str(info.value)
        return config.output

    monkeypatch.setattr(pipeline, "_compile", fake_compile)
    assert compile_model(a) == a.output
    assert seen == [a.output]  # B never started while A ran
    assert compile_model(b) == b.output  # A's locks are released
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".lock")]


def _tokenizer_source(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_text(f"{body} {name}")
        (folder / name).chmod(0o600)  # the source's own mode is not the artifact's
    return folder


def test_tokenizer_folder_is_staged_with_the_artifacts(tmp_path) -> None:
    """Issue 25 item 4: the tokenizer folder is written into the run's staging folder and moved
    with the set: until the commit the old one stands whole (an interrupted run leaves the old
    decoder beside the old tokenizer); at the commit it is replaced whole, with an artifact's
    modes (0755 / 0644 under umask 022, not mkdtemp's 0700)."""
    from dtr_compile.exporters.stateful import copy_tokenizer, tokenizer_path

    out = tmp_path / "h.onnx"
    old = tokenizer_path(out)
    old.mkdir()
    (old / "tokenizer.json").write_text("old")
    (old / "notes.txt").write_text("what the folder held before")
    src = _tokenizer_source(tmp_path / "model.tokenizer", "new")
    prev = os.umask(0o022)
    try:
        staging = Staging(out)
        assert copy_tokenizer(src, out, write_to=staging.path) == old
        # before the commit (an interrupt, a failed export): the old folder, untouched
        assert sorted(p.name for p in old.iterdir()) == ["notes.txt", "tokenizer.json"]
        assert (old / "tokenizer.json").read_text() == "old"
        staging.commit()
        assert sorted(p.name for p in old.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
        assert (old / "tokenizer.json").read_text() == "new tokenizer.json"
        assert stat.S_IMODE(old.stat().st_mode) == 0o755
        assert {stat.S_IMODE(p.stat().st_mode) for p in old.iterdir()} == {0o644}
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        # without a staging folder: staged and moved at once, with the same modes
        shutil.rmtree(old)
        copy_tokenizer(src, out)
        assert stat.S_IMODE(old.stat().st_mode) == 0o755
        assert {stat.S_IMODE(p.stat().st_mode) for p in old.iterdir()} == {0o644}
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")
                    or p.name.startswith("h.tokenizer.")]
    finally:
        os.umask(prev)


def test_a_file_at_the_tokenizer_path_is_exit_2_up_front(task, tmp_path) -> None:
    """Issue 25 item 4: the tokenizer folder is in the write plan: a file at its path is found
    before the model is loaded, not after the whole compile."""
    (tmp_path / "h.tokenizer").write_text("not a folder")
    res = run_cli(str(task["model"]), "--data", str(task["val"]), "-o", str(tmp_path / "h.onnx"))
    one_line_exit_2(res, "h.tokenizer", "tokenizer folder")
    assert (tmp_path / "h.tokenizer").read_text() == "not a folder"
    assert not (tmp_path / "h.onnx").exists()


@pytest.mark.parametrize("inside", ["data", "report", "cache"])
def test_nothing_lies_inside_the_tokenizer_folder(task, tmp_path, inside) -> None:
    """The tokenizer folder is replaced whole: an input, another artifact or the cache inside
    it would be deleted by the commit; refused up front."""
    tok = tmp_path / "h.tokenizer"
    tok.mkdir()
    data = task["val"]
    extra: list[str] = []
    if inside == "data":
        shutil.copy(task["val"], tok / "val.pt")
        data = tok / "val.pt"
    elif inside == "report":
        extra = ["--report", str(tok / "r.json")]
    else:
        extra = ["--cache-dir", str(tok / "cache")]
    res = run_cli(str(task["model"]), "--data", str(data), "-o", str(tmp_path / "h.onnx"),
                  *extra)
    one_line_exit_2(res, "tokenizer folder")


def test_tokenizer_links_out_of_their_folder_are_refused(task, tmp_path) -> None:
    """A crafted model.tokenizer/ whose tokenizer.json links to a private file elsewhere would
    put that file into the artifacts users ship: refused up front, naming the link. Links into
    the folder itself, and a Hugging Face cache snapshot's links to its blobs/, are fine."""
    from dtr_compile.exporters.stateful import copy_tokenizer, tokenizer_files

    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    tok = task["dir"] / "model.tokenizer"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / "tokenizer.json").symlink_to(secret)
    with pytest.raises(InputError, match="tokenizer.json is a link to .*id_rsa"):
        copy_tokenizer(tok, tmp_path / "out" / "h.onnx")
    assert not (tmp_path / "out" / "h.tokenizer").exists()
    res = run_cli(str(task["model"]), "--data", str(task["val"]), "-o", str(tmp_path / "h.onnx"))
    one_line_exit_2(res, "is a link to", "id_rsa")
    # a Hugging Face cache snapshot: REPO/snapshots/REV/tokenizer.json -> REPO/blobs/HASH
    repo = tmp_path / "models--x"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_text("{}")
    snap = repo / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "tokenizer.json").symlink_to(repo / "blobs" / "abc")
    (snap / "tokenizer_config.json").symlink_to(snap / "tokenizer.json")
    assert [f.name for f in tokenizer_files(snap)] == ["tokenizer.json", "tokenizer_config.json"]
