"""`dtr-compile`: a thin shell around :func:`dtr_compile.pipeline.compile_model`.

``dtr-compile MODEL --budget 0.5% -o hybrid.onnx`` compiles; other subcommands (``inspect`` …)
are listed by ``dtr-compile --help``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Reproducible MKL results: the same branch for any memory alignment (set before torch loads MKL).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
# Library deprecation notices (torch/transformers internals) are not the user's to act on.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

# the imports below come after the environment and filters above, on purpose
import click  # noqa: E402
from rich.console import Console  # noqa: E402

from dtr_compile import __version__  # noqa: E402
from dtr_compile.config import MAX_SEQ, CompileConfig, parse_tokens, read_project_config  # noqa: E402
from dtr_compile.errors import (  # noqa: E402
    EXIT_INTERNAL,
    EXIT_NO_REPLACEMENT,
    EXIT_PARITY,
    DtrError,
    InputError,
)
from dtr_compile.fileio import check_json_output, onnx_inputs  # noqa: E402
from dtr_compile.report import table_console  # noqa: E402

EXIT_CODES = """\b
Exit codes:
  0  the hybrid was written and verified
  2  bad input: missing or unknown file, malformed flag or budget, data that does not fit
  3  the budget is not met: no site fits it (the original model is written instead), or
     --min-linear forced sites beyond it (the best such model is written); report included
  4  verification: onnxruntime disagrees with PyTorch beyond --atol (or the fp16
     tolerance), or --target tensorrt's lint found a reject/avoid op (artifacts kept)
  130 / 143  interrupted by Ctrl-C / SIGTERM: nothing half-written; --resume continues
  1  internal error"""


class _DefaultGroup(click.Group):
    """A group whose default command is ``compile``: ``dtr-compile MODEL ...`` works."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["compile", *args]
        return super().parse_args(ctx, args)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        cmd = self.commands["compile"]
        with click.Context(cmd, info_name=ctx.info_name, parent=None) as sub:
            cmd.format_usage(sub, formatter)
            cmd.format_help_text(sub, formatter)
            cmd.format_options(sub, formatter)
            cmd.format_epilog(sub, formatter)
        self.format_commands(ctx, formatter)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job cancelled), raised where Ctrl-C would be: the same clean-up and the same
    ``--resume`` hint run; the CLI then exits 143 (128 + SIGTERM) instead of Ctrl-C's 130."""

    exit_code = 143


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _fail(exc: DtrError) -> None:
    click.echo(f"dtr-compile: error: {exc}", err=True)
    sys.exit(exc.exit_code)


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dtr-compile")
def main() -> None:
    """dtr-compile: turn a full-attention transformer into a faster hybrid (DtR)."""


def _tokens_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """``--distill-tokens``: ``500k`` / ``2M`` → an int (None when not given)."""
    if value is None:
        return None
    try:
        return parse_tokens(value)
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command("compile", epilog=EXIT_CODES)
@click.argument("model", type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="Hybrid ONNX to write (.onnx). The report and config go beside it.")
@click.option("--budget", default=None,
              help="Allowed metric drop: '0.5%' relative to the original, '0.005' absolute, "
                   "'0.5pt' percentage points. Default 0.5%.")
@click.option("--data", default=None, help="Validation set (.pt dict of input tensors [+ labels]).")
@click.option("--calib", default=None, help="Calibration set for distillation (default: --data).")
@click.option("--test", default=None,
              help="Held-out test set (.pt, as --data): the original, the delivered hybrid and "
                   "M_best are evaluated on it after the search, which never sees it.")
@click.option("--metric", default=None,
              help="accuracy | macro_f1 | agreement | cosine | mse | perplexity | kl (mean "
                   "KL(original ‖ hybrid) of the next-token or class distribution, no labels; "
                   "give an absolute --budget such as 0.05, in nats), or "
                   "package.module:function (called as f(outputs, labels, reference) -> float; "
                   "attributes higher_is_better, needs_labels, bounds). Default: accuracy with "
                   "labels, else agreement with the original model's predictions.")
@click.option("--report", default=None, help="Report JSON path (default: OUTPUT.report.json).")
@click.option("--feature-map", default=None,
              help="Linear-attention feature map: hedgehog (default), elu, relu, t2r, taylor, "
                   "performer.")
@click.option("--student", default=None,
              help="Linear-attention student kind: a feature map (hedgehog, elu, relu, t2r, "
                   "taylor, performer; as --feature-map), or gla (gated linear attention), "
                   "deltanet, gated-deltanet (causal sites only). "
                   "Default: --feature-map's.")
@click.option("--distill-target", type=click.Choice(["site", "block"]), default=None,
              help="What each linear attention is trained to reproduce. site (default): the "
                   "attention core's output from the teacher's q, k, v (trains the feature map). "
                   "block: the attention block's output after its output projection from the "
                   "block's input hidden states (q/k/v/o weights train too, from the teacher's).")
@click.option("--distill-loss", type=click.Choice(["mse", "mse+ce"]), default=None,
              help="Distillation loss: output MSE (default), or with --distill-target site also "
                   "Hedgehog's attention-weight cross-entropy.")
@click.option("--distill-steps", type=int, default=None,
              help="Optimiser steps per site, at most (default 400, of 4 calibration rows; early "
                   "stopping on held-out calibration rows may end sooner). With --distill-tokens "
                   "the lower of the two budgets applies.")
