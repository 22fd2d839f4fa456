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


@dataclass(frozen=True)
class Budget:
    """How far the validation metric may move from the original model's.

    Grammar (issue 6): ``0.5%`` is relative to the original's metric (``kind="relative"``,
    ``value=0.005``); ``0.005`` is absolute in the metric's own units; ``0.5pt`` is absolute
    percentage points (``value=0.005``).
    """

    text: str
    kind: str  # "relative" | "absolute"
    value: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse a budget string.

        Raises:
            InputError: the text is not a number with an optional ``%`` or ``pt`` suffix, is
                negative or not finite, or a relative budget is 100% or more.
        """
        m = _BUDGET_RE.match(str(text))
        if m is None:
            raise InputError(
                f"malformed budget {text!r}: expected e.g. '0.5%' (relative), '0.005' (absolute) "
                "or '0.5pt' (percentage points)"
            )
        num = float(m["num"])
        unit = m["unit"]
        if not math.isfinite(num) or num < 0:
            raise InputError(f"budget {text!r} must be a finite number >= 0")
        if unit == "%":
            if num >= 100:
                raise InputError(f"relative budget {text!r} must be below 100%")
            return cls(text=text, kind="relative", value=num / 100.0)
        if unit == "pt":
            if num >= 100:
                raise InputError(f"budget {text!r} must be below 100pt")
            return cls(text=text, kind="absolute", value=num / 100.0)
        return cls(text=text, kind="absolute", value=num)

    def allowed_drop(self, baseline: float) -> float:
        """The largest allowed move of the metric away from ``baseline``, in metric units."""
        return self.value * abs(baseline) if self.kind == "relative" else self.value

    def threshold(self, baseline: float, higher_is_better: bool) -> float:
        """The worst metric value still within budget."""
        drop = self.allowed_drop(baseline)
        return baseline - drop if higher_is_better else baseline + drop


@dataclass(frozen=True)
class CompileConfig:
    """Everything one `dtr-compile` run depends on. Paths are as given by the user."""

    model: str
    output: str
    budget: str = "0.5%"
    data: str | None = None
    calib: str | None = None
    metric: str | None = None
    report: str | None = None
    feature_map: str = "hedgehog"
    distill_steps: int = 300
    distill_lr: float = 1e-2
    distill_batch: int = 8
    max_calib_samples: int = 64
    eval_batch: int = 32
    seed: int = 0
    atol: float = 1e-3
    trust_pickle: bool = False
    keep: tuple[str, ...] = ()
    max_linear: int | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view, written next to the artifacts."""
        return dataclasses.asdict(self)


CONFIG_KEYS = {f.name for f in dataclasses.fields(CompileConfig)} - {"model", "output", "extra"}


def read_project_config(cwd: Path) -> tuple[dict[str, Any], Path | None]:
    """Read defaults from ``dtr.toml`` or ``[tool.dtr-compile]`` in ``pyproject.toml`` in ``cwd``.

    Keys use the CLI flag names with ``-`` or ``_`` (``data``, ``metric``, ``max-calib-samples``).
    Relative paths in the file are resolved against the file's folder.

    Raises:
        InputError: the file is not valid TOML or names an unknown key.
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
            if name not in CONFIG_KEYS:
                raise InputError(
                    f"{path}: unknown key {key!r}; known keys: {', '.join(sorted(CONFIG_KEYS))}"
                )
            if name in ("data", "calib", "report") and isinstance(val, str):
                val = str((path.parent / val)) if not Path(val).is_absolute() else val
            values[name] = val
        return values, path
    return {}, None
