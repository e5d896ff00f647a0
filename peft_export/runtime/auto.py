"""Automatic instance segmentation with any backend, in numpy (SAM's "segment everything", simplified).

1. A regular grid of single-point prompts over the image (``points_per_side`` per side), decoded in batches.
   Grid points that already fall inside an accepted mask are skipped (dense images need far fewer decodes).
2. Candidates: SAM's three multimask outputs per point (single-mask output for models whose multimask outputs
   are untrained, e.g. LiteMedSAM).
3. Filters: predicted IoU >= ``pred_iou_thresh``; stability score (area of logits > +offset over area of logits
   > -offset, measured on the low-res logits inside the image) >= ``stability_thresh``; area >= ``min_area``.
4. Greedy non-maximum suppression on mask IoU (``nms_iou``), highest score first.
5. Painted into one label image, higher scores winning overlaps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from peft_export.imaging import upscale_masks


@dataclass(frozen=True)
class AutoConfig:
    points_per_side: int = 32
    batch_size: int = 64
    pred_iou_thresh: float = 0.8
    stability_thresh: float = 0.9
    stability_offset: float = 1.0
    nms_iou: float = 0.5
    min_area: int = 10
    skip_covered: bool = True


def point_grid(h: int, w: int, n: int) -> np.ndarray:
    """(n*n, 2) x/y pixel coordinates of cell centres."""
    xs = (np.arange(n) + 0.5) * w / n
    ys = (np.arange(n) + 0.5) * h / n
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float32)


def stability_scores(low: np.ndarray, valid_hw: tuple[int, int], offset: float) -> np.ndarray:
    lr = low[:, : valid_hw[0], : valid_hw[1]]
    hi = (lr > offset).sum(axis=(1, 2))
    lo = (lr > -offset).sum(axis=(1, 2))
    return np.where(lo > 0, hi / np.maximum(lo, 1), 0.0)


def mask_nms(masks: np.ndarray, scores: np.ndarray, iou_thresh: float) -> np.ndarray:
    """Indices kept by greedy NMS on mask IoU (highest score first)."""
    order = np.argsort(-scores, kind="stable")
    flat = masks.reshape(len(masks), -1)
    areas = flat.sum(1)
    kept: list[int] = []
    for i in order:
        if kept:
            inter = (flat[kept] & flat[i]).sum(1)
            union = areas[kept] + areas[i] - inter
            if (inter / np.maximum(union, 1) > iou_thresh).any():
                continue
        kept.append(int(i))
    return np.array(kept, dtype=np.int64)


def segment_everything(segmenter, config: AutoConfig | None = None, progress=None) -> np.ndarray:
    """Instance label image (int32, 0 = background) of the segmenter's current image."""
    cfg = config or AutoConfig()
    prep = segmenter._require_image()
    h, w = prep.original_hw
    valid_low = (max(1, prep.resized_hw[0] * segmenter.backend.mask_input_size[0] // prep.img_size),
                 max(1, prep.resized_hw[1] * segmenter.backend.mask_input_size[1] // prep.img_size))
    grid = point_grid(h, w, cfg.points_per_side)
    covered = np.zeros((h, w), bool)
    cand_masks, cand_scores = [], []
    multimask = segmenter.multimask
    for s in range(0, len(grid), cfg.batch_size):
        pts = grid[s: s + cfg.batch_size]
        if cfg.skip_covered:
            xi = np.clip(pts[:, 0].astype(int), 0, w - 1)
            yi = np.clip(pts[:, 1].astype(int), 0, h - 1)
            pts = pts[~covered[yi, xi]]
        if len(pts):
            coords, labels = segmenter.encode_prompts(points=pts[:, None, :], labels=np.ones((len(pts), 1)))
            low, iou = segmenter.backend.decode(segmenter.embedding, coords, labels)
            outs = range(1, 4) if multimask else range(1)
            low = np.concatenate([low[:, k] for k in outs])
            iou = np.concatenate([iou[:, k] for k in outs])
            keep = iou >= cfg.pred_iou_thresh
            if keep.any():
                keep &= stability_scores(low, valid_low, cfg.stability_offset) >= cfg.stability_thresh
            if keep.any():
                masks = upscale_masks(low[keep], prep.img_size, prep.resized_hw, prep.original_hw) > 0
                big = masks.reshape(len(masks), -1).sum(1) >= cfg.min_area
                cand_masks.append(masks[big])
                cand_scores.append(iou[keep][big])
                for m in masks[big]:
                    covered |= m
        if progress is not None:
            progress(1)
    if not cand_masks or sum(len(m) for m in cand_masks) == 0:
        return np.zeros((h, w), np.int32)
    masks = np.concatenate(cand_masks)
    scores = np.concatenate(cand_scores)
    kept = mask_nms(masks, scores, cfg.nms_iou)
    labels = np.zeros((h, w), np.int32)
    for rank, i in enumerate(kept[::-1]):  # lowest score first, so higher scores are painted last
        labels[masks[i]] = len(kept) - rank
    from peft_export.data.samples import relabel_sequential

    return relabel_sequential(labels).astype(np.int32)


def n_batches(config: AutoConfig | None = None) -> int:
    cfg = config or AutoConfig()
    n = cfg.points_per_side ** 2
    return (n + cfg.batch_size - 1) // cfg.batch_size
