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

Images larger than the model input are embedded in tiles at native resolution (see
:mod:`peft_export.runtime.tiling`): each object's prompt is decoded in the tile whose core holds it. Masks are
kept as crops (:mod:`peft_export.runtime.pieces`), so memory follows the image, not the number of objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from peft_export.data.objects import objects_from_labels
from peft_export.imaging import ModelInput, upscale_masks
from peft_export.metrics import instance_scores, iou_matrix, mean_segmentation_accuracy, merge_instance_scores
from peft_export.prompts import box_prompts, pad_points
from peft_export.runtime.backend import Backend, select_masks
from peft_export.runtime.evaluate_options import PROMPT_TYPES
from peft_export.runtime.pieces import paint, piece_iou, rescale_piece
from peft_export.runtime.segmenter import Segmenter
from peft_export.runtime.strategies import AutoOptions
from peft_export.runtime.tiling import Tiling


@dataclass
class PromptResult:
    ious: list[float] = field(default_factory=list)
    msa: list[float] = field(default_factory=list)
    found: int | None = None  # automatic segmentation: the objects it found (``objects``: the true ones)
    method: str | None = None  # automatic segmentation: the strategy that ran

    def summary(self) -> dict:
        auto = {} if self.found is None else {"objects_found": self.found, "method": self.method}
        return {
            "mean_iou": float(np.mean(self.ious)) if self.ious else float("nan"),
            "msa": float(np.mean(self.msa)) if self.msa else float("nan"),
            "objects": len(self.ious),
            "images": len(self.msa),
            **auto,
        }


def prompts_for(objects, prepared: ModelInput, kind: str, multimask: bool = True
                ) -> tuple[np.ndarray, np.ndarray, bool]:
    """Model-space prompts (coords, labels) for every object, and whether to use multimask output."""
    n = len(objects)
    if kind == "box":
        return (*box_prompts(prepared.transform_boxes(objects.boxes)), False)
    if kind == "point":
        pts = prepared.transform_coords(objects.points).reshape(n, 1, 2)
        return (*pad_points(pts, np.ones((n, 1), np.float32)), multimask)
    raise ValueError(f"unknown prompt type {kind!r}; choose from {PROMPT_TYPES}")


def predict_objects(backend: Backend, embedding: np.ndarray, prepared: ModelInput, coords: np.ndarray,
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


def object_pieces(seg, objects, kind: str, batch_size: int = 32) -> tuple[list, np.ndarray]:
    """One prompt per object (its box, or its most interior point) on the segmenter's current image: pieces at
    the original image size and predicted IoUs. Tiled images decode each prompt in its tile."""
    n = len(objects)
    if kind == "box":
        pieces, out = seg.decode_pieces(boxes=objects.boxes, batch_size=batch_size)
    elif kind == "point":
        pieces, out = seg.decode_pieces(points=objects.points.reshape(n, 1, 2), labels=np.ones((n, 1), np.float32),
                                        batch_size=batch_size)
    else:
        raise ValueError(f"unknown prompt type {kind!r}; choose from {PROMPT_TYPES}")
    plan = seg.plan
    return [rescale_piece(p, plan.scaled_hw, plan.original_hw) for p in pieces], out.scores


def _prompted(seg, sample, objects, kind: str) -> tuple[list[float], float]:
    pieces, scores = object_pieces(seg, objects, kind)
    boxes = ndimage.find_objects(sample.labels)
    ious = [piece_iou(p, sample.labels, int(i), boxes[int(i) - 1]) for p, i in zip(pieces, objects.ids)]
    painted = paint(pieces, sample.labels.shape, order=np.argsort(scores, kind="stable"))
    return ious, mean_segmentation_accuracy(painted, sample.labels)


def evaluate(backend: Backend, samples: Iterable, prompts: Sequence[str] = PROMPT_TYPES, *,
             min_area: int = 1, progress: Callable[[int], None] | None = None, auto: AutoOptions | None = None,
             tiling: Tiling | None = None, batch_size: int | None = None, per_image: list | None = None) -> dict:
    """Evaluate ``backend`` on ``samples`` (objects with ``.image`` and ``.labels``; any iterable, read one at a
    time). ``tiling``: how images are embedded (default: tiled when larger than the model input); ``per_image``:
    a list that receives one record per image. Returns a JSON-able dict {prompt type: figures}."""
    results = {p: PromptResult() for p in prompts}
    seg = Segmenter(backend, tiling=tiling, batch_size=batch_size)
    for sample in samples:
        name = getattr(sample, "name", "image")
        plan = seg.set_image(sample.image, name=name)
        labels = np.asarray(sample.labels)
        objects = objects_from_labels(labels, min_area=min_area)
        record = {"name": name, "objects": len(objects), "tiles": len(plan.grid)}
        for kind in prompts:
            if kind == "auto":
                pred_labels = seg.segment(auto)
                iou = iou_matrix(pred_labels, labels)
                ious = (iou.max(axis=0) if iou.shape[0] else np.zeros(iou.shape[1])).tolist()
                msa = mean_segmentation_accuracy(pred_labels, labels)
                record["auto_instances"] = int(iou.shape[0])
                results[kind].found = (results[kind].found or 0) + int(iou.shape[0])
                results[kind].method = seg.strategy(auto)[0].name
            elif len(objects) == 0:
                continue
            else:
                ious, msa = _prompted(seg, sample, objects, kind)
            results[kind].ious.extend(ious)
            results[kind].msa.append(msa)
            record[kind] = {"mean_iou": float(np.mean(ious)) if ious else float("nan"), "msa": msa}
        if per_image is not None:
            per_image.append(record)
        if progress is not None:
            progress(1)
    return {kind: r.summary() for kind, r in results.items()}


def evaluate_instances(backend: Backend, samples: Sequence, auto: AutoOptions | None = None, *, tiling=None,
                       batch_size: int | None = None, progress: Callable[[int], None] | None = None) -> dict:
    """Automatic segmentation without prompts (the strategy ``auto`` chooses), scored against each sample's labels
    (see :func:`peft_export.metrics.instance_scores`). ``seconds_after_embedding``: the decoder(s) and
    post-processing per image."""
    import time

    seg = Segmenter(backend, tiling=tiling, batch_size=batch_size)
    strategy, why = seg.strategy(auto)
    per_image = []
    for sample in samples:
        name = getattr(sample, "name", "image")
        t0 = time.perf_counter()
        seg.set_image(sample.image, name=name)
        t1 = time.perf_counter()
        pred = strategy.segment(seg)
        t2 = time.perf_counter()
        scores = {"name": name, **instance_scores(pred, sample.labels)}
        scores["seconds_embedding"], scores["seconds_after_embedding"] = round(t1 - t0, 3), round(t2 - t1, 3)
        per_image.append(scores)
        if progress is not None:
            progress(1)
    advice = strategy.advice()
    return {"method": strategy.name, "why": why, **({"advice": advice} if advice else {}),
            **merge_instance_scores(per_image), "per_image": per_image}