@click.option("--distill-tokens", default=None, callback=_tokens_option,
              help="Calibration tokens each site trains on, at most: steps x rows per step x row "
                   "length, e.g. 500k or 2M (default 400k; 0: --distill-steps alone decides). "
                   "Long rows get fewer steps of the same tokens.")
@click.option("--distill-step-tokens", type=int, default=None,
              help="Tokens per distillation step: rows longer than this / 4 tokens train fewer "
                   "rows per step, max(1, this // row length) (default 1024: one 1024-token "
                   "row, four 256-token rows; 0: always 4 rows).")
@click.option("--window-dropout", type=float, default=None,
              help="With --window: the probability that a distillation step runs without the "
                   "window, so the linear branch must carry every key (scheduled: annealed to 0 "
                   "at half the steps). Default 0: off.")
@click.option("--student-init", type=click.Choice(["attention", "plain"]), default=None,
              help="gla / deltanet / gated-deltanet: attention (default) starts the decays from "
                   "the teacher's attention distance, the write strength from its entropy and "
                   "the window's share from its normalisers; plain: fixed slow decays.")
@click.option("--distill-lr", type=float, default=None,
              help="Learning rate of the feature maps (default 0.03; a block's q/k/v/o weights "
                   "move by 0.003 of their RMS per step).")
@click.option("--window", type=int, default=None,
              help="Causal sites: keep softmax over the last W keys beside the linear attention "
                   "(LoLCATs' sliding window; feature maps share one normaliser with it, gla and "
                   "(gated-)deltanet mix in their state's read-out of the older keys by the window's "
                   "share of a modelled normaliser; costs O(T·W) "
                   "more; bidirectional sites ignore it). "
                   "Default 0: off.")
@click.option("--max-calib-samples", type=int, default=None,
              help="Calibration sequences used for distillation (default 64).")
@click.option("--max-calib-tokens", type=int, default=None,
              help="Teacher activations of at most this many calibration tokens are held in "
                   "memory; the rest are spilled to temporary files (default 32768).")
@click.option("--workers", type=int, default=None,
              help="Distillation processes, one site each at a time (default: one per CPU).")
@click.option("--cache-dir", default=None, type=click.Path(path_type=str),
              help="Distilled-weights cache, keyed by model, site, feature map, target, "
                   "settings and calibration data (default: .dtr-cache beside the output).")
@click.option("--no-cache", is_flag=True, default=None,
              help="Distil every site afresh and write nothing to the cache.")
@click.option("--eval-batch", type=int, default=None, help="Batch size for evaluation (default 32).")
@click.option("--keep", default=None, help="Comma-separated sites (id or module path) never replaced.")
@click.option("--max-linear", type=int, default=None, help="Replace at most N sites.")
@click.option("--min-linear", type=int, default=None,
              help="Replace at least N sites: past the budget if need be, committing the least "
                   "harmful ones; the report says so and the exit code is 3.")
@click.option("--search", type=click.Choice(["greedy", "lazy", "ranked"]), default=None,
              help="Search strategy. greedy (default, the paper's): each step tries every "
                   "remaining site, keeps the best, L(L+1)/2 evaluations at worst. lazy: the same "
                   "choices when sites hurt at least as much together as apart, re-measuring "
                   "only the most promising site (L + k evaluations when degradations add up). "
                   "ranked: one single-site pass, then sites in that order until one breaks the "
                   "budget (L + k evaluations).")
@click.option("--max-evals", type=int, default=None,
              help="Stop the search after N evaluations (replayed ones count); the sites "
                   "committed until then stand, and so does the best site measured in the "
                   "unfinished step when its set is within budget (in --search ranked's "
                   "single-site pass: the best site that passed alone).")
@click.option("--time-limit", default=None,
              help="Wall time of the whole run, from load to report: seconds, or '90s', '15m', "
                   "'1.5h'. 15 % of it is kept for the export and what follows; the stages that "
                   "can stop early get, when they start, a share of what is left after that: "
                   "distillation at most 40 % of the limit (a site cut short keeps its best "
                   "weights so far, is reported and is not cached), the search all of it, or "
                   "2/3 with --heal, and the heal rounds the rest (the search's unused time "
                   "included). What the search has committed stands, as for --max-evals. Load, "
                   "capture, export and benchmark cannot be interrupted: the run may end later "
                   "than the limit by the export's time, and a stage checks its share before "
                   "each evaluation or step, so it may overrun it by one.")
@click.option("--resume", is_flag=True, default=None,
              help="Continue an interrupted search: replay the evaluations in the ledger "
                   "(REPORT.ledger.jsonl) if it was written for the same model, data, distilled "
                   "weights and metric; otherwise start afresh.")
@click.option("--heal", is_flag=True, default=None,
              help="After the search, heal: train the hybrid's linear students jointly, end to "
                   "end, against the original model's outputs on the calibration set (KL of the "
                   "next-token or class distributions, else MSE), then search the remaining "
                   "sites again from the healed hybrid, in rounds (--heal-rounds), within "
                   "--time-limit. More layers fit the budget; costs forward and backward passes "
                   "of the whole model.")
@click.option("--heal-rounds", type=int, default=None,
              help="Search → heal rounds at most (default 3); they stop earlier when a search "
                   "adds no site or a heal does not improve the validation metric.")
@click.option("--heal-steps", type=int, default=None,
              help="Optimiser steps per heal, at most (default 60; early stopping on held-out "
                   "calibration rows may end sooner).")
