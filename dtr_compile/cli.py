"""`dtr-compile`: a thin shell around :func:`dtr_compile.pipeline.compile_model`.

``dtr-compile MODEL --budget 0.5% -o hybrid.onnx`` compiles; other subcommands (``inspect`` …)
are listed by ``dtr-compile --help``.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

# Reproducible MKL results: the same branch for any memory alignment (set before torch loads MKL).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
# Library deprecation notices (torch/transformers internals) are not the user's to act on.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

# the imports below come after the environment and filters above, on purpose
import click  # noqa: E402
from rich.console import Console  # noqa: E402

from dtr_compile import __version__  # noqa: E402
from dtr_compile.config import CompileConfig, read_project_config  # noqa: E402
from dtr_compile.errors import (  # noqa: E402
    EXIT_INTERNAL,
    EXIT_NO_REPLACEMENT,
    EXIT_PARITY,
    DtrError,
    InputError,
)

EXIT_CODES = """\b
Exit codes:
  0  the hybrid was written and verified
  2  bad input: missing or unknown file, malformed flag or budget, data that does not fit
  3  the budget is not met: no site fits it (the original model is written instead), or
     --min-linear forced sites beyond it (the best such model is written); report included
  4  verification: onnxruntime disagrees with PyTorch beyond --atol (or the fp16
     tolerance), or --target tensorrt's lint found a reject/avoid op (artifacts kept)
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


def _fail(exc: DtrError) -> None:
    click.echo(f"dtr-compile: error: {exc}", err=True)
    sys.exit(exc.exit_code)


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dtr-compile")
def main() -> None:
    """dtr-compile: turn a full-attention transformer into a faster hybrid (DtR)."""


@main.command("compile", epilog=EXIT_CODES)
@click.argument("model", type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="Hybrid ONNX to write (.onnx). The report and config go beside it.")
@click.option("--budget", default=None,
              help="Allowed metric drop: '0.5%' relative to the original, '0.005' absolute, "
                   "'0.5pt' percentage points. Default 0.5%.")
@click.option("--data", default=None, help="Validation set (.pt dict of input tensors [+ labels]).")
@click.option("--calib", default=None, help="Calibration set for distillation (default: --data).")
@click.option("--metric", default=None,
              help="accuracy | macro_f1 | agreement | cosine | mse | perplexity, or "
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
                   "deltanet, gated-deltanet (causal sites only; no --window yet). "
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
                   "stopping on held-out calibration rows may end sooner).")
@click.option("--distill-lr", type=float, default=None,
              help="Learning rate of the feature maps (default 0.03; a block's q/k/v/o weights "
                   "move by 0.003 of their RMS per step).")
@click.option("--window", type=int, default=None,
              help="Causal sites: keep softmax over the last W keys beside the linear attention "
                   "(LoLCATs' sliding window; costs O(T·W) more; bidirectional sites ignore it). "
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
                   "committed until then stand.")
@click.option("--time-limit", default=None,
              help="Stop the search after this long: seconds, or '90s', '15m', '1.5h'.")
@click.option("--resume", is_flag=True, default=None,
              help="Continue an interrupted search: replay the evaluations in the ledger "
                   "(REPORT.ledger.jsonl) if it was written for the same model, data, distilled "
                   "weights and metric; otherwise start afresh.")
@click.option("--cache-mb", type=int, default=None,
              help="Memory for the search's exact prefix cache, which skips the layers before "
                   "each candidate site (default 1024; 0 turns it off).")
@click.option("--atol", type=float, default=None, help="ONNX parity tolerance, max-abs (default 1e-3).")
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt"]), default=None,
              help="Deployment runtime. tensorrt: opset 18 (no ONNX Attention op), and the ONNX "
                   "is linted for TensorRT (a reject/avoid finding fails with exit 4). "
                   "Default onnxruntime (opset 23).")
@click.option("--opset", type=int, default=None,
              help="ONNX opset (default 23, or 18 with --target tensorrt). Every opset keeps "
                   "PyTorch's result for fully masked attention rows.")
@click.option("--fp16", is_flag=True, default=None,
              help="Also write OUTPUT.fp16.onnx (fp16 weights and activations, linear-attention "
                   "state in fp32), verified against the fp32 PyTorch hybrid at the fp16 "
                   "tolerance (max-abs 3e-2·max(1, |ref|), rel. RMS 1e-2).")
@click.option("--export-original", is_flag=True, default=None,
              help="Also write the original model as OUTPUT.original.onnx (verified), for "
                   "side-by-side runs.")
@click.option("--engine", default=None, type=click.Path(path_type=str),
              help="Build a TensorRT engine of the hybrid at this path (needs the [tensorrt] "
                   "extra and a CUDA GPU; with --fp16, fp16 kernels).")
@click.option("--seed", type=int, default=None, help="Random seed (default 0).")
@click.option("--trust-pickle", is_flag=True, default=False,
              help="Allow loading a pickled torch.save model (runs code from the file).")
