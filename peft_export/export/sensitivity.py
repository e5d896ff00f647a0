"""Per-node int8 sensitivity in one pass (torch-free): how much each MatMul/Conv's own output changes when its
inputs and weights are quantized with the calibrated ranges (fake quantization, computed inside one ONNX Runtime
session next to the float graph). :mod:`peft_export.export.quantize` keeps the most sensitive nodes float.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from peft_export.runtime.onnx_backend import ort_session

if TYPE_CHECKING:
    import onnx

OP_TYPES = ("MatMul", "Conv")
WEIGHT_QMAX = 64  # reduce_range: int8 weights in [-64, 64]


def node_module(node: onnx.NodeProto) -> str:
    """The PyTorch module a node came from (the exporter's name scopes), or ''."""
    import ast

    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [s for s in ast.literal_eval(p.value) if s]
            except (ValueError, SyntaxError):
                return ""
            return scopes[-2] if len(scopes) > 1 else (scopes[0] if scopes else "")
    return ""


def _fake_quant_weight(w: np.ndarray, axis: int) -> np.ndarray:
    red = tuple(i for i in range(w.ndim) if i != axis)
    scale = np.maximum(np.abs(w).max(axis=red, keepdims=True) / WEIGHT_QMAX, 1e-12)
    return (np.clip(np.round(w / scale), -WEIGHT_QMAX, WEIGHT_QMAX) * scale).astype(np.float32)


def _act_params(lo: float, hi: float, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        return np.array(max(-lo, hi) / 127 or 1e-12, np.float32), np.array(0, np.int8)
    scale = (hi - lo) / 255 or 1e-12
    return np.array(scale, np.float32), np.array(round(-lo / scale), np.uint8)


def sensitivity_graph(model: onnx.ModelProto, ranges: dict, symmetric: bool) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` plus, for every MatMul/Conv, a copy on fake-quantized inputs and weights and two scalar outputs:
    ``||y_q - y||^2`` and ``||y||^2``. Returns the graph and the candidate node names."""
    import onnx
    from onnx import helper, numpy_helper

    g = onnx.ModelProto()
    g.CopyFrom(model)
    graph = g.graph
    inits = {i.name: i for i in graph.initializer}
    extra_nodes, extra_inits, names = [], [], []
    mk = helper.make_node
    for node in list(graph.node):
        if node.op_type not in OP_TYPES or not node.name:
            continue
        p = f"sens/{node.name}/"
        ins = []
        for k, x in enumerate(node.input):
            if x in inits and k == 1:
                w = numpy_helper.to_array(inits[x])
                extra_inits.append(numpy_helper.from_array(_fake_quant_weight(w, 0 if node.op_type == "Conv" else
                                                                              w.ndim - 1), p + "w"))
                ins.append(p + "w")
            elif x in inits or not x or x not in ranges:
                ins.append(x)
            else:
                s, z = _act_params(*ranges[x], symmetric)
                extra_inits += [numpy_helper.from_array(s, p + f"s{k}"), numpy_helper.from_array(z, p + f"z{k}")]
                extra_nodes += [mk("QuantizeLinear", [x, p + f"s{k}", p + f"z{k}"], [p + f"q{k}"]),
                                mk("DequantizeLinear", [p + f"q{k}", p + f"s{k}", p + f"z{k}"], [p + f"dq{k}"])]
                ins.append(p + f"dq{k}")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = p + "node"
        del copy.input[:], copy.output[:]
        copy.input.extend(ins)
        copy.output.append(p + "y")
        extra_nodes += [copy, mk("Sub", [p + "y", node.output[0]], [p + "d"]),
                        mk("ReduceSumSquare", [p + "d"], [p + "err"], keepdims=0),
                        mk("ReduceSumSquare", [node.output[0]], [p + "ref"], keepdims=0)]
        graph.output.extend([helper.make_tensor_value_info(p + "err", onnx.TensorProto.FLOAT, []),
                             helper.make_tensor_value_info(p + "ref", onnx.TensorProto.FLOAT, [])])
        names.append(node.name)
    graph.node.extend(extra_nodes)
    graph.initializer.extend(extra_inits)
    return g, names


def node_sensitivity(model: onnx.ModelProto, ranges: dict, feeds: list[np.ndarray], symmetric: bool
                     ) -> dict[str, float]:
    """Relative error of each MatMul/Conv output under int8 quantization of its own inputs and weights."""
    graph, names = sensitivity_graph(model, ranges, symmetric)
    sess = ort_session(graph)
    outs = [o.name for o in sess.get_outputs()]
    err = dict.fromkeys(names, 0.0)
    for x in feeds:
        r = dict(zip(outs, sess.run(None, {model.graph.input[0].name: x})))
        for n in names:
            err[n] += float(np.sqrt(r[f"sens/{n}/err"] / max(float(r[f"sens/{n}/ref"]), 1e-30))) / len(feeds)
    return err
