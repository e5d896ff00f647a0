"""Hand-written ONNX pieces around the traced graphs (torch-free): baked preprocessing and Meta's decoder.

Both are written node by node instead of traced, so that nothing can be frozen from a dummy input:

- :func:`preprocessing_model`: ``image`` uint8 (H', W', 3), already resized so that max(H', W') == S ->
  (1, 3, S, S) float32, exactly :func:`peft_export.imaging.normalize_and_pad` (``sam``: (x - mean) / std,
  ``minmax``: per-image (x - min) / max(max - min, 1e-8)), zero-padded bottom/right to S.
- :func:`meta_postprocessing_model`: all four low-res masks + IoUs (the TensorRT-friendly decoder's outputs),
  ``point_labels`` and ``orig_im_size`` -> Meta's ``masks`` (upscaled to the original size, logits),
  ``iou_predictions`` and ``low_res_masks``. Upscaling follows SAM's ``postprocess_masks``: bilinear to
  (S, S), crop to the resized size ``floor(orig * S / max(orig) + 0.5)`` (computed in float64, the arithmetic
  of :func:`peft_export.imaging.resized_shape`), bilinear to ``orig_im_size``.
  Single-mask option: Meta's selection (mask 0 when the prompt has more than one point, padding included, else
  the best of masks 1..3 by predicted IoU), done with arithmetic; for models whose multimask outputs were not
  trained (LiteMedSAM) always mask 0.

:func:`attach_before` / :func:`attach_after` splice such a piece onto a graph (renaming what joins them).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from peft_export.imaging import PreprocessSpec

OPSET = 18  # Resize/Pad/ReduceMax with axes inputs or attributes need opset >= 18

_F = TensorProto.FLOAT


def _const(name: str, value, dtype=None) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _model(nodes, inputs, outputs, inits, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "piece", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="peft-export")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# ---- baked preprocessing -----------------------------------------------------------------------------

def preprocessing_nodes(spec: PreprocessSpec, inp: str = "image", out: str = "image_preprocessed",
                        prefix: str = "pre/") -> tuple[list, list]:
    """Nodes + initializers: uint8 (H', W', 3) ``inp`` -> float32 (1, 3, S, S) ``out``."""
    p = prefix
    n = helper.make_node
    s = int(spec.img_size)
    nodes = [n("Cast", [inp], [p + "x"], to=_F)]
    inits = []
    if spec.mode == "sam":
        inits += [_const(p + "mean", np.asarray(spec.pixel_mean, np.float32)),
                  _const(p + "std", np.asarray(spec.pixel_std, np.float32))]
        nodes += [n("Sub", [p + "x", p + "mean"], [p + "centred"]),
                  n("Div", [p + "centred", p + "std"], [p + "norm"])]
    elif spec.mode == "minmax":
        inits += [_const(p + "eps", np.float32(1e-8))]
        nodes += [n("ReduceMin", [p + "x"], [p + "lo"], keepdims=1),
                  n("ReduceMax", [p + "x"], [p + "hi"], keepdims=1),
                  n("Sub", [p + "hi", p + "lo"], [p + "range"]),
                  n("Max", [p + "range", p + "eps"], [p + "den"]),
                  n("Sub", [p + "x", p + "lo"], [p + "centred"]),
                  n("Div", [p + "centred", p + "den"], [p + "norm"])]
    else:
        raise ValueError(f"unknown preprocessing mode {spec.mode!r}")
    inits += [_const(p + "axes0", np.array([0], np.int64)), _const(p + "hw_start", np.array([2], np.int64)),
              _const(p + "hw_end", np.array([4], np.int64)), _const(p + "size", np.array([s, s], np.int64)),
              _const(p + "zeros2", np.array([0, 0], np.int64)), _const(p + "pad_axes", np.array([2, 3], np.int64))]
    nodes += [
        n("Transpose", [p + "norm"], [p + "chw"], perm=[2, 0, 1]),
        n("Unsqueeze", [p + "chw", p + "axes0"], [p + "nchw"]),
        n("Shape", [p + "nchw"], [p + "shape"]),
        n("Slice", [p + "shape", p + "hw_start", p + "hw_end"], [p + "hw"]),
        n("Sub", [p + "size", p + "hw"], [p + "pad_end"]),
        n("Concat", [p + "zeros2", p + "pad_end"], [p + "pads"], axis=0),
        n("Pad", [p + "nchw", p + "pads", "", p + "pad_axes"], [out], mode="constant"),
    ]
    return nodes, inits


def preprocessing_model(spec: PreprocessSpec) -> onnx.ModelProto:
    """The baked preprocessing alone: ``image`` uint8 (height, width, 3) -> ``image_preprocessed`` (1,3,S,S)."""
    nodes, inits = preprocessing_nodes(spec)
    s = int(spec.img_size)
    return _model(nodes, [helper.make_tensor_value_info("image", TensorProto.UINT8, ["height", "width", 3])],
                  [helper.make_tensor_value_info("image_preprocessed", _F, [1, 3, s, s])], inits)


# ---- Meta's decoder post-processing ------------------------------------------------------------------

def postprocessing_nodes(img_size: int, *, single_mask: bool, multimask: bool, masks_in: str = "all_masks",
                         iou_in: str = "all_iou", labels_in: str = "point_labels",
                         orig_in: str = "orig_im_size", prefix: str = "post/") -> tuple[list, list]:
    """Nodes + initializers: all four low-res masks (B,4,h,w) + IoUs (B,4) -> masks, iou_predictions,
    low_res_masks (Meta's outputs; M = 1 with ``single_mask`` else 4)."""
    p = prefix
    n = helper.make_node
    s = int(img_size)
    nodes: list = []
    inits: list = []
    if single_mask and multimask:
        # Meta's select_masks: score = iou + (num_points - 2.5) * [1000, 0, 0, 0]; best = argmax
        inits += [_const(p + "reweight", np.array([[1000.0, 0.0, 0.0, 0.0]], np.float32)),
                  _const(p + "two_and_half", np.float32(2.5)), _const(p + "one", np.array([1], np.int64)),
                  _const(p + "sl_start", np.array([1], np.int64)), _const(p + "sl_end", np.array([2], np.int64))]
        nodes += [
            n("Shape", [labels_in], [p + "labels_shape"]),
            n("Slice", [p + "labels_shape", p + "sl_start", p + "sl_end"], [p + "num_points_i"]),
            n("Cast", [p + "num_points_i"], [p + "num_points"], to=_F),
            n("Sub", [p + "num_points", p + "two_and_half"], [p + "np_off"]),
            n("Mul", [p + "np_off", p + "reweight"], [p + "bias"]),
            n("Add", [iou_in, p + "bias"], [p + "score"]),
            n("ArgMax", [p + "score"], [p + "best"], axis=1, keepdims=1),  # (B, 1)
            n("GatherElements", [iou_in, p + "best"], ["iou_predictions"], axis=1),
            n("Shape", [masks_in], [p + "mshape"]),
            n("Slice", [p + "mshape", p + "zero1", p + "one"], [p + "bdim"]),
            n("Slice", [p + "mshape", p + "two1", p + "four1"], [p + "hwdim"]),
            n("Concat", [p + "bdim", p + "one", p + "hwdim"], [p + "idx_shape"], axis=0),
            n("Unsqueeze", [p + "best", p + "axes23"], [p + "best4"]),
            n("Expand", [p + "best4", p + "idx_shape"], [p + "best_idx"]),
            n("GatherElements", [masks_in, p + "best_idx"], ["low_res_masks"], axis=1),
        ]
        inits += [_const(p + "zero1", np.array([0], np.int64)), _const(p + "two1", np.array([2], np.int64)),
                  _const(p + "four1", np.array([4], np.int64)), _const(p + "axes23", np.array([2, 3], np.int64))]
    elif single_mask:  # multimask outputs untrained: the single-mask output
        inits += [_const(p + "m0", np.array([0], np.int64)), _const(p + "m1", np.array([1], np.int64))]
        nodes += [n("Slice", [masks_in, p + "m0", p + "m1", p + "m1"], ["low_res_masks"]),
                  n("Slice", [iou_in, p + "m0", p + "m1", p + "m1"], ["iou_predictions"])]
    else:
        nodes += [n("Identity", [masks_in], ["low_res_masks"]), n("Identity", [iou_in], ["iou_predictions"])]
    inits += [
        _const(p + "square", np.array([s, s], np.int64)),
        _const(p + "s64", np.float64(s)), _const(p + "half", np.float64(0.5)),
        _const(p + "crop_start", np.array([0, 0], np.int64)), _const(p + "crop_axes", np.array([2, 3], np.int64)),
    ]
    resize = dict(mode="linear", coordinate_transformation_mode="half_pixel", axes=[2, 3])
    nodes += [
        n("Resize", ["low_res_masks", "", "", p + "square"], [p + "up"], **resize),
        n("Cast", [orig_in], [p + "orig64"], to=TensorProto.DOUBLE),
        n("ReduceMax", [p + "orig64"], [p + "longest"], keepdims=1),
        n("Div", [p + "s64", p + "longest"], [p + "scale"]),
        n("Mul", [p + "orig64", p + "scale"], [p + "scaled"]),
        n("Add", [p + "scaled", p + "half"], [p + "scaled_h"]),
        n("Floor", [p + "scaled_h"], [p + "resized_f"]),
        n("Cast", [p + "resized_f"], [p + "resized"], to=TensorProto.INT64),
        n("Slice", [p + "up", p + "crop_start", p + "resized", p + "crop_axes"], [p + "cropped"]),
        n("Cast", [orig_in], [p + "orig_i"], to=TensorProto.INT64),
        n("Resize", [p + "cropped", "", "", p + "orig_i"], ["masks"], **resize),
    ]
    return nodes, inits


def meta_postprocessing_model(img_size: int, mask_hw: tuple[int, int], *, single_mask: bool,
                              multimask: bool) -> onnx.ModelProto:
    """The Meta post-processing alone (inputs ``all_masks``, ``all_iou``, ``point_labels``, ``orig_im_size``)."""
    nodes, inits = postprocessing_nodes(img_size, single_mask=single_mask, multimask=multimask)
    h, w = mask_hw
    m = 1 if single_mask else 4
    inputs = [helper.make_tensor_value_info("all_masks", _F, ["B", 4, h, w]),
              helper.make_tensor_value_info("all_iou", _F, ["B", 4]),
              helper.make_tensor_value_info("point_labels", _F, ["B", "N"]),
              helper.make_tensor_value_info("orig_im_size", _F, [2])]
    outputs = [helper.make_tensor_value_info("masks", _F, ["B", m, "H", "W"]),
               helper.make_tensor_value_info("iou_predictions", _F, ["B", m]),
               helper.make_tensor_value_info("low_res_masks", _F, ["B", m, h, w])]
    return _model(nodes, inputs, outputs, inits)


# ---- splicing ----------------------------------------------------------------------------------------

def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
        for attr in node.attribute:  # subgraphs (If/Loop) see outer names too
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_uses(attr.g, old, new)
            for g in attr.graphs:
                _rename_uses(g, old, new)


def _check_free(graph: onnx.GraphProto, names: set[str]) -> None:
    used = {v for node in graph.node for v in (*node.input, *node.output)}
    used |= {i.name for i in graph.initializer} | {i.name for i in graph.input}
    clash = names & used
    if clash:
        raise ValueError(f"cannot splice: names already used in the graph: {sorted(clash)[:3]}")


def _ensure_opset(model: onnx.ModelProto, minimum: int = OPSET) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < minimum:
            raise ValueError(f"graph has opset {op.version}; the hand-written pieces need >= {minimum}")


def bake_preprocessing(encoder: onnx.ModelProto, spec: PreprocessSpec, input_name: str = "image") -> onnx.ModelProto:
    """Encoder with float (1,3,S,S) input ``image`` -> encoder with uint8 (height, width, 3) input ``image``."""
    _ensure_opset(encoder)
    model = onnx.ModelProto()
    model.CopyFrom(encoder)
    g = model.graph
    old_inputs = [i for i in g.input if i.name == input_name]
    if not old_inputs:
        raise ValueError(f"encoder graph has no input {input_name!r}")
    nodes, inits = preprocessing_nodes(spec, inp=input_name, out="pre/image_preprocessed")
    _check_free(g, {o for nd in nodes for o in nd.output} | {i.name for i in inits})
    _rename_uses(g, input_name, "pre/image_preprocessed")
    old_nodes = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old_nodes)
    g.initializer.extend(inits)
    new_in = helper.make_tensor_value_info(input_name, TensorProto.UINT8, ["height", "width", 3])
    idx = list(g.input).index(old_inputs[0])
    g.input.remove(old_inputs[0])
    g.input.insert(idx, new_in)
    return model


