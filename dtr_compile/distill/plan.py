"""What each site of stage 5 trains as, with which settings, under which cache key.

:class:`DistillSettings` holds every hyper-parameter (all of them enter the cache key),
:func:`plan_distillation` picks each site's target (``site`` or ``block``, see
:mod:`dtr_compile.distill.run`) and computes its key, and :func:`new_student` builds a site's
untrained linear attention.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn
from torch.fx import GraphModule

from dtr_compile.data import Dataset
from dtr_compile.distill.cache import cache_key, code_digest, node_hashes
from dtr_compile.errors import InputError
from dtr_compile.linear import STUDENTS, make_student, student_kind
from dtr_compile.linear.base import LinearStudent
from dtr_compile.linear.feature_maps import FEATURE_MAPS
from dtr_compile.linear.kernel import SiteSwitch, SoftmaxAttention
from dtr_compile.passes.attention_block import (
    AttentionBlock,
    BlockMiss,
    BlockSwitch,
    block_module,
    find_block,
)
from dtr_compile.passes.find_attention import AttentionSite
from dtr_compile.search.ledger import hash_tensors

TARGETS = ("site", "block")
LOSSES = ("mse", "mse+ce")
INITS = ("attention", "plain")
#: Held-out rows are the last ``N // 8`` calibration rows, at most this many.
MAX_HOLDOUT_ROWS = 16


@dataclass(frozen=True)
class DistillSettings:
    """Everything a site's training depends on besides its teacher and data (all in the cache key).

    Attributes:
        target: ``"site"`` or ``"block"``.
        feature_map: a name in :data:`~dtr_compile.linear.feature_maps.FEATURE_MAPS`: the
            student kind when ``student`` is None (``--feature-map``, as before ``--student``).
        student: a kind in :data:`~dtr_compile.linear.STUDENTS` other than a feature map
            (``gla``, ``deltanet``, ``gated-deltanet``), or None; see :attr:`kind`.
        steps: optimiser steps per site, at most (early stopping may end sooner); with
            ``tokens`` the lower of the two budgets applies (:meth:`steps_for`).
        tokens: calibration tokens each site's training sees, at most: ``steps × rows per step
            × row length`` (``--distill-tokens``); 0: ``steps`` alone decides.
        lr: Adam learning rate of the feature map's parameters (cosine-annealed).
        block_lr: learning rate of a block's teacher-initialised weights (q/k/v/o), relative to
            their RMS (Adam moves each weight by about ``block_lr · RMS`` per step).
        batch_rows: calibration rows per step, at most (see ``step_tokens``).
        step_tokens: with rows longer than ``step_tokens / batch_rows`` tokens, fewer rows per
            step: ``max(1, step_tokens // row length)`` (:meth:`rows_for`); 0: ``batch_rows``
            always. For long rows the same tokens then make more, smaller steps, which trains
            the few parameters of a student further per token.
        query_positions: query positions per row and step for bidirectional ``site`` training
            (0: all); keys are always complete.
        loss: ``"mse"`` or ``"mse+ce"`` (``site`` only).
        eval_every: steps between held-out evaluations.
        patience: held-out evaluations without improvement before stopping (0: never stop).
        seed: random seed.
        window: ``W > 0``: causal sites keep softmax over their last ``W`` keys beside the linear
            attention (LoLCATs' sliding window, :func:`~dtr_compile.linear.kernel.
            sliding_window_linear_attention` for feature maps, :class:`~dtr_compile.linear.
            recurrence.MatrixStateStudent` for gla / deltanet); bidirectional sites ignore it.
        window_dropout: with a window, the probability that a training step runs without it
            (the linear branch then covers every key and must carry the whole signal), annealed
            linearly to 0 at half the steps; see :func:`~dtr_compile.distill.train.
            window_dropped` (scheduled sliding-window dropout, arXiv 2510.05901).
        init: matrix-state students (``gla``, ``deltanet``, ``gated-deltanet``): ``"attention"``
            starts their decays, write strengths and output mixing from the teacher's attention
            statistics on the first training rows (:meth:`~dtr_compile.linear.recurrence.
            MatrixStateStudent.init_from_teacher`); ``"plain"`` from fixed slow decays, ``β =
            0.27`` and a least-squares output scale.
    """

    target: str = "site"
    feature_map: str = "hedgehog"
    steps: int = 400
    lr: float = 3e-2
    block_lr: float = 3e-3
    batch_rows: int = 4
    step_tokens: int = 0
    query_positions: int = 64
    loss: str = "mse"
    eval_every: int = 50
    patience: int = 3
    seed: int = 0
    window: int = 0
    student: str | None = None
    tokens: int = 0
    window_dropout: float = 0.0
    init: str = "attention"

    def rows_for(self, row_tokens: int) -> int:
        """Calibration rows per step for rows of ``row_tokens`` tokens: ``batch_rows``, or
        ``max(1, step_tokens // row_tokens)`` when that is fewer."""
        if not self.step_tokens:
            return self.batch_rows
        return max(1, min(self.batch_rows, self.step_tokens // max(1, row_tokens)))

    def steps_for(self, row_tokens: int) -> int:
        """Optimiser steps of a site whose calibration rows hold ``row_tokens`` tokens each:
        ``steps``, or fewer when ``tokens`` runs out first, ``ceil(tokens / (rows ×
        row_tokens))`` with ``rows`` from :meth:`rows_for` (at least 1)."""
        if not self.tokens:
            return self.steps
        per_step = max(1, self.rows_for(row_tokens) * max(1, row_tokens))
        return min(self.steps, max(1, -(-self.tokens // per_step)))

    @property
    def kind(self) -> str:
        """The student kind: ``student``, or the feature-map kind ``feature_map``."""
        return self.student or self.feature_map

    def check(self) -> None:
        """Raises :class:`InputError` naming the bad setting."""
        if self.target not in TARGETS:
            raise InputError(f"unknown distillation target {self.target!r}: expected one of "
                             f"{', '.join(TARGETS)}")
        if self.feature_map not in FEATURE_MAPS:
            raise InputError(f"unknown feature map {self.feature_map!r}: expected one of "
                             f"{', '.join(FEATURE_MAPS)}; pick one with --feature-map")
        if self.student is not None:
            if self.student in FEATURE_MAPS:
                raise InputError(f"student {self.student!r} is a feature map: give it as "
                                 "feature_map (the CLI does)")
            student_kind(self.student)
            if self.window and not STUDENTS[self.student].window:
                raise InputError(f"--window {self.window} is not supported with --student "
                                 f"{self.student} (no sliding-window form for it yet); drop "
                                 "--window or use a feature-map student (hedgehog, …)")
            if self.loss != "mse":
                raise InputError(f"--distill-loss {self.loss} is the feature maps' attention-"
                                 f"weight loss; --student {self.student} trains with mse")
        if self.loss not in LOSSES:
            raise InputError(f"unknown distillation loss {self.loss!r}: expected one of "
                             f"{', '.join(LOSSES)}")
        if self.loss != "mse" and self.target != "site":
            raise InputError(f"--distill-loss {self.loss} needs --distill-target site (the "
                             "block's attention weights are not the teacher's)")
        for name in ("steps", "query_positions", "patience", "tokens", "step_tokens"):
            if getattr(self, name) < 0:
                raise InputError(f"distillation {name.replace('_', ' ')} must be >= 0")
        if self.window < 0:
            raise InputError(f"--window {self.window}: the sliding window must be >= 0 tokens "
                             "(0: none)")
        for name in ("batch_rows", "eval_every"):
            if getattr(self, name) < 1:
                raise InputError(f"distillation {name.replace('_', ' ')} must be >= 1")
        if not (self.lr > 0 and self.block_lr >= 0):
            raise InputError("distillation learning rates must be > 0")
        if not 0.0 <= self.window_dropout < 1.0:
            raise InputError(f"--window-dropout {self.window_dropout:g}: a probability in [0, 1)"
                             " (0: off)")
        if self.init not in INITS:
            raise InputError(f"unknown student initialisation {self.init!r}: expected one of "
                             f"{', '.join(INITS)}")

    def for_target(self, target: str) -> DistillSettings:
        return dataclasses.replace(self, target=target,
                                   loss=self.loss if target == "site" else "mse")


@dataclass
class DistillResult:
    """Outcome for one site. Errors are relative RMS ``‖y − ŷ‖₂ / ‖y‖₂`` on held-out rows, of
    the site's output (target ``site``) or of the block's output (target ``block``).

    ``linear_contribution``: how much the student's linear branch adds, ``‖ŷ − ŷ₀‖₂ / ‖ŷ‖₂`` on
    the held-out rows with ``ŷ₀`` the student's output with that branch removed (the window's
    softmax alone: :meth:`~dtr_compile.linear.base.LinearStudent.without_linear`); 0: the
    branch is unused, 1: it is everything (no window). ``tokens``: calibration tokens trained on
    (steps × rows × row length). ``time_limited``: ``--time-limit`` stopped the training before
    its steps or tokens were done (its best weights so far are kept); such a student is never
    stored in the cross-run cache, whose key does not cover the time it had.
    """

    site_id: str
    ok: bool
    init_error: float
    final_error: float
    final_loss: float
    steps: int
    seconds: float
    reason: str = ""
    loss_history: list[float] = field(default_factory=list)
    target: str = "site"
    best_step: int = 0
    cached: bool = False
    note: str = ""
    linear_contribution: float = float("nan")
    tokens: int = 0
    time_limited: bool = False

    @property
    def cacheable(self) -> bool:
        """Fit for the cross-run cache: trained successfully, and to its full budget."""
        return self.ok and not self.time_limited


#: A student whose held-out error reaches this is further from its teacher than outputting
#: zeros: its lone swap is expected to explode the metric (:func:`search_order`).
EXPLOSIVE_ERROR = 1.0


def search_order(candidates: Sequence[str], results: Mapping[str, DistillResult]) -> list[str]:
    """The order in which the search (stage 6) first meets the candidate sites: by held-out
    distillation error, lowest first (ties: the given graph order), and last every site whose
    error is non-finite or at least :data:`EXPLOSIVE_ERROR` — the sites whose lone swap would
    explode the metric, found from the distillation before any evaluation. The ranked
    strategy's sensitivity pass measures them last and ranks them last among equal metrics;
    greedy and lazy break ties the same way (:func:`~dtr_compile.search.schedule.schedule`)."""
    def key(i: int) -> tuple[bool, float, int]:
        err = results[candidates[i]].final_error
        bad = not math.isfinite(err) or err >= EXPLOSIVE_ERROR
        return bad, err if math.isfinite(err) else math.inf, i

    return [candidates[i] for i in sorted(range(len(candidates)), key=key)]


def new_student(site: AttentionSite, settings: DistillSettings) -> LinearStudent:
    """The untrained student of ``site`` (kind ``settings.kind``); ``settings.window`` applies
    to causal sites only.

    Raises:
        InputError: a causal-only kind (``gla``, ``deltanet``, ``gated-deltanet``) on a
            bidirectional site.
    """
    check_site_kind(site, settings.kind)
    return make_student(settings.kind, num_heads=site.num_heads, num_kv_heads=site.num_kv_heads,
                        head_dim=site.head_dim, head_dim_v=site.head_dim_v,
                        mask_kind=site.mask_kind, causal=site.causal, scale=site.scale,
                        window=settings.window if site.causal else 0)


def check_site_kind(site: AttentionSite, kind: str) -> None:
    """Raises :class:`InputError` when ``kind`` has no form for ``site`` (causal-only kinds on
    bidirectional sites: a recurrence over positions has no "future" to read)."""
    if student_kind(kind).causal_only and not site.causal:
        fit = [n for n, k in STUDENTS.items() if not k.causal_only]
        raise InputError(f"--student {kind} is causal only, and {site.id} ({site.module_path}) is "
                         f"a bidirectional site; use one of {', '.join(fit)} (`dtr-compile "
                         "inspect` lists the kinds each site takes)")



# --- the plan: what each site trains, and its cache key --------------------------------------


@dataclass
class DistillPlan:
    """What each site is trained as (target, block) and its cache key.

    Attributes:
        sites: every site.
        settings: as requested; a site's own settings are ``settings.for_target(targets[id])``.
        targets: effective target per site (``block`` falls back to ``site`` without a block).
        blocks: the block of each ``block``-target site.
        notes: why a site does not train as requested.
        keys: cache key per site; ``key_parts``: what each key hashes.
    """

    sites: tuple[AttentionSite, ...]
    settings: DistillSettings
    targets: dict[str, str]
    blocks: dict[str, AttentionBlock]
    notes: dict[str, str]
    keys: dict[str, str]
    key_parts: dict[str, dict[str, str]]

    def site(self, site_id: str) -> AttentionSite:
        return next(s for s in self.sites if s.id == site_id)

    def empty_student(self, gm: GraphModule, site_id: str) -> nn.Module:
        """An untrained student of ``site_id`` (to load saved weights into)."""
        site = self.site(site_id)
        lin = new_student(site, self.settings)
        block = self.blocks.get(site_id)
        return lin if block is None else block_module(gm, block, site, lin, copy_weights=True)

    def switch(self, gm: GraphModule, site_id: str, student: nn.Module) -> SiteSwitch:
        """The search's switch between a site's teacher and ``student``: the softmax core
        (``site``) or the teacher's own block sharing its weights (``block``)."""
        site = self.site(site_id)
        block = self.blocks.get(site_id)
        if block is None:
            return SiteSwitch(SoftmaxAttention(site.num_heads, site.num_kv_heads, scale=site.scale,
                                               causal=site.sdpa_is_causal), student)  # type: ignore[arg-type]
        return BlockSwitch(block_module(gm, block, site), student)  # type: ignore[arg-type]


def plan_distillation(
    gm: GraphModule,
    sites: Sequence[AttentionSite],
    settings: DistillSettings,
    calib: Dataset,
    record_batch: int,
) -> DistillPlan:
    """Find each site's block (target ``block``) and compute every site's cache key."""
    settings.check()
    for site in sites:
        check_site_kind(site, settings.kind)
    targets, blocks, notes = {}, {}, {}
    for site in sites:
        target = settings.target
        if site.layout != "BHTD":
            notes[site.id] = f"layout {site.layout} is not supported by LinearAttention"
        if target == "block":
            found = find_block(gm, site)
            if isinstance(found, BlockMiss):
                target = "site"
                notes[site.id] = f"no attention block ({found}); distilled as target site"
            else:
                blocks[site.id] = found
        targets[site.id] = target
    hashes = node_hashes(gm)
    common = {"code": code_digest(), "calib": hash_tensors(calib.inputs),
              "record_batch": str(record_batch)}
    keys, parts = {}, {}
    for site in sites:
        block = blocks.get(site.id)
        shape = {k: v for k, v in dataclasses.asdict(site).items()
                 if k in ("num_heads", "num_kv_heads", "head_dim", "head_dim_v", "causal",
                          "mask_kind", "scale", "layout", "kind")}
        if block is None:
            teacher = [hashes[n] for n in (site.q, site.k, site.v, site.output)]
        else:
            teacher = [hashes[n] for n in (*block.inputs, block.output)] + [block.owner]
        if site.mask:
            teacher.append(hashes[site.mask])
        own = dataclasses.asdict(settings.for_target(targets[site.id]))
        if not (site.causal and own["window"]):
            del own["window"]  # no window here: the key stays that of a run without --window
            del own["window_dropout"]
        if student_kind(settings.kind).family == "feature-map":
            del own["init"]  # the teacher-statistics initialisation is the matrix states'
        if own["student"] is None:
            del own["student"]  # feature-map kinds: the key of a run before --student
        p = dict(common, teacher=hashlib.sha256("|".join(teacher).encode()).hexdigest(),
                 site=json.dumps(shape, sort_keys=True), settings=json.dumps(own, sort_keys=True))
        parts[site.id], keys[site.id] = p, cache_key(p)
    return DistillPlan(tuple(sites), settings, targets, blocks, notes, keys, parts)

