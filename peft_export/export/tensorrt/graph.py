"""What build-engine needs to know about an ONNX graph, read without TensorRT (and without its weights).

Inputs/outputs (for the optimisation profiles), op types (for precision decisions) and whether its Q/DQ nodes
are the symmetric int8 quantization TensorRT supports: TensorRT only implements symmetric quantization — signed
int8 values, zero point 0 (`Working with Quantized Types`, TensorRT 10 and 11 developer guides) — while ONNX
Runtime's ``quantize_static`` quantizes activations asymmetrically by default (int8 since onnxruntime 1.2x,
uint8 before and in its CPU examples): non-zero zero points.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from peft_export.errors import DataError, MissingDependencyError, first_line

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
# ONNX Runtime's integer-operator int8 formats (quantize_dynamic; QOperator format): CPU kernels, no TensorRT
INTEGER_INT8_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv"}
SYMMETRIC_INT8_HINT = "re-export with --precision int8 --int8-target tensorrt"
_RUNTIME = "computed at run time"  # a zero point that is not a constant of the graph


@dataclass
class TensorSpec:
    name: str
    dims: list[int | None]  # None: dynamic
    dtype: str


@dataclass
class GraphFacts:
    name: str  # file name, for messages
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    ops: set[str]  # op types, functions included
    qdq_nodes: int = 0
    # Q/DQ nodes TensorRT cannot build, as (activations|weights, quantized type, non-zero zero point)
    qdq_issues: set[tuple[str, str, bool]] = field(default_factory=set)


def _onnx():
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError("reading the export's graphs needs the onnx package: pip install onnx") from None
    return onnx


def read_onnx(path: Path) -> GraphFacts:
    """Graph inputs, outputs, op types and Q/DQ facts, without loading external weights (only the zero points of
    Q/DQ nodes are read, from the external data file if they live there)."""
    onnx = _onnx()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf errors have no common base class
        raise DataError(f"cannot read {path}: {first_line(exc)}") from None
    inits = {i.name for i in model.graph.initializer}

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        dims = [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        except Exception:  # bfloat16/float8 have no numpy type
            dtype = f"onnx-type-{t.elem_type}"
        return TensorSpec(v.name, dims, dtype)

    nodes = [*model.graph.node, *(n for f in model.functions for n in f.node)]
    qdq = [n for n in nodes if n.op_type in QDQ_OPS]
    return GraphFacts(Path(path).name, [spec(v) for v in model.graph.input if v.name not in inits],
                      [spec(v) for v in model.graph.output], {n.op_type for n in nodes}, len(qdq),
                      _qdq_issues(model, qdq, Path(path).parent))


def _constants(model) -> dict:
    """Initializers and Constant-node tensors by name."""
    consts = {t.name: t for t in model.graph.initializer}
    for f_nodes in (model.graph.node, *(f.node for f in model.functions)):
        for n in f_nodes:
            if n.op_type == "Constant":
                value = next((a.t for a in n.attribute if a.name == "value"), None)
                if value is not None:
                    consts[n.output[0]] = value
    return consts


def _qdq_issues(model, qdq: Iterable, base_dir: Path) -> set[tuple[str, str, bool]]:
    """(activations|weights, quantized type, non-zero) for every Q/DQ node that is not symmetric int8."""
    onnx = _onnx()
    consts = _constants(model)
    type_name = onnx.TensorProto.DataType.Name
    issues = set()
    for n in qdq:
        kind = "weights" if n.input[0] in consts else "activations"
        zp = n.input[2] if len(n.input) > 2 else ""
        if zp:
            if zp not in consts:
                issues.add((kind, _RUNTIME, False))
                continue
            t = consts[zp]
            values = onnx.numpy_helper.to_array(t, base_dir=str(base_dir))
            qtype, nonzero = type_name(t.data_type).lower(), bool(np.any(values != 0))
        elif n.op_type == "QuantizeLinear":  # no zero point: output_dtype (opset 21), else uint8 (ONNX default)
            out = next((a.i for a in n.attribute if a.name == "output_dtype"), 0)
            qtype, nonzero = (type_name(out) if out else "UINT8").lower(), False
        elif n.input[0] in consts:  # DequantizeLinear of stored weights: their type
            qtype, nonzero = type_name(consts[n.input[0]].data_type).lower(), False
        else:  # DequantizeLinear of a QuantizeLinear output: that node is checked
            continue
        if qtype != "int8" or nonzero:
            issues.add((kind, qtype, nonzero))
    return issues


def qdq_refusal(graph: GraphFacts) -> str | None:
    """Why TensorRT cannot build this graph's Q/DQ nodes (one line), or None when they are symmetric int8."""
    if not graph.qdq_issues:
        return None
    parts = []
    for kind in ("activations", "weights"):
        found = [(q, nz) for k, q, nz in sorted(graph.qdq_issues) if k == kind]
        if not found:
            continue
        types = sorted({q for q, _ in found if q != _RUNTIME})
        text = f"{kind} as {'/'.join(types)}" if types else kind
        if any(nz for _, nz in found):
            text += " with non-zero zero points"
        if any(q == _RUNTIME for q, _ in found):
            text += f"{', some' if types else ''} with zero points {_RUNTIME}"
        parts.append(text)
    known = [text for issue, text in (
        (("activations", "int8", True), "ONNX Runtime quantize_static's default: asymmetric activations"),
        (("activations", "uint8", True), "ONNX Runtime's uint8 CPU layout")) if issue in graph.qdq_issues]
    layout = f" ({'; '.join(known)})" if known else ""
    return (f"{graph.name} quantizes {' and '.join(parts)}{layout}; TensorRT needs symmetric int8 Q/DQ (signed "
            f"int8, zero point 0): {SYMMETRIC_INT8_HINT}")
