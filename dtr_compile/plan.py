"""What a run will read and write, checked before anything is loaded or written: the config's
values (:func:`validate`), the artifact paths and the write plan (:func:`write_plan`).

Each family checks its own options (``check_export_options``, ``DistillSettings.check``,
``deploy_seqs``...); this module calls them in one place so that bad input fails in seconds.
"""

from __future__ import annotations

import math
from pathlib import Path

from dtr_compile.config import Budget, CompileConfig, cache_dir, check_seed, parse_duration
from dtr_compile.distill.stage import distill_settings
from dtr_compile.errors import InputError
from dtr_compile.exporters.artifacts import check_export_options, export_paths
from dtr_compile.exporters.stateful import (
    decoder_paths,
    find_model_tokenizer,
    tokenizer_files,
    tokenizer_path,
)
from dtr_compile.fileio import check_cache_dir, check_write_plan, data_path
from dtr_compile.load import check_model_path
from dtr_compile.report import report_paths
from dtr_compile.runtime.speed import deploy_seqs
from dtr_compile.search.run import SELECT
from dtr_compile.search.schedule import STRATEGIES


def artifact_paths(config: CompileConfig) -> tuple[Path, Path, Path]:
    """``(onnx, report, config)`` paths: the report defaults to ``<output>.report.json``."""
    out = Path(config.output)
    report = Path(config.report) if config.report else out.with_suffix(".report.json")
    return out, report, out.with_suffix(".config.json")


def lock_path(config: CompileConfig) -> Path:
    """The output lock, ``<output>.lock`` (see :class:`dtr_compile.fileio.OutputLock`)."""
    return Path(str(config.output) + ".lock")


def write_plan(config: CompileConfig) -> dict[str, Path]:
    """Every path this run may write, by name, resolved before any work (see
    :func:`dtr_compile.fileio.check_write_plan`). ``ledger`` and ``students`` are written while
    the run goes (they are what ``--resume`` reads); the rest are staged and moved together. Each ``.onnx`` path comes with its
    ``NAME.data`` (external weights, :func:`dtr_compile.fileio.data_path`)."""
    out, report, config_path = artifact_paths(config)
    rp = report_paths(report)
    exp = export_paths(out)
    plan = {"output": out, "pt2": exp["pt2"], "report": report, "report_md": rp.markdown,
            "report_png": rp.plot, "config": config_path, "ledger": rp.ledger,
            "students": rp.students, "lock": lock_path(config),
            "tokenizer folder": tokenizer_path(out)}  # causal models, when a tokenizer came along
    if config.fp16:
        plan["fp16 ONNX"] = exp["onnx_fp16"]
    if config.export_original:
        plan["original ONNX"] = exp["original_onnx"]
    if config.engine:
        plan["engine"] = Path(config.engine)
    if config.decoder:  # written for causal models only; planned for all (the checks are cheap)
        dec = decoder_paths(out)
        plan["decoder ONNX"] = dec["hybrid"]
        if config.export_original:
            plan["original decoder ONNX"] = dec["original"]
    # an ONNX file's weights may go to NAME.data beside it (--external-data); a stale one is removed
    for name, path in list(plan.items()):
        if path.suffix == ".onnx":
            plan[f"{name} weights"] = data_path(path)
    return plan


def input_paths(config: CompileConfig) -> dict[str, Path | None]:
    """The files a run reads, by flag (``--test`` where the config has it)."""
    test = getattr(config, "test", None)
    return {"model": Path(config.model), "--data": Path(config.data) if config.data else None,
            "--calib": Path(config.calib) if config.calib else None,
            "--test": Path(test) if test else None}


def validate(config: CompileConfig) -> Budget:
    """Every check that needs no model: done before anything is loaded or written."""
    budget = Budget.parse(config.budget)
    check_model_path(config.model)
    if config.data is None:
        raise InputError("no validation data: pass --data VAL.pt or set `data = \"...\"` in "
                         "dtr.toml ([tool.dtr-compile] in pyproject.toml)")
    for what, p in (("data", config.data), ("calibration data", config.calib),
                    ("test data", config.test)):
        if p is not None and not Path(p).is_file():
            raise InputError(f"{what} file not found: {p}")
    if config.confidence is not None and not 0.5 <= config.confidence < 1.0:
        raise InputError(f"--confidence {config.confidence}: expected a probability in [0.5, 1), "
                         "e.g. 0.9 (the one-sided level of the bound on the metric drop)")
    if config.select not in SELECT:
        raise InputError(f"unknown --select {config.select!r}; choose one of {', '.join(SELECT)}")
    deploy_seqs(config.deploy_seq)
    check_seed(config.seed)
    if config.bench_repeats < 1:
        raise InputError("--bench-repeats must be >= 1")
    if Path(config.output).suffix != ".onnx":
        raise InputError(f"output {config.output!r} must end in .onnx")
    if config.report is not None and Path(config.report).suffix != ".json":
        raise InputError(f"--report {config.report!r} must end in .json (the .md, .png and "
                         "ledger go beside it)")
    if config.max_linear is not None and config.max_linear < 1:
        raise InputError(f"--max-linear {config.max_linear}: must be >= 1 (to export the "
                         "original model unchanged, compile nothing: use --export-original "
                         "with any run, or torch.onnx.export)")
    if config.eval_batch < 1:
        raise InputError(f"--eval-batch {config.eval_batch}: must be >= 1")
    if config.max_calib_samples < 1:
        raise InputError(f"--max-calib-samples {config.max_calib_samples}: must be >= 1")
    if not math.isfinite(config.atol) or config.atol < 0:
        raise InputError(f"--atol {config.atol}: must be a finite number >= 0 (default 1e-3)")
    if config.min_linear < 0:
        raise InputError("--min-linear must be >= 0")
    if config.max_linear is not None and config.min_linear > config.max_linear:
        raise InputError(f"--min-linear {config.min_linear} exceeds --max-linear "
                         f"{config.max_linear}")
    if config.search not in STRATEGIES:
        raise InputError(f"unknown --search {config.search!r}; choose one of "
                         f"{', '.join(STRATEGIES)}")
    if config.max_evals is not None and config.max_evals < 1:
        raise InputError("--max-evals must be >= 1")
    if config.time_limit is not None:
        parse_duration(config.time_limit)
    if config.cache_mb < 0:
        raise InputError("--cache-mb must be >= 0 (0 turns the prefix cache off)")
    check_export_options(target=config.target, opset=config.opset, engine=config.engine,
                         linear_attention=config.linear_attention,
                         external_data=config.external_data)
    distill_settings(config).check()
    if config.max_calib_tokens < 1:
        raise InputError("--max-calib-tokens must be >= 1")
    if config.workers < 0:
        raise InputError("--workers must be >= 0 (0: one per CPU)")
    plan = write_plan(config)
    check_write_plan(plan, input_paths(config))
    if (tok := find_model_tokenizer(config.model)) is not None:  # encoders' too
        tokenizer_files(tok)  # what the tokenizer folder will copy, checked before any work
    if not config.no_cache:
        check_cache_dir(cache_dir(config), plan, input_paths(config))
    return budget
