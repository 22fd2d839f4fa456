"""flash-linear-attention's own sequential references as a second oracle (issue 14).

``flash-linear-attention`` / ``fla-core`` 0.6.0 is not a dependency: its package imports Triton
kernels at ``import fla.ops`` (ModuleNotFoundError: triton on a CPU-only install), so neither
its layers nor its chunked kernels run here. Its naive references, ``fla/ops/gla/naive.py`` and
``fla/ops/gated_delta_rule/naive.py``, are plain PyTorch (the latter needs ``einops``): when fla
is installed these tests load those two files by path, without importing ``fla.ops``, and
compare them with our chunked forms. They skip when fla (or einops) is absent.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.matrix_state_checks import assert_close, chunked_recurrence, functional_inputs, seeded


def _fla_file(rel: str) -> ModuleType:
    try:
        spec = importlib.util.find_spec("fla")
    except ImportError:  # fla's package __init__ failed
        spec = None
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("flash-linear-attention (fla-core) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        pytest.skip(f"fla has no {rel}")
    mod_spec = importlib.util.spec_from_file_location(f"_fla_{path.stem}_{path.parent.name}", path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except ModuleNotFoundError as exc:  # einops
        pytest.skip(f"fla's {rel} needs {exc.name}")
    return module


def _bthd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).contiguous()


def test_gla_matches_fla_naive_recurrent_gla() -> None:
    """fla's GLA has a per-key-dimension decay ``gk: [B, T, H, K]`` and scales q by
    ``K^-0.5``; ours is its per-head case (gk broadcast over K)."""
    naive = _fla_file("ops/gla/naive.py")
    B, H, T, D = 2, 3, 70, 8
    q, k, v, la, _ = functional_inputs("gla", B, H, T, D, D, seeded("fla-gla"))
    s0 = torch.randn(B, H, D, D, generator=seeded("fla-gla-s0"))
    gk = la[..., None].expand(B, H, T, D)
    o_fla, s_fla = naive.naive_recurrent_gla(_bthd(q * D**0.5), _bthd(k), _bthd(v), _bthd(gk),
                                             initial_state=s0, output_final_state=True)
    out, state = chunked_recurrence(q, k, v, la, None, chunk_size=16, initial_state=s0)
    assert_close(out, _bthd(o_fla), tol=1e-4)
    assert_close(state, s_fla, tol=1e-4)


@pytest.mark.parametrize("kind", ["deltanet", "gated-deltanet"])
def test_delta_rule_matches_fla_naive_gated_delta_rule(kind: str) -> None:
    naive = _fla_file("ops/gated_delta_rule/naive.py")
    B, H, T, D = 2, 3, 70, 8
    q, k, v, la, beta = functional_inputs(kind, B, H, T, D, D, seeded(f"fla-{kind}"))
    assert beta is not None
    s0 = torch.randn(B, H, D, D, generator=seeded("fla-delta-s0"))
    o_fla, s_fla = naive.naive_recurrent_gated_delta_rule(
        _bthd(q), _bthd(k), _bthd(v), _bthd(beta), _bthd(la), scale=1.0, initial_state=s0,
        output_final_state=True)
    out, state = chunked_recurrence(q, k, v, la, beta, chunk_size=16, initial_state=s0)
    assert_close(out, _bthd(o_fla), tol=1e-4)
    assert_close(state, s_fla, tol=1e-4)
