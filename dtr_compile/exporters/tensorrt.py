"""Exporter: TensorRT. A lint of an ONNX file against TensorRT's ONNX parser (no GPU needed) and
an engine build with the TensorRT Python API (needs the ``[tensorrt]`` extra and a CUDA GPU).

The lint's rule table (:data:`RULES`). Severity ``reject``: TensorRT's parser or builder fails on
it. ``avoid``: TensorRT builds it, but it is slow or numerically fragile, and ``--target tensorrt``
promises a graph without it. ``warn``: depends on the TensorRT version or on the inputs.

=======  ========  ==========================================================================
rule     severity  flags
=======  ========  ==========================================================================
TRT001   reject    an op TensorRT's parser does not import (``N`` in onnx-tensorrt's operators
                   table), or an op of a custom domain (needs a plugin)
TRT002   warn      an op not in this table at all: check operators.md of your TensorRT
TRT003   reject    an input TensorRT needs at build time computed at run time: ``CumSum`` axis,
                   ``TopK`` K (must be an initializer or ``Constant``)
TRT004   reject    ``Einsum`` with an ellipsis or a repeated index (diagonal) — unsupported;
         avoid     any other ``Einsum`` (restricted, no broadcasting; use MatMul)
TRT005   avoid     ``CumSum`` / ``ReduceSum`` accumulating in fp16: a sum over a long sequence
                   overflows 65504 or loses precision; accumulate in fp32 (the normaliser)
TRT006   warn      an op only recent TensorRT parses: ``Attention`` (10.14), ``RMSNormalization``
                   and ``RotaryEmbedding`` (10.15), ``LayerNormalization`` (8.6)
TRT007   warn      opset above 20, the newest TensorRT 10.0 parses
TRT008   warn      int64 graph inputs or outputs: TensorRT 10 takes them, 8.x casts them to
                   int32 (clamping); feed int32 on 8.x
TRT009   warn      float64 tensors: TensorRT casts DOUBLE to FLOAT (clamping to ±FLT_MAX)
TRT010   warn      control flow or data-dependent shapes (``Loop``, ``Scan``, ``NonZero``,
                   ``NonMaxSuppression``): imported with restrictions, often slow
         reject    an ``If`` whose two branches give outputs of different ranks (TensorRT's
                   ``IIfConditional`` needs equal ranks unless the condition is a build-time
                   constant); an ``If`` with equal ranks (the stateful decoders' decode/prefill
                   choice) is imported and not reported
TRT011   reject    the fused linear-attention form, ``LinearAttention`` (opset 27 or com.microsoft): no
                   TensorRT parser imports it; the plain form (MatMul, CumSum, …) is what
                   dtr-compile exports
=======  ========  ==========================================================================

Sources: onnx-tensorrt ``docs/operators.md`` (TensorRT 8.5 and 10.0 tables) and its changelog
(10.14: ``Attention``; 10.15: ``RotaryEmbedding``, ``RMSNormalization``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from dtr_compile.errors import DependencyError, DtrError
from dtr_compile.fileio import atomic_path, read_onnx

SEVERITIES = ("reject", "avoid", "warn")

#: Ops TensorRT's ONNX parser imports (default domain), from onnx-tensorrt's operators tables.
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
GridSample GRU HardSigmoid HardSwish Identity If ImageScaler InstanceNormalization IsInf IsNaN
LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool
Mean MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN
RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
#: Ops TensorRT's parser does not import (``N`` in the operators tables).
UNSUPPORTED_OPS = frozenset("""
Bernoulli BitShift BlackmanWindow Compress ConcatFromSequence ConvInteger DFT Det
DynamicQuantizeLinear HammingWindow HannWindow Hardmax MatMulInteger MaxRoiPool MaxUnpool
MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement
OptionalHasElement QLinearConv QLinearMatMul STFT SequenceAt SequenceConstruct SequenceEmpty
SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence
StringNormalizer TfIdfVectorizer Unique
""".split())
#: Ops only recent TensorRT parses: op → (the first TensorRT version that does, what else to do).
VERSIONED_OPS: dict[str, tuple[str, str]] = {
    "Attention": ("10.14", "export with --target tensorrt (opset 18: attention as MatMul/Softmax)"),
    "RMSNormalization": ("10.15", "export at opset < 23, where it is decomposed"),
    "RotaryEmbedding": ("10.15", "export at opset < 23, where it is decomposed"),
    "LayerNormalization": ("8.6", "upgrade TensorRT"),
}
#: Inputs TensorRT needs as build-time constants: op → (input index, input name).
CONSTANT_INPUTS: dict[str, tuple[int, str]] = {"CumSum": (1, "axis"), "TopK": (1, "K")}
#: The newest opset TensorRT 10.0 parses.
MAX_OPSET = 20
_CONTROL_FLOW = ("Loop", "Scan", "NonZero", "NonMaxSuppression")
_FP16_SUMS = ("CumSum", "ReduceSum")


@dataclass(frozen=True)
class Finding:
    """One lint finding: a rule hit by ``count`` nodes (the first few named in ``nodes``)."""

    rule: str
    severity: str
    op: str
    message: str
    nodes: tuple[str, ...] = ()
    count: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"nodes": list(self.nodes)}


@dataclass
class _Graph:
    """The facts the rules read from an ONNX model."""

    nodes: list[Any]
    opset: int
    constants: set[str]
    elem_types: dict[str, int]
    inputs: list[Any]
    outputs: list[Any]
    initializers: list[Any]
    by_op: dict[str, list[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Rule:
    """A lint rule: ``check(graph)`` yields findings."""

    id: str
    title: str
    check: Callable[[_Graph], Iterable[Finding]]


def _names(nodes: list[Any]) -> tuple[str, ...]:
    return tuple(n.name or n.op_type for n in nodes[:3])


def _grouped(rule: str, severity: str, hits: Mapping[str, list[Any]],
             message: Callable[[str], str]) -> Iterable[Finding]:
    for op, nodes in sorted(hits.items()):
        yield Finding(rule, severity, op, message(op), _names(nodes), len(nodes))


def _unsupported_ops(g: _Graph) -> Iterable[Finding]:
    bad: dict[str, list[Any]] = {}
    for n in g.nodes:
        if n.domain not in ("", "ai.onnx"):
            bad.setdefault(f"{n.domain}::{n.op_type}", []).append(n)
        elif n.op_type in UNSUPPORTED_OPS:
            bad.setdefault(n.op_type, []).append(n)
    yield from _grouped("TRT001", "reject", bad, lambda op: (
        f"{op} is not imported by TensorRT's ONNX parser"
        + ("; a custom-domain op needs a TensorRT plugin" if "::" in op else
           "; rewrite it with supported ops before export")))


def _unknown_ops(g: _Graph) -> Iterable[Finding]:
    unknown = {op: ns for op, ns in g.by_op.items()
               if op not in SUPPORTED_OPS and op not in UNSUPPORTED_OPS and op not in VERSIONED_OPS
               and all(n.domain in ("", "ai.onnx") for n in ns)}
    yield from _grouped("TRT002", "warn", unknown, lambda op: (
        f"{op} is not in dtr-compile's table of TensorRT ops; check onnx-tensorrt's "
        "operators.md for your TensorRT version"))


def _constant_inputs(g: _Graph) -> Iterable[Finding]:
    for op, (index, what) in sorted(CONSTANT_INPUTS.items()):
        bad = [n for n in g.by_op.get(op, [])
               if len(n.input) > index and n.input[index] and n.input[index] not in g.constants]
        if bad:
            yield Finding("TRT003", "reject", op, (
                f"{op}'s {what} is computed at run time; TensorRT needs it as an initializer or "
                f"Constant: make the {what} a Python constant in the model"), _names(bad), len(bad))


_EINSUM_OPERAND = re.compile(r"[a-zA-Z.]+")


def _einsum(g: _Graph) -> Iterable[Finding]:
    rejected: list[Any] = []
    avoided: list[Any] = []
    for n in g.by_op.get("Einsum", []):
        eq = next((a.s.decode() for a in n.attribute if a.name == "equation"), "")
        lhs = eq.split("->")[0]
        operands = [op.strip() for op in lhs.split(",")]
        diagonal = any(len(set(o.replace(".", ""))) < len(o.replace(".", "")) for o in operands)
        (rejected if "..." in eq or diagonal else avoided).append(n)
    if rejected:
        yield Finding("TRT004", "reject", "Einsum", (
            "Einsum with an ellipsis or a repeated index is not supported by TensorRT; write it "
            "as MatMul / Mul / ReduceSum"), _names(rejected), len(rejected))
    if avoided:
        yield Finding("TRT004", "avoid", "Einsum", (
            "Einsum is imported with restrictions (no broadcasting between inputs) and may run "
            "as a slow generic kernel; write it as MatMul"), _names(avoided), len(avoided))


def _fp16_sums(g: _Graph) -> Iterable[Finding]:
    import onnx

    hits: dict[str, list[Any]] = {}
    for op in _FP16_SUMS:
        for n in g.by_op.get(op, []):
            if n.input and g.elem_types.get(n.input[0]) == onnx.TensorProto.FLOAT16:
                hits.setdefault(op, []).append(n)
    yield from _grouped("TRT005", "avoid", hits, lambda op: (
        f"{op} accumulates in fp16: over a long sequence the sum overflows 65504 or loses "
        "precision; Cast to float before it and back after (fp32 state and normaliser)"))


def _versioned(g: _Graph) -> Iterable[Finding]:
    hits = {op: ns for op, ns in g.by_op.items() if op in VERSIONED_OPS}
    yield from _grouped("TRT006", "warn", hits, lambda op: (
        f"{op} is parsed by TensorRT >= {VERSIONED_OPS[op][0]} only; for older TensorRT "
        f"{VERSIONED_OPS[op][1]}"))


def _opset(g: _Graph) -> Iterable[Finding]:
    if g.opset > MAX_OPSET:
        yield Finding("TRT007", "warn", f"opset {g.opset}", (
            f"opset {g.opset} is above {MAX_OPSET}, the newest TensorRT 10.0 parses; newer "
            "releases parse more. Export with --target tensorrt (opset 18) for older TensorRT"))


def _int64_io(g: _Graph) -> Iterable[Finding]:
    import onnx

    io = [v.name for v in (*g.inputs, *g.outputs)
          if v.type.tensor_type.elem_type == onnx.TensorProto.INT64]
    if io:
        yield Finding("TRT008", "warn", "int64 I/O", (
            f"int64 graph inputs/outputs {io}: TensorRT 10 takes them, TensorRT 8.x casts them "
            "to int32 (clamping); on 8.x feed int32"), tuple(io[:3]), len(io))


def _float64(g: _Graph) -> Iterable[Finding]:
    import onnx

    dbl = [name for name, t in g.elem_types.items() if t == onnx.TensorProto.DOUBLE]
    if dbl:
        yield Finding("TRT009", "warn", "float64", (
            "float64 tensors: TensorRT casts DOUBLE to FLOAT, clamping to ±FLT_MAX"),
            tuple(dbl[:3]), len(dbl))


def _branch_ranks(node: Any, branch: str) -> list[int | None]:
    graph = next(a.g for a in node.attribute if a.name == branch)
    return [len(o.type.tensor_type.shape.dim) if o.type.tensor_type.HasField("shape") else None
            for o in graph.output]


def _control_flow(g: _Graph) -> Iterable[Finding]:
    hits = {op: g.by_op[op] for op in _CONTROL_FLOW if op in g.by_op}
    yield from _grouped("TRT010", "warn", hits, lambda op: (
        f"{op}: control flow or a data-dependent shape; TensorRT imports it with restrictions "
        "and it often runs slowly"))
    uneven = [n for n in g.by_op.get("If", [])
              if any(a is not None and b is not None and a != b for a, b in
                     zip(_branch_ranks(n, "then_branch"), _branch_ranks(n, "else_branch"),
                         strict=False))]
    yield from _grouped("TRT010", "reject", {"If": uneven} if uneven else {}, lambda op: (
        "If with branch outputs of different ranks: TensorRT's IIfConditional needs equal "
        "ranks; make both branches return the same rank"))


def _fused_linear_attention(g: _Graph) -> Iterable[Finding]:
    hits = {op: g.by_op[op] for op in ("LinearAttention",) if op in g.by_op}
    yield from _grouped("TRT011", "reject", hits, lambda op: (
        f"{op} (ONNX opset 27, or onnxruntime's com.microsoft op) is the fused linear-attention "
        "form; TensorRT does not import it; export with --linear-attention plain"))


#: The lint rules, in report order.
RULES: tuple[Rule, ...] = (
    Rule("TRT001", "op not imported by TensorRT", _unsupported_ops),
    Rule("TRT002", "op not in the table", _unknown_ops),
    Rule("TRT003", "run-time value where TensorRT needs a constant", _constant_inputs),
    Rule("TRT004", "Einsum", _einsum),
    Rule("TRT005", "fp16 accumulation", _fp16_sums),
    Rule("TRT006", "op needs a recent TensorRT", _versioned),
    Rule("TRT007", "opset too new for TensorRT 10.0", _opset),
    Rule("TRT008", "int64 inputs/outputs", _int64_io),
    Rule("TRT009", "float64 tensors", _float64),
    Rule("TRT010", "control flow / data-dependent shapes", _control_flow),
    Rule("TRT011", "fused LinearAttention", _fused_linear_attention),
)


def _with_subgraphs(graph: Any) -> list[Any]:
    """``graph`` and every graph nested in its nodes' attributes (If branches, Loop bodies),
    depth first."""
    out = [graph]
    for n in graph.node:
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                out.extend(_with_subgraphs(sub))
    return out


def _graph_facts(model: Any) -> _Graph:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - types are a best effort; rules needing them find less
        inferred = model
    g = inferred.graph
    graphs = _with_subgraphs(g)  # If/Loop/Scan bodies hold nodes TensorRT imports too
    nodes = [n for sub in graphs for n in sub.node]
    constants = {i.name for sub in graphs for i in sub.initializer}
    constants |= {o for n in nodes if n.op_type == "Constant" for o in n.output}
    elem_types = {v.name: v.type.tensor_type.elem_type
                  for sub in graphs for v in (*sub.value_info, *sub.input, *sub.output)}
    elem_types |= {i.name: i.data_type for sub in graphs for i in sub.initializer}
    opset = next((o.version for o in inferred.opset_import if o.domain in ("", "ai.onnx")), 0)
    facts = _Graph(nodes, opset, constants, elem_types, list(g.input), list(g.output),
                   list(g.initializer))
    for n in nodes:
        facts.by_op.setdefault(n.op_type, []).append(n)
    return facts


def lint_trt(model: str | os.PathLike[str] | Any) -> list[Finding]:
    """Lint an ONNX model (a path or a ``ModelProto``) against :data:`RULES`. Needs no GPU.

    Raises:
        InputError: the file is missing or not an ONNX model.
    """

    if isinstance(model, (str, os.PathLike)):
        model = read_onnx(model)
    facts = _graph_facts(model)
    return [f for rule in RULES for f in rule.check(facts)]


def blocking(findings: Iterable[Finding], *, strict: bool = False) -> list[Finding]:
    """Findings that fail ``--target tensorrt`` and ``lint-trt``: rejects and avoids (and warns
    with ``strict``)."""
    fail = {"reject", "avoid", "warn"} if strict else {"reject", "avoid"}
    return [f for f in findings if f.severity in fail]


def findings_table(findings: list[Finding], title: str = "TensorRT lint"):  # noqa: ANN201
    """A rich Table of ``findings``."""
    from rich.table import Table

    style = {"reject": "bold red", "avoid": "yellow", "warn": "cyan"}
    table = Table(title=title, show_lines=False)
    for col in ("rule", "severity", "op", "count", "nodes", "what to do"):
        table.add_column(col, overflow="fold")
    for f in findings:
        table.add_row(f.rule, f"[{style[f.severity]}]{f.severity}[/]", f.op, str(f.count),
                      ", ".join(f.nodes), f.message)
    return table


# --- engine build -------------------------------------------------------------------------------


def require_tensorrt() -> Any:
    """Import TensorRT and check that it can use a CUDA GPU; return the ``tensorrt`` module.

    Raises:
        DependencyError: TensorRT is not installed, or no CUDA GPU is usable.
    """
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as exc:
        raise DependencyError(
            "building a TensorRT engine needs TensorRT: pip install 'dtr-compile[tensorrt]' "
            "(the `tensorrt` Python module is not installed), and a CUDA GPU") from exc
    logger = trt.Logger(trt.Logger.ERROR)
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # noqa: BLE001
        builder, why = None, f"{type(exc).__name__}: {exc}"
    else:
        why = "TensorRT could not create a builder"
    if builder is None:
        raise DependencyError(f"building a TensorRT engine needs a CUDA GPU: {why} "
                              "(no GPU, or no CUDA driver visible to this process)")
    return trt


@dataclass(frozen=True)
class EngineInfo:
    """A built engine: where, from what, with which precision and shape ranges."""

    path: str
    onnx: str
    fp16: bool
    profile: dict[str, list[list[int]]]
    tensorrt_version: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _profile_shape(dims: list[Any], ranges: Mapping[str, tuple[int, int, int]]) -> list[list[int]]:
    out: list[list[int]] = [[], [], []]
    for d in dims:
        if isinstance(d, int) and d >= 0:
            lo = opt = hi = d
        else:
            lo, opt, hi = ranges.get(str(d), (1, 1, 1))
        out[0].append(lo)
        out[1].append(opt)
        out[2].append(hi)
    return out


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    fp16: bool = False,
    ranges: Mapping[str, tuple[int, int, int]] | None = None,
    workspace_bytes: int = 4 << 30,
) -> EngineInfo:
    """Build a TensorRT engine from ``onnx_path`` and write it to ``engine_path`` atomically.

    Args:
        fp16: allow fp16 kernels (``BuilderFlag.FP16``).
        ranges: ``{axis name: (min, opt, max)}`` for the ONNX's named dynamic axes (``batch``,
            ``sequence``); one optimization profile covers them. Unnamed dynamic dims get 1.
        workspace_bytes: the builder's workspace memory pool.

    Raises:
        DependencyError: no TensorRT or no CUDA GPU.
        DtrError: the parser or the builder failed (its messages are included).
    """
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode from 10 on
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise DtrError(f"TensorRT could not parse {onnx_path}: {'; '.join(errors[:5])} "
                       "(run `dtr-compile lint-trt` on it)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    shapes: dict[str, list[list[int]]] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)
        if any(d < 0 for d in dims):
            names = _onnx_dim_names(onnx_path, tensor.name) or dims
            named = [n if d < 0 else d for n, d in zip(names, dims, strict=False)]
            lo, opt, hi = _profile_shape(named, ranges or {})
            profile.set_shape(tensor.name, lo, opt, hi)
            shapes[tensor.name] = [lo, opt, hi]
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DtrError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    data = bytes(serialized)
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(data)
    return EngineInfo(str(engine_path), str(onnx_path), fp16, shapes, str(trt.__version__), len(data))


def _onnx_dim_names(onnx_path: str | os.PathLike[str], input_name: str) -> list[Any] | None:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for v in model.graph.input:
        if v.name == input_name:
            return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return None
