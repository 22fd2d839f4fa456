"""Linear-attention operators that replace softmax attention sites.

Shapes use a fixed letter set: ``q: [B, H, T, Dk]``, ``k: [B, Hkv, S, Dk]``, ``v: [B, Hkv, S, Dv]``,
feature maps ``φ(x): [..., F]``, output ``[B, H, T, Dv]``. Key/value heads are repeated to ``H``
as ``repeat_interleave`` (the grouping SDPA's ``enable_gqa`` uses).

Bidirectional linear attention (Katharopoulos et al. 2020, "Transformers are RNNs", eq. 4–6)::

    out_t = φ(q_t) · Σ_s m_s φ(k_s) v_sᵀ  /  (φ(q_t) · Σ_s m_s φ(k_s) + eps)

with ``m_s`` the key padding mask. State and normaliser are accumulated in fp32 whatever the input
dtype; an all-padding sequence gives zeros (0 / eps), never NaN.

The Hedgehog feature map (Zhang et al. 2024, "The Hedgehog & the Porcupine", eq. 5) is, per head,
``φ(x) = [softmax(x W + b), softmax(−(x W + b))]`` over the feature dim, with ``W: [Dk, Dk]``
initialised to the identity and ``b`` to zero, so ``F = 2·Dk``. Queries and keys have separate
maps (as in LoLCATs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Keys with an additive-mask value at or below this count as padding.
ADDITIVE_MASK_PADDING = -5.0e3


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``x: [B, Hkv, S, D]`` → ``[B, H, S, D]``, each kv head repeated ``H // Hkv`` times."""
    hkv = x.shape[1]
    if hkv == num_heads:
        return x
    return x.repeat_interleave(num_heads // hkv, dim=1)


def key_valid_from_mask(mask: torch.Tensor, mask_kind: str) -> torch.Tensor:
    """Key padding mask ``[B|1, S]`` (float, 1 = attend) from a site's attention mask.

    Args:
        mask: bool (True = attend) or additive float mask, broadcastable to ``[B, H, T, S]``.
        mask_kind: ``"bool"`` or ``"additive"``.

    A key is valid when any query of any head may attend it; for a padding mask this is exactly
    the padding mask.
    """
    if mask_kind == "bool":
        valid = mask.to(torch.float32)
    else:
        valid = (mask > ADDITIVE_MASK_PADDING).to(torch.float32)
    while valid.dim() < 4:
        valid = valid.unsqueeze(0)
    return valid.amax(dim=2).amax(dim=1)  # [B|1, S]


class HedgehogFeatureMap(nn.Module):
    """Per-head learnable feature map ``φ(x) = [softmax(xW+b), softmax(−xW−b)]``, ``F = 2·Dk``.

    Args:
        num_heads: ``H``.
        head_dim: ``Dk``.
    """

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(num_heads, 1, 1))  # [H, Dk, Dk]
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, head_dim))  # [H, 1, Dk]

    @property
    def feature_dim(self) -> int:
        return 2 * self.weight.shape[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, H, T, Dk]`` → ``φ(x): [B, H, T, 2·Dk]`` (fp32)."""
        z = torch.matmul(x.float(), self.weight.float()) + self.bias.float()  # [B, H, T, Dk]
        return torch.cat([F.softmax(z, dim=-1), F.softmax(-z, dim=-1)], dim=-1)


FEATURE_MAPS: dict[str, type[nn.Module]] = {"hedgehog": HedgehogFeatureMap}


def make_feature_map(name: str, num_heads: int, head_dim: int) -> nn.Module:
    """Build feature map ``name`` from the registry.

    Raises:
        ValueError: unknown name.
    """
    try:
        cls = FEATURE_MAPS[name]
    except KeyError:
        raise ValueError(f"unknown feature map {name!r}; known: {', '.join(sorted(FEATURE_MAPS))}") from None
    return cls(num_heads, head_dim)


def linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    causal: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Linear attention from feature-mapped queries and keys (fp32 state and normaliser).

    Args:
        phi_q: ``[B, H, T, F]``.
        phi_k: ``[B, H, S, F]``.
        v: ``[B, H, S, Dv]``.
        key_valid: ``[B|1, S]``, 1 = attend, or None.
        causal: causal form (prefix sums); query ``t`` sees keys ``s <= t + S - T``.
        eps: added to the normaliser.

    Returns:
        ``[B, H, T, Dv]`` in fp32.
    """
    phi_q, phi_k, v = phi_q.float(), phi_k.float(), v.float()
    if key_valid is not None:
        phi_k = phi_k * key_valid[:, None, :, None].to(phi_k.dtype)
    if not causal:
        kv = torch.matmul(phi_k.transpose(-1, -2), v)  # [B, H, F, Dv]
        z = phi_k.sum(dim=-2, keepdim=True)  # [B, H, 1, F]
        num = torch.matmul(phi_q, kv)  # [B, H, T, Dv]
        den = (phi_q * z).sum(dim=-1, keepdim=True)  # [B, H, T, 1]
        return num / (den + eps)
    T, S = phi_q.shape[-2], phi_k.shape[-2]
    kv = torch.cumsum(phi_k.unsqueeze(-1) * v.unsqueeze(-2), dim=2)  # [B, H, S, F, Dv]
    z = torch.cumsum(phi_k, dim=2)  # [B, H, S, F]
    kv, z = kv[:, :, S - T :], z[:, :, S - T :]  # bottom-right aligned, as SDPA's is_causal
    num = torch.einsum("bhtf,bhtfd->bhtd", phi_q, kv)
    den = (phi_q * z).sum(dim=-1, keepdim=True)
    return num / (den + eps)


