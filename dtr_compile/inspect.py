"""``dtr-compile inspect``: a model's attention sites, what they cost, and why any is not rewritten.

``inspect_model(MODEL)`` loads and captures the model the way ``compile`` does, runs
:func:`~dtr_compile.passes.find_attention.find_attention` on the captured graph (before any
decomposition), and counts FLOPs at one input shape: the *attention cores* (``q·kᵀ`` and ``p·v``,
``2·B·H·T·S·(Dk + Dv)`` per site) and everything else (``torch.utils.flop_counter`` on the graph
with the cores stubbed out). It needs example inputs, which it builds when none are given:

* a ``torch.export`` archive: from the graph's input signature, with every dynamic dim 0 set to
  ``B = 2`` and every other dynamic dim to ``T``; integer inputs whose name contains ``mask`` are
  ones, other integer inputs zeros (valid token ids), floating inputs standard normal;
* a Hugging Face folder: from ``config.json`` (:func:`example_from_config`): ``input_ids [2, T]``
  (random ids below ``vocab_size``) and, when ``forward`` takes one, an ``attention_mask [2, T]``
  with the last key of row 1 padded, so that the sites see the padding masks real data gives them;
  or ``pixel_values [2, C, H, W]`` from ``num_channels`` and ``image_size`` (then ``T`` is fixed by
  the image). Decoders are captured with ``use_cache=False``;
* ``--data FILE.pt`` (a dict of tensors, as ``compile`` takes): its first two rows. This is the only
  way for a pickled module, whose input signature is unknown.

``T`` defaults to the archive's example length, or ``min(128, max positions)`` for a folder.

A hybrid written by dtr-compile (``hybrid.pt2``) keeps its site ids: its linear-attention sites
are recognised by their ``dtr.<site id>`` weights and listed as linear, and the softmax sites left
take the ids not used by them, in graph order (the ids of the original model's compile). An ONNX
file is not captured: :func:`inspect_onnx` lists the sites dtr-compile recorded in its metadata,
or, for another ONNX file, the softmax attention it holds (``Attention`` ops, ``Softmax`` nodes) by
module.
"""

from __future__ import annotations

import inspect as pyinspect
import json
import math
import re
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dtr_compile.capture import capture
from dtr_compile.errors import CaptureError, InputError
from dtr_compile.linear import kinds_for_site
from dtr_compile.load import LoadedModel, load_model
from dtr_compile.passes.find_attention import AttentionSite, Rejected, find_attention
from dtr_compile.passes.linearize import rewrite_sites

BATCH = 2
DEFAULT_SEQ_LEN = 128


@dataclass(frozen=True)
class LinearSite:
    """An attention site a dtr-compile hybrid already runs as linear attention."""

    id: str
    module_path: str


