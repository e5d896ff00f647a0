"""``instance_decoder.onnx``: the instance decoder (micro-sam's AIS) as a fourth graph of an export folder.

Contract (a bioimage.io package composes ``encoder.onnx`` + this graph, so it is kept exactly):
input ``image_embeddings`` (B, C, h, w) float32 -> output ``instance_maps`` (B, 3, S, S) float32, the sigmoid maps
in the order foreground, centre distance, boundary distance, at the model input size S (crop to the resized image
and resize like SAM's masks; :mod:`peft_export.runtime.instances` does that and the watershed). The manifest lists
it under ``files["instance_decoder"]`` and describes it in ``extra["instance_decoder"]`` (channels, output size,
architecture, post-processing defaults).

Precision: fp32, or fp16 with the export's fp16 rules; an int8 export keeps it float32 (as its prompt decoders).
Parity gate: fed the PyTorch embedding of the gate's sample image (the real DSB2018 tile), the graph's maps vs the
PyTorch decoder's (batch of two: the dynamic axis) — fp32 graphs by max |diff| (``atol + rtol``; the maps lie in
[0, 1]); and the whole ONNX chain (encoder.onnx -> instance_decoder.onnx -> watershed) vs PyTorch's instance
labels, as the object-matched IoU — a check for fp16 / int8 exports (>= their mask-IoU threshold), a figure for fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from peft_export.export import onnx_export, precision
from peft_export.export.parity import Check, Thresholds, _model_outputs, _session, max_abs
from peft_export.imaging import upscale_masks
from peft_export.metrics import matched_iou
from peft_export.runtime.instances import CHANNELS, InstanceOptions, maps_to_instances

ROLE = "instance_decoder"
FILENAME = "instance_decoder.onnx"
INPUT = "image_embeddings"
OUTPUT = "instance_maps"


@dataclass
class BuiltInstance:
    model: onnx.ModelProto
    reused: bool


def trace(decoder, embedding_chw: tuple[int, int, int], opset: int) -> onnx_export.Traced:
    """(B, C, h, w) -> (B, 3, S, S) with a dynamic batch B (example batch 2, so nothing specialises on it)."""
    example = (torch.zeros(2, *embedding_chw),)
    batch = torch.export.Dim("B", min=1, max=1024)
    return onnx_export.trace(decoder.eval(), example, input_names=[INPUT], output_names=[OUTPUT],
                             dynamic_shapes=({0: batch},), opset=opset, key=ROLE)


def build(prepared, options, say, timed) -> BuiltInstance | None:
    """The graph at the export's precision (None when the model has no instance decoder)."""
    decoder = getattr(prepared, "instance_decoder", None)
    if decoder is None:
        return None
    sam = prepared.model
    chw = (int(sam.prompt_encoder.embed_dim), *(int(v) for v in sam.prompt_encoder.image_embedding_size))
    say("tracing the instance decoder", advance=False)
    traced = timed("trace_instance_decoder", lambda: trace(decoder.float(), chw, options.opset))
    model = timed("optimize_instance_decoder", lambda: onnx_export.optimize(traced.model))
    if options.precision == "fp16":
        model = timed("fp16_instance_decoder", lambda: precision.to_fp16(model))
    return BuiltInstance(model, traced.reused)


def manifest_entry(prepared) -> dict | None:
    decoder = getattr(prepared, "instance_decoder", None)
    if decoder is None:
        return None
    return {"file": FILENAME, "input": INPUT, "output": OUTPUT, "channels": list(CHANNELS),
            "output_size": int(prepared.spec.img_size), "activation": "sigmoid",
            "architecture": {"kind": "micro-sam UNETR decoder (torch-em), no skip connections",
                             **decoder.config.to_dict()},
            "postprocessing": {"method": "seeded watershed (micro-sam AIS)", **InstanceOptions().to_dict()}}


# ---- parity ------------------------------------------------------------------------------------------------

def parity_checks(prepared, folder: Path, *, precision_name: str, baked: bool, thresholds: Thresholds,
                  fig: dict, int8_threshold: float | None = None) -> list[Check]:
    """The instance decoder's parity figures (into ``fig["instance_decoder"]``) and checks; [] without one."""
    decoder = getattr(prepared, "instance_decoder", None)
    if decoder is None:
        return []
    sam, spec = prepared.model.eval(), prepared.spec
    _sample, original_hw, resized_hw, feed_image, emb, _rounds = _model_outputs(sam, spec.preprocess, baked)
    batch = np.concatenate([emb, emb[..., ::-1].copy()]).astype(np.float32)  # two different images' worth
    with torch.no_grad():
        ref = decoder.eval().float()(torch.from_numpy(batch)).numpy()
    graph = _session(folder / FILENAME)
    out = graph.run([OUTPUT], {INPUT: batch})[0]
    emb_onnx = _session(folder / "encoder.onnx").run(None, {"image": feed_image})[0]
    chain = graph.run([OUTPUT], {INPUT: emb_onnx})[0]
    s = int(spec.img_size)

    def labels(maps):
        return maps_to_instances(upscale_masks(maps[0], s, resized_hw, original_hw))

    ref_labels, chain_labels = labels(ref[:1]), labels(chain)
    f = {"maps_max_abs_diff": max_abs(out, ref), "chain_maps_max_abs_diff": max_abs(chain, ref[:1]),
         "chain_matched_iou": matched_iou(chain_labels, ref_labels),
         "objects_torch": int(ref_labels.max()), "objects_onnx_chain": int(chain_labels.max())}
    fig["instance_decoder"] = f
    checks = []
    if precision_name in ("fp32", "int8"):  # the decoder graph itself is float32
        checks.append(Check("instance decoder maps max |diff|", f["maps_max_abs_diff"],
                            thresholds.atol + thresholds.rtol, "max", "fed the PyTorch embedding, batch of 2"))
    limit = thresholds.iou_for(precision_name) if precision_name == "fp16" else int8_threshold
    if limit is not None:
        checks.append(Check("instance labels matched IoU vs fp32 PyTorch (ONNX chain)", f["chain_matched_iou"], limit,
                            "min", f"{f['objects_onnx_chain']} vs {f['objects_torch']} objects"))
    return checks