@click.option("--heal-lr", type=float, default=None,
              help="Learning rate of the heal (default 1e-3; Adam, cosine schedule).")
@click.option("--heal-rank", type=int, default=None,
              help="Rank of low-rank adapters (LoRA) on each linear layer's q, k, v and output, "
                   "trained by the heal and exported with the student (default 0: none).")
@click.option("--heal-rows", type=int, default=None,
              help="Calibration rows per heal step (default 2).")
@click.option("--confidence", type=float, default=None,
              help="A candidate is within budget only when the one-sided P upper bound of its "
                   "metric drop (paired over validation rows: exact Clopper-Pearson limits "
                   "for accuracy and agreement, a seeded bootstrap otherwise) is within it, "
                   "e.g. 0.9. Default: the point metric decides (the bound is still reported).")
@click.option("--select", type=click.Choice(["most-linear", "best"]), default=None,
              help="Which hybrid -o gets: most-linear (default; M_opt, the most linear sites "
                   "within budget) or best (M_best, the best validation metric among every "
                   "evaluated set within budget). The report lists both.")
@click.option("--deploy-seq", default=None,
              help="Sequence lengths at which the original and hybrid ONNX are timed after "
                   "export, comma-separated (default: the validation length and 4x); 'none' "
                   "skips the timing.")
@click.option("--no-bench", "bench", flag_value=False, default=None,
              help="Skip timing the original and hybrid ONNX after export.")
@click.option("--bench-repeats", type=int, default=None,
              help="Timed runs per length and model for the speed report, each model alone "
                   "in fresh processes (default 5).")
@click.option("--cache-mb", type=int, default=None,
              help="Memory for the search's exact prefix cache, which skips the layers before "
                   "each candidate site (default 1024; 0 turns it off).")
@click.option("--device", default=None,
              help="Where the torch stages run (baseline, teacher activations, distillation, "
                   "search): auto (default: CUDA when present), cpu, cuda or cuda:N. Capture, "
                   "export and the ONNX parity check stay on the CPU. Under torchrun, cuda means "
                   "each rank's LOCAL_RANK GPU.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Precision of the teacher and its recorded activations (baseline and search "
                   "run in it too, under autocast); students keep fp32 weights and fp32 losses. "
                   "Default fp32.")
@click.option("--atol", type=float, default=None, help="ONNX parity tolerance, max-abs (default 1e-3).")
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt"]), default=None,
              help="Deployment runtime. tensorrt: opset 18 (no ONNX Attention op), and the ONNX "
                   "is linted for TensorRT (a reject/avoid finding fails with exit 4). "
                   "Default onnxruntime (opset 23).")
@click.option("--opset", type=int, default=None,
              help="ONNX opset (default 23, or 18 with --target tensorrt; 27 at most). Every "
                   "opset keeps PyTorch's result for fully masked attention rows.")
@click.option("--linear-attention", type=click.Choice(["auto", "plain", "fused"]), default=None,
              help="How gla/deltanet/gated-deltanet recurrences are written. plain: chunked form "
                   "in plain ops (every runtime, TensorRT). fused: one ONNX LinearAttention node "
                   "each (onnxruntime >= 1.32, not TensorRT): the standard op at --opset 27, "
                   "onnxruntime's com.microsoft op (a native CPU kernel) below. auto (default): "
                   "fused at opset 27, plain below.")
@click.option("--external-data", type=click.Choice(["auto", "always", "never"]), default=None,
              help="Where each ONNX file keeps its weights: always: in NAME.data beside it (ONNX "
                   "external data; onnxruntime maps the file instead of copying it), never: "
                   "inside the .onnx (protobuf caps a file at 2 GiB). auto (default): NAME.data "
                   "when the weights exceed 1.5 GiB (as torch.onnx).")
@click.option("--fp16", is_flag=True, default=None,
              help="Also write OUTPUT.fp16.onnx (fp16 weights and activations, linear-attention "
                   "state in fp32), verified against the fp32 PyTorch hybrid at the fp16 "
                   "tolerance (max-abs 3e-2·max(1, |ref|), rel. RMS 1e-2).")
@click.option("--export-original", is_flag=True, default=None,
              help="Also write the original model as OUTPUT.original.onnx (verified), for "
                   "side-by-side runs.")
@click.option("--quantize", type=click.Choice(["int4", "int8"]), default=None,
              help="Also write int4 / int8 weight copies of the ONNX models (OUTPUT.int4.onnx, "
                   "OUTPUT.int4.decoder.onnx, and the original's with --export-original): "
                   "every constant-weight MatMul becomes onnxruntime's MatMulNBits (its own "
                   "quantizer; onnxruntime-genai's CPU settings: symmetric, int8 activations). "
                   "With --test, the report gives their test metric beside the fp32 original's.")
@click.option("--quantize-block-size", type=int, default=None,
              help="Weights per quantization scale with --quantize: 16, 32 (default, as "
                   "onnxruntime-genai on CPU), 64, 128 or 256.")
@click.option("--no-decoder", "decoder", flag_value=False, default=None,
              help="Causal models: do not write the stateful decoder OUTPUT.decoder.onnx "
                   "(input_ids, attention_mask and per-layer KV cache / recurrent state → logits "
                   "and the new states), written by default.")
@click.option("--engine", default=None, type=click.Path(path_type=str),
              help="Build a TensorRT engine of the hybrid at this path (needs the [tensorrt] "
                   "extra and a CUDA GPU; with --fp16, fp16 kernels).")
