"""The frozen configuration of one compile run, the budget grammar, and `dtr.toml` reading.

The CLI parses flags (and the project's config file) into one :class:`CompileConfig`;
:func:`dtr_compile.pipeline.compile_model` takes nothing else. The config is written next to the
artifacts so a CI job can be reproduced from its own output.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtr_compile.errors import InputError

_BUDGET_RE = re.compile(r"^\s*(?P<num>[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?)\s*(?P<unit>%|pt)?\s*$")


_BUDGET_HELP = ("'0.5%' (relative to the original's metric), '0.005' (absolute, in the metric's "
                "units) or '0.5pt' (absolute percentage points)")


#: The longest sequence a timing takes (``--deploy-seq``, ``bench --seq / --context``), in
#: tokens: its inputs and activations are allocated whole.
MAX_SEQ = 1 << 20


def check_seed(seed: int) -> None:
    """``--seed`` is one torch (``manual_seed``) and numpy (``default_rng``) both accept.

    Raises:
        InputError: outside ``[0, 2**63 - 1]``.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise InputError(f"--seed {seed}: expected an integer in [0, 2**63 - 1] (torch and "
                         "numpy take no other), e.g. --seed 0")


@dataclass(frozen=True)
class Budget:
    """How far the validation metric may move from the original model's, in its worse direction.

    Grammar (issue 6): ``0.5%`` is relative to the original's metric (``kind="relative"``,
    ``value=0.005``: accuracy 0.90 may fall to 0.8955, perplexity 10 may rise to 10.05);
    ``0.005`` is absolute in the metric's own units; ``0.5pt`` is absolute percentage points
    (``value=0.005``), for metrics that are shares in [0, 1]. Zero is allowed (no change at all).
    """

    text: str
    kind: str  # "relative" | "absolute"
    value: float
    unit: str = ""  # "%", "pt" or "" as written

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse a budget string.

        Raises:
            InputError: the text is not a number with an optional ``%`` or ``pt`` suffix, is
                negative or not finite, or a relative budget is 100% or more.
        """
        m = _BUDGET_RE.match(str(text))
        if m is None:
            raise InputError(f"malformed budget {text!r}: expected {_BUDGET_HELP}")
        num = float(m["num"])
        unit = m["unit"] or ""
        if not math.isfinite(num):
            raise InputError(f"budget {text!r} is not a finite number: expected {_BUDGET_HELP}")
        if num < 0:
            raise InputError(f"budget {text!r} is negative: it must be >= 0, how far the metric "
                             f"may get worse, e.g. {str(text).replace('-', '', 1).strip()!r}")
        if unit == "%":
            if num >= 100:
                raise InputError(f"relative budget {text!r} must be below 100% (100% would "
                                 "accept any model)")
            return cls(text=str(text).strip(), kind="relative", value=num / 100.0, unit=unit)
        if unit == "pt":
            if num >= 100:
                raise InputError(f"budget {text!r} must be below 100pt (100 percentage points "
                                 "would accept any model)")
            return cls(text=str(text).strip(), kind="absolute", value=num / 100.0, unit=unit)
        return cls(text=str(text).strip(), kind="absolute", value=num, unit=unit)

    def check_metric(self, name: str, bounds: tuple[float, float] | None) -> None:
        """Reject a budget that cannot mean what was written for this metric.

        Raises:
            InputError: ``pt`` for a metric that is not a share in [0, 1], or an absolute budget
                as wide as the metric's whole range (``--budget 1`` for accuracy: did the user
                mean ``1%``?).
        """
        if self.unit == "pt" and bounds != (0.0, 1.0):
            raise InputError(f"budget {self.text!r} is in percentage points, which only applies "
                             f"to metrics in [0, 1] (accuracy, macro_f1, agreement); {name} is "
                             f"not one: use a relative ('0.5%') or absolute budget")
        if self.kind == "absolute" and bounds is not None and math.isfinite(bounds[1] - bounds[0]):
            width = bounds[1] - bounds[0]
            if self.value >= width:
                raise InputError(f"budget {self.text!r} spans the whole range of {name} "
                                 f"[{bounds[0]:g}, {bounds[1]:g}] and would accept any model; "
                                 f"did you mean '{self.text}%' or '{self.text}pt'?")

    def check_baseline(self, name: str, baseline: float) -> None:
        """Reject a relative budget around an original metric of 0 (it would allow nothing).

        Raises:
            InputError: relative, non-zero budget and ``baseline == 0``.
        """
        if self.kind == "relative" and self.value > 0 and baseline == 0:
            raise InputError(f"the original model's {name} is 0, so the relative budget "
                             f"{self.text!r} allows no change at all; use an absolute budget "
                             "(e.g. '0.01') instead")

    def allowed_drop(self, baseline: float) -> float:
        """The largest allowed move of the metric away from ``baseline``, in metric units."""
        return self.value * abs(baseline) if self.kind == "relative" else self.value

    def threshold(self, baseline: float, higher_is_better: bool) -> float:
        """The worst metric value still within budget."""
        drop = self.allowed_drop(baseline)
        return baseline - drop if higher_is_better else baseline + drop

    def describe(self, baseline: float, higher_is_better: bool) -> str:
        """One line, e.g. ``budget 0.5% of 0.9 → threshold >= 0.8955``."""
        what = {"%": f" of {baseline:.6g}", "pt": " (percentage points)", "": " (absolute)"}
        op = ">=" if higher_is_better else "<="
        return (f"budget {self.text}{what[self.unit]} → threshold {op} "
                f"{self.threshold(baseline, higher_is_better):.6g}")

    def to_dict(self, baseline: float, higher_is_better: bool) -> dict[str, Any]:
        """The budget as written and as resolved against ``baseline``."""
        return {"text": self.text, "kind": self.kind, "value": self.value, "unit": self.unit,
                "allowed_drop": self.allowed_drop(baseline),
                "threshold": self.threshold(baseline, higher_is_better)}


_TOKENS_RE = re.compile(r"^\s*(?P<num>\d+(\.\d*)?|\.\d+)\s*(?P<unit>[kKmMgG])?\s*$")


def parse_tokens(value: str | int) -> int:
    """A token count from ``500000``, ``"500k"``, ``"2M"`` or ``"1.5G"`` (powers of 1000).

    Raises:
        InputError: not a non-negative number with an optional k / M / G suffix.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    else:
        m = _TOKENS_RE.match(str(value))
        if m is None:
            raise InputError(f"token count {value!r}: expected a number with an optional k, M "
                             "or G suffix, e.g. 500k or 2M")
        unit = (m["unit"] or "").lower()
        count = round(float(m["num"]) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[unit])
    if count < 0:
        raise InputError(f"token count {value!r} must be >= 0 (0: no token budget)")
    return int(count)