@dataclass(frozen=True)
class Inspection:
    """What ``inspect`` found.

    Attributes:
        model: the path given. format: ``"torch.export"``, ``"huggingface"`` or ``"pickle"``.
        batch: ``B`` of the inputs the FLOPs were counted at.
        seq_len: ``T`` of those inputs (None when the inputs have no sequence dim, e.g. images).
        inputs: name → shape of each input used.
        sites, rejected: from :func:`find_attention`.
        site_flops: site id → FLOPs of its attention core at these inputs.
        site_lengths: site id → ``(T, S)``, the query and key lengths the site saw.
        other_flops: FLOPs of everything else (projections, MLPs, embeddings …; in a hybrid,
            its linear attention too).
        linear: the sites of a dtr-compile hybrid that are already linear attention.
        stateful: causal models only: ``()`` when a stateful decoder (KV cache / recurrent
            state, :mod:`dtr_compile.passes.stateful`) can be built, else the reasons it cannot;
            None for a model with no causal site.
    """

    model: str
    format: str
    batch: int
    seq_len: int | None
    inputs: dict[str, list[int]]
    sites: tuple[AttentionSite, ...]
    rejected: tuple[Rejected, ...]
    site_flops: dict[str, int]
    site_lengths: dict[str, tuple[int, int]]
    other_flops: int
    linear: tuple[LinearSite, ...] = ()
    stateful: tuple[str, ...] | None = None

    @property
    def attention_flops(self) -> int:
        return sum(self.site_flops.values())

    @property
    def total_flops(self) -> int:
        return self.attention_flops + self.other_flops

    @property
    def attention_share(self) -> float:
        """Share of the model's FLOPs spent in the attention cores of the sites."""
        return self.attention_flops / self.total_flops if self.total_flops else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``--json``)."""
        total = self.total_flops or 1
        return {
            "model": self.model,
            "format": self.format,
            "batch": self.batch,
            "seq_len": self.seq_len,
            "inputs": self.inputs,
            "total_flops": self.total_flops,
            "attention_flops": self.attention_flops,
            "attention_share": self.attention_share,
            "sites": [
                asdict(s) | {"internal": list(s.internal), "masking": s.masking,
                             "sdpa_is_causal": s.sdpa_is_causal,
                             "query_len": self.site_lengths[s.id][0],
                             "key_len": self.site_lengths[s.id][1],
                             "flops": self.site_flops[s.id],
                             "flops_share": self.site_flops[s.id] / total,
                             "students": list(kinds_for_site(s.causal))}
                for s in self.sites
            ],
            "rejected": [asdict(r) for r in self.rejected],
            "linear_sites": [asdict(s) for s in self.linear],
        } | ({} if self.stateful is None else
             {"stateful": {"possible": not self.stateful, "reasons": list(self.stateful)}})


@dataclass(frozen=True)
class OnnxInspection:
    """What ``inspect`` found in an ONNX file.

    Attributes:
        model: the path. recorded: the sites come from dtr-compile's record in the file's
            metadata (else from its ops). sites: ``{"id", "module_path", "linear"}`` per site
            (recorded) or ``{"id", "module_path", "linear": False, "ops"}`` per module holding
            softmax attention. note: how the sites were found.
    """

    model: str
    recorded: bool
    sites: list[dict[str, Any]]
    note: str
    format: str = "onnx"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``--json``)."""
        return {"model": self.model, "format": self.format, "recorded": self.recorded,
                "sites": self.sites, "note": self.note}


def inspect_onnx(path: str | Path) -> OnnxInspection:
    """The attention sites of an ONNX file (see the module docstring).

    Raises:
        InputError: the file is missing or not an ONNX model.
    """
    import onnx

    from dtr_compile.exporters.onnx import SITES_KEY

    p = Path(path)
    if not p.is_file():
        raise InputError(f"ONNX file not found: {p}")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - a decode error means a corrupt file
        raise InputError(f"{p}: not a readable ONNX model ({type(exc).__name__})") from exc
    if not proto.graph.node:
        raise InputError(f"{p}: not an ONNX model (no graph nodes)")
    props = {m.key: m.value for m in proto.metadata_props}
    if SITES_KEY in props:
        try:
            sites = [dict(s) for s in json.loads(props[SITES_KEY])]
        except (ValueError, TypeError):
            sites = []
        if sites:
            n = sum(bool(s.get("linear")) for s in sites)
            return OnnxInspection(str(p), True, sites, f"written by dtr-compile: {n} of "
                                  f"{len(sites)} attention sites are linear attention")
    found: dict[str, list[str]] = {}
    for node in proto.graph.node:
        if node.op_type not in ("Attention", "Softmax"):
            continue
        meta = {m.key: m.value for m in node.metadata_props}
        try:
            scopes = json.loads(meta.get("pkg.torch.onnx.name_scopes", "[]").replace("'", '"'))
        except ValueError:
            scopes = []
        module = str(scopes[-2]) if len(scopes) >= 2 else ""
        found.setdefault(module, []).append(node.op_type)
    sites = [{"id": f"attention{i}", "module_path": m, "linear": False,
              "ops": ", ".join(sorted(set(ops)))} for i, (m, ops) in enumerate(found.items())]
    note = ("not written by dtr-compile (no site record in its metadata): listed are the modules "
            "holding softmax attention (ONNX Attention ops, or Softmax nodes, which may also be "
            "other softmaxes). For rewritable sites, FLOPs and masks, inspect the model's "
            ".pt2 archive or Hugging Face folder")
    if not sites:
        note = ("no softmax attention (Attention or Softmax nodes) found, and no dtr-compile "
                "site record in its metadata")
    return OnnxInspection(str(p), False, sites, note)