@click.option("--seed", type=int, default=None, help="Random seed (default 0).")
@click.option("--ignore-auto-map", is_flag=True, default=None,
              help="A Hugging Face folder whose config.json names its own model code "
                   "(auto_map) is refused: dtr-compile never runs code from a model folder. "
                   "This loads it with transformers' built-in class for its model_type instead.")
@click.option("--trust-pickle", is_flag=True, default=False,
              help="Allow loading a pickled torch.save model (runs code from the file).")
@click.option("--no-progress", is_flag=True, default=False, help="No progress bars.")
def compile_cmd(model: str, output: str, **flags: object) -> None:
    """Compile MODEL (a torch.export archive .pt/.pt2, or a Hugging Face folder) into a hybrid
    ONNX within the budget. Data and metric may also come from dtr.toml or [tool.dtr-compile]
    in pyproject.toml in the working directory; flags override the file."""
    with _sigterm_as_interrupt():
        _compile(model, output, flags)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While compiling, SIGTERM raises :class:`Terminated` (the previous handler is restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _compile(model: str, output: str, flags: dict[str, object]) -> None:
    try:
        file_values, _src = read_project_config(Path.cwd())
        values = dict(file_values)
        for key, val in flags.items():
            if key in ("trust_pickle", "no_progress"):
                continue
            if val is not None:
                values[key] = val
        if isinstance(values.get("keep"), str):
            values["keep"] = tuple(k.strip() for k in str(values["keep"]).split(",") if k.strip())
        elif "keep" in values:
            values["keep"] = tuple(values["keep"])
        values["trust_pickle"] = bool(flags["trust_pickle"])  # command line only
        values["progress"] = not flags["no_progress"] and sys.stderr.isatty()
        config = CompileConfig(model=model, output=output, **values)
        from dtr_compile.pipeline import compile_model

        result = compile_model(config, _console())
    except DtrError as exc:
        _fail(exc)
    except KeyboardInterrupt as exc:
        term = isinstance(exc, Terminated)
        what = "terminated (SIGTERM)" if term else "interrupted"
        if getattr(exc, "artifacts_written", False):
            click.echo(f"dtr-compile: {what} as the artifacts were moved into place: all of "
                       f"them are written; the report beside {output} says how the run ended",
                       err=True)
        else:
            click.echo(f"dtr-compile: {what}; rerun the same command with --resume to continue "
                       "from the finished search evaluations", err=True)
        sys.exit(143 if term else 130)
    from dtr_compile.report import summary_lines, time_limited

    rep = result.report
    if not rep:  # a rank other than 0 of a torchrun run: rank 0 reports
        sys.exit(result.exit_code)
    lines = summary_lines(rep)
    click.echo(lines[0])
    click.echo(f"linear sites ({len(rep['replaced'])}/{len(rep['sites'])}): "
               + (", ".join(r["module_path"] for r in rep["replaced"]) or "none"))
    for line in lines[1:]:
        click.echo(line)
    search = rep.get("search") or {}
    if search:
        click.echo(f"search {search['strategy']}: {search['evaluations']} evaluations "
                   f"({search['evaluations_replayed']} replayed), {search['stop_reason']}")
    if result.exit_code == EXIT_NO_REPLACEMENT:
        limited = time_limited(rep)
        click.echo("budget not met (exit 3): " + (
            "--min-linear forced sites beyond the budget" if rep["replaced"]
            else f"no site was shown to fit before --time-limit ({limited}); the original "
            "model was written" if limited else "no site fits; the original model was written"))
        for step in rep.get("next_steps") or ():
            click.echo(f"  try: {step}")
    click.echo(f"wrote {result.output} and {result.report_path}")
    sys.exit(result.exit_code)


class _PlainLog(Console):
    """The log console when stderr is not a terminal (CI): one line per message, ``[HH:MM:SS]``
    then the text, never wrapped or padded, no source locations; greppable."""

    def log(self, *objects: Any, **kwargs: Any) -> None:  # noqa: ARG002 - rich's signature
        self.print(time.strftime("[%H:%M:%S]"), *objects, soft_wrap=True)


def _console() -> Console:
    """The stderr console: rich's log (time, message, source column) on a terminal, else
    :class:`_PlainLog`."""
    return Console(stderr=True) if sys.stderr.isatty() else _PlainLog(stderr=True)


@main.command("run", epilog="""\b
Exit codes:
  0  evaluated
  2  bad input: missing file, data that does not fit the model, unknown metric""")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--data", required=True, type=click.Path(path_type=str),
              help="Dataset (.pt dict of input tensors [+ labels], as for compile).")
@click.option("--metric", default=None,
              help="Metric name or package.module:function (default: accuracy with labels, "
                   "else agreement, which needs --reference).")
@click.option("--reference", default=None, type=click.Path(path_type=str),
              help="ONNX of the original model: the reference for agreement / cosine / kl.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Rows per run.")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads.")
@click.option("--json", "json_path", default=None, type=click.Path(path_type=str),
              help="Also write the result as JSON here.")
