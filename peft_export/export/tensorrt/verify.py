"""The comparison of freshly built engines with ONNX Runtime on the same ONNX files (the build-time gate).

The reference is the runtime's own :class:`~peft_export.runtime.onnx_backend.OnnxBackend` on the CPU execution
provider; the engines run through the runtime's :class:`~peft_export.runtime.tensorrt_backend.EngineRunner`, so
the gate checks the code that serves predictions, not a second runner.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from peft_export.data.dataset import sample_image
from peft_export.export.tensorrt.options import DEFAULT_MIN_IOU
from peft_export.metrics import mask_ious
from peft_export.prompts import sample_prompts
from peft_export.runtime.backend import mask_prompt_inputs, prepare_input
from peft_export.runtime.onnx_backend import OnnxBackend
from peft_export.runtime.tensorrt_backend import EngineRunner

_MAX = ("masks_abs", "masks_rel", "iou_abs")  # running worst: max of these, min of the IoUs


# ---- figures -------------------------------------------------------------------------------------------------

def _iou(logits: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(mean, smallest) IoU of logits > 0 over every mask of a (B, M, H, W) output."""
    per = mask_ious(np.asarray(logits).reshape(-1, *logits.shape[2:]) > 0,
                    np.asarray(ref).reshape(-1, *ref.shape[2:]) > 0)
    return (float(per.mean()), float(per.min())) if per.size else (1.0, 1.0)


def _rel_diff(a: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |a - ref|, that / max(1, max |ref|)); inf when ``a`` is not finite."""
    a = np.asarray(a, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.isfinite(a).all():
        return math.inf, math.inf
    d = float(np.abs(a - ref).max()) if ref.size else 0.0
    return d, d / max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)


class _Engines:
    """The two engine runners behind OnnxBackend's ``embed`` / ``decode`` interface (no batch splitting)."""

    def __init__(self, encoder: EngineRunner, decoder: EngineRunner, mask_size: tuple[int, int]):
        self.encoder, self.decoder, self.mask_size = encoder, decoder, mask_size
        outs = encoder.outputs
        self._io = encoder.inputs[0], "image_embeddings" if "image_embeddings" in outs else outs[0]

    def embed(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.encoder.run({self._io[0]: x})[self._io[1]], np.float32)

    def decode(self, emb, coords, labels, mask_input=None) -> tuple[np.ndarray, np.ndarray]:
        mask_input, has = mask_prompt_inputs(len(coords), mask_input, self.mask_size)
        out = self.decoder.run({"image_embeddings": emb, "point_coords": coords, "point_labels": labels,
                                "mask_input": mask_input, "has_mask_input": has})
        return out["low_res_masks"], out["iou_predictions"]


# ---- the comparison --------------------------------------------------------------------------------------------

def check_parity(plan, encoder: EngineRunner, decoder: EngineRunner) -> dict[str, Any]:
    """Run both engines and ONNX Runtime (same ONNX files) on sample inputs; figures + pass/fail.

    Decoder figures use the ONNX Runtime embedding for both (the decoder alone); the end-to-end mask IoU runs
    TensorRT encoder -> TensorRT decoder against ONNX Runtime -> ONNX Runtime. Prompt sets cover the profile's
    min/opt/max points, a refinement pass (mask_input) and the maximum batch (the prompts repeated).
    """
    ref = OnnxBackend(plan.out_dir, plan.manifest, providers=["CPUExecutionProvider"])
    trt = _Engines(encoder, decoder, tuple(plan.manifest.mask_input_size))
    image, image_name = sample_image(ref.info.img_size)
    x, prep = prepare_input(ref, image)
    ref_emb = np.asarray(ref.embed(x), np.float32)
    trt_emb = trt.embed(x)
    emb_abs, emb_rel = _rel_diff(trt_emb, ref_emb)
    cos = float(np.dot(trt_emb.ravel(), ref_emb.ravel())
                / max(np.linalg.norm(trt_emb) * np.linalg.norm(ref_emb), 1e-30))
    figures: dict[str, Any] = {"prompt_sets": {}}
    worst = {"masks_abs": 0.0, "masks_rel": 0.0, "iou_abs": 0.0, "dec_iou": 1.0, "e2e_iou": 1.0, "e2e_min": 1.0}
    sets, b_max = _prompt_sets(plan, prep.resized_hw, ref, ref_emb)
    for name, c, lab, mi in sets:
        figures["prompt_sets"][name] = _compare_set(ref, trt, ref_emb, trt_emb, c, lab, mi, worst)
    name_b, cb, lb, _ = sets[0]
    if b_max > len(cb):  # the profile's largest batch: the first set repeated
        figures["prompt_sets"][f"{name_b} x batch {b_max}"] = _compare_max_batch(ref, trt, ref_emb, cb, lb, b_max,
                                                                                 worst)
    figures.update({
        "sample": image_name,
        "reference": "onnxruntime CPUExecutionProvider on the same ONNX files",
        "embedding_max_abs_diff": emb_abs, "embedding_rel_diff": emb_rel, "embedding_cosine": cos,
        "masks_max_abs_diff": worst["masks_abs"], "masks_rel_diff": worst["masks_rel"],
        "iou_predictions_max_abs_diff": worst["iou_abs"],
        "decoder_mask_iou": worst["dec_iou"], "mask_iou": worst["e2e_iou"], "mask_iou_min": worst["e2e_min"],
    })
    failed = _gate(plan, figures)
    figures["passed"] = not failed
    figures["failure"] = "; ".join(failed) if failed else None
    return figures