def linear_sites(gm: torch.fx.GraphModule) -> tuple[LinearSite, ...]:
    """The linear-attention sites of a dtr-compile hybrid: modules under ``dtr.<site id>``
    (their weights' ``get_attr`` nodes), with the module path of the site they replaced (the
    ``nn_module_stack`` of the nodes using them), in graph order."""
    found: dict[str, str] = {}
    for node in gm.graph.nodes:
        target = str(node.target)
        if node.op != "get_attr" or not target.startswith("dtr."):
            continue
        sid = target.split(".")[1]
        if sid in found and found[sid]:
            continue
        path = ""
        for user in node.users:
            stack = user.meta.get("nn_module_stack") or {}
            paths = [str(v[0]) for v in stack.values() if not str(v[0]).startswith("dtr")]
            if paths:
                path = paths[-1]
                break
        found[sid] = path
    return tuple(LinearSite(sid, path) for sid, path in found.items())


def _renumber(sites: tuple[AttentionSite, ...],
              linear: tuple[LinearSite, ...]) -> tuple[AttentionSite, ...]:
    """Softmax sites of a hybrid with the ids its compile gave them: ``site<i>`` not taken by a
    linear site, in graph order."""
    taken = {s.id for s in linear}
    free = [f"site{i}" for i in range(len(sites) + len(linear)) if f"site{i}" not in taken]
    if len(free) != len(sites):
        return sites  # linear ids not of the form site<i>: keep the scan's own
    return tuple(replace(s, id=new) for s, new in zip(sites, free, strict=True))


# --- example inputs ---------------------------------------------------------------------------


def _max_positions(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        n = getattr(config, key, None)
        if isinstance(n, int) and n >= 2:
            return n
    return None


def example_from_config(module: nn.Module, seq_len: int | None, batch: int = BATCH) -> dict[str, torch.Tensor]:
    """Example inputs for a Hugging Face model from its config (see the module docstring).

    Raises:
        InputError: the config gives neither a vocabulary nor an image size, or ``seq_len`` is
            outside ``[2, max positions]``.
    """
    config = getattr(module, "config", None)
    g = torch.Generator().manual_seed(0)
    image_size = getattr(config, "image_size", None)
    vocab = getattr(config, "vocab_size", None)
    params = pyinspect.signature(module.forward).parameters
    if image_size is not None and "pixel_values" in params:
        hw = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(batch, channels, *hw, generator=g)}
    if not isinstance(vocab, int) or "input_ids" not in params:
        kind = getattr(config, "model_type", type(module).__name__)
        raise InputError(f"cannot build example inputs for a {kind!r} model (its config has no "
                         "vocab_size or image_size); pass --data with a .pt dict of example inputs")
    top = _max_positions(config)
    t = seq_len if seq_len is not None else min(DEFAULT_SEQ_LEN, top or DEFAULT_SEQ_LEN)
    if t < 2 or (top is not None and t > top):
        raise InputError(f"--seq-len {t} is outside [2, {top}] (the model's max positions); "
                         "torch.export needs sequence sizes >= 2")
    out = {"input_ids": torch.randint(0, vocab, (batch, t), generator=g)}
    if "attention_mask" in params:
        mask = torch.ones(batch, t, dtype=torch.long)
        mask[-1, -1] = 0
        out["attention_mask"] = mask
    return out


