"""Functions that :func:`dtr_compile.runtime.alone.run_alone` runs in the tests
(``tests/test_bench_alone.py``): a module that imports nothing heavy, so that the child's
memory before the call is the interpreter's alone."""

from __future__ import annotations

import os


def child_info(mib: int) -> dict:
    """The child's pid after holding ``mib`` MiB (every page touched: resident)."""
    ballast = bytearray(mib * 2**20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    return {"pid": os.getpid(), "held": len(ballast)}


def child_fails() -> dict:
    return {"x": 1 / 0}