@click.option("--no-progress", is_flag=True, default=False, help="No progress bar.")
def run_cmd(model: str, data: str, metric: str | None, reference: str | None, batch_size: int,
            threads: int | None, json_path: str | None, no_progress: bool) -> None:
    """Evaluate MODEL (.onnx) on DATA with onnxruntime and print the metric."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dtr_compile.runtime.evaluate import evaluate_onnx, write_json

    console = _console()
    try:
        if batch_size < 1:
            raise InputError("--batch-size must be >= 1")
        _check_threads(threads)
        check_json_output(json_path, {**onnx_inputs("model", model), "--data": Path(data),
                                      **(onnx_inputs("--reference", reference) if reference
                                         else {})})
        rows = _rows(data)
        show = not no_progress and sys.stderr.isatty() and rows > batch_size
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True,
                      disable=not show) as prog:
            task = prog.add_task(f"run {Path(model).name}",
                                 total=rows * (2 if reference else 1))
            result = evaluate_onnx(model, data, metric=metric, reference=reference,
                                   batch_size=batch_size, threads=threads,
                                   on_batch=lambda k: prog.advance(task, k))
        if json_path:
            write_json(json_path, result.to_dict())
    except DtrError as exc:
        _fail(exc)
    click.echo(f"{result.metric}: {result.value:.4f} ({result.rows} rows, {result.seconds:.1f} s, "
               f"{Path(model).name})")


def _check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise InputError(f"--threads {threads}: must be >= 1 (leave it out for onnxruntime's "
                         "default)")


def _rows(data: str) -> int:
    """Row count of a dataset file (0 when unreadable: the loader reports the problem)."""
    import torch

    try:
        obj = torch.load(data, weights_only=True, map_location="cpu")
        return int(next(iter(obj.values())).shape[0]) if isinstance(obj, dict) and obj else 0
    except Exception:  # noqa: BLE001
        return 0


def _seqs(text: str, flag: str = "--seq") -> list[int]:
    try:
        seqs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{flag} {text!r}: expected comma-separated lengths, e.g. 512,2048") from None
    if not seqs:
        raise InputError(f"{flag} needs at least one length")
    if max(seqs) > MAX_SEQ:
        raise InputError(f"{flag} {text!r}: {max(seqs)} tokens is beyond what can be timed "
                         f"({MAX_SEQ} at most)")
    return seqs


@main.command("bench", epilog="""\b
Each model is timed alone: --rounds rounds, each running every model in turn in a fresh process
of its own (no two models loaded at once); a figure is the median of all timed runs, with the
lowest and highest round median beside it.
Columns: each model's median latency (ms) and peak memory (MiB) per length T, and each later
model's ratio to the first (B/A < 1: B is faster / smaller).
With --decode (stateful decoders): per context C, decode ms/token (median of --tokens greedy
steps after a prefill of C tokens; * = from a synthesised past of length C), prefill ms, state
MiB per stream (KV caches + recurrent states) and peak MiB, with ×A ratios; a MODEL may also be
an onnxruntime-genai folder, and --builder-from HF_FOLDER adds the model builder's exports of
the original (built once, kept in --builder-dir) beside yours.
Exit codes:
  0  measured (cells a model cannot run say why)
  2  bad input: missing or unloadable file, malformed --seq / --context, a prefill-only model
     with --decode, --builder-from without onnxruntime-genai""")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--seq", "seq", default="512,2048", show_default=True,
              help="Comma-separated sequence lengths.")
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size.")
@click.option("--repeats", type=int, default=10, show_default=True,
              help="Timed runs per model and length, in all (spread over the rounds).")
@click.option("--rounds", type=int, default=3, show_default=True,
              help="Rounds; in each, every model runs alone in a fresh process of its own.")
@click.option("--warmup", type=int, default=2, show_default=True,
              help="Untimed runs (--decode: decode steps) per model in each round.")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads.")
@click.option("--extend-positions", is_flag=True, default=False,
              help="Time lengths beyond a model's position table (e.g. 512) on a copy whose "
                   "table is extended with random rows; such cells are marked *.")
@click.option("--no-memory", is_flag=True, default=False,
              help="Leave the peak-memory column out.")
@click.option("--decode", is_flag=True, default=False,
              help="Decode benchmark of stateful decoder ONNX models (see below).")
@click.option("--context", default="1024,4096,16384", show_default=True,
              help="--decode: comma-separated context lengths.")
@click.option("--tokens", type=int, default=48, show_default=True,
              help="--decode: timed decode steps per model and context, in all.")
@click.option("--max-prefill", type=int, default=4096, show_default=True,
              help="--decode: run a real prefill up to this context; above it decode starts "
                   "from a synthesised past and the prefill cell says 'skipped'.")
@click.option("--prefill-repeats", type=int, default=3, show_default=True,
              help="--decode: timed prefill runs per model and context, in all.")
@click.option("--profile", is_flag=True, default=False,
              help="--decode: also profile 8 decode steps per model at the largest context "
                   "(onnxruntime profiler) and list where the time goes, per op type.")
@click.option("--builder-from", "builder_from", default=None,
              type=click.Path(path_type=str, file_okay=False),
              help="--decode: a Hugging Face folder of the original model (with its tokenizer): "
                   "also time onnxruntime-genai's model builder exports of it "
                   "(--builder-precision), built offline once into --builder-dir.")
@click.option("--builder-precision", default="fp32,int4", show_default=True,
              help="--decode: the builder's precisions to time (fp32, int4, int8).")
@click.option("--builder-dir", default=None, type=click.Path(path_type=str, file_okay=False),
              help="--decode: where the builder's exports are kept (default: "
                   "HF_FOLDER.genai beside it).")
@click.option("--json", "json_path", default=None, type=click.Path(path_type=str),
              help="Also write the results as JSON here.")
def bench_cmd(models: tuple[str, ...], seq: str, batch: int, repeats: int, rounds: int,
              warmup: int, threads: int | None, extend_positions: bool, no_memory: bool,
              decode: bool, context: str, tokens: int, max_prefill: int, prefill_repeats: int,
              profile: bool, builder_from: str | None, builder_precision: str,
              builder_dir: str | None, json_path: str | None) -> None:
    """Latency and peak memory of MODELS (.onnx, e.g. original then hybrid) in onnxruntime at
    each sequence length, each model timed alone, with inputs synthesised from each model's
    input signature; with --decode, per-token decode latency, prefill time, state size and
    peak memory of stateful decoders."""
    from dtr_compile.runtime.evaluate import write_json

    console = _console()
    try:
        _check_threads(threads)
        check_json_output(json_path, {k: v for i, m in enumerate(models)
                                      for k, v in onnx_inputs(f"model {i + 1}", m).items()})
        if decode:
            _bench_decode(console, list(models), _seqs(context, "--context"), batch=batch,
                          tokens=tokens, prefill_repeats=prefill_repeats,
                          max_prefill=max_prefill, warmup=warmup, rounds=rounds,
                          threads=threads, profile=profile, builder_from=builder_from,
                          builder_precision=builder_precision, builder_dir=builder_dir,
                          json_path=json_path)
            return
        from dtr_compile.runtime.bench import bench, bench_table

        result = bench(list(models), _seqs(seq), batch=batch, repeats=repeats, rounds=rounds,
                       warmup=warmup, threads=threads, extend=extend_positions,
                       memory=not no_memory, on_step=lambda msg: console.log(msg))
        if json_path:
            write_json(json_path, result.to_dict())
    except DtrError as exc:
        _fail(exc)
    table_console().print(bench_table(result))
    if result.prepack_note:
        click.echo(result.prepack_note)


def _bench_decode(console: Console, models: list[str], contexts: list[int], *,
                  builder_from: str | None, builder_precision: str, builder_dir: str | None,
                  profile: bool, json_path: str | None, threads: int | None,
                  **kwargs: Any) -> None:
    """``bench --decode``: the builder's baselines (built or reused), the timing, the tables."""
    from dataclasses import asdict

    from dtr_compile.runtime.bench_decode import (
        bench_decode,
        decode_table,
        is_genai_folder,
        profile_decode,
        profile_table,
    )
    from dtr_compile.runtime.evaluate import write_json

    builds = {}
    if builder_from is not None:
        from dtr_compile.runtime.genai_baseline import builder_baselines

        precisions = [p.strip() for p in builder_precision.split(",") if p.strip()]
        root = builder_dir or str(Path(builder_from).resolve()) + ".genai"
        builds = builder_baselines(builder_from, root, precisions, log=console.log)
        models = models + [b.folder for b in builds.values()]
    dres = bench_decode(models, contexts, threads=threads, on_step=lambda m: console.log(m),
                        **kwargs)
    out = dres.to_dict() | {"builds": {p: b.to_dict() for p, b in builds.items()}}
    profiles = {}
    if profile:
        longest = max(dres.contexts)
        profiles = {m: profile_decode(m, longest, threads=threads) for m in dres.models
                    if not is_genai_folder(m)}
        out["profile"] = {"context": longest,
                          "ops": {m: [asdict(o) for o in p] for m, p in profiles.items()}}
    if json_path:
        write_json(json_path, out)
    table_console().print(decode_table(dres))
    if profiles:
        table_console().print(profile_table(profiles, max(dres.contexts)))


