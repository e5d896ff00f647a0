"""The instance decoder's post-processing (micro-sam's AIS seeded watershed) as one self-contained file.

This file imports only numpy, scipy and scikit-image, so it is shipped as it is inside bioimage.io packages as the
spec's custom post-processing step (``postprocessing: [{id: custom, callable: instance_watershed, source:
instance_watershed.py, kwargs: {...}}]``, bioimageio.spec >= 0.5.10 / bioimageio.core >= 0.11), and the
peft-export runtime uses the same function (:func:`peft_export.runtime.instances.maps_to_instances`).

``seeded_watershed(maps, ...)``: (3, H, W) foreground / centre distance / boundary distance -> int32 labels:
Gaussian smoothing (foreground sigma ``foreground_smoothing``, both distances ``distance_smoothing``), foreground
``> foreground_threshold``, seeds = 8-connected components of foreground pixels with centre distance
``< center_distance_threshold`` and boundary distance ``< boundary_distance_threshold``, watershed on the boundary
distance inside the foreground, objects under ``min_size`` pixels removed, ids 1..N.

``instance_watershed(**kwargs)(maps)``: the bioimage.io op. bioimage.io's custom steps must keep the tensor's shape
(bioimageio.core checks it), so on a (B, 3, S, S) tensor it returns (B, 3, S, S): channel 0 the instance ids
(float32), channels 1 and 2 the centre and boundary distances unchanged.
"""

from __future__ import annotations

import numpy as np


def seeded_watershed(maps, foreground_threshold: float = 0.5, center_distance_threshold: float = 0.5,
                     boundary_distance_threshold: float = 0.5, foreground_smoothing: float = 1.0,
                     distance_smoothing: float = 1.6, min_size: int = 0) -> np.ndarray:
    from scipy import ndimage
    from skimage.measure import label
    from skimage.segmentation import relabel_sequential, watershed

    fg, center, boundary = (np.asarray(m, np.float32) for m in maps[:3])
    smooth = dict(mode="mirror", truncate=3.0)  # vigra's / bioimage-cpp's Gaussian, which micro-sam uses
    if foreground_smoothing > 0:
        fg = ndimage.gaussian_filter(fg, foreground_smoothing, **smooth)
    if distance_smoothing > 0:
        center = ndimage.gaussian_filter(center, distance_smoothing, **smooth)
        boundary = ndimage.gaussian_filter(boundary, distance_smoothing, **smooth)
    mask = fg > foreground_threshold
    seeds = mask & (center < center_distance_threshold) & (boundary < boundary_distance_threshold)
    markers = label(seeds, connectivity=2)
    seg = watershed(boundary, markers=markers, mask=mask)
    if min_size > 0:
        ids, counts = np.unique(seg, return_counts=True)
        seg[np.isin(seg, ids[(counts < min_size) & (ids != 0)])] = 0
    return relabel_sequential(seg)[0].astype(np.int32)


class instance_watershed:  # lower case: the callable name the rdf gives
    """bioimage.io custom post-processing: (B, 3, H, W) maps -> the same shape, channel 0 the instance ids."""

    def __init__(self, **settings):
        self.settings = settings

    def __call__(self, maps: np.ndarray) -> np.ndarray:
        m = np.asarray(maps, np.float32)
        out = m.copy()
        for b in range(m.shape[0]):
            out[b, 0] = seeded_watershed(m[b], **self.settings)
        return out
