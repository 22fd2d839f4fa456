"""The CLI end to end on a tiny random-weight BERT classifier, and every bad-input path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dtr_compile.exporters.onnx import ort_session

from .conftest import make_token_data

CLI = [sys.executable, "-m", "dtr_compile"]
FAST = ["--distill-steps", "40", "--max-calib-samples", "16", "--no-progress", "--no-bench"]


def run_cli(*args: str, cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH: the package of this checkout, also when cwd is another folder
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def compiled(tiny_task, tmp_path_factory):
    from tests.stateful_fixture import save_tokenizer

    src = tmp_path_factory.mktemp("src")
    (src / "model.pt").write_bytes(Path(tiny_task["model"]).read_bytes())
    save_tokenizer(src / "model.tokenizer")  # an encoder that came with its tokenizer
    out = tmp_path_factory.mktemp("out") / "hybrid.onnx"
    # agreement with the original at a loose budget: some site must fit
    res = run_cli(str(src / "model.pt"), "--budget", "10%", "--data", tiny_task["val"],
                  "-o", str(out), "--metric", "agreement", *FAST)
    return res, out


def test_encoder_gets_its_tokenizer_beside_the_hybrid(compiled) -> None:
    """Issue 25 item 15: the tokenizer is copied for every model, not only for decoders."""
    res, out = compiled
    assert res.returncode in (0, 3), res.stderr
    tok = out.with_name("hybrid.tokenizer")
    assert (tok / "tokenizer.json").is_file()
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["artifacts"]["tokenizer"] == str(tok)


def test_compile_writes_verified_artifacts(compiled) -> None:
    res, out = compiled
    assert res.returncode in (0, 3), res.stderr
    report = json.loads(out.with_suffix(".report.json").read_text())
    config = json.loads(out.with_suffix(".config.json").read_text())
    assert config["budget"] == "10%" and config["distill_steps"] == 40
    assert report["baseline_metric"] == pytest.approx(1.0)
    assert report["threshold"] == pytest.approx(0.9)
    assert len(report["sites"]) == 3 and report["parity_ok"]
    steps = report["replaced"]
    assert all(s["metric_after"] >= report["threshold"] for s in steps)
    assert set(report["distill"]) == {"site0", "site1", "site2"}
    assert set(report["timings_s"]) >= {"load", "capture", "distill", "schedule", "export"}
    assert "threshold" in res.stderr  # the resolved threshold is printed
    assert res.returncode == (0 if steps else 3)


def test_hybrid_onnx_runs_at_other_shapes(compiled, tiny_task) -> None:
    _res, out = compiled
    sess = ort_session(out)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    dims = [d for i in sess.get_inputs() for d in i.shape]
    assert dims == ["batch", "sequence", "batch", "sequence"]
    for b, t in [(1, 5), (4, 31), (7, 64)]:
        data = make_token_data(b, t, seed=b * 100 + t)
        got = sess.run(None, {k: v.numpy() for k, v in data.items()})[0]
        assert got.shape == (b, 4) and np.isfinite(got).all()


def test_same_seed_same_report(compiled, tiny_task, tmp_path) -> None:
    _res, out = compiled
    out2 = tmp_path / "again.onnx"
    res = run_cli(tiny_task["model"], "--budget", "10%", "--data", tiny_task["val"],
                  "-o", str(out2), "--metric", "agreement", *FAST)
    a = json.loads(out.with_suffix(".report.json").read_text())
    b = json.loads(out2.with_suffix(".report.json").read_text())
    assert res.returncode == a["exit_code"]
    assert a["replaced"] == b["replaced"]
    assert [e["metric"] for e in a["schedule"]["evaluations"]] == \
        [e["metric"] for e in b["schedule"]["evaluations"]]
    assert a["distill"]["site0"]["final_loss"] == b["distill"]["site0"]["final_loss"]


@pytest.mark.parametrize("args, message", [
    (["missing.pt", "--budget", "0.5%"], "model not found"),
    (["{model}", "--budget", "abc"], "malformed budget"),
    (["{model}", "--budget", "-1%"], "is negative"),
    (["{model}", "--budget", "150%"], "below 100%"),
    (["{readme}", "--budget", "1%"], "unknown model format"),
    (["{model}", "--budget", "1%", "--data", "nope.pt"], "data file not found"),
    (["{model}", "--budget", "1%"], "no validation data"),
], ids=["missing-model", "budget-abc", "budget-negative", "budget-150", "unknown-format",
        "missing-data", "no-data"])
def test_bad_input_one_line_error_writes_nothing(tiny_task, tmp_path, args, message) -> None:
    readme = tmp_path / "notes.txt"
    readme.write_text("hi")
    args = [a.format(model=tiny_task["model"], readme=readme) for a in args]
    out = tmp_path / "sub" / "hybrid.onnx"
    res = run_cli(*args, "-o", str(out), cwd=tmp_path)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert not (tmp_path / "sub").exists()


def test_data_that_does_not_fit(tiny_task, tmp_path) -> None:
    bad = tmp_path / "bad.pt"
    torch.save({"input_ids": torch.ones(4, 8, dtype=torch.long)}, bad)
    res = run_cli(tiny_task["model"], "--data", str(bad), "-o", str(tmp_path / "h.onnx"))
    assert res.returncode == 2 and "lacks ['attention_mask']" in res.stderr
    assert not (tmp_path / "h.onnx").exists()


def test_config_file_supplies_data_and_metric(tiny_task, tmp_path) -> None:
    (tmp_path / "dtr.toml").write_text(
        f'data = "{tiny_task["val"]}"\nmetric = "agreement"\ndistill-steps = 5\n'
        'max-calib-samples = 8\nmax-linear = 1\n')
    res = run_cli(tiny_task["model"], "--budget", "99pt", "-o", "h.onnx", "--no-progress", "--no-bench",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "h.report.json").read_text())
    assert report["metric"]["name"] == "agreement" and len(report["replaced"]) == 1
    # a flag overrides the file; --window on a model without causal sites says it does nothing
    res = run_cli(tiny_task["model"], "--budget", "99pt", "-o", "h2.onnx", "--max-linear", "2",
                  "--window", "8", "--no-progress", "--no-bench", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "--window 8 has no effect" in " ".join(res.stderr.split())
    assert len(json.loads((tmp_path / "h2.report.json").read_text())["replaced"]) == 2


def test_help_documents_every_flag() -> None:
    res = run_cli("--help")
    assert res.returncode == 0
    for flag in ["--budget", "--data", "--calib", "--metric", "--report", "-o, --output",
                 "--keep", "--max-linear", "--trust-pickle", "Exit codes"]:
        assert flag in res.stdout


# Issue 25 item 14: the README's and docs' snippets cannot rot.

_DOCS = [Path(__file__).resolve().parents[1] / p for p in ("README.md", "docs/exporters.md",
                                                            "docs/benchmarks.md")]


def _blocks(lang: str) -> list[tuple[str, str]]:
    import re

    out = []
    for doc in _DOCS:
        for m in re.finditer(rf"^( *)```{lang}\n(.*?)^\1```", doc.read_text(), re.M | re.S):
            indent = len(m.group(1))
            out.append((doc.name, "\n".join(line[indent:] for line in
                                            m.group(2).splitlines())))
    return out


def test_doc_python_snippets_import_what_they_use() -> None:
    """Every import of every Python snippet runs, and every name the snippet calls at the top
    level (``f(...)`` or ``f(...).x``) is imported or a builtin: a snippet that imports ``bench``
    from the wrong module, or uses ``rich`` without importing it, fails here."""
    import ast
    import builtins

    blocks = _blocks("python")
    assert len(blocks) >= 2
    for doc, code in blocks:
        tree = ast.parse(code)
        bound: set[str] = set(dir(builtins))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                exec(compile(ast.Module([node], []), doc, "exec"), {})  # noqa: S102
                bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.Assign):
                bound |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.comprehension):
                bound |= {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                and isinstance(n.ctx, ast.Load)}
        assert used <= bound | {"texts", "labels"}, (doc, sorted(used - bound), code)


def test_doc_command_lines_use_existing_flags() -> None:
    """Every ``dtr-compile`` line of the shell snippets names a subcommand and flags that exist."""
    import click

    from dtr_compile.cli import main

    checked = 0
    for doc, code in _blocks("sh") + _blocks(""):
        lines = code.splitlines()
        for i, line in enumerate(lines):
            words = line.split("#")[0].split()
            if "dtr-compile" not in words:
                continue
            words = words[words.index("dtr-compile") + 1:]
            j = i + 1  # continuation lines: indented, no new command
            while j < len(lines) and lines[j].startswith(" ") and "dtr-compile" not in lines[j]:
                words += lines[j].split("#")[0].split()
                j += 1
            name = words[0] if words and words[0] in main.commands else "compile"
            cmd = main.commands[name]
            opts = {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts}
            opts |= {"--help", "-h"}
            for w in words:
                flag = w.strip("[]()…|,").split("=")[0]
                if flag.startswith("--"):
                    assert flag in opts, (doc, name, flag, line)
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("columns", [None, "100"])
def test_tables_are_not_cut_when_output_is_not_a_terminal(tiny_task, columns) -> None:
    """Issue 25 item 15: a pipe or a CI log got rich's 80 columns, cutting the table. Now COLUMNS
    when set, else wide enough for every column."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {
        "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if columns:
        env["COLUMNS"] = columns
    res = subprocess.run([*CLI, "inspect", tiny_task["model"]], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    if columns is None:
        assert any("backbone.encoder.layer.0.attention.self" in ln for ln in lines), res.stdout
        assert max(map(len, lines)) > 80
    else:
        assert max(map(len, lines)) <= 100


def test_distill_tokens_take_k_m_g_suffixes() -> None:
    """--distill-tokens 500k / 2M / 1.5G (powers of 1000) or a plain count; anything else is one
    clear error (exit 2) before any work."""
    from click.testing import CliRunner

    from dtr_compile.cli import main
    from dtr_compile.config import parse_tokens
    from dtr_compile.errors import InputError

    assert [parse_tokens(x) for x in ("0", "500k", "2M", "1.5G", " 40 ", 123)] == \
        [0, 500_000, 2_000_000, 1_500_000_000, 40, 123]
    for bad in ("2X", "-3", "", "1e6"):
        with pytest.raises(InputError, match="token count"):
            parse_tokens(bad)
    res = CliRunner().invoke(main, ["compile", "m.pt", "-o", "h.onnx", "--distill-tokens", "2X"])
    assert res.exit_code == 2 and "token count '2X'" in res.output
