"""Automatic instance segmentation with any backend, in numpy (SAM's "segment everything", simplified).

1. A regular grid of single-point prompts (``points_per_side`` per side of the image; of each tile for a tiled
   image, every grid point decoded once, in the tile whose core holds it), decoded in batches. Grid points that
   already fall inside an accepted mask (of any tile) are skipped (dense images need far fewer decodes).
2. Candidates: SAM's three multimask outputs per point (single-mask output for models whose multimask outputs
   are untrained, e.g. LiteMedSAM).
3. Filters: predicted IoU >= ``pred_iou_thresh``; stability score (area of logits > +offset over area of logits
   > -offset, measured on the low-res logits inside the image) >= ``stability_thresh``; area >= ``min_area``.
4. Greedy non-maximum suppression on mask IoU (``nms_iou``), highest score first; on a tiled image the parts
   of an object cut by a tile's border are joined (:func:`peft_export.runtime.pieces.merge_pieces`).
5. Painted into one label image, higher scores winning overlaps; ids 1..N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from peft_export.imaging import upscale_masks
from peft_export.prompts import pad_points
from peft_export.runtime.pieces import crop_piece, merge_pieces


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


def grid_points(plan, cfg: AutoConfig) -> tuple[np.ndarray, np.ndarray]:
    """Grid points in scaled-image pixels and the tile of each: the image's grid (untiled), or a grid of
    ``points_per_side`` per tile side over the whole image, each point in the tile whose core holds it."""
    h, w = plan.scaled_hw
    if not plan.tiled:
        return point_grid(h, w, cfg.points_per_side), np.zeros(cfg.points_per_side ** 2, int)
    step = plan.grid.tile / cfg.points_per_side
    xs = np.arange(step / 2, w, step)
    ys = np.arange(step / 2, h, step)
    gx, gy = np.meshgrid(xs, ys)
    pts = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float32)
    return pts, plan.grid.core_index(pts[:, 1], pts[:, 0])


def _tile_candidates(seg, t: int, emb: np.ndarray, pts: np.ndarray, covered: np.ndarray, cfg: AutoConfig,
                     pieces: list, progress, stats=None) -> None:
    """Decode tile ``t``'s grid points (scaled-image pixels) and add the masks that pass the filters."""
    plan = seg.plan
    tile, geo = plan.tiles[t], plan.geometry[t]
    y0, _, x0, _ = tile.window
    wh, ww = tile.hw
    mask_hw = seg.backend_mask_size()
    valid_low = (max(1, geo.resized_hw[0] * mask_hw[0] // geo.img_size),
                 max(1, geo.resized_hw[1] * mask_hw[1] // geo.img_size))
    edges = plan.grid.interior_edges(tile) if plan.tiled else (False,) * 4
    outs = range(1, 4) if seg.multimask else range(1)
    for s in range(0, max(len(pts), 1), cfg.batch_size):
        batch = pts[s: s + cfg.batch_size]
        if cfg.skip_covered and len(batch):
            xi = np.clip(batch[:, 0].astype(int), 0, covered.shape[1] - 1)
            yi = np.clip(batch[:, 1].astype(int), 0, covered.shape[0] - 1)
            batch = batch[~covered[yi, xi]]
        if len(batch):
            local = geo.transform_coords(batch - np.array([x0, y0], np.float32))
            coords, labels = pad_points(local[:, None, :], np.ones((len(batch), 1), np.float32))
            low, iou = seg.backend.decode(emb, coords, labels)
            low = np.concatenate([low[:, k] for k in outs])
            iou = np.concatenate([iou[:, k] for k in outs])
            if stats is not None:  # strategy.Stats: the predicted IoUs seen (runtime/strategy.py quality_advice)
                stats.ious += iou.tolist()
            keep = iou >= cfg.pred_iou_thresh
            if keep.any():
                keep &= stability_scores(low, valid_low, cfg.stability_offset) >= cfg.stability_thresh
            if keep.any():
                masks = upscale_masks(low[keep], geo.img_size, geo.resized_hw, (wh, ww)) > 0
                for m, score in zip(masks, iou[keep]):
                    if m.sum() >= cfg.min_area:
                        pieces.append(crop_piece(m, y0, x0, float(score), t, edges))
                        covered[y0:y0 + wh, x0:x0 + ww] |= m
        if progress is not None and not plan.tiled:
            progress(1)


def segment_everything(segmenter, config: AutoConfig | None = None, progress=None, stats=None) -> np.ndarray:
    """Instance label image (int32, 0 = background) of the segmenter's current image, at its original size.

    ``progress(1)`` is called per batch of grid points (untiled) or per tile (tiled): see :func:`auto_steps`."""
    cfg = config or AutoConfig()
    seg = segmenter
    plan = seg._require_plan()
    pts, owner = grid_points(plan, cfg)
    covered = np.zeros(plan.scaled_hw, bool)
    pieces: list = []
    n = len(plan.grid)
    for s in range(0, n, seg.batch_size):
        group = list(range(s, min(n, s + seg.batch_size)))
        embs = seg.tile_embeddings(group)  # one encoder batch per group of tiles
        for j, t in enumerate(group):
            _tile_candidates(seg, t, embs[j:j + 1], pts[owner == t], covered, cfg, pieces, progress, stats)
            if progress is not None and plan.tiled:
                progress(1)
        seg._emb.release(group)  # never needed again by this pass (kept if they were computed eagerly: no-op)
    if not pieces:
        return np.zeros(plan.original_hw, np.int32)
    labels = merge_pieces(pieces, plan.scaled_hw, cfg.nms_iou, plan.grid if plan.tiled else None)
    from peft_export.data.samples import relabel_sequential

    return relabel_sequential(plan.to_original(labels)).astype(np.int32)


def n_batches(config: AutoConfig | None = None) -> int:
    cfg = config or AutoConfig()
    n = cfg.points_per_side ** 2
    return (n + cfg.batch_size - 1) // cfg.batch_size


def auto_steps(segmenter, config: AutoConfig | None = None) -> int:
    """How many ``progress`` calls :func:`segment_everything` makes on the current image."""
    plan = segmenter._require_plan()
    return len(plan.grid) if plan.tiled else n_batches(config)
