"""Feature maps ``φ`` of linear attention, in one registry.

Every map takes ``x: [B, H, T, Dk]`` (any float dtype) and returns ``φ(x): [B, H, T, F]`` in fp32,
with ``φ(q) · φ(k) >= 0`` an (unnormalised) attention weight; ``F`` is the map's ``feature_dim``.
Queries and keys get separate instances (``role="query"`` / ``"key"``): learnable maps train
separate weights for each, as in LoLCATs, and Performer stabilises the two differently.
With ``d = Dk`` and, where learnable, ``W: [H, Dk, Dk] = I`` and ``b: [H, 1, Dk] = 0`` per head:

* ``elu``: ``elu(x) + 1``, computed as ``relu(x) + exp(min(x, 0))``; ``F = Dk``
  (Katharopoulos et al. 2020).
* ``relu``: ``relu(x)``; ``F = Dk``.
* ``hedgehog``: ``[softmax(xW + b), softmax(−(xW + b))]``; ``F = 2·Dk`` (Zhang et al. 2024, in
  the LoLCATs form: see :class:`HedgehogFeatureMap`).
* ``t2r``: ``relu(xW + b)``; ``F = Dk`` (Kasai et al. 2021, who draw ``W`` at random with their
  own ``F``; ours starts at the identity).
* ``taylor``: ``[1, x/d^¼, x_i²/√(2d), x_i·x_j/√d (i < j)]``, so ``φ(q)·φ(k) = 1 + s + s²/2``,
  ``s = q·k/√d``; ``F = 1 + Dk + Dk(Dk+1)/2`` (the Based kernel, Arora et al. 2024, without
  Based's duplicate ``x_i·x_j, x_j·x_i`` features). Its features have signs, its kernel is > 0.
* ``performer``: ``exp(ωᵀx/d^¼ − ‖x‖²/(2√d) − c) / √m`` with ``ω: [Dk, m]`` iid Gaussian from a
  fixed seed, ``m = F = 2·Dk`` (FAVOR+ positive random features, Choromanski et al. 2021,
  without the orthogonalisation).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dtr_compile.errors import InputError

ROLES = ("query", "key")


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1`` in ``x``'s own dtype, without the cancellation of ``(exp(x) − 1) + 1``.

    ``elu(−8) + 1`` computed literally in bf16 is ``(−0.99966 → −1.0) + 1 = 0``; this form,
    ``relu(x) + exp(min(x, 0))``, is ``exp(x) + 0`` for ``x <= 0`` (``exp(−8) = 3.4e-4``) and
    ``x + 1`` above, and never overflows. (No ``Where``: onnxruntime's is slow.)
    """
    return torch.relu(x) + torch.exp(torch.clamp(x, max=0.0))


class FeatureMap(nn.Module):
    """Base class: ``x: [B, H, T, Dk]`` → ``φ(x): [B, H, T, F]`` in fp32.

    Args:
        num_heads: ``H``.
        head_dim: ``Dk``.
        role: ``"query"`` or ``"key"``.
    """

    def __init__(self, num_heads: int, head_dim: int, *, role: str = "query") -> None:
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.num_heads, self.head_dim, self.role = num_heads, head_dim, role

    @property
    def feature_dim(self) -> int:
        """``F``."""
        return self.head_dim


class EluFeatureMap(FeatureMap):
    """``φ(x) = elu(x) + 1`` (always ``> 0``), ``F = Dk``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return elu_plus_one(x.float())


class ReluFeatureMap(FeatureMap):
    """``φ(x) = relu(x)``, ``F = Dk``. A token whose entries are all ≤ 0 gets weight 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.float())