def attach_meta_postprocessing(lowres: onnx.ModelProto, img_size: int, *, single_mask: bool,
                               multimask: bool) -> onnx.ModelProto:
    """TensorRT-friendly decoder (-> low_res_masks, iou_predictions, all four) -> Meta's decoder signature."""
    _ensure_opset(lowres)
    model = onnx.ModelProto()
    model.CopyFrom(lowres)
    g = model.graph
    out_names = [o.name for o in g.output]
    if out_names != ["low_res_masks", "iou_predictions"]:
        raise ValueError(f"decoder outputs are {out_names}, expected low_res_masks, iou_predictions")
    mask_type = g.output[0].type.tensor_type
    dims = [d.dim_value for d in mask_type.shape.dim]
    nodes, inits = postprocessing_nodes(img_size, single_mask=single_mask, multimask=multimask)
    _check_free(g, {"all_masks", "all_iou", "masks", "orig_im_size"} |
                {o for nd in nodes for o in nd.output if o not in ("low_res_masks", "iou_predictions")} |
                {i.name for i in inits})
    _rename_uses(g, "low_res_masks", "all_masks")
    _rename_uses(g, "iou_predictions", "all_iou")
    g.node.extend(nodes)
    g.initializer.extend(inits)
    bdim = mask_type.shape.dim[0].dim_param or "B"
    m = 1 if single_mask else 4
    del g.output[:]
    g.output.extend([
        helper.make_tensor_value_info("masks", _F, [bdim, m, "orig_height", "orig_width"]),
        helper.make_tensor_value_info("iou_predictions", _F, [bdim, m]),
        helper.make_tensor_value_info("low_res_masks", _F, [bdim, m, dims[2], dims[3]]),
    ])
    g.input.append(helper.make_tensor_value_info("orig_im_size", _F, [2]))
    return model


def describe_io(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs as manifest entries: name, shape (ints, or strings for dynamic axes), dtype."""
    def one(v) -> dict:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else (int(d.dim_value) if d.HasField("dim_value") else "?")
                 for d in t.shape.dim]
        return {"name": v.name, "shape": shape, "dtype": helper.tensor_dtype_to_np_dtype(t.elem_type).name}

    inits = {i.name for i in model.graph.initializer}
    return [one(v) for v in model.graph.input if v.name not in inits], [one(v) for v in model.graph.output]
