"""Where the torch stages run: ``--device`` and ``--dtype``, and what the run's memory peaked at.

The captured graph ``gm`` stays on the CPU in fp32: capture, the ONNX export and its parity check
read it, so the artifacts do not depend on the device. The stages that only *run* the model
(baseline, teacher activations, search evaluations) run a :meth:`Placement.graph` of it: ``gm``
itself on ``cpu``/``fp32``, else a copy with weights on the device in ``dtype`` and every
``device=`` argument of the graph's ops pointed at the device. With ``bf16``/``fp16`` they run
under :func:`torch.autocast` as well, so that fp32 values the graph creates itself (masks, position
tables) mix with the low-precision weights as in mixed-precision inference. Students keep fp32
weights and are trained with fp32 losses on the (up-cast) teacher activations.
"""

from __future__ import annotations

import contextlib
import copy
import os
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule

from dtr_compile.errors import DependencyError, InputError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                  "fp16": torch.float16}
DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"


def resolve_device(spec: str) -> torch.device:
    """``auto`` → ``cuda`` when :func:`torch.cuda.is_available`, else ``cpu``; ``cpu``, ``cuda``,
    ``cuda:N`` as given.

    Raises:
        InputError: not one of those spellings.
        DependencyError: ``cuda``/``cuda:N`` without a usable CUDA device (or N out of range).
    """
    s = str(spec).strip().lower()
    if s == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if s == "cpu":
        return torch.device("cpu")
    if s == "cuda" or (s.startswith("cuda:") and s[5:].isdigit()):
        if not torch.cuda.is_available():
            raise DependencyError(f"--device {spec}: no CUDA device is available to this torch "
                                  f"({torch.__version__}); use --device cpu or auto")
        dev = torch.device(s)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DependencyError(f"--device {spec}: only {torch.cuda.device_count()} CUDA "
                                  "device(s) are visible")
        return dev
    raise InputError(f"unknown --device {spec!r}: expected {DEVICE_HELP}")


def resolve_dtype(name: str) -> torch.dtype:
    """``fp32`` | ``bf16`` | ``fp16`` → the torch dtype.

    Raises:
        InputError: another name.
    """
    key = str(name).strip().lower()
    if key not in DTYPES:
        raise InputError(f"unknown --dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[key]


def _retarget(x: object, device: torch.device) -> object:
    if isinstance(x, torch.device):
        return device
    if isinstance(x, (list, tuple)):
        return type(x)(_retarget(a, device) for a in x)
    return x


def move_graph(gm: GraphModule, device: torch.device, dtype: torch.dtype) -> GraphModule:
    """A copy of ``gm`` with floating weights and buffers in ``dtype`` on ``device``, every
    ``torch.device`` argument of its nodes replaced by ``device``, and its
    ``aten._assert_tensor_metadata`` checks (which pin the capture's device and dtypes) removed.

    ``gm`` itself is not changed.
    """
    moved = copy.deepcopy(gm)
    graph = moved.graph
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        if n.target is torch.ops.aten._assert_tensor_metadata.default and not n.users:
            graph.erase_node(n)
            continue
        n.args = _retarget(n.args, device)  # type: ignore[assignment]
        n.kwargs = {k: _retarget(v, device) for k, v in n.kwargs.items()}
    graph.lint()
    moved.recompile()

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, dtype) if t.is_floating_point() else t.to(device)

    return moved._apply(convert)


def to_device(x: Any, device: torch.device) -> Any:
    """Tensors in ``x`` (nested tuples, lists, dicts) on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(a, device) for a in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


@dataclass(frozen=True)
class Placement:
    """The device and dtype the run-only stages use (see the module docstring)."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @classmethod
    def parse(cls, device: str, dtype: str) -> Placement:
        """From the ``--device`` / ``--dtype`` strings (see :func:`resolve_device`)."""
        dt = resolve_dtype(dtype)
        dev = resolve_device(device)
        return cls(dev, dt)

    @property
    def is_default(self) -> bool:
        """CPU and fp32: the stages run ``gm`` itself, exactly as without the flags."""
        return self.device.type == "cpu" and self.dtype == torch.float32

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)

    def describe(self) -> str:
        """``cpu/fp32``, ``cuda:0/bf16`` …: also the cache-key part for non-default runs."""
        return f"{self.device}/{self.dtype_name}"

    def graph(self, gm: GraphModule) -> GraphModule:
        """``gm`` itself for the default placement, else :func:`move_graph` of it."""
        return gm if self.is_default else move_graph(gm, self.device, self.dtype)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """:func:`torch.autocast` in ``dtype`` on the device, or nothing for fp32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


class OnDevice(torch.nn.Module):
    """``module`` run at a :class:`Placement`: inputs moved there, outputs back to the CPU."""

    def __init__(self, module: torch.nn.Module, placement: Placement) -> None:
        super().__init__()
        self.module, self.placement = module, placement

    def forward(self, *args: torch.Tensor) -> Any:
        with self.placement.autocast():
            out = self.module(*to_device(args, self.placement.device))
        return to_device(out, torch.device("cpu"))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def peak_memory(device: torch.device | None = None) -> dict[str, float | None]:
    """Peak resident memory of this process (and of its finished worker children) and, on CUDA,
    the peak memory torch allocated on ``device``, all in MiB.

    ``ru_maxrss`` is in KiB on Linux and bytes on macOS.
    """
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 2**10
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    gpu = None
    if device is not None and device.type == "cuda":
        gpu = torch.cuda.max_memory_allocated(device) / 2**20
    return {"peak_rss_mib": round(own, 1), "peak_rss_children_mib": round(children, 1),
            "peak_gpu_mib": None if gpu is None else round(gpu, 1)}


@contextlib.contextmanager
def no_grad_on(placement: Placement) -> Iterator[None]:
    """Inference mode and the placement's autocast."""
    with torch.inference_mode(), placement.autocast():
        yield