def example_from_graph(gm: torch.fx.GraphModule, seq_len: int | None,
                       batch: int = BATCH) -> dict[str, torch.Tensor]:
    """Inputs for a captured graph from its placeholders' shapes (see the module docstring).

    Raises:
        InputError: ``seq_len`` is outside a dynamic dim's range.
    """
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise InputError(f"input {node.name!r} is not a tensor; pass --data with example inputs")
        shape = []
        for i, d in enumerate(val.shape):
            if not isinstance(d, torch.SymInt):
                shape.append(int(d))
                continue
            hint = d.node.hint
            want = batch if i == 0 else (seq_len if seq_len is not None else int(hint))
            vr = d.node.shape_env.var_to_range.get(d.node.expr)
            lo, hi = _bound(vr.lower if vr is not None else None), _bound(vr.upper if vr is not None else None)
            if (lo is not None and want < lo) or (hi is not None and want > hi):
                raise InputError(f"{'batch' if i == 0 else '--seq-len'} {want} is outside the "
                                 f"range [{lo}, {hi}] of dim {i} of input {node.name!r}")
            shape.append(want)
        if val.dtype == torch.bool:
            out[node.name] = torch.ones(shape, dtype=torch.bool)
        elif val.is_floating_point():
            out[node.name] = torch.randn(shape, generator=g).to(val.dtype)
        elif "mask" in node.name:
            out[node.name] = torch.ones(shape, dtype=val.dtype)
        else:
            out[node.name] = torch.zeros(shape, dtype=val.dtype)
    return out


def _bound(x: object) -> int | None:
    try:
        return int(x)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def _example_from_data(path: str, seq_len: int | None) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is an input problem
        raise InputError(f"--data {path}: not a readable .pt file ({exc})") from exc
    if not isinstance(obj, dict) or not obj:
        raise InputError(f"--data {path}: expected a dict of input tensors")
    out = {k: v[:BATCH] for k, v in obj.items() if k != "labels" and isinstance(v, torch.Tensor)}
    if seq_len is not None:
        for k, v in out.items():
            if v.dim() >= 2 and not v.is_floating_point():
                if v.shape[1] < seq_len:
                    raise InputError(f"--seq-len {seq_len} is longer than --data's {k!r} "
                                     f"({v.shape[1]})")
                out[k] = v[:, :seq_len]
    return out


# --- capture errors ---------------------------------------------------------------------------

_HINTS = (
    (r"DynamicCache|Cache'> in output|not a known type",
     "the model returns an object torch.export cannot flatten (for a Hugging Face decoder, its "
     "KV cache: set config.use_cache=False)"),
    (r"data-dependent|GuardOnDataDependent|item\(\)",
     "Python control flow on tensor values (an if/while on a tensor): make it depend on shapes "
     "only, or use torch.where / torch.cond"),
    (r"[Ss]pecializ|Constraints violated",
     "a dynamic dim was specialised: use example batch and sequence sizes >= 2"),
)


def explain_capture_error(err: CaptureError) -> CaptureError:
    """``err`` with the failing line of model code and the fix for the failing construct."""
    cause = err.__cause__
    text = f"{type(cause).__name__}: {cause}" if cause is not None else str(err)
    where = _failing_line(cause) if cause is not None else None
    hint = next((h for pattern, h in _HINTS if re.search(pattern, text)), None)
    extra = (f" Failing construct: {where}." if where else "") + (f" Likely cause: {hint}." if hint else "")
    return CaptureError(str(err) + extra) if extra else err


def _failing_line(exc: BaseException) -> str | None:
    """``file:line in fn: `code``` of the model code that raised ``exc``."""
    m = re.search(r'raised this error:\s*File "([^"]+)", line (\d+), in (\S+)\s*\n\s*(.+)', str(exc))
    if m:
        return f"{m.group(1)}:{m.group(2)} in {m.group(3)}: `{m.group(4).strip()}`"
    skip = (str(Path(torch.__file__).parent), str(Path(__file__).parent), str(Path(pyinspect.__file__).parent))
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(skip)]
    if frames:
        f = frames[-1]
        return f"{f.filename}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"
    return None


