"""Error hierarchy of dtr-compile.

Every error a user can cause derives from :class:`DtrError` and carries an exit code, so the CLI
can turn it into one line on stderr and a documented exit status without a traceback.
"""

from __future__ import annotations


class DtrError(Exception):
    """Base of every dtr-compile error. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class InputError(DtrError):
    """Bad user input: a missing or unreadable file, an unknown format, a malformed flag."""

    exit_code = 2


class CaptureError(DtrError):
    """torch.export could not capture the model into an fx graph."""

    exit_code = 2


class NoAttentionError(DtrError):
    """The captured graph holds no attention site that dtr-compile can rewrite."""

    exit_code = 2


class PassError(DtrError):
    """A graph pass failed; the message names the pass and the passes that ran before it."""

    exit_code = 1


class DependencyError(DtrError):
    """An optional dependency or device the run needs is missing (TensorRT, a CUDA GPU)."""

    exit_code = 2


class ParityError(DtrError):
    """The exported artifact disagrees with the PyTorch hybrid beyond tolerance (exit code 4)."""

    exit_code = 4


# Exit codes, documented in the README and `dtr-compile --help`.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_NO_REPLACEMENT = 3
EXIT_PARITY = 4


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``: an exception in one line, for error messages."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def root_cause_line(exc: BaseException, limit: int = 400) -> str:
    """``exc``'s cause in one line: the innermost exception of its chain (torch.onnx's own
    first line is a generic "Failed to export the model with torch.export" followed by advice),
    its non-empty lines joined, terminal colour codes removed, at most ``limit`` characters."""
    import re

    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(root)).splitlines()]
    text = "; ".join(ln for ln in lines if ln)
    return f"{type(root).__name__}: {text}"[:limit]
