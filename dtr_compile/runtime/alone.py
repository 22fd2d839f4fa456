"""Run one measurement in a fresh Python process of its own, one model at a time.

The benchmarks (:mod:`dtr_compile.runtime.bench`, :mod:`dtr_compile.runtime.bench_decode`) time
every model **alone**: a child process loads the one model, warms it up, times it and reports,
and no other model of the benchmark is loaded or running meanwhile. Two models timed step by step
in one process share caches, allocator arenas and memory bandwidth, which can flatter one of them
(issue 24: an interleaved decode benchmark gave ×0.71 where each model alone gives ×0.93–1.03).

:func:`run_alone` calls ``module:function(**kwargs)`` in a child (``python -m
dtr_compile.runtime.alone``, the arguments and the result as JSON) and returns the function's
result, a JSON object, with ``peak_bytes_added`` set: the child's peak resident memory
(``VmHWM``) at the end less its peak before the call, i.e. what loading and running the model
added to a Python process that had imported the function's module; and ``load_1m``, the
machine's 1-minute load average when the call ended (a shared machine's noise, reported beside
the figures).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from dtr_compile.errors import DtrError

#: the line before the child's JSON result on stdout (a library may print to stdout too)
_MARK = "@@dtr-alone-result@@"


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes (``VmHWM`` of ``/proc/self/status``, else
    ``ru_maxrss``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _child_env() -> dict[str, str]:
    """The environment of a child: this one, with the folder this ``dtr_compile`` was imported
    from first on ``PYTHONPATH`` (a checkout run from its root imports itself, not an installed
    copy)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p and p != root]])
    return env


def run_alone(target: str, kwargs: dict[str, Any], *, timeout_s: float = 1800) -> dict[str, Any]:
    """``target(**kwargs)`` in a fresh process of its own; its JSON result with
    ``peak_bytes_added`` and ``load_1m`` (see the module docstring).

    Args:
        target: ``"package.module:function"``; the function takes JSON-able keyword arguments
            and returns a JSON-able dict.

    Raises:
        DtrError: the child failed, timed out or printed no result (the message carries the
            last line of its stderr).
    """
    try:
        proc = subprocess.run([sys.executable, "-m", "dtr_compile.runtime.alone", target],
                              input=json.dumps(kwargs), capture_output=True, text=True,
                              timeout=timeout_s, env=_child_env())
    except subprocess.TimeoutExpired as exc:
        raise DtrError(f"{target} timed out after {timeout_s:.0f} s in its own process") from exc
    if proc.returncode != 0 or _MARK not in proc.stdout:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise DtrError(f"{target} failed in its own process: {last}")
    return json.loads(proc.stdout.rsplit(_MARK, 1)[1])


def _main() -> None:
    module, _, func = sys.argv[1].partition(":")
    fn = getattr(importlib.import_module(module), func)
    kwargs = json.loads(sys.stdin.read())
    before = peak_rss_bytes()
    out = dict(fn(**kwargs))
    out["peak_bytes_added"] = max(0, peak_rss_bytes() - before)
    out["load_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    sys.stdout.write("\n" + _MARK + json.dumps(out) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    _main()