def _prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", ",").split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--prompt-ids {text!r}: expected comma-separated token ids, "
                         "e.g. 1,2,3") from None
    if not ids:
        raise InputError("--prompt-ids needs at least one token id")
    return ids


@main.command("generate", epilog="""\b
Files: MODEL is a stateful decoder ONNX (inputs input_ids, attention_mask and
past_key_values.* / past.*, outputs logits and present.*), as dtr-compile writes beside the
hybrid of a causal model. The tokenizer is --tokenizer DIR, else MODEL_STEM.tokenizer/ or
tokenizer/ beside MODEL (a Hugging Face tokenizer folder); without one, --prompt-ids works and
the output is token ids.
Exit codes:
  0  generated
  2  bad input: missing or prefill-only model, no tokenizer for a text prompt, bad option""")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--prompt", multiple=True,
              help="Prompt text; repeat for a batch (left-padded; printed when all are done).")
@click.option("--prompt-file", default=None, type=click.Path(path_type=str),
              help="Read the prompt text from this file.")
@click.option("--prompt-ids", multiple=True,
              help="Prompt as comma-separated token ids; repeat for a batch.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True,
              help="Tokens to generate at most (fewer when EOS comes first).")
@click.option("--tokenizer", default=None, type=click.Path(path_type=str),
              help="Hugging Face tokenizer folder (default: looked up beside MODEL).")
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="0: greedy; > 0: sample from softmax(logits / T).")
@click.option("--top-k", type=int, default=None, help="Sample among the K most likely tokens.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--eos-id", type=int, default=None,
              help="Stop at this token id (default: the tokenizer's EOS; none without one).")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads.")
