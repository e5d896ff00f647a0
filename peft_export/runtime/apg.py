"""Automatic prompt generation (micro-sam's APG; Archit & Pape, MIDL 2026), torch-free.

The instance decoder's maps (foreground, centre distance, boundary distance: :mod:`peft_export.runtime.instances`)
give one point prompt per object; SAM's prompt decoder turns each into a mask; duplicates are removed. As micro-sam's
``AutomaticPromptGenerator.generate`` / ``TiledAutomaticPromptGenerator.generate`` with their defaults:

1. Maps at the image's size (tiled: each tile's maps stitched across the halo, as AIS does,
   ``EmbeddedImage.map_tiles``); no smoothing (APG thresholds the raw maps).
2. Seeds: 4-connected components of ``foreground >= foreground_threshold`` and ``centre distance <
   center_distance_threshold`` and ``boundary distance < boundary_distance_threshold``
   (micro-sam's ``_derive_point_prompts``).
3. One positive point per seed: its most interior pixel (the maximum of the distance transform of the
   non-boundary pixels, ``find_boundaries(mode="outer")``, image border excluded; micro-sam's ``_get_centers``).
4. The points are decoded in batches of ``prompts_per_batch`` prompts by the backend's prompt decoder (single-mask
   output unless ``multimask``); on a tiled image each point in the tile whose core holds it, with that tile's
   embedding (micro-sam's ``batched_tiled_inference``). Masks: logits > 0 at the image's resolution; score =
   predicted IoU x stability score (offset 1.0).
5. Masks of at most ``min_size`` pixels are dropped; greedy NMS on mask IoU (``nms_threshold``, or intersection
   over the smaller mask with ``intersection_over_min``), highest score first (micro-sam's ``apply_nms``).
6. Painted largest first, each mask only onto unclaimed pixels; 4-connected components of the result become the
   objects; objects under ``min_size`` pixels are removed; ids 1..N (micro-sam's ``mask_data_to_segmentation``).

``merge="score"`` replaces 5-6 with the merge of micro-sam's APG for SAM2 (``micro_sam.v2``'s ``merge_by_score``):
best score first, each mask painted only onto unclaimed pixels, dropped when more than ``max_overlap`` of it is
already claimed or fewer than ``min_size`` of its pixels stay free; no components step. A mask that spans two touching
nuclei then loses to the two better-scored single-nucleus masks instead of being painted first for its size.

Works with any backend whose ``info.instance_decoder`` is set (its ``decode`` and ``instance_maps``), through the
:class:`peft_export.runtime.strategies.EmbeddedImage` protocol; :class:`APGStrategy` is strategy ``apg``, its
settings :class:`APGOptions` (``AutoOptions.apg``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import ConfigDict

from peft_export.imaging import upscale_masks
from peft_export.options import Options, option
from peft_export.prompts import box_prompts, pad_points
from peft_export.runtime.backend import select_masks
from peft_export.runtime.instances import image_maps

STABILITY_OFFSET = 1.0  # micro-sam's batched_inference: calculate_stability_score(masks, threshold, 1.0)
MASK_THRESHOLD = 0.0  # SAM's mask threshold on the logits (micro-sam's mask_threshold=None)


class APGOptions(Options):
    """APG's settings; the defaults are micro-sam's (``AutomaticPromptGenerator.generate``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    family = "apg"
    panel = "Automatic segmentation: APG"

    foreground_threshold: float = option(0.5, "Seeds: foreground probability at least this.", ge=0, le=1,
                                         cli="--apg-foreground-threshold")
    center_distance_threshold: float = option(0.5, "Seeds: centre distance below this ...", ge=0, le=1,
                                              cli="--apg-center-distance-threshold")
    boundary_distance_threshold: float = option(0.5, "... and boundary distance below this.", ge=0, le=1,
                                                cli="--apg-boundary-distance-threshold")
    min_size: int = option(25, "Masks and objects with at most this many pixels are removed.", ge=0,
                           cli="--apg-min-size")
    nms_threshold: float = option(0.9, "NMS: a mask overlapping a better-scored one by more than this IoU is "
                                  "dropped.", ge=0, le=1)
    intersection_over_min: bool = option(False, "NMS overlap as intersection over the smaller mask.",
                                         cli="--apg-intersection-over-min/--no-apg-intersection-over-min")
    merge: Literal["nms", "score"] = option(
        "nms", "How the masks become objects: nms (micro-sam's APG for SAM: NMS, then painted largest first) or "
        "score (the merge of micro-sam's APG for SAM2: best score first onto unclaimed pixels, a mask dropped when "
        "more than --apg-max-overlap of it is claimed; better on tiled images in our measurements).",
        cli="--apg-merge")
    max_overlap: float = option(0.15, "With --apg-merge score: drop a mask when more than this fraction of it is "
                                "already claimed (micro-sam's SAM2 default).", ge=0, le=1, cli="--apg-max-overlap")
    multimask: bool = option(False, "Decode with SAM's three masks and keep the best.",
                             cli="--apg-multimask/--no-apg-multimask")
    refine_with_boxes: bool = option(False, "Decode each mask again from its bounding box, extended by 1% "
                                     "(micro-sam's refine_with_box_prompts).",
                                     cli="--apg-box-refine/--no-apg-box-refine")
    prompts_per_batch: int = option(32, "Point prompts per prompt-decoder call.", ge=1, cli="--apg-prompts-per-batch")
    mask_threshold: float = option(MASK_THRESHOLD, "Logits above this are the mask (micro-sam's mask_threshold; "
                                   "lower gives larger masks).", allow_inf_nan=False)

    def unused(self) -> list[str]:
        """The flags set away from their defaults that this ``merge`` ignores (the strategy's line names them)."""
        names = ("max_overlap",) if self.merge == "nms" else ("nms_threshold", "intersection_over_min")
        return [self.flag_of(n).split("/")[0] for n in names if getattr(self, n) != type(self).model_fields[n].default]


# ---- seeds and point prompts (micro-sam's _derive_point_prompts / _get_centers) ---------------------------

def seed_mask(maps: np.ndarray, cfg: APGOptions) -> np.ndarray:
    fg, center, boundary = (np.asarray(m) for m in maps[:3])
    return (fg >= cfg.foreground_threshold) & (center < cfg.center_distance_threshold) & \
        (boundary < cfg.boundary_distance_threshold)


def seed_labels(maps: np.ndarray, cfg: APGOptions) -> np.ndarray:
    """Seeds: 4-connected components of :func:`seed_mask` (ids 1..N in raster order)."""
    from skimage.measure import label

    return label(seed_mask(maps, cfg), connectivity=1).astype(np.int32)


def object_centers(labels: np.ndarray) -> np.ndarray:
    """(N, 2) row/col of each object's most interior pixel (ids in increasing order): the maximum of the Euclidean
    distance to the nearest pixel marked by ``find_boundaries(mode="outer")`` or lying on the image border."""
    from scipy import ndimage
    from skimage.segmentation import find_boundaries

    inside = ~find_boundaries(labels, mode="outer")
    inside[0, :] = inside[-1, :] = inside[:, 0] = inside[:, -1] = False
    dist = ndimage.distance_transform_edt(inside)
    centers = []
    for n, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        d = np.where(labels[sl] == n, dist[sl], 0)
        r, c = np.unravel_index(int(np.argmax(d)), d.shape)
        centers.append((r + sl[0].start, c + sl[1].start))
    return np.asarray(centers, np.int64).reshape(-1, 2)


def point_prompts(maps: np.ndarray, cfg: APGOptions | None = None) -> np.ndarray:
    """(N, 2) x/y pixel coordinates of one point per seed of the (3, H, W) maps."""
    rc = object_centers(seed_labels(maps, cfg or APGOptions()))
    return rc[:, ::-1].astype(np.float32)


# ---- masks from the prompt decoder -------------------------------------------------------------------------

@dataclass
class Candidate:
    y0: int
    x0: int
    mask: np.ndarray  # (h, w) bool, its bounding box, in pixels of the scaled image
    iou: float  # the decoder's predicted IoU
    stability: float
    tile: int = 0

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def score(self) -> float:
        return self.iou * self.stability

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        return self.y0, self.x0, self.y0 + self.mask.shape[0], self.x0 + self.mask.shape[1]


def stability_scores(logits: np.ndarray, offset: float = STABILITY_OFFSET, threshold: float = MASK_THRESHOLD
                     ) -> np.ndarray:
    """SAM's stability score per mask: area(logits > thr + offset) / area(logits > thr - offset)."""
    hi = (logits > threshold + offset).sum(axis=(-2, -1))
    lo = (logits > threshold - offset).sum(axis=(-2, -1))
    return np.where(lo > 0, hi / np.maximum(lo, 1), 0.0)


def _crop(mask: np.ndarray, oy: int, ox: int, iou: float, stab: float, tile: int) -> Candidate | None:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return None
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return Candidate(oy + int(r0), ox + int(c0), np.ascontiguousarray(mask[r0:r1, c0:c1]), float(iou), float(stab),
                     tile)


def decode_points(image, tile: int, embedding: np.ndarray, points: np.ndarray, cfg: APGOptions,
                  boxes: np.ndarray | None = None) -> list[Candidate]:
    """Masks of point prompts (N, 2) (x/y pixels of the scaled image), or of ``boxes`` (N, 4) x0, y0, x1, y1,
    decoded in ``tile`` with its embedding (1, C, h, w), ``cfg.prompts_per_batch`` prompts per decoder call."""
    plan = image.plan
    window, geo = plan.tiles[tile], plan.geometry[tile]
    y0, _, x0, _ = window.window
    wh, ww = window.hw
    out: list[Candidate] = []
    chunk = max(1, 2**25 // max(1, wh * ww))  # bounded memory for the window-size logits
    prompts = points if boxes is None else boxes
    for s in range(0, len(prompts), cfg.prompts_per_batch):
        if boxes is None:
            pts = points[s: s + cfg.prompts_per_batch]
            local = geo.transform_coords(pts - np.array([x0, y0], np.float32))
            coords, labels = pad_points(local[:, None, :], np.ones((len(pts), 1), np.float32))
        else:
            pts = boxes[s: s + cfg.prompts_per_batch]
            local = geo.transform_boxes(pts - np.array([x0, y0, x0, y0], np.float32))
            coords, labels = box_prompts(local)
        low, iou = image.backend.decode(embedding, coords, labels)
        low, iou = select_masks(np.asarray(low), np.asarray(iou), cfg.multimask)
        for c in range(0, len(pts), chunk):
            logits = upscale_masks(low[c: c + chunk], geo.img_size, geo.resized_hw, (wh, ww))
            stab = stability_scores(logits, threshold=cfg.mask_threshold)
            for j, m in enumerate(logits > cfg.mask_threshold):
                cand = _crop(m, y0, x0, iou[c + j], stab[j], tile)
                if cand is not None:
                    out.append(cand)
    return out


def refine_boxes(cands: list[Candidate], window, extension: float = 0.01) -> np.ndarray:
    """Box prompts (N, 4) x0, y0, x1, y1 from the masks' bounding boxes (SAM's: the last row/column inclusive),
    each side moved out by ``extension`` of the box's size and clipped to the tile window (micro-sam's
    ``_derive_box_prompts``)."""
    y0w, y1w, x0w, x1w = window
    out = []
    for c in cands:
        y0, x0, y1, x1 = c.bbox
        h, w = y1 - 1 - y0, x1 - 1 - x0
        out.append([max(x0 - w * extension, x0w), max(y0 - h * extension, y0w),
                    min(x0 + (1 + extension) * w, x1w), min(y0 + (1 + extension) * h, y1w)])
    return np.asarray(out, np.float32).reshape(-1, 4)


# ---- NMS and painting (micro-sam's apply_nms / mask_data_to_segmentation) ----------------------------------

def _intersection(a: Candidate, b: Candidate) -> int:
    ay0, ax0, ay1, ax1 = a.bbox
    by0, bx0, by1, bx1 = b.bbox
    y0, x0, y1, x1 = max(ay0, by0), max(ax0, bx0), min(ay1, by1), min(ax1, bx1)
    if y0 >= y1 or x0 >= x1:
        return 0
    return int(np.count_nonzero(a.mask[y0 - ay0: y1 - ay0, x0 - ax0: x1 - ax0]
                                & b.mask[y0 - by0: y1 - by0, x0 - bx0: x1 - bx0]))


def nms(cands: list[Candidate], threshold: float, intersection_over_min: bool = False) -> list[int]:
    """Indices kept by greedy mask NMS, best score first: a mask whose overlap (IoU, or intersection over the
    smaller area) with a kept mask exceeds ``threshold`` is dropped (micro-sam's ``_batched_mask_nms``)."""
    scores = np.array([c.score for c in cands], np.float64)
    order = np.argsort(-scores, kind="stable")
    boxes = np.array([c.bbox for c in cands], np.int64).reshape(-1, 4)
    areas = np.array([c.area for c in cands], np.int64)
    kept: list[int] = []
    for i in order:
        k = np.asarray(kept, np.int64)
        if len(k):
            b = boxes[i]
            near = k[(boxes[k, 0] < b[2]) & (boxes[k, 2] > b[0]) & (boxes[k, 1] < b[3]) & (boxes[k, 3] > b[1])]
            suppressed = False
            for j in near:
                inter = _intersection(cands[i], cands[j])
                den = min(areas[i], areas[j]) if intersection_over_min else areas[i] + areas[j] - inter
                if inter / max(den, 1) > threshold:
                    suppressed = True
                    break
            if suppressed:
                continue
        kept.append(int(i))
    return kept


def paint_largest_first(cands: list[Candidate], shape: tuple[int, int]) -> np.ndarray:
    """Candidates painted in order of decreasing area (ties: in the given order), each only onto pixels no earlier
    one claimed; ids 1..N in painting order."""
    order = sorted(range(len(cands)), key=lambda i: cands[i].area, reverse=True)
    labels = np.zeros(shape, np.int32)
    for n, i in enumerate(order, start=1):
        c = cands[i]
        y0, x0, y1, x1 = c.bbox
        region = labels[y0:y1, x0:x1]
        region[c.mask & (region == 0)] = n
    return labels


def merge_by_score(cands: list[Candidate], shape: tuple[int, int], max_overlap: float, min_size: int,
                   area_scale: float = 1.0) -> np.ndarray:
    """Candidates painted best score first (ties: in the given order), each only onto pixels no earlier one claimed;
    one is dropped when more than ``max_overlap`` of its pixels are already claimed or when fewer than ``min_size``
    stay free, which also drops every mask under ``min_size`` pixels (micro-sam's SAM2 ``merge_by_score``; sizes in
    original pixels: ``area_scale`` per scaled pixel). Ids 1..N in painting order."""
    labels = np.zeros(shape, np.int32)
    n = 0
    for i in np.argsort([-c.score for c in cands], kind="stable"):
        c = cands[i]
        y0, x0, y1, x1 = c.bbox
        region = labels[y0:y1, x0:x1]
        if np.count_nonzero(region[c.mask]) / c.area > max_overlap:
            continue
        fresh = c.mask & (region == 0)
        if np.count_nonzero(fresh) * area_scale < min_size:
            continue
        n += 1
        region[fresh] = n
    return labels


def finish_labels(labels: np.ndarray, min_size: int, components: bool = True) -> np.ndarray:
    """4-connected components of a label image as objects (``components=False``: the labels as they are), those
    under ``min_size`` pixels removed, ids 1..N."""
    from skimage.measure import label
    from skimage.segmentation import relabel_sequential

    cc = label(labels, background=0, connectivity=1) if components else labels.copy()
    if min_size > 0:
        ids, counts = np.unique(cc, return_counts=True)
        cc[np.isin(cc, ids[(counts < min_size) & (ids != 0)])] = 0
    return relabel_sequential(cc)[0].astype(np.int32)


def candidates_to_labels(cands: list[Candidate], shape: tuple[int, int], cfg: APGOptions,
                         area_scale: float = 1.0, to_original=None) -> np.ndarray:
    """Size filter (area > min_size), NMS, painting, components, size filter (``cfg.merge="score"``: the score
    merge, size filter): the label image. ``area_scale``: original pixels per scaled pixel (a ``--scale``d image);
    ``to_original``: scaled labels -> original size."""
    if cfg.merge == "score":
        labels = merge_by_score(cands, shape, cfg.max_overlap, cfg.min_size, area_scale)
    else:
        cands = [c for c in cands if c.area * area_scale > cfg.min_size]
        cands = [cands[i] for i in nms(cands, cfg.nms_threshold, cfg.intersection_over_min)]
        labels = paint_largest_first(cands, shape)
    if to_original is not None:
        labels = to_original(labels)
    return finish_labels(labels, cfg.min_size, components=cfg.merge == "nms")


# ---- the strategy ------------------------------------------------------------------------------------------

def route_points(plan, points_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Original-image points -> (scaled-image points, the tile whose core holds each)."""
    pts = plan.to_scaled(points_xy).reshape(-1, 2)
    if not plan.tiled:
        return pts, np.zeros(len(pts), int)
    return pts, plan.grid.core_index(pts[:, 1], pts[:, 0])


class APGStrategy:
    """Strategy ``apg`` (:mod:`peft_export.runtime.strategies`): the instance decoder's seeds as point prompts."""

    name = "apg"
    description = "the instance decoder's seeds as point prompts for the prompt decoder (micro-sam's APG)"

    def __init__(self, options):
        self.cfg: APGOptions = options.apg
        self.ious: list[float] = []  # the decoded prompts' predicted IoUs (all images so far): see advice()

    def steps(self, image) -> int:
        """``segment`` calls ``progress`` for the tiles mapped, then once per tile decoded."""
        return 2 * len(image.plan.grid)

    def segment(self, image, progress=None, *, maps: np.ndarray | None = None) -> np.ndarray:
        """Instance labels (int32, 0 = background) of the image at its original size (``maps``: the (3, H, W)
        instance maps when already computed)."""
        labels, _ = self.segment_with_maps(image, progress, maps=maps)
        return labels

    def segment_with_maps(self, image, progress=None, *, maps: np.ndarray | None = None):
        """(labels, the (3, H, W) maps)."""
        cfg, plan = self.cfg, image.plan
        if maps is None:
            maps = image_maps(image, progress)
        elif progress is not None:
            progress(len(plan.grid))
        pts, owner = route_points(plan, point_prompts(maps, cfg))
        cands: list[Candidate] = []
        for t in range(len(plan.grid)):
            mine = pts[owner == t]
            if len(mine):
                emb = image.tile_embeddings([t])
                got = decode_points(image, t, emb, mine, cfg)
                if cfg.refine_with_boxes and got:
                    got = decode_points(image, t, emb, mine, cfg, boxes=refine_boxes(got, plan.tiles[t].window))
                cands += got
            image.release([t])
            if progress is not None:
                progress(1)
        self.ious += [c.iou for c in cands]
        (hs, ws), (h, w) = plan.scaled_hw, plan.original_hw
        labels = candidates_to_labels(cands, plan.scaled_hw, cfg, (h * w) / (hs * ws),
                                      plan.to_original if plan.scaled_hw != plan.original_hw else None)
        return labels, maps

    def advice(self) -> str | None:
        """One line when the prompt decoder answers poorly (median predicted IoU below ``LOW_IOU``)."""
        if not self.ious:
            return None
        med = float(np.median(self.ious))
        if med >= LOW_IOU:
            return None
        return (f"the prompt decoder's predicted IoUs are low (median {med:.2f} over {len(self.ious)} prompts): APG "
                "will be poor; finetune with point prompts and the instance decoder (finetune --instance-decoder), "
                "or use --method instance")


LOW_IOU = 0.6  # median predicted IoU of the decoded prompts below this: the prompt heads answer poorly
