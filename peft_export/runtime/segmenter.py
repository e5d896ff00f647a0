"""``Segmenter``: the microscope-side API. numpy + ONNX Runtime (or OpenVINO, TensorRT), never torch.

    seg = Segmenter("export_dir")              # an export folder or a bioimage.io package; every file's sha256
    seg.info                                   #   checked; seg.info: model, backend, precision, instance decoder
    seg.set_image(image)                       # any 2D grayscale/RGB, uint8/uint16/float; tiled when larger
    out = seg.predict(boxes=[[10, 20, 60, 80]])   #   than the model input (tile=, halo=, scale=, tiled=False)
    out.masks      # (B, H, W) bool at the image's size
    out.scores     # (B,) predicted IoU of the returned masks
    out.low_res    # (B, 4h, 4w) logits, reusable as ``mask_input`` (with ``tiles=out.tiles``) for a refinement step
    labels, scores = seg.predict_labels(boxes=...)   # the same painted into one label image (no full masks)
    labels = seg.segment()                     # automatic instance segmentation (the best method the model has)
    maps = seg.map_tiles(fn)                   # any per-tile output at model resolution, stitched (K, H, W)

The image embedding (one per tile) is computed once per ``set_image`` (or read from an embedding cache,
``Segmenter(..., cache="cache/")``) and reused for any number of prompts. Tiling: :mod:`peft_export.runtime.tiling`;
backends: :mod:`peft_export.runtime.backends`; automatic segmentation: :mod:`peft_export.runtime.strategies`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from peft_export.errors import DataError, UsageError
from peft_export.imaging import upscale_masks
from peft_export.prompts import box_prompts, pad_points
from peft_export.runtime.backend import Backend, BackendInfo, select_masks
from peft_export.runtime.backends import RuntimeOptions, open_model
from peft_export.runtime.cache import open_cache
from peft_export.runtime.embedding import (
    ImagePlan,
    TileEmbeddings,
    TileInputs,
    check_stored,
    image_digest,
    plan_image,
    recipe_key,
)
from peft_export.runtime.pieces import Piece, crop_piece, full_masks, paint
from peft_export.runtime.strategies import GRID_FALLBACK, AutoOptions, choose_strategy
from peft_export.runtime.tiling import Stitcher, Tiling, check_prompts_inside

log = logging.getLogger(__name__)

__all__ = ["Prediction", "Segmenter"]


@dataclass
class Prediction:
    masks: np.ndarray  # (B, H, W) bool
    scores: np.ndarray  # (B,) float32
    low_res: np.ndarray  # (B, 4h, 4w) float32 logits (in the frame of each prompt's tile)
    tiles: np.ndarray | None = None  # (B,) the tile each prompt was decoded in (0 for an untiled image)


def _as_batch(arr, last: int, what: str) -> np.ndarray:
    a = np.asarray(arr, np.float32)
    if a.ndim == 1:
        a = a[None]
    if a.shape[-1] != last:
        raise DataError(f"{what} must have {last} numbers each, got shape {a.shape}")
    return a


def _points_and_labels(points, labels) -> tuple[np.ndarray, np.ndarray]:
    pts = np.asarray(points, np.float32)
    if pts.ndim == 2:
        pts = pts[None]
    if pts.ndim != 3 or pts.shape[-1] != 2 or pts.shape[1] == 0:
        raise DataError(f"points must be (N, 2) or (B, N, 2) x/y pixel coordinates, got shape {pts.shape}")
    lab = np.ones(pts.shape[:2], np.float32) if labels is None else np.asarray(labels, np.float32)
    lab = lab.reshape(pts.shape[:2]) if lab.size == pts.shape[0] * pts.shape[1] else lab
    if lab.shape != pts.shape[:2]:
        raise DataError(f"labels shape {lab.shape} does not match points {pts.shape[:2]}")
    if not np.isin(lab, (0, 1)).all():
        raise DataError("point labels must be 1 (object) or 0 (background)")
    return pts, lab


class Segmenter:
    def __init__(self, model: str | os.PathLike | Backend, *, runtime: RuntimeOptions | None = None,
                 tiling: Tiling | None = None, cache=None, **runtime_options):
        """``model``: an export folder, a bioimage.io package, or an opened backend. ``runtime`` (or its fields as
        keywords: ``backend``, ``batch_size``, ``providers``, ``threads``): which backend runs it, and how."""
        opts = runtime or RuntimeOptions.parse(runtime_options)
        if runtime is not None and runtime_options:
            opts = runtime.replace(**runtime_options)
        self.backend: Backend = open_model(model, opts) if isinstance(model, (str, os.PathLike)) else model
        self.batch_size = int(opts.batch_size or self.info.default_batch_size)
        self.tiling = tiling or Tiling()
        self.cache = open_cache(cache, self.info)
        self.plan: ImagePlan | None = None
        self._emb: TileEmbeddings | None = None
        self.cache_hit = False
        # progress over one image's tiles: on_tiles(k, n) after each encoder call (k more of n tiles embedded)
        self.on_tiles: Callable[[int, int], None] | None = None
        self._warned: set[str] = set()  # kinds of plan warnings already given (once per segmenter, not per image)

    @property
    def info(self) -> BackendInfo:
        return self.backend.info

    # ---- the image -----------------------------------------------------------------------------------

    def _tiling(self, tile=None, halo=None, scale=None, tiled: bool | None = None) -> Tiling:
        """This segmenter's tiling with per-call overrides (``tiled``: True/False forces tiling on/off)."""
        t = self.tiling
        mode = t.mode if tiled is None else ("on" if tiled else "off")
        if tiled is None and tile is not None:
            mode = "on"
        out = Tiling(mode=mode, tile=t.tile if tile is None else tile, halo=t.halo if halo is None else halo,
                     scale=t.scale if scale is None else float(scale))
        out.sizes(self.info.img_size)
        return out

    def set_image(self, image: np.ndarray, *, name: str = "image", tile: int | None = None, halo: int | None = None,
                  scale: float | None = None, tiled: bool | None = None, lazy: bool = False) -> ImagePlan:
        """Embed ``image`` (every tile, in batches of ``batch_size``; ``lazy``: each tile when first needed; progress
        over its tiles: ``on_tiles``)."""
        tiling = self._tiling(tile, halo, scale, tiled)
        info = self.info
        inputs = TileInputs(image, info.preprocess, info.baked_preprocessing, name=name)
        plan = plan_image(inputs.rgb.shape[:2], info.img_size, tiling, name)
        inputs.bind(plan)
        stored, key = None, None
        if self.cache is not None:
            key = recipe_key(image_digest(image), plan.recipe, self.cache.encoder_sha256)
            stored = self.cache.get(key)
            if stored is not None:
                check_stored(stored, plan, info.embedding_shape)
        self.plan, self.cache_hit = plan, stored is not None
        for kind, msg in plan.warnings:
            if kind not in self._warned:
                self._warned.add(kind)
                log.warning(msg)
        self._emb = TileEmbeddings(self.backend, inputs, len(plan.grid), self.batch_size, stored, keep=not lazy,
                                   on_tiles=self.on_tiles)
        if stored is None and (not lazy or self.cache is not None):
            embs = self._emb.all()
            if self.cache is not None:
                self.cache.put(key, embs, {"name": name, "image_shape": list(np.shape(image)),
                                           "dtype": str(np.asarray(image).dtype), "recipe": plan.recipe,
                                           "windows": [list(t.window) for t in plan.tiles]})
        if stored is not None or not lazy:
            inputs.release()
        if plan.tiled:
            log.info("%s: %dx%d image, %d tiles of %d px (halo %d) at scale %g", name, *plan.original_hw,
                     len(plan.grid), plan.grid.tile, plan.grid.halo, plan.recipe["scale"])
        return plan

    def _require_plan(self) -> ImagePlan:
        if self.plan is None:
            raise UsageError("call set_image(image) before predict()")
        return self.plan

    def tile_embeddings(self, idx) -> np.ndarray:
        """The embeddings (k, C, h, w) of tiles ``idx`` of the current image (computed when first needed)."""
        self._require_plan()
        return self._emb.get(idx)

    def release(self, idx) -> None:
        """Forget tiles ``idx``' embeddings when the image was set ``lazy`` (they are recomputed if asked again)."""
        if self._emb is not None:
            self._emb.release(idx)

    # ---- prompts -------------------------------------------------------------------------------------

    def _check_inside(self, coords_xy: np.ndarray, what: str) -> None:
        plan = self._require_plan()
        c = np.asarray(coords_xy, np.float32).reshape(-1, 2)
        check_prompts_inside(np.stack([c[:, 1], c[:, 0], c[:, 1], c[:, 0]], 1), plan.original_hw, what, plan.tiled)

    def _validated(self, points, labels, boxes):
        pts = lab = bx = None
        if points is not None:
            pts, lab = _points_and_labels(points, labels)
            self._check_inside(pts, "point")
        if boxes is not None:
            bx = _as_batch(boxes, 4, "boxes")
            if (bx[:, 2] < bx[:, 0]).any() or (bx[:, 3] < bx[:, 1]).any():
                raise DataError("boxes must be x0, y0, x1, y1 with x1 >= x0 and y1 >= y0")
            self._check_inside(bx.reshape(-1, 2), "box corner")
            if pts is not None and bx.shape[0] != pts.shape[0]:
                raise DataError(f"{bx.shape[0]} boxes but {pts.shape[0]} point prompts: give one box per prompt")
        if pts is None and bx is None:
            raise UsageError("give points and/or boxes")
        return pts, lab, bx

    def _route(self, pts, bx) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Scaled-image prompts and the tile each goes to: (tiles (B,), points (B, N, 2) | None, boxes | None)."""
        plan = self.plan
        spts = None if pts is None else plan.to_scaled(pts)
        sbx = None if bx is None else plan.to_scaled(bx.reshape(-1, 2, 2)).reshape(-1, 4)
        b = len(spts) if spts is not None else len(sbx)
        if not plan.tiled:
            return np.zeros(b, int), spts, sbx
        xy = [a.reshape(b, -1, 2) for a in (spts, sbx) if a is not None]
        allxy = np.concatenate(xy, axis=1)
        ext = np.stack([allxy[..., 1].min(1), allxy[..., 0].min(1), allxy[..., 1].max(1), allxy[..., 0].max(1)], 1)
        tiles, fits = plan.grid.route(ext)
        if not fits.all():
            log.warning("%s: %d prompt(s) reach beyond one %d-px tile: clipped to their tile (objects larger than "
                        "the halo are cut; use a larger tile or a scale < 1)", plan.name, int((~fits).sum()),
                        plan.grid.tile)
        return tiles, spts, sbx

    def _model_prompts(self, t: int, idx, spts, lab, sbx) -> tuple[np.ndarray, np.ndarray]:
        """Model-input coordinates/labels (Meta's convention) of prompts ``idx`` in tile ``t``."""
        plan = self.plan
        tile, geo = plan.tiles[t], plan.geometry[t]
        y0, y1, x0, x1 = tile.window
        lo, hi = np.array([x0, y0], np.float32), np.array([x1, y1], np.float32)
        parts_c, parts_l = [], []
        if spts is not None:
            parts_c.append(geo.transform_coords(np.clip(spts[idx], lo, hi) - lo))
            parts_l.append(lab[idx])
        if sbx is not None:
            corners = np.clip(sbx[idx].reshape(-1, 2, 2), lo, hi) - lo
            c, lb = box_prompts(geo.transform_coords(corners).reshape(-1, 4))
            parts_c.append(c)
            parts_l.append(lb)
        coords, labs = np.concatenate(parts_c, axis=1), np.concatenate(parts_l, axis=1)
        if sbx is None:  # SAM's padding point for prompts without a box
            coords, labs = pad_points(coords, labs)
        return coords, labs

    def _decode(self, points, labels, boxes, mask_input, multimask, batch_size, tiles) -> tuple[list, Prediction]:
        plan = self._require_plan()
        pts, lab, bx = self._validated(points, labels, boxes)
        routed, spts, sbx = self._route(pts, bx)
        if tiles is not None:
            forced = np.asarray(tiles, int).reshape(-1)
            if len(forced) != len(routed) or forced.min(initial=0) < 0 or forced.max(initial=0) >= len(plan.grid):
                raise UsageError(f"tiles= must name one of the image's {len(plan.grid)} tiles per prompt")
            routed = forced
        elif mask_input is not None and plan.tiled:
            raise UsageError("on a tiled image mask_input belongs to a tile: pass tiles=previous.tiles with it")
        n_points = (0 if spts is None else spts.shape[1]) + (0 if sbx is not None else 1)
        if multimask is None:
            multimask = self.info.multimask and sbx is None and n_points == 2
        if mask_input is not None:
            mask_input = np.asarray(mask_input, np.float32)
            if mask_input.ndim == 3:
                mask_input = mask_input[:, None]
        b = len(routed)
        pieces: list[Piece | None] = [None] * b
        scores = np.zeros(b, np.float32)
        lows = np.zeros((b, *self.info.mask_input_size), np.float32)
        for t in np.unique(routed):
            emb = self._emb.get([t])
            members = np.flatnonzero(routed == t)
            for s in range(0, len(members), batch_size):
                idx = members[s: s + batch_size]
                self._decode_batch(int(t), idx, emb, spts, lab, sbx, mask_input, multimask, pieces, scores, lows)
        return pieces, Prediction(np.zeros(0, bool), scores, lows, routed)

    def _decode_batch(self, t, idx, emb, spts, lab, sbx, mask_input, multimask, pieces, scores, lows) -> None:
        plan = self.plan
        tile, geo = plan.tiles[t], plan.geometry[t]
        coords, labs = self._model_prompts(t, idx, spts, lab, sbx)
        mi = None if mask_input is None else mask_input[idx]
        low, iou = self.backend.decode(emb, coords, labs, mi)
        low, iou = select_masks(low, iou, multimask)
        edges = plan.grid.interior_edges(tile) if plan.tiled else (False,) * 4
        chunk = max(1, 2**26 // max(1, tile.hw[0] * tile.hw[1]))  # bounded memory for the full-size logits
        for c in range(0, len(idx), chunk):
            up = upscale_masks(low[c: c + chunk], geo.img_size, geo.resized_hw, geo.original_hw) > 0
            for j, m in enumerate(up):
                k = idx[c + j]
                pieces[k] = crop_piece(m, tile.window[0], tile.window[2], float(iou[c + j]), t, edges)
        scores[idx] = iou
        lows[idx] = low

    def decode_pieces(self, points=None, labels=None, boxes=None, mask_input=None, multimask: bool | None = None,
                      batch_size: int = 64, tiles=None) -> tuple[list[Piece], Prediction]:
        """Like :meth:`predict`, but masks as crops (:class:`peft_export.runtime.pieces.Piece`, in pixels of the
        scaled image) instead of full-size masks: memory follows the objects' size, not their number."""
        return self._decode(points, labels, boxes, mask_input, multimask, batch_size, tiles)

    def predict(self, points=None, labels=None, boxes=None, mask_input=None, multimask: bool | None = None,
                batch_size: int = 64, tiles=None) -> Prediction:
        """Masks for a batch of prompts: points (B, N, 2) + labels (B, N), and/or boxes (B, 4), in image pixels.

        ``multimask`` (default: when the model's multimask outputs are trained and a prompt is one point) picks the
        best of SAM's three masks; otherwise SAM's single-mask output is returned. On a tiled image each prompt is
        decoded in the tile whose core holds it (``tiles``: force the tiles, e.g. ``previous.tiles`` with
        ``mask_input``)."""
        pieces, out = self._decode(points, labels, boxes, mask_input, multimask, batch_size, tiles)
        out.masks = self.plan.to_original(full_masks(pieces, self.plan.scaled_hw))
        return out

    def predict_labels(self, points=None, labels=None, boxes=None, batch_size: int = 64
                       ) -> tuple[np.ndarray, np.ndarray]:
        """(label image (H, W) int32 with id k + 1 for prompt k, higher predicted IoU winning overlaps; scores)."""
        pieces, out = self._decode(points, labels, boxes, None, None, batch_size, None)
        order = np.argsort(out.scores, kind="stable")
        return self.plan.to_original(paint(pieces, self.plan.scaled_hw, order=order)), out.scores

    def predict_point_prompts(self, prompts, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Prompts of different point counts [(points (N, 2), labels (N,)[, box (4,) or None]), ...] -> (label image,
        scores): decoded in groups of equal point count, with or without a box (uniform batches, no extra padding).
        Label id k + 1 is prompt k, as :meth:`predict_labels`."""
        self._require_plan()
        pieces: list = [None] * len(prompts)
        scores = np.zeros(len(prompts), np.float32)
        box_of = [p[2] if len(p) > 2 else None for p in prompts]
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault((len(p[0]), box_of[i] is not None), []).append(i)
        for (n, boxed), idx in groups.items():
            pts = labs = boxes = None
            if n:
                pts = np.stack([np.asarray(prompts[i][0], np.float32) for i in idx])
                labs = np.stack([np.asarray(prompts[i][1], np.float32) for i in idx])
            if boxed:
                boxes = np.stack([np.asarray(box_of[i], np.float32) for i in idx])
            got, out = self._decode(pts, labs, boxes, None, None, batch_size, None)
            for j, i in enumerate(idx):
                pieces[i], scores[i] = got[j], out.scores[j]
        order = np.argsort(scores, kind="stable")
        return self.plan.to_original(paint(pieces, self.plan.scaled_hw, order=order)), scores

    # ---- whole-image outputs -------------------------------------------------------------------------

    def segment(self, options: AutoOptions | None = None, *, method: str | None = None,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Automatic instance segmentation of the current image: int32 labels at its original size. ``options``
        (or ``method``: auto, instance, grid) choose the strategy (:mod:`peft_export.runtime.strategies`);
        ``progress(1)`` per step (see :meth:`strategy`)."""
        strategy, _ = self.strategy(options, method=method)
        self._require_plan()
        return strategy.segment(self, progress)

    def strategy(self, options: AutoOptions | None = None, *, method: str | None = None):
        """(the automatic-segmentation strategy ``options`` choose for this model, one line saying which and why)."""
        opts = options or AutoOptions()
        if method is not None:
            opts = opts.replace(method=method)
        strategy, why = choose_strategy(self.info, opts)
        if opts.method == "auto" and strategy.name == "grid" and "grid" not in self._warned:
            self._warned.add("grid")  # results will be poor: said once per segmenter
            log.warning(GRID_FALLBACK)
        return strategy, why

    def map_tiles(self, fn, *, channels: int | None = None, blend: str = "core", progress=None) -> np.ndarray:
        """A per-tile output stitched over the image: ``fn(embeddings (k, C, h, w)) -> (k, K, S, S)`` float maps
        at the model input size S (e.g. an instance decoder's foreground/distance maps). Each tile's maps are
        un-padded and resized to its window like masks, stitched (``core``: each pixel from the tile whose core
        holds it; ``linear``: blended across the overlap) and resized to the original image: (K, H, W) float32.
        For an untiled image this is exactly un-padding + resizing the one (K, S, S) output."""
        plan = self._require_plan()
        stitcher = None
        n = len(plan.grid)
        for s in range(0, n, self.batch_size):
            idx = list(range(s, min(n, s + self.batch_size)))
            maps = np.asarray(fn(self._emb.get(idx)), np.float32)
            if maps.ndim != 4 or maps.shape[0] != len(idx):
                raise ValueError(f"map_tiles: fn returned shape {maps.shape}, expected ({len(idx)}, K, S, S)")
            if stitcher is None:
                stitcher = Stitcher(plan.grid, channels or maps.shape[1], blend)
            for j, t in enumerate(idx):
                geo = plan.geometry[t]
                stitcher.add(plan.tiles[t], upscale_masks(maps[j], geo.img_size, geo.resized_hw, geo.original_hw))
            if progress is not None:
                progress(len(idx))
        return plan.maps_to_original(stitcher.result())