def naive_linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    causal: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """fp32 quadratic reference of :func:`linear_attention` (same signature): the normalised,
    masked ``A = φ(Q) φ(K)ᵀ`` applied to ``V``."""
    phi_q, phi_k, v = phi_q.double(), phi_k.double(), v.double()
    a = phi_q @ phi_k.transpose(-1, -2)  # [B, H, T, S]
    if key_valid is not None:
        a = a * key_valid[:, None, None, :].double()
    if causal:
        T, S = a.shape[-2:]
        a = a * torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    return ((a @ v) / (a.sum(-1, keepdim=True) + eps)).float()


class LinearAttention(nn.Module):
    """A drop-in for one softmax attention site: ``(q, k, v[, mask]) → [B, H, T, Dv]``.

    Args:
        num_heads: ``H``. num_kv_heads: ``Hkv`` (``H % Hkv == 0``).
        head_dim: ``Dk``. mask_kind: the site's mask, ``"none"``, ``"bool"`` or ``"additive"``.
        causal: causal site. feature_map: registry name.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, *, mask_kind: str = "none",
                 causal: bool = False, feature_map: str = "hedgehog", eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.mask_kind, self.causal, self.eps = mask_kind, causal, eps
        self.feature_map_name = feature_map
        self.feature_map_q = make_feature_map(feature_map, num_heads, head_dim)
        self.feature_map_k = make_feature_map(feature_map, num_heads, head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """q: [B, H, T, Dk], k: [B, Hkv, S, Dk], v: [B, Hkv, S, Dv], mask as the site's."""
        k, v = repeat_kv(k, self.num_heads), repeat_kv(v, self.num_heads)
        key_valid = key_valid_from_mask(mask, self.mask_kind) if mask is not None else None
        out = linear_attention(self.feature_map_q(q), self.feature_map_k(k), v, key_valid,
                               causal=self.causal, eps=self.eps)
        return out.to(q.dtype)


class SoftmaxAttention(nn.Module):
    """Recomputes a site's softmax attention from its own q, k, v and mask (the teacher).

    Equal to the original site: SDPA with the site's scale, causality and mask.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, *, scale: float, causal: bool = False) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.scale, self.causal = num_heads, num_kv_heads, scale, causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """q: [B, H, T, Dk], k: [B, Hkv, S, Dk], v: [B, Hkv, S, Dv] → [B, H, T, Dv]."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )


class SiteSwitch(nn.Module):
    """A site that runs either its softmax teacher or its linear student, by ``use_linear``.

    The scheduler flips the flag to try a candidate and flips it back to revert: an exact swap,
    with no graph or weight copies.
    """

    def __init__(self, softmax: SoftmaxAttention, linear: LinearAttention) -> None:
        super().__init__()
        self.softmax, self.linear = softmax, linear
        self.use_linear = False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return (self.linear if self.use_linear else self.softmax)(q, k, v, mask)