_DURATION_RE = re.compile(r"^\s*(?P<num>\d+(\.\d*)?|\.\d+)\s*(?P<unit>s|m|h|min)?\s*$")


def parse_duration(value: str | float | int) -> float:
    """Seconds from ``900``, ``"90s"``, ``"15m"``/``"15min"`` or ``"1.5h"``.

    Raises:
        InputError: not a positive number with an optional ``s``, ``m`` or ``h`` unit.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = _DURATION_RE.match(str(value))
        if m is None:
            raise InputError(f"malformed duration {value!r}: expected seconds (900) or a number "
                             "with a unit: '90s', '15m', '1.5h'")
        seconds = float(m["num"]) * {None: 1, "s": 1, "m": 60, "min": 60, "h": 3600}[m["unit"]]
    if not math.isfinite(seconds) or seconds <= 0:
        raise InputError(f"duration {value!r} must be a positive number of seconds")
    return seconds


#: Calibration tokens each site's distillation sees by default (``--distill-tokens``): see
#: docs/benchmarks.md, "Distillation budget", for how it was chosen.
DEFAULT_DISTILL_TOKENS = 400_000
#: Default probability of a training step without the window (``--window-dropout``).
DEFAULT_WINDOW_DROPOUT = 0.0


@dataclass(frozen=True)
class CompileConfig:
    """Everything one `dtr-compile` run depends on. Paths are as given by the user."""

    model: str
    output: str
    budget: str = "0.5%"
    data: str | None = None
    calib: str | None = None
    test: str | None = None  # held-out set: evaluated after the search, never used by it
    metric: str | None = None
    report: str | None = None
    feature_map: str = "hedgehog"
    student: str | None = None  # a dtr_compile.linear.STUDENTS kind; None: --feature-map's
    distill_target: str = "site"  # "site" | "block" (see dtr_compile.distill)
    distill_loss: str = "mse"  # "mse" | "mse+ce" (site only)
    distill_steps: int = 400  # at most, per site
    distill_tokens: int = DEFAULT_DISTILL_TOKENS  # calibration tokens per site, at most (0: off)
    window_dropout: float = DEFAULT_WINDOW_DROPOUT  # windowed students: p of a step without it
    student_init: str = "attention"  # matrix-state students: "attention" | "plain"
    distill_lr: float = 3e-2  # feature maps
    distill_block_lr: float = 3e-3  # a block's q/k/v/o weights, relative to their RMS
    distill_batch: int = 4  # calibration rows per step, at most
    distill_step_tokens: int = 1024  # long rows: max(1, this // row length) rows per step (0: off)
    distill_queries: int = 64  # query positions per row and step (site, bidirectional; 0: all)
    window: int = 0  # causal sites: softmax over the last W keys beside linear attention (0: off)
    max_calib_samples: int = 64
    max_calib_tokens: int = 32768  # teacher activations of this many tokens in memory, then disk
    workers: int = 0  # distillation processes (0: one per CPU, at most one per site)
    cache_dir: str | None = None  # distilled-weights cache (default: .dtr-cache beside the output)
    no_cache: bool = False
    eval_batch: int = 32
    seed: int = 0
    atol: float = 1e-3
    target: str = "onnxruntime"  # "onnxruntime" | "tensorrt" (opset 18, TensorRT lint)
    opset: int | None = None  # default: 23 for onnxruntime, 18 for tensorrt
    linear_attention: str = "auto"  # "auto" | "plain" | "fused" (exporters/fused.py)
    external_data: str = "auto"  # ONNX weights in NAME.data: "auto" (over 1.5 GiB) | always | never
    fp16: bool = False  # also write <output>.fp16.onnx, verified at the fp16 tolerance
    export_original: bool = False  # also write <output>.original.onnx
    quantize: str | None = None  # "int4" | "int8": also write <output>.int4.onnx etc. (MatMulNBits)
    quantize_block_size: int = 32  # weights per quantization block (onnxruntime-genai's CPU default)
    decoder: bool = True  # causal models: also write <output>.decoder.onnx (KV cache + state)
    decode_steps: int = 64  # greedy tokens of the decoder's parity check
    engine: str | None = None  # build a TensorRT engine here (needs [tensorrt] and a GPU)
    trust_pickle: bool = False
    ignore_auto_map: bool = False  # load an HF folder with auto_map by its built-in class
    keep: tuple[str, ...] = ()
    max_linear: int | None = None
    min_linear: int = 0  # commit at least N sites, beyond the budget if need be (then exit 3)
    search: str = "greedy"  # "greedy" | "lazy" | "ranked" (see dtr_compile.search.schedule)
    max_evals: int | None = None  # stop the search after N evaluations
    time_limit: str | float | None = None  # the whole run: 900, "90s", "15m" (timelimit.py)
    resume: bool = False  # replay the search ledger of an interrupted run with the same inputs
    heal: bool = False  # after the search: train the hybrid's students end to end, search again
    heal_rounds: int = 3  # search → heal rounds at most (dtr_compile.heal.rounds)
    heal_steps: int = 60  # optimiser steps per heal, at most (early stopping may end sooner)
    heal_lr: float = 1e-3
    heal_rank: int = 0  # low-rank adapters on each student's q, k, v and output (0: none)
    heal_rows: int = 2  # calibration rows per heal step
    cache_mb: int = 1024  # memory for the search's prefix cache (0: off)
    confidence: float | None = None  # within budget only when the P upper bound of the drop is
    select: str = "most-linear"  # which hybrid -o gets: "most-linear" (M_opt) | "best" (M_best)
    deploy_seq: str | list[int] | None = None  # bench lengths: "512,2048"; default: T and 4T; "none": skip
    bench: bool = True  # time original vs hybrid ONNX in onnxruntime after export
    bench_repeats: int = 5  # timed runs per model and length, each model alone (median)
    device: str = "auto"  # torch stages: auto (CUDA when present) | cpu | cuda | cuda:N
    dtype: str = "fp32"  # teacher and recorded activations: fp32 | bf16 | fp16
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view, written next to the artifacts."""
        return dataclasses.asdict(self)


