"""Masks as pieces: a boolean crop at its bounding box in image pixels (torch-free).

A full-size mask per object costs H x W bytes each (16 MB on a 4096² image); a piece costs its bounding box.
Pieces are painted into label images, expanded to full masks when a caller asks for them, and merged across
tiles: :func:`merge_pieces` removes duplicates (mask NMS) and joins the parts of an object that a tile border
cut (pieces of different tiles that agree where their windows overlap).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from peft_export.runtime.tiling import TileGrid


@dataclass
class Piece:
    y0: int
    x0: int
    mask: np.ndarray  # (h, w) bool, its bounding box
    score: float
    tile: int = 0
    cut: bool = False  # touches a window edge inside the image: may be part of a larger object
    area: int = field(init=False)

    def __post_init__(self):
        self.area = int(self.mask.sum())

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        return self.y0, self.x0, self.y0 + self.mask.shape[0], self.x0 + self.mask.shape[1]


def crop_piece(mask: np.ndarray, oy: int, ox: int, score: float, tile: int = 0,
               edges: tuple[bool, bool, bool, bool] = (False, False, False, False)) -> Piece:
    """A piece from a window-sized mask at offset (oy, ox); ``edges``: which window edges (top, bottom, left,
    right) are inside the image (a mask touching one of them is ``cut``)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return Piece(oy, ox, np.zeros((0, 0), bool), float(score), tile)
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    h, w = mask.shape
    cut = (edges[0] and r0 == 0) or (edges[1] and r1 == h) or (edges[2] and c0 == 0) or (edges[3] and c1 == w)
    return Piece(oy + int(r0), ox + int(c0), np.ascontiguousarray(mask[r0:r1, c0:c1]), float(score), tile, bool(cut))


def paint(pieces: list[Piece], shape: tuple[int, int], order=None, ids=None) -> np.ndarray:
    """Paint pieces into an int32 label image in ``order`` (later wins overlaps); piece k gets ``ids[k]``
    (default k + 1)."""
    labels = np.zeros(shape, np.int32)
    for k in (range(len(pieces)) if order is None else order):
        p = pieces[k]
        if p.mask.size:
            y0, x0, y1, x1 = p.bbox
            labels[y0:y1, x0:x1][p.mask] = k + 1 if ids is None else ids[k]
    return labels


