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

import numpy as np
from pydantic import ConfigDict

from peft_export.data.samples import relabel_sequential
from peft_export.imaging import upscale_masks
from peft_export.options import Options, option
from peft_export.prompts import pad_points
from peft_export.runtime.pieces import crop_piece, merge_pieces


class GridOptions(Options):
    """The point-grid strategy's settings (SAM's automatic mask generator, simplified)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    family = "grid"
    panel = "Automatic segmentation: grid"

    points_per_side: int = option(32, "Grid points per side (of each tile when tiled).", ge=1)
    points_per_batch: int = option(64, "Grid points per prompt-decoder call.", ge=1)
    pred_iou_thresh: float = option(0.8, "Minimum predicted IoU of a mask.", ge=0, le=1)
    stability_thresh: float = option(0.9, "Minimum stability score of a mask.", ge=0, le=1)
    stability_offset: float = option(1.0, "Logit offset of the stability score.", gt=0)
    nms_iou: float = option(0.5, "Masks overlapping a better one by more than this IoU are dropped.", ge=0, le=1)
    min_area: int = option(10, "Smallest object in pixels.", ge=0)
    skip_covered: bool = option(True, "Skip grid points inside a mask already found (dense images need far fewer "
                                "decoder calls).")


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


def grid_points(plan, cfg: GridOptions) -> tuple[np.ndarray, np.ndarray]:
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


def _tile_candidates(seg, t: int, emb: np.ndarray, pts: np.ndarray, covered: np.ndarray, cfg: GridOptions,
                     pieces: list, progress) -> None:
    """Decode tile ``t``'s grid points (scaled-image pixels) and add the masks that pass the filters."""
    plan = seg.plan
    tile, geo = plan.tiles[t], plan.geometry[t]
    y0, _, x0, _ = tile.window
    wh, ww = tile.hw
    mask_hw = seg.info.mask_input_size
    valid_low = (max(1, geo.resized_hw[0] * mask_hw[0] // geo.img_size),
                 max(1, geo.resized_hw[1] * mask_hw[1] // geo.img_size))
    edges = plan.grid.interior_edges(tile) if plan.tiled else (False,) * 4
    outs = range(1, 4) if seg.info.multimask else range(1)
    for s in range(0, max(len(pts), 1), cfg.points_per_batch):
        batch = pts[s: s + cfg.points_per_batch]
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


class GridStrategy:
    """Strategy ``grid`` (:mod:`peft_export.runtime.strategies`)."""

    name = "grid"
    description = "a grid of point prompts"

    def __init__(self, options):
        self.cfg: GridOptions = options.grid

    def steps(self, image) -> int:
        """``segment`` calls ``progress(1)`` per batch of grid points (untiled) or per tile (tiled)."""
        if image.plan.tiled:
            return len(image.plan.grid)
        return -(-self.cfg.points_per_side ** 2 // self.cfg.points_per_batch)

    def segment(self, image, progress=None) -> np.ndarray:
        """Instance label image (int32, 0 = background) of the image, at its original size."""
        cfg, plan = self.cfg, image.plan
        pts, owner = grid_points(plan, cfg)
        covered = np.zeros(plan.scaled_hw, bool)
        pieces: list = []
        n = len(plan.grid)
        for s in range(0, n, image.batch_size):
            group = list(range(s, min(n, s + image.batch_size)))
            embs = image.tile_embeddings(group)  # one encoder batch per group of tiles
            for j, t in enumerate(group):
                _tile_candidates(image, t, embs[j:j + 1], pts[owner == t], covered, cfg, pieces, progress)
                if progress is not None and plan.tiled:
                    progress(1)
            image.release(group)  # never needed again by this pass (kept if they were computed eagerly: no-op)
        if not pieces:
            return np.zeros(plan.original_hw, np.int32)
        labels = merge_pieces(pieces, plan.scaled_hw, cfg.nms_iou, plan.grid if plan.tiled else None)
        return relabel_sequential(plan.to_original(labels)).astype(np.int32)