def cache_dir(config: CompileConfig) -> Path:
    """The distilled-weights cache folder: ``--cache-dir``, else ``.dtr-cache`` beside the output."""
    return Path(config.cache_dir) if config.cache_dir else \
        Path(config.output).parent / ".dtr-cache"


CONFIG_KEYS = {f.name for f in dataclasses.fields(CompileConfig)} - {"model", "output", "extra"}
# Keys a config file may not set: a dtr.toml can arrive with a pull request, and these switch a
# safety off (unpickling runs code) or describe the terminal, not the project.
COMMAND_LINE_ONLY = {"trust_pickle": "--trust-pickle", "progress": "--no-progress"}
_FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(CompileConfig)}


def _check_type(path: Path, key: str, name: str, val: Any) -> Any:
    """``val`` if it has the type of ``CompileConfig.<name>`` (ints accepted for floats; a
    string or a list of strings for ``keep``).

    Raises:
        InputError: naming the key, the value and the expected type.
    """
    kind = _FIELD_TYPES[name]
    optional = "None" in kind
    base = kind.replace(" | None", "")
    ok: bool
    if name == "budget":  # budget = 0.005 (absolute) reads as well as budget = "0.5%"
        ok = isinstance(val, (str, int, float)) and not isinstance(val, bool)
        expected = "a string such as \"0.5%\" or a number"
    elif name == "keep":
        ok = isinstance(val, str) or (isinstance(val, list) and all(isinstance(v, str) for v in val))
        expected = "a string or a list of strings"
    elif base == "bool":
        ok, expected = isinstance(val, bool), "true or false (a TOML boolean, unquoted)"
    elif base == "int":
        ok, expected = isinstance(val, int) and not isinstance(val, bool), "an integer"
    elif base == "float":
        ok = isinstance(val, (int, float)) and not isinstance(val, bool)
        expected = "a number"
    elif base == "str":
        ok, expected = isinstance(val, str), "a string (quoted)"
    elif base == "str | float":
        ok = isinstance(val, (str, int, float)) and not isinstance(val, bool)
        expected = "a number of seconds or a string such as \"15m\""
    else:  # pragma: no cover - a new field type: accept, the config validates it later
        ok, expected = True, base
    if not ok:
        raise InputError(f"{path}: {key} = {val!r} has the wrong type: expected {expected}"
                         + (" (or leave it out)" if optional else ""))
    return val


