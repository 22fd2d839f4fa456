"""Helpers shared by the benchmark scripts: machine facts and writing one section of
``docs/benchmarks.md`` between a benchmark's own markers (other sections stay untouched)."""

from __future__ import annotations

import os
from pathlib import Path


def loadavg() -> str:
    """The 1/5/15-minute load averages, or ``n/a``."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def write_section(doc: Path, name: str, section: str) -> None:
    """Replace the ``<!-- name:begin -->`` … ``<!-- name:end -->`` section of ``doc`` (or append
    it), writing a temporary file and renaming it into place."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{section}\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_suffix(f".md.{name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, doc)


def publish(lines: list[str], doc: Path | None, name: str) -> None:
    """Print the section ``lines`` and, unless ``doc`` is None (``--no-doc``), write it into
    ``doc`` between ``name``'s markers (:func:`write_section`)."""
    table = "\n".join(lines)
    print(table)
    if doc is not None:
        write_section(doc, name, table)