def full_masks(pieces: list[Piece], shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros((len(pieces), *shape), bool)
    for k, p in enumerate(pieces):
        if p.mask.size:
            y0, x0, y1, x1 = p.bbox
            out[k, y0:y1, x0:x1] = p.mask
    return out


def rescale_piece(p: Piece, scaled_hw: tuple[int, int], original_hw: tuple[int, int]) -> Piece:
    """A piece at the scaled image size -> the original size, by the nearest-neighbour sampling of
    :func:`peft_export.imaging.resize_labels`."""
    if tuple(scaled_hw) == tuple(original_hw) or not p.mask.size:
        return p
    (hs, ws), (h, w) = scaled_hw, original_hw
    src_y = np.minimum(((np.arange(h) + 0.5) * hs / h).astype(np.int64), hs - 1)
    src_x = np.minimum(((np.arange(w) + 0.5) * ws / w).astype(np.int64), ws - 1)
    y0, x0, y1, x1 = p.bbox
    rows = np.flatnonzero((src_y >= y0) & (src_y < y1))
    cols = np.flatnonzero((src_x >= x0) & (src_x < x1))
    if not len(rows) or not len(cols):
        return Piece(0, 0, np.zeros((0, 0), bool), p.score, p.tile, p.cut)
    crop = p.mask[src_y[rows][:, None] - y0, src_x[cols][None, :] - x0]
    return crop_piece(crop, int(rows[0]), int(cols[0]), p.score, p.tile) if crop.any() else \
        Piece(0, 0, np.zeros((0, 0), bool), p.score, p.tile, p.cut)


def piece_iou(p: Piece, labels: np.ndarray, obj_id: int, box: tuple[slice, slice] | None) -> float:
    """IoU of a piece with object ``obj_id`` of a label image, whose bounding box is ``box`` (``find_objects``);
    computed on the union of the two boxes."""
    if box is None:
        return 0.0 if p.area else 1.0
    if not p.mask.size:
        return 0.0
    tb, pb = (box[0].start, box[1].start, box[0].stop, box[1].stop), p.bbox
    region = (min(tb[0], pb[0]), min(tb[1], pb[1]), max(tb[2], pb[2]), max(tb[3], pb[3]))
    t = labels[region[0]:region[2], region[1]:region[3]] == obj_id
    a = _region(p, region)
    union = (a | t).sum()
    return float((a & t).sum() / union) if union else 1.0


def _overlap(a: tuple, b: tuple) -> tuple | None:
    y0, x0 = max(a[0], b[0]), max(a[1], b[1])
    y1, x1 = min(a[2], b[2]), min(a[3], b[3])
    return (y0, x0, y1, x1) if y0 < y1 and x0 < x1 else None


def _region(p: Piece, box: tuple) -> np.ndarray:
    """``p``'s mask over the rectangle ``box`` (zeros where p has no pixels)."""
    y0, x0, y1, x1 = box
    out = np.zeros((y1 - y0, x1 - x0), bool)
    ov = _overlap(p.bbox, box)
    if ov is not None and p.mask.size:
        out[ov[0] - y0: ov[2] - y0, ov[1] - x0: ov[3] - x0] = p.mask[ov[0] - p.y0: ov[2] - p.y0,
                                                                     ov[1] - p.x0: ov[3] - p.x0]
    return out


def _inter(a: Piece, b: Piece) -> int:
    """Pixels two pieces share."""
    ov = _overlap(a.bbox, b.bbox)
    if ov is None:
        return 0
    y0, x0, y1, x1 = ov
    return int(np.count_nonzero(a.mask[y0 - a.y0: y1 - a.y0, x0 - a.x0: x1 - a.x0]
                                & b.mask[y0 - b.y0: y1 - b.y0, x0 - b.x0: x1 - b.x0]))


def _union(a: Piece, b: Piece) -> Piece:
    y0, x0 = min(a.y0, b.y0), min(a.x0, b.x0)
    y1, x1 = max(a.bbox[2], b.bbox[2]), max(a.bbox[3], b.bbox[3])
    box = (y0, x0, y1, x1)
    return Piece(y0, x0, _region(a, box) | _region(b, box), max(a.score, b.score), a.tile, a.cut or b.cut)


@dataclass
class _Object:
    piece: Piece  # the union of its pieces
    tiles: set
    cut: bool


def _window_overlap(grid: TileGrid | None, a: int, b: int) -> tuple | None:
    if grid is None:
        return None
    wa, wb = grid.tiles[a].window, grid.tiles[b].window
    return _overlap((wa[0], wa[2], wa[1], wa[3]), (wb[0], wb[2], wb[1], wb[3]))


def _zone_iou(p: Piece, o: _Object, grid: TileGrid | None) -> float:
    """Agreement of ``p`` and ``o`` where ``p``'s window overlaps the windows ``o`` came from."""
    best = 0.0
    for t in o.tiles:
        zone = _window_overlap(grid, p.tile, t)
        if zone is None:
            continue
        a, b = _region(p, zone), _region(o.piece, zone)
        union = (a | b).sum()
        if union:
            best = max(best, float((a & b).sum() / union))
    return best


def merge_pieces(pieces: list[Piece], shape: tuple[int, int], nms_iou: float, grid: TileGrid | None = None,
                 zone_iou: float = 0.5) -> np.ndarray:
    """Candidates (e.g. of automatic segmentation, from every tile) -> one instance label image.

    Whole pieces first, then by score: a piece whose mask IoU with an accepted object exceeds ``nms_iou`` is a
    duplicate (dropped, or joined when both are cut parts from different tiles); a cut piece from another tile
    that agrees with an object inside the overlap of their windows (IoU there > ``zone_iou``) is joined to it.
    Objects are painted lowest rank first (earlier ones win overlaps); ids 1..N in rank order."""
    order = sorted(range(len(pieces)), key=lambda i: (pieces[i].cut, -pieces[i].score))
    objects: list[_Object] = []
    boxes = np.zeros((len(pieces), 4), np.int64)
    for i in order:
        p = pieces[i]
        if not p.mask.size:
            continue
        n = len(objects)
        b = p.bbox
        near = np.flatnonzero((boxes[:n, 0] < b[2]) & (boxes[:n, 2] > b[0]) & (boxes[:n, 1] < b[3])
                              & (boxes[:n, 3] > b[1]))
        target, drop = None, False
        for j in near:
            o = objects[j]
            inter = _inter(p, o.piece)
            iou = inter / max(p.area + o.piece.area - inter, 1)
            other_tile = p.tile not in o.tiles
            if iou > nms_iou:
                if p.cut and o.cut and other_tile:
                    target = j
                else:
                    drop = True
                break
            if other_tile and (p.cut or o.cut) and inter and _zone_iou(p, o, grid) > zone_iou:
                target = j
                break
        if drop:
            continue
        if target is None:
            objects.append(_Object(p, {p.tile}, p.cut))
            boxes[n] = b
        else:
            o = objects[target]
            o.piece = _union(o.piece, p)
            o.tiles.add(p.tile)
            o.cut = o.cut or p.cut
            boxes[target] = o.piece.bbox
    merged = [o.piece for o in objects]
    return paint(merged, shape, order=range(len(merged) - 1, -1, -1))