def _worsen(worst: dict[str, float], **figures: float) -> None:
    for k, v in figures.items():
        worst[k] = max(worst[k], v) if k in _MAX else min(worst[k], v)


def _decoder_ranges(plan) -> tuple[list[int], int, int]:
    """(point counts to try: the profile's min/opt/max, smallest batch, largest batch)."""
    prof = plan.engines["decoder"].profile.get("point_coords")
    if prof is not None:
        return sorted({prof[k][1] for k in ("min", "opt", "max")}), prof["min"][0], prof["max"][0]
    fixed = next(t for t in plan.engines["decoder"].inputs if t.name == "point_coords").dims
    return [fixed[1]], fixed[0], fixed[0]


def _prompt_sets(plan, resized_hw, ref, ref_emb) -> tuple[list[tuple], int]:
    """[(name, coords, labels, mask_input or None)] within the profile, and the profile's largest batch."""
    n_values, b_min, b_max = _decoder_ranges(plan)
    sets = []
    for i, n in enumerate(n_values):
        c, lab = sample_prompts(resized_hw, n, 3, seed=i)
        idx = np.arange(min(max(len(c), b_min), b_max)) % len(c)  # repeat/trim to a batch the profile accepts
        sets.append((f"{n} point{'s' if n != 1 else ''}", c[idx], lab[idx], None))
    # a refinement pass: the second set's ONNX Runtime masks (first of each prompt) as mask_input
    name0, c0, l0, _ = sets[min(1, len(sets) - 1)]
    low0, _ = ref.decode(ref_emb, c0, l0)
    sets.append((f"{name0} + mask_input", c0, l0, np.ascontiguousarray(low0[:, :1], np.float32)))
    return sets, b_max


def _compare_set(ref, trt, ref_emb, trt_emb, c, lab, mi, worst) -> dict[str, Any]:
    r_low, r_iou = ref.decode(ref_emb, c, lab, mi)
    g_low, g_iou = trt.decode(ref_emb, c, lab, mi)  # the decoder alone
    e_low, _ = trt.decode(trt_emb, c, lab, mi)  # TensorRT -> TensorRT vs ONNX Runtime -> ONNX Runtime
    m_abs, m_rel = _rel_diff(g_low, r_low)
    i_abs, _ = _rel_diff(g_iou, r_iou)
    dec_iou, _ = _iou(g_low, r_low)
    e_iou, e_min = _iou(e_low, r_low)
    _worsen(worst, masks_abs=m_abs, masks_rel=m_rel, iou_abs=i_abs, dec_iou=dec_iou, e2e_iou=e_iou, e2e_min=e_min)
    return {"batch": len(c), "points": int(c.shape[1]), "masks_max_abs_diff": m_abs, "iou_max_abs_diff": i_abs,
            "mask_iou": e_iou, "mask_iou_min": e_min}


def _compare_max_batch(ref, trt, ref_emb, c, lab, b_max, worst) -> dict[str, Any]:
    """Every copy in a batch of ``b_max`` repeated prompts must equal its original's reference."""
    idx = np.arange(b_max) % len(c)
    big, _ = trt.decode(ref_emb, c[idx], lab[idx])
    small, _ = ref.decode(ref_emb, c, lab)
    bb_abs, bb_rel = _rel_diff(big, small[idx])
    bb_iou, _ = _iou(big, small[idx])
    _worsen(worst, masks_abs=bb_abs, masks_rel=bb_rel, dec_iou=bb_iou)
    return {"batch": b_max, "points": int(c.shape[1]), "masks_max_abs_diff": bb_abs, "mask_iou": bb_iou}


def _gate(plan, figures: dict[str, Any]) -> list[str]:
    """Sets ``figures["gate"]``; returns the failures. An fp32 engine without TF32 is held to max |diff|
    (relative), any other to mask IoU — an int8 encoder end to end, its fp32 decoder alone by max |diff|."""
    opts = plan.options
    tol = opts.tolerance
    exact = {role: e.precision == "fp32" and not opts.tf32 for role, e in plan.engines.items()}
    rel = f"max |diff| / max(1, max |reference|) <= {tol:g}"
    if all(exact.values()):
        figures["gate"] = f"fp32: {rel} (embedding and low-res masks)"
        checks = [("the embedding", figures["embedding_rel_diff"], None),
                  ("the masks", figures["masks_rel_diff"], None)]
    else:
        need = opts.min_iou if opts.min_iou is not None else DEFAULT_MIN_IOU.get(plan.precision, 0.99)
        figures["gate"] = f"{plan.precision}{' + TF32' if opts.tf32 else ''}: mask IoU vs ONNX Runtime >= {need:g}"
        checks = [("end to end", figures["mask_iou"], need)]
        if exact["decoder"]:
            figures["gate"] += f" end to end; the fp32 decoder alone: {rel} (low-res masks)"
            checks.append(("the masks of the decoder alone", figures["masks_rel_diff"], None))
        else:
            checks.append(("decoder alone", figures["decoder_mask_iou"], need))
    return [f"{what} differs by {v:.3g} (relative; tolerance {tol:g})" if limit is None else
            f"mask IoU {v:.4f} < {limit:g} ({what})"
            for what, v, limit in checks if not (v <= tol if limit is None else v >= limit)]
