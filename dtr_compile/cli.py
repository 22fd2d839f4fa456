"""`dtr-compile`: a thin shell around :func:`dtr_compile.pipeline.compile_model`.

``dtr-compile MODEL --budget 0.5% -o hybrid.onnx`` compiles; other subcommands (``inspect`` …)
are listed by ``dtr-compile --help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

from dtr_compile import __version__
from dtr_compile.config import CompileConfig, read_project_config
from dtr_compile.errors import EXIT_INTERNAL, DtrError

EXIT_CODES = """\b
Exit codes:
  0  the hybrid was written and verified
  2  bad input: missing or unknown file, malformed flag or budget, data that does not fit
  3  no site fits the budget: the original model is written instead, with the report
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
              help="accuracy | macro_f1 | agreement. Default: accuracy with labels, else agreement "
                   "with the original model's predictions.")
@click.option("--report", default=None, help="Report JSON path (default: OUTPUT.report.json).")
@click.option("--feature-map", default=None, help="Linear-attention feature map (default hedgehog).")
@click.option("--distill-steps", type=int, default=None, help="Optimiser steps per site (default 300).")
@click.option("--distill-lr", type=float, default=None, help="Distillation learning rate (default 0.01).")
@click.option("--max-calib-samples", type=int, default=None,
              help="Calibration sequences used for distillation (default 64).")
@click.option("--eval-batch", type=int, default=None, help="Batch size for evaluation (default 32).")
@click.option("--keep", default=None, help="Comma-separated sites (id or module path) never replaced.")
@click.option("--max-linear", type=int, default=None, help="Replace at most N sites.")
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
    click.echo(f"wrote {result.output} and {result.report_path}")
    sys.exit(result.exit_code)


if __name__ == "__main__":  # pragma: no cover
    try:
        main()
    except Exception as exc:  # noqa: BLE001
        click.echo(f"dtr-compile: internal error: {exc}", err=True)
        sys.exit(EXIT_INTERNAL)
