"""Precision conversion and simplification of exported graphs (torch-free).

- fp16: weights and activations in float16, graph inputs and outputs stay float32 (the runtime contract), and
  the operations that overflow or lose too much in float16 stay float32: the reductions and powers of the
  normalisations (SAM's hand-written ``LayerNorm2d`` in the neck is ReduceMean/Pow/Sqrt/Div, not a
  LayerNormalization op: ``(x - mean)**2`` exceeds 65504 for activations above ~256), LayerNormalization
  itself, and Softmax. The result is an explicitly typed graph, which is what TensorRT 11 builds fp16 engines
  from.
- int8: see :mod:`peft_export.export.quantize` (static, calibrated, accuracy-aware; the encoder only).
- simplify: onnxslim (optional extra ``peft-export[simplify]``).
Every result goes through the same parity gate as the fp32 graphs.
"""

from __future__ import annotations

import contextlib
import io
import logging

import onnx

from peft_export.errors import MissingDependencyError, PeftExportError, first_line

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
# kept in float32 in fp16 graphs (in addition to onnxruntime's default block list)
FP16_FP32_OPS = ("ReduceMean", "ReduceSum", "Pow", "Sqrt", "Div", "LayerNormalization", "Softmax", "Exp", "Erf",
                 "Resize", "CumSum", "Sin", "Cos")


@contextlib.contextmanager
def _quiet():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield buf


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """float16 graph with float32 inputs/outputs and float32 islands (see module docstring)."""
    from onnxruntime.transformers import float16

    blocked = list(float16.DEFAULT_OP_BLOCK_LIST) + [op for op in FP16_FP32_OPS
                                                      if op not in float16.DEFAULT_OP_BLOCK_LIST]
    with _quiet():
        out = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked,
                                               disable_shape_infer=False)
    _dedupe_nodes(out.graph)
    # the converter leaves value_info entries whose element types no longer match (float vs float16): drop
    # them, so that shape inference (onnx, TensorRT's parser) derives consistent types from the graph itself
    del out.graph.value_info[:]
    return out


def _dedupe_nodes(graph: onnx.GraphProto) -> None:
    """onnxruntime's converter inserts one identical Cast per consumer of a shared value (same output name,
    invalid SSA): keep the first of identical nodes, which comes before every consumer."""
    seen: dict[str, bytes] = {}
    keep = []
    for node in graph.node:
        key = node.SerializeToString()
        outs = tuple(node.output)
        if outs and all(o in seen for o in outs):
            if all(seen[o] == key for o in outs):
                continue
            raise PeftExportError(f"fp16 conversion produced conflicting definitions of {outs[0]!r}")
        for o in outs:
            seen[o] = key
        keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim's graph simplification (constant folding, dead-code and redundant-op removal)."""
    try:
        import onnxslim
    except ImportError:
        raise MissingDependencyError("--simplify needs onnxslim: pip install 'peft-export[simplify]'") from None
    with _quiet():
        try:
            out = onnxslim.slim(model)
        except Exception as exc:
            raise PeftExportError(f"onnxslim failed: {first_line(exc)}") from exc
    if out is None:
        raise PeftExportError("onnxslim returned no model")
    return out


def count_ops(model: onnx.ModelProto) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in model.graph.node:
        out[node.op_type] = out.get(node.op_type, 0) + 1
    return out
