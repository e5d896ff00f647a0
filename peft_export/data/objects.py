"""Per-object prompts derived from an instance label image (torch-free): boxes and interior points."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Objects:
    ids: np.ndarray  # (N,) label ids
    boxes: np.ndarray  # (N, 4) float32 x0, y0, x1, y1 (x1/y1 exclusive, micro-sam's convention)
    points: np.ndarray  # (N, 2) float32 x, y: the interior pixel farthest from the object's border

    def __len__(self) -> int:
        return len(self.ids)


def object_ids(labels: np.ndarray, min_area: int = 1) -> np.ndarray:
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    return ids[counts >= min_area]


def objects_from_labels(labels: np.ndarray, min_area: int = 1) -> Objects:
    labels = np.asarray(labels)
    ids = object_ids(labels, min_area)
    boxes = np.zeros((len(ids), 4), np.float32)
    points = np.zeros((len(ids), 2), np.float32)
    slices = ndimage.find_objects(labels.astype(np.int64, copy=False))
    for n, i in enumerate(ids):
        sl = slices[int(i) - 1]
        ys, xs = sl
        boxes[n] = (xs.start, ys.start, xs.stop, ys.stop)
        crop = np.pad(labels[sl] == i, 1)
        dist = ndimage.distance_transform_edt(crop)
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        points[n] = (xs.start + x - 1, ys.start + y - 1)
    return Objects(ids, boxes, points)
