"""The ONNX pieces around the traced graphs (torch-free): baked preprocessing and Meta's decoder signature.

Both are written as array code with onnxscript (not traced, so nothing can be frozen from a dummy input):

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

:func:`bake_preprocessing` / :func:`attach_meta_postprocessing` splice such a piece onto a traced graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnxscript import FLOAT, UINT8, script
from onnxscript import opset18 as op

from peft_export.imaging import PreprocessSpec

OPSET = 18  # Resize/Pad/ReduceMax with axes inputs or attributes need opset >= 18
_F = TensorProto.FLOAT


# ---- the pieces, as array code -----------------------------------------------------------------------------

def _preprocessing_function(spec: PreprocessSpec):
    s = np.array([spec.img_size, spec.img_size], np.int64)
    mean, std = np.asarray(spec.pixel_mean, np.float32), np.asarray(spec.pixel_std, np.float32)
    eps = np.array(1e-8, np.float32)
    if spec.mode not in ("sam", "minmax"):
        raise ValueError(f"unknown preprocessing mode {spec.mode!r}")
    sam = spec.mode == "sam"

    @script()
    def preprocess(image: UINT8) -> FLOAT:  # (height, width, 3) -> (1, 3, S, S)
        x = op.Cast(image, to=1)
        if sam:
            norm = (x - op.Constant(value=mean)) / op.Constant(value=std)
        else:
            lo = op.ReduceMin(x, keepdims=1)
            norm = (x - lo) / op.Max(op.ReduceMax(x, keepdims=1) - lo, op.Constant(value=eps))
        nchw = op.Unsqueeze(op.Transpose(norm, perm=[2, 0, 1]), [0])
        pads = op.Concat([0, 0], op.Constant(value=s) - op.Slice(op.Shape(nchw), [2], [4]), axis=0)
        image_preprocessed = op.Pad(nchw, pads, None, [2, 3])
        return image_preprocessed

    return preprocess


def _postprocessing_function(img_size: int, *, single_mask: bool, multimask: bool):
    square = np.array([img_size, img_size], np.int64)
    s64, half = np.array(float(img_size), np.float64), np.array(0.5, np.float64)
    reweight = np.array([[1000.0, 0.0, 0.0, 0.0]], np.float32)
    meta_choice, first_only = single_mask and multimask, single_mask and not multimask

    @script()
    def postprocess(all_masks: FLOAT, all_iou: FLOAT, point_labels: FLOAT, orig_im_size: FLOAT):
        # (B, 4, h, w), (B, 4), (B, N), (2,) -> masks (B, M, H, W), iou_predictions (B, M), low_res_masks (B, M, h, w)
        if meta_choice:  # Meta's select_masks: score = iou + (num_points - 2.5) * [1000, 0, 0, 0]; best = argmax
            num_points = op.Cast(op.Slice(op.Shape(point_labels), [1], [2]), to=1)
            best = op.ArgMax(all_iou + (num_points - 2.5) * op.Constant(value=reweight), axis=1, keepdims=1)
            iou_predictions = op.GatherElements(all_iou, best, axis=1)
            mshape = op.Shape(all_masks)
            index = op.Expand(op.Unsqueeze(best, [2, 3]),
                              op.Concat(op.Slice(mshape, [0], [1]), [1], op.Slice(mshape, [2], [4]), axis=0))
            low_res_masks = op.GatherElements(all_masks, index, axis=1)
        elif first_only:  # multimask outputs untrained: the single-mask output
            low_res_masks = op.Slice(all_masks, [0], [1], [1])
            iou_predictions = op.Slice(all_iou, [0], [1], [1])
        else:
            low_res_masks = op.Identity(all_masks)
            iou_predictions = op.Identity(all_iou)
        up = op.Resize(low_res_masks, None, None, op.Constant(value=square), mode="linear",
                       coordinate_transformation_mode="half_pixel", axes=[2, 3])
        orig64 = op.Cast(orig_im_size, to=11)
        scaled = orig64 * (op.Constant(value=s64) / op.ReduceMax(orig64, keepdims=1))
        resized = op.Cast(op.Floor(scaled + op.Constant(value=half)), to=7)
        cropped = op.Slice(up, [0, 0], resized, [2, 3])
        masks = op.Resize(cropped, None, None, op.Cast(orig_im_size, to=7), mode="linear",
                          coordinate_transformation_mode="half_pixel", axes=[2, 3])
        return masks, iou_predictions, low_res_masks

    return postprocess


def _nodes(fn, prefix: str, keep: set[str]) -> tuple[list, list]:
    """A script function's nodes and initializers, every internal name prefixed (the names in ``keep`` are its
    interface to the graph it joins)."""
    model = fn.to_model_proto()
    rename = {v: v if v in keep else prefix + v for n in model.graph.node for v in (*n.input, *n.output) if v}
    nodes = []
    for n in model.graph.node:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.input[:] = [rename.get(v, v) for v in n.input]
        c.output[:] = [rename[v] for v in n.output]
        c.name = prefix + (n.name or n.op_type)
        nodes.append(c)
    inits = []
    for i in model.graph.initializer:
        c = onnx.TensorProto()
        c.CopyFrom(i)
        c.name = prefix + i.name
        inits.append(c)
    return nodes, inits


def preprocessing_nodes(spec: PreprocessSpec, inp: str = "image", out: str = "image_preprocessed",
                        prefix: str = "pre/") -> tuple[list, list]:
    """Nodes + initializers: uint8 (H', W', 3) ``inp`` -> float32 (1, 3, S, S) ``out``."""
    nodes, inits = _nodes(_preprocessing_function(spec), prefix, {"image", "image_preprocessed"})
    for n in nodes:
        n.input[:] = [inp if v == "image" else v for v in n.input]
        n.output[:] = [out if v == "image_preprocessed" else v for v in n.output]
    return nodes, inits


def postprocessing_nodes(img_size: int, *, single_mask: bool, multimask: bool, prefix: str = "post/"
                         ) -> tuple[list, list]:
    """Nodes + initializers: ``all_masks`` (B,4,h,w), ``all_iou`` (B,4), ``point_labels``, ``orig_im_size`` ->
    Meta's ``masks``, ``iou_predictions``, ``low_res_masks`` (M = 1 with ``single_mask`` else 4)."""
    fn = _postprocessing_function(img_size, single_mask=single_mask, multimask=multimask)
    return _nodes(fn, prefix, {"all_masks", "all_iou", "point_labels", "orig_im_size", "masks", "iou_predictions",
                               "low_res_masks"})