def generate_cmd(model: str, prompt: tuple[str, ...], prompt_file: str | None,
                 prompt_ids: tuple[str, ...],
                 max_new_tokens: int, tokenizer: str | None, temperature: float,
                 top_k: int | None, seed: int, eos_id: int | None, threads: int | None) -> None:
    """Continue a prompt with a stateful decoder ONNX in onnxruntime, streaming the text to
    stdout as it is decoded (greedy by default; seeded sampling with --temperature / --top-k)."""
    from dtr_compile.runtime.generate import Generator, TextStream

    console = _console()
    try:
        given = [bool(prompt), prompt_file is not None, bool(prompt_ids)]
        if sum(given) != 1:
            raise InputError("give one of --prompt TEXT, --prompt-file F, --prompt-ids 1,2,3")
        texts = list(prompt)
        if prompt_file is not None:
            try:
                texts = [Path(prompt_file).read_text(encoding="utf-8")]
            except OSError as exc:
                raise InputError(f"--prompt-file {prompt_file}: {exc.strerror or exc}") from None
            except UnicodeDecodeError as exc:
                raise InputError(f"--prompt-file {prompt_file}: not UTF-8 text (byte "
                                 f"{exc.start}: {exc.reason}); convert it, e.g. iconv -t UTF-8"
                                 ) from None
        ids = [_prompt_ids(p) for p in prompt_ids]
        gen = Generator(model, tokenizer=tokenizer, threads=threads)
        rows = ids or gen.encode(texts)
        out: list[int] = []
        stream = TextStream(gen.tokenizer) if gen.tokenizer is not None else None

        def on_token(_row: int, tok: int) -> None:
            if len(rows) > 1:  # a batch is printed row by row when it is done
                return
            out.append(tok)
            if stream is None:
                click.echo(("" if len(out) == 1 else " ") + str(tok), nl=False)
            elif piece := stream.push(tok):  # multi-byte characters arrive whole
                click.echo(piece, nl=False)  # echo flushes

        res = gen.generate(rows, max_new_tokens, temperature=temperature, top_k=top_k,
                           seed=seed, eos_token_id=eos_id, on_token=on_token)
        if len(rows) > 1:
            for r, toks in enumerate(res.tokens):
                click.echo(f"[{r}] " + (res.text[r] if res.text is not None
                                        else " ".join(map(str, toks))))
        else:
            click.echo(stream.flush() if stream is not None else "")
    except DtrError as exc:
        _fail(exc)
    ms = 1000.0 * res.decode_s / res.steps if res.steps else float("nan")
    console.print(f"[dim]{sum(map(len, res.tokens))} tokens ({', '.join(sorted(set(res.stopped)))})"
                  f"; prefill {len(rows)}×{max(map(len, rows))} tokens "
                  f"{1000 * res.prefill_s:.0f} ms; decode {ms:.1f} ms/step[/]")


@main.command("genai-folder", epilog="""\b
Writes OUT/model.onnx (MODEL with a pass-through conv state per linear layer, which
onnxruntime-genai 0.18 requires), OUT/genai_config.json and the tokenizer files; run it with
onnxruntime_genai.Model(OUT) (extra [genai]). docs/exporters.md, "onnxruntime-genai", says what
works and what does not.
Exit codes:
  0  written
  2  bad input: missing or prefill-only model, no tokenizer, a decoder or option
     onnxruntime-genai cannot run (no head size recorded, an unknown --model-type,
     --context-length beyond a learned position table)
  130 / 143  interrupted by Ctrl-C / SIGTERM: OUT holds what it held before""")
@click.argument("model", type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="Folder to write.")
@click.option("--tokenizer", default=None, type=click.Path(path_type=str),
              help="Hugging Face tokenizer folder (default: looked up beside MODEL).")
@click.option("--context-length", type=int, default=None,
              help="context_length and search.max_length in genai_config.json (default: the "
                   "model's: a learned position table's rows, else its max positions, else "
                   "4096; at most the position table).")
@click.option("--model-type", default=None,
              help="model.type in genai_config.json (default: the model's own when "
                   "onnxruntime-genai runs it as a plain decoder, else decoder).")
def genai_folder_cmd(model: str, output: str, tokenizer: str | None, context_length: int | None,
                     model_type: str | None) -> None:
    """Write a folder onnxruntime-genai can run from a stateful decoder MODEL (.onnx)."""
    from dtr_compile.runtime.genai_config import write_genai_folder

    notes: list[str] = []
    try:
        if context_length is not None and context_length < 1:
            raise InputError("--context-length must be >= 1")
        with _sigterm_as_interrupt():
            out = write_genai_folder(model, output, tokenizer, context_length=context_length,
                                     model_type=model_type, notes=notes)
    except DtrError as exc:
        _fail(exc)
    except KeyboardInterrupt as exc:  # the model being written is removed; what stood is kept
        term = isinstance(exc, Terminated)
        click.echo(f"dtr-compile: {'terminated (SIGTERM)' if term else 'interrupted'}; "
                   f"{output} holds what it held before (nothing half-written): rerun the same "
                   "command", err=True)
        sys.exit(143 if term else 130)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {out}/model.onnx, genai_config.json and the tokenizer files")