# --- FLOPs ------------------------------------------------------------------------------------


class _CoreStub(nn.Module):
    """Stands in for one attention core: records its FLOPs, returns zeros of the output shape."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.lengths = (0, 0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """q: [B, H, T, Dk] (or [B·H, T, Dk]), k: [.., S, Dk], v: [.., S, Dv] → [.., T, Dv]."""
        s, dk, dv = k.shape[-2], q.shape[-1], v.shape[-1]
        self.flops = 2 * math.prod(q.shape[:-1]) * s * (dk + dv)  # q·kᵀ and p·v
        self.lengths = (int(q.shape[-2]), int(s))
        return q.new_zeros(*q.shape[:-1], dv)


def count_flops(gm: torch.fx.GraphModule, sites: tuple[AttentionSite, ...],
                args: list[torch.Tensor]) -> tuple[dict[str, int], dict[str, tuple[int, int]], int]:
    """``(site FLOPs, site (T, S), other FLOPs)`` of ``gm`` run on ``args``."""
    stubs = {s.id: _CoreStub() for s in sites}
    stubbed = rewrite_sites(gm, sites, stubs, class_name="FlopGraph")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        stubbed(*args)
    return ({i: m.flops for i, m in stubs.items()}, {i: m.lengths for i, m in stubs.items()},
            int(counter.get_total_flops()))


# --- the command ------------------------------------------------------------------------------


def _examples(loaded: LoadedModel, seq_len: int | None, data: str | None) -> dict[str, torch.Tensor] | None:
    if data is not None:
        return _example_from_data(data, seq_len)
    if loaded.format == "huggingface":
        assert loaded.module is not None
        config = getattr(loaded.module, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = False
        return example_from_config(loaded.module, seq_len)
    if loaded.format == "pickle":
        raise InputError(f"{loaded.source} is a pickled module: pass --data with example inputs")
    return None


def inspect_model(model: str, *, seq_len: int | None = None, data: str | None = None,
                  trust_pickle: bool = False, ignore_auto_map: bool = False) -> Inspection:
    """Load, capture, find attention and count FLOPs (see the module docstring). For an
    ``.onnx`` file use :func:`inspect_onnx`.

    Raises:
        InputError: unreadable model or data, or a length out of range.
        CaptureError: torch.export failed; names the failing line and the usual fix.
        NoAttentionError: no rewritable site; says what was searched for and why not.
    """
    loaded = load_model(model, trust_pickle=trust_pickle, ignore_auto_map=ignore_auto_map)
    example = _examples(loaded, seq_len, data)
    try:
        captured = capture(loaded, example)
    except CaptureError as err:
        raise explain_capture_error(err) from err.__cause__
    gm = captured.gm
    if example is None:
        example = example_from_graph(gm, seq_len)
    scan = find_attention(gm)
    linear = linear_sites(gm)
    sites = _renumber(scan.sites, linear) if linear else scan.require_sites()
    args = [example[n] for n in captured.input_names]
    seq = next((v.shape[1] for v in example.values() if v.dim() >= 2 and not v.is_floating_point()), None)
    try:
        site_flops, lengths, other = count_flops(gm, sites, args)
    except Exception as exc:  # noqa: BLE001 - the captured model rejects these inputs
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in example.items())
        raise InputError(
            f"the captured model failed on inputs {shapes}"
            + (f" (--seq-len {seq})" if seq is not None else "")
            + f": {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. A "
            "length beyond the model's position table fails like this; try a smaller --seq-len"
        ) from exc
    return Inspection(
        model=model, format=loaded.format, batch=args[0].shape[0] if args else BATCH,
        seq_len=int(seq) if seq is not None else None,
        inputs={k: list(v.shape) for k, v in example.items()}, sites=sites,
        rejected=scan.rejected, site_flops=site_flops, site_lengths=lengths, other_flops=other,
        linear=linear,
        stateful=_stateful(gm, scan),
    )


def _stateful(gm: torch.fx.GraphModule, scan: Any) -> tuple[str, ...] | None:
    """Why the model cannot have a stateful decoder (``()``: it can); None without causal sites."""
    from dtr_compile.passes.stateful import NotStateful, make_stateful

    if not any(s.causal for s in scan.sites):
        return None
    res = make_stateful(gm, scan.sites, {}, rejected=scan.rejected)
    return res.reasons if isinstance(res, NotStateful) else ()


def _flops(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f}"


def _students(causal: bool) -> str:
    """The ``--student`` kinds a site takes, short: causal sites take every kind."""
    if causal:
        return "all"
    return "feature maps (" + ", ".join(kinds_for_site(False)) + ")"


def render(ins: Inspection | OnnxInspection, console: Console) -> None:
    """The sites as a table, then the rejected look-alikes with their reasons (an ONNX file:
    its sites and how they were found)."""
    if isinstance(ins, OnnxInspection):
        table = Table(title=f"Attention sites of {ins.model}", title_justify="left",
                      caption=ins.note, caption_justify="left")
        for col in ("site", "module path", "attention"):
            table.add_column(col, overflow="fold")
        for site in ins.sites:
            kind = "linear" if site.get("linear") else "softmax"
            table.add_row(str(site.get("id")), str(site.get("module_path") or "(top level)"),
                          kind + (f" ({site['ops']})" if site.get("ops") else ""))
        console.print(table)
        return
    total = ins.total_flops or 1
    shape = ", ".join(f"{k} {v}" for k, v in ins.inputs.items())
    table = Table(title=f"Attention sites of {ins.model}", title_justify="left",
                  caption=(f"attention cores (q·kᵀ and p·v) take {ins.attention_share:.1%} of "
                           f"{_flops(ins.total_flops)}FLOPs at {shape}"),
                  caption_justify="left")
    table.add_column("site", no_wrap=True)
    table.add_column("module path", overflow="fold", min_width=12)
    table.add_column("kind")
    table.add_column("H/Hkv/Dk", justify="right")
    table.add_column("mask")
    table.add_column("T×S", justify="right")
    table.add_column("FLOPs", justify="right", no_wrap=True)
    table.add_column("share", justify="right")
    table.add_column("--student")
    for s in ins.sites:
        mask = s.masking + (f" ({s.mask_kind})" if s.mask is not None else "")
        t, k = ins.site_lengths[s.id]
        table.add_row(s.id, s.module_path or "(top level)", s.kind,
                      f"{s.num_heads}/{s.num_kv_heads}/{s.head_dim}", mask, f"{t}×{k}",
                      _flops(ins.site_flops[s.id]), f"{ins.site_flops[s.id] / total:.1%}",
                      _students(s.causal))
    console.print(table)
    if ins.linear:
        lin = Table(title="Linear attention (replaced by dtr-compile)", title_justify="left")
        for col in ("site", "module path"):
            lin.add_column(col)
        for ls in ins.linear:
            lin.add_row(ls.id, ls.module_path or "(top level)")
        console.print(lin)
    if ins.rejected:
        why = Table(title="Not rewritten", title_justify="left")
        for col in ("node", "module path", "reason"):
            why.add_column(col)
        for r in ins.rejected:
            why.add_row(r.node, r.module_path or "(top level)", r.reason)
        console.print(why)
    if ins.stateful is not None:
        if ins.stateful:
            console.print("Stateful decoder: not possible: " + "; ".join(ins.stateful))
        else:
            console.print("Stateful decoder: possible (a KV cache per softmax layer, a recurrent "
                          "state per linear layer, positions from attention_mask)")


__all__ = ["Inspection", "LinearSite", "OnnxInspection", "count_flops", "inspect_onnx",
           "linear_sites", "example_from_config", "example_from_graph",
           "explain_capture_error", "inspect_model", "render"]