class _PerHeadProjection(FeatureMap):
    """A learnable per-head affine map ``z = xW + b``, ``W: [H, Dk, Dk] = I``, ``b: [H, 1, Dk] = 0``."""

    def __init__(self, num_heads: int, head_dim: int, *, role: str = "query") -> None:
        super().__init__(num_heads, head_dim, role=role)
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(num_heads, 1, 1))  # [H, Dk, Dk]
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, head_dim))  # [H, 1, Dk]

    def project(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``[x, 1] [W; b]: [B, H, T, Dout]`` in fp32 for ``weight: [H, Dk, Dout]``, ``bias: [H, 1,
        Dout]``: the bias rides in the matmul instead of a separate pass over its output."""
        x = x.float()
        if isinstance(x.shape[-2], int) and x.shape[-2] == 1:  # one token: two ops, no concat
            return torch.matmul(x, weight.float()) + bias.float()
        x1 = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)  # [B, H, T, Dk+1]
        return torch.matmul(x1, torch.cat([weight, bias], dim=-2).float())


class HedgehogFeatureMap(_PerHeadProjection):
    """Hedgehog: ``φ(x) = [softmax(z), softmax(−z)]`` over the feature dim, ``z = xW + b``, ``F = 2·Dk``.

    Implementations of "hedgehog" disagree; ours is the LoLCATs form (Zhang et al. 2025, its
    ``SoftmaxDim`` activation after a learnable per-head linear layer): one affine map per head, ``W: [H, Dk, Dk]`` initialised
    to the identity and ``b`` to zero, then a softmax over the ``Dk`` features of ``z`` and another
    over those of ``−z``. The Hedgehog paper (Zhang et al. 2024, eq. 5) writes ``[exp(z), exp(−z)]``
    without the two normalisations; the softmax divides each half by a per-token constant, which
    keeps every entry in ``(0, 1]`` whatever the scale of ``x`` (no overflow in any dtype), at the
    price of a per-key weight that the paper's form does not have. Queries and keys have separate
    maps.
    """

    @property
    def feature_dim(self) -> int:
        return 2 * self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # z and −z from one matmul with [W, −W], then one softmax over each half: no Concat
        weight = torch.cat([self.weight, -self.weight], dim=-1)  # [H, Dk, 2·Dk]
        bias = torch.cat([self.bias, -self.bias], dim=-1)  # [H, 1, 2·Dk]
        z = self.project(x, weight, bias)  # [B, H, T, 2·Dk] = [z, −z]
        halves = torch.softmax(z.unflatten(-1, (2, self.head_dim)), dim=-1)  # [B, H, T, 2, Dk]
        return halves.flatten(-2)


class T2RFeatureMap(_PerHeadProjection):
    """T2R: ``φ(x) = relu(xW + b)``, ``W: [H, Dk, Dk] = I``, ``b = 0``, ``F = Dk``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.project(x, self.weight, self.bias))