@main.command("lint-trt", epilog="""\b
Rules (severity): TRT001 op TensorRT does not import (reject); TRT002 op not in the table (warn);
TRT003 CumSum axis / TopK K computed at run time (reject); TRT004 Einsum (reject with ellipsis or
diagonal, else avoid); TRT005 CumSum/ReduceSum accumulating in fp16 (avoid); TRT006 op needing a
recent TensorRT: Attention 10.14, RMSNormalization/RotaryEmbedding 10.15, LayerNormalization 8.6
(warn); TRT007 opset > 20 (warn); TRT008 int64 I/O (warn); TRT009 float64 (warn); TRT010 control
flow / data-dependent shapes (warn); TRT011 fused LinearAttention-27 (reject). The last line
says which linear-attention form the file holds (plain ops or fused LinearAttention).
Exit codes:
  0  no reject/avoid finding (no finding at all with --strict)
  4  TensorRT would reject the model or it holds something --target tensorrt avoids
  2  bad input""")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--strict", is_flag=True, default=False, help="Fail on warnings too.")
@click.option("--json", "json_path", default=None, type=click.Path(path_type=str),
              help="Also write the findings as JSON here.")
def lint_trt_cmd(model: str, strict: bool, json_path: str | None) -> None:
    """List what TensorRT would reject or run suspiciously in MODEL (.onnx); needs no GPU."""
    from dtr_compile.exporters.tensorrt import blocking, findings_table, lint_trt
    from dtr_compile.runtime.evaluate import write_json

    try:
        check_json_output(json_path, onnx_inputs("model", model))
        findings = lint_trt(model)
        if json_path:
            write_json(json_path, [f.to_dict() for f in findings])
    except DtrError as exc:
        _fail(exc)
    if findings:
        table_console().print(findings_table(findings, title=f"TensorRT lint: {Path(model).name}"))
    failing = blocking(findings, strict=strict)
    click.echo(f"{len(findings)} finding{'s' if len(findings) != 1 else ''}, {len(failing)} "
               f"blocking" + ("" if failing else ": TensorRT-ready"))
    click.echo("linear-attention form: " + _linear_attention_form(model))
    sys.exit(EXIT_PARITY if failing else 0)


def _linear_attention_form(model: str) -> str:
    """Which linear-attention form the ONNX file at ``model`` holds, in words."""
    import onnx

    from dtr_compile.exporters.fused import nodes

    domains = sorted({n.domain or "ai.onnx" for n in
                      nodes(onnx.load(model, load_external_data=False).graph)
                      if n.op_type == "LinearAttention"})
    if not domains:
        return "plain ops (no LinearAttention node)"
    names = {"ai.onnx": "ONNX LinearAttention-27", "com.microsoft": "com.microsoft LinearAttention"}
    return "fused (" + ", ".join(names.get(d, f"{d} LinearAttention") for d in domains) + ")"


@main.command("inspect", epilog="""\b
Columns: site id, module path, kind (sdpa | eager), query heads H / key-value heads Hkv / head
dim Dk, masking (none | padding | causal | causal+padding, with the mask tensor's kind), query ×
key length, and the FLOPs of the site's attention core (q·kᵀ and p·v) with its share of the
model's FLOPs at the inputs shown. Look-alikes that cannot be rewritten follow, with the reason.
Exit codes:
  0  sites listed
  2  bad input, a model torch.export cannot capture, or no rewritable attention site""")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--seq-len", "seq_len", type=int, default=None,
              help="Sequence length T of the inputs (default: the archive's example length; "
                   "128, at most the max positions, for a Hugging Face folder).")
@click.option("--data", default=None, type=click.Path(path_type=str),
              help="Example inputs (.pt dict of tensors) instead of ones built from the model's "
                   "signature or config; required for a pickled model.")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON instead of a table.")
@click.option("--ignore-auto-map", is_flag=True, default=False,
              help="A Hugging Face folder whose config.json names its own model code "
                   "(auto_map) is refused: dtr-compile never runs code from a model folder. "
                   "This loads it with transformers' built-in class for its model_type instead.")
@click.option("--trust-pickle", is_flag=True, default=False,
              help="Allow loading a pickled torch.save model (runs code from the file).")
def inspect_cmd(model: str, seq_len: int | None, data: str | None, as_json: bool,
                trust_pickle: bool, ignore_auto_map: bool) -> None:
    """List the attention sites of MODEL (a torch.export archive .pt/.pt2, or a Hugging Face
    folder) with their shapes, masks and FLOPs share, and say why any look-alike is not
    rewritable. Without --data the inputs are built: from the archive's input signature, or from
    the folder's config.json (input_ids [2, T] and an attention_mask, or pixel_values [2, C, H, W]).
    A hybrid written by dtr-compile (.pt2) shows which sites are linear, with their compile's ids;
    an .onnx file lists the sites dtr-compile recorded in it, or its softmax attention by module."""
    from dtr_compile.fileio import json_text
    from dtr_compile.inspect import inspect_model, inspect_onnx, render

    try:
        result = inspect_onnx(model) if Path(model).suffix == ".onnx" else \
            inspect_model(model, seq_len=seq_len, data=data, trust_pickle=trust_pickle,
                          ignore_auto_map=ignore_auto_map)
    except DtrError as exc:
        _fail(exc)
    if as_json:
        click.echo(json_text(result.to_dict()), nl=False)
    else:
        render(result, table_console())


def entry() -> None:
    """Console-script entry: an unexpected exception is one line and exit 1 (set DTR_DEBUG=1 for
    the traceback); a DtrError has already been turned into its own line and exit code."""
    try:
        main()
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("DTR_DEBUG"):
            raise
        click.echo(f"dtr-compile: internal error: {type(exc).__name__}: {exc} "
                   "(rerun with DTR_DEBUG=1 for the traceback, and please report it)", err=True)
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":  # pragma: no cover
    entry()
