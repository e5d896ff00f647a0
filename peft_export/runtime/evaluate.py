"""Prompted evaluation against instance labels, for any backend (torch-free).

For every object of the ground truth: a box prompt (its bounding box) and/or a point prompt (its most
interior pixel). Box prompts use SAM's single-mask output; a lone point is ambiguous, so point prompts use
the best of SAM's three multimask outputs by predicted IoU (for models whose multimask outputs were trained;
LiteMedSAM's were not, so it uses its single-mask output). Masks are upscaled to the original image in
numpy (one implementation for all backends) and thresholded at logit 0.

Reported per prompt type: mean IoU over all objects, and mSA (mean segmentation accuracy over IoU thresholds
0.5…0.95) of the instance segmentation painted from the per-object masks (higher predicted IoU wins overlaps),
averaged over images. ``auto`` (segment everything, no prompts from the labels): mean IoU is each true
object's best IoU with any predicted instance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from peft_export.data.objects import objects_from_labels
from peft_export.imaging import Prepared, upscale_masks
from peft_export.metrics import iou_matrix, mask_iou, masks_to_labels, mean_segmentation_accuracy
from peft_export.prompts import box_prompts, pad_points
from peft_export.runtime.backend import Backend, select_masks

PROMPT_TYPES = ("box", "point")
ALL_PROMPT_TYPES = (*PROMPT_TYPES, "auto")


@dataclass
class PromptResult:
    ious: list[float] = field(default_factory=list)
    msa: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "mean_iou": float(np.mean(self.ious)) if self.ious else float("nan"),
            "msa": float(np.mean(self.msa)) if self.msa else float("nan"),
            "objects": len(self.ious),
            "images": len(self.msa),
        }


def prompts_for(objects, prepared: Prepared, kind: str, multimask: bool = True
                ) -> tuple[np.ndarray, np.ndarray, bool]:
    """Model-space prompts (coords, labels) for every object, and whether to use multimask output."""
    n = len(objects)
    if kind == "box":
        return (*box_prompts(prepared.transform_boxes(objects.boxes)), False)
    if kind == "point":
        pts = prepared.transform_coords(objects.points).reshape(n, 1, 2)
        return (*pad_points(pts, np.ones((n, 1), np.float32)), multimask)
    raise ValueError(f"unknown prompt type {kind!r}; choose from {PROMPT_TYPES}")


def predict_objects(backend: Backend, embedding: np.ndarray, prepared: Prepared, coords: np.ndarray,
                    labels: np.ndarray, multimask: bool, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Masks (N, H, W) bool at the original size and their predicted IoUs (N,)."""
    masks, scores = [], []
    for s in range(0, len(coords), batch_size):
        low, iou = backend.decode(embedding, coords[s: s + batch_size], labels[s: s + batch_size])
        low, iou = select_masks(low, iou, multimask)
        up = upscale_masks(low, prepared.img_size, prepared.resized_hw, prepared.original_hw)
        masks.append(up > 0)
        scores.append(iou)
    if not masks:
        return np.zeros((0, *prepared.original_hw), bool), np.zeros(0, np.float32)
    return np.concatenate(masks), np.concatenate(scores)


def evaluate(backend: Backend, samples: Sequence, prompts: Sequence[str] = PROMPT_TYPES, *,
             min_area: int = 1, progress: Callable[[int], None] | None = None, auto_config=None) -> dict:
    """Evaluate ``backend`` on ``samples`` (objects with ``.image`` and ``.labels``). Returns a JSON-able dict."""
    from peft_export.runtime.segmenter import Segmenter

    results = {p: PromptResult() for p in prompts}
    seg = Segmenter(backend=backend)
    for sample in samples:
        seg.set_image(sample.image, name=getattr(sample, "name", "image"))
        prepared, embedding = seg.prepared, seg.embedding
        objects = objects_from_labels(sample.labels, min_area=min_area)
        for kind in prompts:
            if kind == "auto":
                pred_labels = seg.segment_everything(config=auto_config)
                iou = iou_matrix(pred_labels, sample.labels)
                results[kind].ious.extend((iou.max(axis=0) if iou.shape[0] else np.zeros(iou.shape[1])).tolist())
                results[kind].msa.append(mean_segmentation_accuracy(pred_labels, sample.labels))
                continue
            if len(objects) == 0:
                continue
            coords, labels, multimask = prompts_for(objects, prepared, kind, getattr(backend, "multimask", True))
            masks, scores = predict_objects(backend, embedding, prepared, coords, labels, multimask)
            for m, i in zip(masks, objects.ids):
                results[kind].ious.append(mask_iou(m, sample.labels == i))
            results[kind].msa.append(mean_segmentation_accuracy(masks_to_labels(masks, scores), sample.labels))
        if progress is not None:
            progress(1)
    return {kind: r.summary() for kind, r in results.items()}