def read_project_config(cwd: Path) -> tuple[dict[str, Any], Path | None]:
    """Read defaults from ``dtr.toml`` or ``[tool.dtr-compile]`` in ``pyproject.toml`` in ``cwd``.

    Keys use the CLI flag names with ``-`` or ``_`` (``data``, ``metric``, ``max-calib-samples``).
    Relative paths in the file are resolved against the file's folder.

    ``trust_pickle`` (and ``progress``) are command-line only: a config file that sets them is
    refused, so a file arriving with a pull request cannot switch the pickle guard off.

    Raises:
        InputError: the file is not valid TOML, names an unknown or command-line-only key, or
            gives a value of the wrong type (``export_original = "no"``).
    """
    candidates = [(cwd / "dtr.toml", None), (cwd / "pyproject.toml", ("tool", "dtr-compile"))]
    for path, table in candidates:
        if not path.is_file():
            continue
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not valid TOML ({exc})") from exc
        if table is not None:
            for key in table:
                doc = doc.get(key, {})
            if not doc:
                continue
        values: dict[str, Any] = {}
        for key, val in doc.items():
            name = key.replace("-", "_")
            if name in COMMAND_LINE_ONLY:
                raise InputError(
                    f"{path}: {key!r} may only be given on the command line "
                    f"({COMMAND_LINE_ONLY[name]}): a config file must not switch it; remove it")
            if name not in CONFIG_KEYS:
                raise InputError(
                    f"{path}: unknown key {key!r}; known keys: "
                    f"{', '.join(sorted(CONFIG_KEYS - set(COMMAND_LINE_ONLY)))}"
                )
            val = _check_type(path, key, name, val)
            if name in ("data", "calib", "test", "report", "cache_dir") and isinstance(val, str):
                val = str(path.parent / val) if not Path(val).is_absolute() else val
            values[name] = val
        return values, path
    return {}, None