class TaylorFeatureMap(FeatureMap):
    """Second-order Taylor map (Based): ``φ(q) · φ(k) = 1 + s + s²/2`` with ``s = q·k / √Dk``.

    That is ``exp(s)`` to second order, and ``> 0`` for every ``s``. Based builds it from the full
    outer product ``x⊗x`` (``F = 1 + Dk + Dk²``); we keep each unordered pair once, the diagonal
    ``x_i²`` scaled by ``1/√(2·Dk)`` and each ``x_i·x_j, i < j`` by ``1/√Dk``, which gives the same
    kernel with ``F = 1 + Dk + Dk(Dk+1)/2``.

    Computed as the pairwise products ``x̂_i·x̂_j, i <= j`` of ``x̂ = [1, x]`` (in that order:
    ``1``, then ``x``, then the pairs of ``x`` row by row), exact in fp32. The pairs are gathered
    along the feature axis of ``x̂ᵀ: [Dk+1, T]``, so each gathered row is one contiguous copy
    (onnxruntime's Gather along the innermost axis copies element by element), and returned as a
    transposed view that the following matmuls absorb.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    scale: torch.Tensor

    def __init__(self, num_heads: int, head_dim: int, *, role: str = "query") -> None:
        super().__init__(num_heads, head_dim, role=role)
        rows, cols = torch.triu_indices(head_dim + 1, head_dim + 1)  # pairs of x̂ = [1, x]
        scale = torch.full((len(rows),), 1.0 / math.sqrt(head_dim))  # x_i·x_j, i < j
        scale[rows == cols] = 1.0 / math.sqrt(2.0 * head_dim)  # x_i²
        scale[rows == 0] = 1.0 / head_dim**0.25  # 1·x_j
        scale[0] = 1.0  # 1·1
        self.register_buffer("rows", rows, persistent=False)  # [F]
        self.register_buffer("cols", cols, persistent=False)  # [F]
        self.register_buffer("scale", scale[:, None], persistent=False)  # [F, 1]

    @property
    def feature_dim(self) -> int:
        return 1 + self.head_dim + self.head_dim * (self.head_dim + 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x_hat = torch.cat([torch.ones_like(x[..., :1]), x], dim=-1).transpose(
            -1, -2
        )  # [B, H, Dk+1, T]
        phi_t = x_hat.index_select(-2, self.rows) * self.scale * x_hat.index_select(-2, self.cols)
        return phi_t.transpose(-1, -2)  # [B, H, T, F]


class PerformerFeatureMap(FeatureMap):
    """Performer (FAVOR+) positive random features: ``E[φ(q) · φ(k)] ∝ exp(q·k / √Dk)``.

    ``φ(x)_i = exp(ω_iᵀx̃ − ‖x̃‖²/2 − c) / √m`` with ``x̃ = x / Dk^¼``, ``ω: [Dk, m]`` iid standard
    Gaussian drawn once from ``seed`` (a persistent buffer, so a saved module keeps its features),
    ``m = 2·Dk``. The stabiliser ``c`` cancels between numerator and normaliser (it only rescales
    ``eps``): for queries it is the row's own maximum exponent (per token); for keys the maximum
    over all positions and features of a ``(batch, head)`` (as in the Performer reference code),
    so no key overflows and the largest is exactly ``1/√m``. That key maximum sees every position,
    padding and (in a causal site) later keys included, but only through the rescaled ``eps``.
    """

    omega: torch.Tensor

    def __init__(
        self, num_heads: int, head_dim: int, *, role: str = "query", seed: int = 0
    ) -> None:
        super().__init__(num_heads, head_dim, role=role)
        gen = torch.Generator().manual_seed(seed)
        self.num_features = 2 * head_dim  # m
        omega = torch.randn(head_dim, self.num_features, generator=gen)
        self.register_buffer("omega", omega)  # [Dk, m]

    @property
    def feature_dim(self) -> int:
        return self.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / self.head_dim**0.25  # x̃: [B, H, T, Dk]
        logits = torch.matmul(x, self.omega) - 0.5 * (x * x).sum(-1, keepdim=True)  # [B, H, T, m]
        if self.role == "query":
            c = logits.amax(dim=-1, keepdim=True)  # [B, H, T, 1]
        else:
            c = logits.amax(dim=(-2, -1), keepdim=True)  # [B, H, 1, 1]
        return torch.exp(logits - c) / math.sqrt(self.feature_dim)


FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    "elu": EluFeatureMap,
    "relu": ReluFeatureMap,
    "hedgehog": HedgehogFeatureMap,
    "t2r": T2RFeatureMap,
    "taylor": TaylorFeatureMap,
    "performer": PerformerFeatureMap,
}


def make_feature_map(
    name: str, num_heads: int, head_dim: int, *, role: str = "query"
) -> FeatureMap:
    """Build feature map ``name`` from :data:`FEATURE_MAPS`.

    Raises:
        InputError: ``name`` is not in the registry.
    """
    try:
        cls = FEATURE_MAPS[name]
    except KeyError:
        raise InputError(
            f"unknown feature map {name!r}: expected one of "
            f"{', '.join(FEATURE_MAPS)}; pick one with --feature-map"
        ) from None
    return cls(num_heads, head_dim, role=role)
