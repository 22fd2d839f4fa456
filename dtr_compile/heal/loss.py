"""What the recovery stage minimises: the hybrid's outputs against the original's, row by row.

The original model (the teacher) runs over the calibration set **once**
(:func:`record_targets`); every training step and held-out evaluation then compares the hybrid's
first output with those stored targets. Three losses, chosen from the metric and the output's
shape by :func:`loss_kind`:

==========  ==========================================  =========================================
kind        for                                         per row: ``(numerator, denominator)``
==========  ==========================================  =========================================
token-kl    causal LMs, ``logits: [N, T, V]`` with      ``Σ_t w_t KL(p_t ‖ q_t)`` over the row's
            metric perplexity, agreement or kl          valid positions, and ``Σ_t w_t``
class-kl    classifiers, ``logits: [N, C]`` with        ``KL(p ‖ q)`` over the classes, and 1
            accuracy, macro_f1, agreement or kl
mse         anything else (embeddings: cosine, mse;     ``Σ (y − ŷ)²`` and ``Σ y²``: relative MSE
            user metrics)
==========  ==========================================  =========================================

``p`` is the teacher's softmax, ``q`` the hybrid's, ``w_t`` the attention mask (1 for a real
token; all ones without a mask). The loss of a set of rows is ``Σ numerators / Σ denominators``,
so per-row terms can be computed anywhere (one row per forward, on any rank) and summed in row
order (see :mod:`dtr_compile.heal.train`).

**What is stored for token-kl.** Full next-token distributions do not fit: SmolLM2's 49,152-token
vocabulary makes one 1024-token row 200 MB in fp32. We keep, per position, the teacher's ``K``
largest log-probabilities ``log p_i`` (fp32) with their token ids (int32) and the log of the mass
they leave, ``log p_rest = log(1 − Σ_{i∈top-K} p_i)``: ``K·8 + 4`` bytes per position (K = 64:
2 MB for 4,096 positions). The loss is then the KL divergence between the two distributions
*coarsened* to ``K + 1`` outcomes (the top-K tokens, and "any other token")::

    KL_K(p ‖ q) = Σ_{i∈top-K} p_i (log p_i − log q_i) + p_rest (log p_rest − log q_rest)

with ``q_rest = Σ_{j∉top-K} q_j`` computed exactly from the hybrid's full logits. It is the exact
KL of that coarsening, a lower bound of the full KL (data-processing inequality; equality when
the teacher puts all its mass in its top K), and unlike plain top-K truncation it stays a proper
divergence: the student cannot gain by moving mass outside the teacher's top K. Caching top-K
teacher log-probabilities is the usual offline form of LLM distillation (e.g. Anshumann et al.,
"Sparse Logit Sampling", ACL 2025, arXiv 2503.16870, who study its bias; the ``rest`` bucket is
what removes the bias towards overconfidence they measure for truncated top-K).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dtr_compile.data import Dataset, _first_tensor
from dtr_compile.device import Placement, to_device
from dtr_compile.errors import InputError
from dtr_compile.metrics import Metric
from dtr_compile.parallel import Group, batch_rows

LOSS_KINDS = ("token-kl", "class-kl", "mse")
#: metrics about a distribution over the last axis: healed with a KL divergence
_DISTRIBUTION_METRICS = {"perplexity", "agreement", "kl", "accuracy", "macro_f1"}
MASK_INPUT = "attention_mask"


def loss_kind(metric: Metric, output_dims: int) -> str:
    """``token-kl`` for ``[N, T, V]`` logits under a distribution metric (perplexity,
    agreement, kl), ``class-kl`` for ``[N, C]`` logits under one (accuracy, macro_f1,
    agreement, kl), else ``mse`` (embeddings, regression, user metrics)."""
    if metric.name in _DISTRIBUTION_METRICS:
        if output_dims == 3:
            return "token-kl"
        if output_dims == 2:
            return "class-kl"
    return "mse"


@dataclass
class Targets:
    """The teacher's stored outputs over the calibration rows (CPU tensors, rows first).

    Attributes:
        kind: a :data:`LOSS_KINDS` name.
        tensors: ``token-kl``: ``top_logp: [N, T, K]`` fp32, ``top_idx: [N, T, K]`` int32,
            ``rest_logp: [N, T]`` fp32 (``-inf`` where the top K hold all the mass), ``weight:
            [N, T]`` fp32; ``class-kl``: ``logp: [N, C]`` fp32; ``mse``: ``out: [N, ...]`` fp32.
        top_k: ``K`` (token-kl), else 0.
    """

    kind: str
    tensors: dict[str, torch.Tensor]
    top_k: int = 0

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def row(self, i: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Row ``i`` of every tensor, as a batch of one (``[1, ...]``)."""
        return {k: v[i:i + 1].to(device) if device is not None else v[i:i + 1]
                for k, v in self.tensors.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _weights(inputs: Mapping[str, torch.Tensor], rows: int, t: int,
             device: torch.device) -> torch.Tensor:
    """``[rows, T]`` fp32: the attention mask where the model takes one, else ones."""
    mask = inputs.get(MASK_INPUT)
    if mask is not None and mask.dim() == 2 and mask.shape[1] == t:
        return (mask != 0).to(torch.float32)
    return torch.ones(rows, t, device=device)


def make_targets(kind: str, out: torch.Tensor, inputs: Mapping[str, torch.Tensor],
                 top_k: int) -> dict[str, torch.Tensor]:
    """The stored form of one batch of teacher outputs ``out`` (CPU, see :class:`Targets`)."""
    cpu = torch.device("cpu")
    if kind == "token-kl":
        logp = torch.log_softmax(out.float(), dim=-1)  # [B, T, V]
        k = min(top_k, logp.shape[-1])
        top_logp, top_idx = logp.topk(k, dim=-1)  # [B, T, K]
        rest = logp.scatter(-1, top_idx, -torch.inf).logsumexp(-1)  # [B, T]: log p_rest
        weight = _weights(inputs, out.shape[0], out.shape[1], out.device)
        return {"top_logp": top_logp.to(cpu), "top_idx": top_idx.to(torch.int32).to(cpu),
                "rest_logp": rest.to(cpu), "weight": weight.to(cpu)}
    if kind == "class-kl":
        return {"logp": torch.log_softmax(out.float(), dim=-1).to(cpu)}
    if kind == "mse":
        return {"out": out.float().to(cpu)}
    raise InputError(f"unknown heal loss {kind!r}: expected one of {', '.join(LOSS_KINDS)}")


def record_targets(
    teacher: torch.nn.Module,
    data: Dataset,
    input_names: Sequence[str],
    kind: str,
    *,
    batch_size: int,
    top_k: int = 64,
    placement: Placement | None = None,
    group: Group | None = None,
) -> Targets:
    """Run the teacher over ``data`` once and keep what the loss needs (see the module docstring).

    Over several ranks each runs its contiguous run of whole batches
    (:func:`~dtr_compile.parallel.batch_rows`) and the rows are gathered in rank order: the same
    batches as one process, so the same targets bit for bit.

    Raises:
        InputError: the model's first output does not fit ``kind`` (``token-kl`` needs ``[N, T,
            V]``, ``class-kl`` ``[N, C]``).
    """
    group = group or Group()
    placement = placement or Placement()
    lo, hi = batch_rows(len(data), batch_size, group)

    def mine() -> dict[str, torch.Tensor] | None:
        if hi <= lo:
            return None
        parts: list[dict[str, torch.Tensor]] = []
        sub = Dataset({k: v[lo:hi] for k, v in data.inputs.items()}, None, data.source)
        with torch.inference_mode(), placement.autocast():
            for batch in sub.batches(batch_size):
                batch = to_device(batch, placement.device)
                out = _first_tensor(teacher(*(batch[n] for n in input_names)))
                want = {"token-kl": 3, "class-kl": 2}.get(kind)
                if want is not None and out.dim() != want:
                    raise InputError(f"heal loss {kind} needs the model's first output to have "
                                     f"{want} dims, got shape {tuple(out.shape)}")
                parts.append(make_targets(kind, out, batch, top_k))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    got = [p for p in group.exchange(mine) if p is not None]
    tensors = {k: torch.cat([p[k] for p in got]) for k in got[0]}
    return Targets(kind, tensors, top_k if kind == "token-kl" else 0)


def row_loss(kind: str, out: torch.Tensor, target: Mapping[str, torch.Tensor],
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(numerator, denominator)`` of rows ``out`` against their stored ``target`` (see the
    module docstring); the numerator carries the gradient, both are fp32 scalars.

    Args:
        kind: a :data:`LOSS_KINDS` name.
        out: the hybrid's first output for the rows: ``[B, T, V]``, ``[B, C]`` or any shape.
        target: the same rows of :attr:`Targets.tensors`, on ``out``'s device.
    """
    if kind == "token-kl":
        logq = torch.log_softmax(out.float(), dim=-1)  # [B, T, V]
        idx = target["top_idx"].long()  # [B, T, K]
        logq_top = logq.gather(-1, idx)  # [B, T, K]
        logq_rest = logq.scatter(-1, idx, -torch.inf).logsumexp(-1)  # [B, T]
        p_top, logp_rest = target["top_logp"].exp(), target["rest_logp"]
        kl = (p_top * (target["top_logp"] - logq_top)).sum(-1)  # [B, T]
        has_rest = torch.isfinite(logp_rest)
        rest_term = torch.where(has_rest, logp_rest.exp() * (logp_rest - logq_rest),
                                torch.zeros_like(logp_rest))
        w = target["weight"]
        return ((kl + rest_term) * w).sum(), w.sum()
    if kind == "class-kl":
        logp = target["logp"]
        kl = F.kl_div(torch.log_softmax(out.float(), dim=-1), logp, log_target=True,
                      reduction="sum")
        return kl, torch.tensor(float(out.shape[0]), device=out.device)
    ref = target["out"]
    return (out.float() - ref).square().sum(), ref.square().sum().clamp_min(1e-30)