# ---- the pieces alone (tests) ------------------------------------------------------------------------------

def _model(nodes, inputs, outputs, inits, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "piece", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="peft-export")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def preprocessing_model(spec: PreprocessSpec) -> onnx.ModelProto:
    """The baked preprocessing alone: ``image`` uint8 (height, width, 3) -> ``image_preprocessed`` (1,3,S,S)."""
    nodes, inits = preprocessing_nodes(spec)
    s = int(spec.img_size)
    return _model(nodes, [helper.make_tensor_value_info("image", TensorProto.UINT8, ["height", "width", 3])],
                  [helper.make_tensor_value_info("image_preprocessed", _F, [1, 3, s, s])], inits)


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
        node.input[:] = [new if v == old else v for v in node.input]
        node.output[:] = [new if v == old else v for v in node.output]
        for attr in node.attribute:  # subgraphs (If/Loop) see outer names too
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                _rename_uses(g, old, new)


def _check_free(graph: onnx.GraphProto, names: set[str]) -> None:
    used = {v for node in graph.node for v in (*node.input, *node.output)}
    used |= {i.name for i in graph.initializer} | {i.name for i in graph.input}
    clash = names & used
    if clash:
        raise ValueError(f"cannot splice: names already used in the graph: {sorted(clash)[:3]}")


def _copy_checked(model: onnx.ModelProto, minimum: int = OPSET) -> onnx.ModelProto:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version < minimum:
            raise ValueError(f"graph has opset {o.version}; the hand-written pieces need >= {minimum}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def bake_preprocessing(encoder: onnx.ModelProto, spec: PreprocessSpec, input_name: str = "image") -> onnx.ModelProto:
    """Encoder with float (1,3,S,S) input ``image`` -> encoder with uint8 (height, width, 3) input ``image``."""
    model = _copy_checked(encoder)
    g = model.graph
    old = [i for i in g.input if i.name == input_name]
    if not old:
        raise ValueError(f"encoder graph has no input {input_name!r}")
    nodes, inits = preprocessing_nodes(spec, inp=input_name, out="pre/image_preprocessed")
    _check_free(g, {o for nd in nodes for o in nd.output} | {i.name for i in inits})
    _rename_uses(g, input_name, "pre/image_preprocessed")
    old_nodes = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old_nodes)
    g.initializer.extend(inits)
    idx = list(g.input).index(old[0])
    g.input.remove(old[0])
    g.input.insert(idx, helper.make_tensor_value_info(input_name, TensorProto.UINT8, ["height", "width", 3]))
    return model


def attach_meta_postprocessing(lowres: onnx.ModelProto, img_size: int, *, single_mask: bool,
                               multimask: bool) -> onnx.ModelProto:
    """TensorRT-friendly decoder (-> low_res_masks, iou_predictions, all four) -> Meta's decoder signature."""
    model = _copy_checked(lowres)
    g = model.graph
    out_names = [o.name for o in g.output]
    if out_names != ["low_res_masks", "iou_predictions"]:
        raise ValueError(f"decoder outputs are {out_names}, expected low_res_masks, iou_predictions")
    dims = [d.dim_value for d in g.output[0].type.tensor_type.shape.dim]
    bdim = g.output[0].type.tensor_type.shape.dim[0].dim_param or "B"
    nodes, inits = postprocessing_nodes(img_size, single_mask=single_mask, multimask=multimask)
    interface = {"low_res_masks", "iou_predictions", "point_labels"}
    _check_free(g, {"all_masks", "all_iou", "masks", "orig_im_size"} | {i.name for i in inits} |
                {o for nd in nodes for o in nd.output if o not in interface})
    _rename_uses(g, "low_res_masks", "all_masks")
    _rename_uses(g, "iou_predictions", "all_iou")
    g.node.extend(nodes)
    g.initializer.extend(inits)
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