@click.option("--no-progress", is_flag=True, default=False, help="No progress bars.")
def compile_cmd(model: str, output: str, **flags: object) -> None:
    """Compile MODEL (a torch.export archive .pt/.pt2, or a Hugging Face folder) into a hybrid
    ONNX within the budget. Data and metric may also come from dtr.toml or [tool.dtr-compile]
    in pyproject.toml in the working directory; flags override the file."""
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
        values["trust_pickle"] = bool(flags["trust_pickle"]) or bool(values.get("trust_pickle"))
        values["progress"] = not flags["no_progress"] and sys.stderr.isatty()
        config = CompileConfig(model=model, output=output, **values)
        from dtr_compile.pipeline import compile_model

        result = compile_model(config, Console(stderr=True))
    except DtrError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        click.echo("dtr-compile: interrupted", err=True)
        sys.exit(130)
    rep = result.report
    click.echo(f"{rep['metric']['name']}: original {rep['baseline_metric']:.4f} → hybrid "
               f"{rep['final_metric']:.4f} (threshold {rep['threshold']:.4f}, budget {rep['budget']['text']})")
    click.echo(f"linear sites ({len(rep['replaced'])}/{len(rep['sites'])}): "
               + (", ".join(r["module_path"] for r in rep["replaced"]) or "none"))
    search = rep.get("search") or {}
    if search:
        click.echo(f"search {search['strategy']}: {search['evaluations']} evaluations "
                   f"({search['evaluations_replayed']} replayed), {search['stop_reason']}")
    if result.exit_code == EXIT_NO_REPLACEMENT:
        click.echo("budget not met (exit 3): " + ("no site fits; the original model was written"
                   if not rep["replaced"] else "--min-linear forced sites beyond the budget"))
    click.echo(f"wrote {result.output} and {result.report_path}")
    sys.exit(result.exit_code)


def _console() -> Console:
    return Console(stderr=True)


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
              help="ONNX of the original model: the reference for agreement / cosine.")
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


def _rows(data: str) -> int:
    """Row count of a dataset file (0 when unreadable: the loader reports the problem)."""
    import torch

    try:
        obj = torch.load(data, weights_only=True, map_location="cpu")
        return int(next(iter(obj.values())).shape[0]) if isinstance(obj, dict) and obj else 0
    except Exception:  # noqa: BLE001
        return 0


def _seqs(text: str) -> list[int]:
    try:
        seqs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--seq {text!r}: expected comma-separated lengths, e.g. 512,2048") from None
    if not seqs:
        raise InputError("--seq needs at least one length")
    return seqs


@main.command("bench", epilog="""\b
Columns: each model's median latency (ms) and peak memory (MiB) per length T, and each later
model's ratio to the first (B/A < 1: B is faster / smaller).
Exit codes:
  0  measured (cells a model cannot run say why)
  2  bad input: missing or unloadable file, malformed --seq""")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--seq", "seq", default="512,2048", show_default=True,
              help="Comma-separated sequence lengths.")
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size.")
@click.option("--repeats", type=int, default=10, show_default=True,
              help="Timed rounds per length; each round runs every model once, interleaved.")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed runs first.")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads.")
@click.option("--extend-positions", is_flag=True, default=False,
              help="Time lengths beyond a model's position table (e.g. 512) on a copy whose "
                   "table is extended with random rows; such cells are marked *.")
@click.option("--no-memory", is_flag=True, default=False,
              help="Skip the peak-memory probes (one child process per model and length).")
@click.option("--json", "json_path", default=None, type=click.Path(path_type=str),
              help="Also write the results as JSON here.")
def bench_cmd(models: tuple[str, ...], seq: str, batch: int, repeats: int, warmup: int,
              threads: int | None, extend_positions: bool, no_memory: bool,
              json_path: str | None) -> None:
    """Latency and peak memory of MODELS (.onnx, e.g. original then hybrid) in onnxruntime at
    each sequence length, with inputs synthesised from each model's input signature."""
    from dtr_compile.runtime.bench import bench, bench_table
    from dtr_compile.runtime.evaluate import write_json

    console = _console()
    try:
        result = bench(list(models), _seqs(seq), batch=batch, repeats=repeats, warmup=warmup,
                       threads=threads, extend=extend_positions, memory=not no_memory,
                       on_step=lambda msg: console.log(msg))
        if json_path:
            write_json(json_path, result.to_dict())
    except DtrError as exc:
        _fail(exc)
    Console().print(bench_table(result))


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
        findings = lint_trt(model)
        if json_path:
            write_json(json_path, [f.to_dict() for f in findings])
    except DtrError as exc:
        _fail(exc)
    if findings:
        Console().print(findings_table(findings, title=f"TensorRT lint: {Path(model).name}"))
    failing = blocking(findings, strict=strict)
    click.echo(f"{len(findings)} finding{'s' if len(findings) != 1 else ''}, {len(failing)} "
               f"blocking" + ("" if failing else ": TensorRT-ready"))
    fused = any(f.rule == "TRT011" for f in findings)
    click.echo("linear-attention form: " + ("fused (ONNX LinearAttention-27)" if fused
                                            else "plain ops (no LinearAttention node)"))
    sys.exit(EXIT_PARITY if failing else 0)


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
@click.option("--trust-pickle", is_flag=True, default=False,
              help="Allow loading a pickled torch.save model (runs code from the file).")
def inspect_cmd(model: str, seq_len: int | None, data: str | None, as_json: bool,
                trust_pickle: bool) -> None:
    """List the attention sites of MODEL (a torch.export archive .pt/.pt2, or a Hugging Face
    folder) with their shapes, masks and FLOPs share, and say why any look-alike is not
    rewritable. Without --data the inputs are built: from the archive's input signature, or from
    the folder's config.json (input_ids [2, T] and an attention_mask, or pixel_values [2, C, H, W])."""
    import json

    from dtr_compile.inspect import inspect_model, render

    try:
        result = inspect_model(model, seq_len=seq_len, data=data, trust_pickle=trust_pickle)
    except DtrError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        render(result, Console())


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
