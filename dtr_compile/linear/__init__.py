"""Linear-attention students: one module per family, each with its fast forms and naive reference.

* :mod:`~dtr_compile.linear.base` — the contract every student meets (prefill and stateful forms);
* :mod:`~dtr_compile.linear.kernel` — feature-map ("kernel") linear attention, bidirectional,
  causal and sliding-window, with :mod:`~dtr_compile.linear.feature_maps`;
* :mod:`~dtr_compile.linear.gated` — gated linear attention (GLA), causal;
* :mod:`~dtr_compile.linear.delta` — DeltaNet and Gated DeltaNet, causal;
* :mod:`~dtr_compile.linear.recurrence` — what GLA and DeltaNet share (chunk scan, output norm,
  the sliding window beside the state, and the fused op ``dtr_compile::linear_attention`` that
  ``--opset 27`` writes as ONNX ``LinearAttention``);
* :mod:`~dtr_compile.linear.window` — exact softmax over the last ``W`` keys (the matrix-state
  students' ``--window``).

The registry :data:`STUDENTS` maps every student kind (``--student``) to its builder: each feature
map name is a feature-map kind (``hedgehog``, ``elu``, …), plus ``gla``, ``deltanet`` and
``gated-deltanet``. :func:`make_student` builds one; :func:`kinds_for_site` says which apply to a
causal or bidirectional site.

flash-linear-attention (``fla-core`` 0.6.0, the field's library for GLA and Gated DeltaNet) is
not a dependency: ``import fla.ops`` imports its Triton kernels and fails on a CPU-only install,
and its layers own their projections where ours reuse the teacher's q/k/v. Its plain-PyTorch
sequential references (``fla/ops/gla/naive.py``, ``fla/ops/gated_delta_rule/naive.py``) agree
with our chunked forms and serve as a second test oracle when fla is installed
(``tests/test_linear_fla_oracle.py``, skipped otherwise). On CUDA its chunked kernels would be
the faster training kernel; CPU training and export use ours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dtr_compile.errors import InputError
from dtr_compile.linear.base import LinearStudent
from dtr_compile.linear.delta import DeltaNet
from dtr_compile.linear.feature_maps import FEATURE_MAPS
from dtr_compile.linear.gated import GatedLinearAttention
from dtr_compile.linear.kernel import LinearAttention

__all__ = ["STUDENTS", "StudentKind", "kinds_for_site", "make_student", "student_kind"]


@dataclass(frozen=True)
class StudentKind:
    """One ``--student`` kind.

    Attributes:
        name: the option value.
        family: ``"feature-map"``, ``"gla"`` or ``"delta"``.
        causal_only: no bidirectional form (refused on encoder sites).
        window: ``--window`` is supported.
        build: ``(H, Hkv, Dk, Dv, mask_kind=, causal=, scale=, window=, chunk_size=) → student``.
    """

    name: str
    family: str
    causal_only: bool
    window: bool
    build: Callable[..., LinearStudent]


def _feature_map(name: str) -> Callable[..., LinearStudent]:
    def build(num_heads: int, num_kv_heads: int, head_dim: int, head_dim_v: int,
              **kw: object) -> LinearStudent:
        return LinearAttention(num_heads, num_kv_heads, head_dim, feature_map=name, **kw)  # type: ignore[arg-type]
    return build


def _deltanet(gated: bool) -> Callable[..., LinearStudent]:
    def build(num_heads: int, num_kv_heads: int, head_dim: int, head_dim_v: int,
              **kw: object) -> LinearStudent:
        return DeltaNet(num_heads, num_kv_heads, head_dim, head_dim_v, gated=gated, **kw)
    return build


STUDENTS: dict[str, StudentKind] = {
    **{n: StudentKind(n, "feature-map", False, True, _feature_map(n)) for n in FEATURE_MAPS},
    "gla": StudentKind("gla", "gla", True, True, GatedLinearAttention),
    "deltanet": StudentKind("deltanet", "delta", True, True, _deltanet(False)),
    "gated-deltanet": StudentKind("gated-deltanet", "delta", True, True, _deltanet(True)),
}


def student_kind(name: str) -> StudentKind:
    """The registry entry of ``name``; raises :class:`InputError` naming the known kinds."""
    try:
        return STUDENTS[name]
    except KeyError:
        raise InputError(f"unknown student kind {name!r}: expected one of "
                         f"{', '.join(STUDENTS)}; pick one with --student") from None


def kinds_for_site(causal: bool) -> tuple[str, ...]:
    """The kinds that apply to a causal (all) or bidirectional (not the causal-only) site."""
    return tuple(n for n, k in STUDENTS.items() if causal or not k.causal_only)


def make_student(kind: str, *, num_heads: int, num_kv_heads: int, head_dim: int,
                 head_dim_v: int, mask_kind: str = "none", causal: bool = True,
                 scale: float | None = None, window: int = 0,
                 chunk_size: int = 64) -> LinearStudent:
    """An untrained student of ``kind`` (shapes as :class:`~dtr_compile.linear.base.
    LinearStudent`). Raises InputError for an unknown kind, ValueError for a causal-only kind on
    a bidirectional site or a window the kind has no form for."""
    return student_kind(kind).build(num_heads, num_kv_heads, head_dim, head_dim_v,
                                    mask_kind=mask_kind, causal=causal, scale=scale,
                                    window=window, chunk_size=chunk_size)
