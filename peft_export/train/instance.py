"""Training the instance decoder: per-object distance targets (numpy) and micro-sam's loss (torch).

Targets (torch-em's ``PerObjectDistanceTransform(distances=True, boundary_distances=True, foreground=True)``, which
micro-sam trains with), from an instance label image at model-input resolution, each in [0, 1]:

- foreground: 1 inside objects;
- centre distance: per object, the Euclidean distance to its centre (the rounded centroid; the pixel farthest from
  the boundary when the centroid lies outside the object), divided by the object's largest such distance;
- boundary distance: per object, (largest distance to the boundary) - (distance to the boundary), normalised the
  same way — 0 at the most interior pixel, 1 at the boundary. Boundaries are skimage's inner boundaries of the
  whole label image; distances are measured inside each object's bounding box.
- Outside objects both distances are 1 (torch-em's fill value); the loss masks them there anyway.

Loss (torch-em's ``DiceBasedDistanceLoss(mask_distances_in_bg=True)``): Dice (squared form) of the foreground plus
Dice of each distance map multiplied by the true foreground, summed. ``tests/test_instance.py`` compares the
targets with torch-em's own transform.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

EPS = 1e-7
FILL = 1.0


def instance_targets(labels: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
    """(3, H, W) float32 targets for the objects ``ids`` of ``labels`` (default: all; other pixels are background)."""
    from skimage.segmentation import find_boundaries

    labels = np.asarray(labels)
    if ids is not None:
        labels = np.where(np.isin(labels, ids), labels, 0)
    out = np.full((3, *labels.shape), FILL, np.float32)
    out[0] = labels > 0
    boundaries = find_boundaries(labels, mode="inner")
    for n, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        mask = labels[sl] == n
        if not mask.any():
            continue
        _object_distances(mask, boundaries[sl], sl, out)
    return out


def _object_distances(mask: np.ndarray, boundary: np.ndarray, sl: tuple[slice, slice], out: np.ndarray) -> None:
    ys, xs = np.nonzero(mask)
    # the rounded centroid in image coordinates (as torch-em rounds it), then relative to the box
    y0, x0 = sl[0].start, sl[1].start
    center = (int(np.round(ys.mean() + y0)) - y0, int(np.round(xs.mean() + x0)) - x0)
    bdist = ndimage.distance_transform_edt(~boundary)
    bdist[~mask] = 0
    far = np.unravel_index(np.argmax(bdist), bdist.shape)
    if not mask[center]:
        center = far
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    cdist = np.sqrt((yy - center[0]) ** 2 + (xx - center[1]) ** 2)
    inv = bdist[far] - bdist
    for ch, d in ((1, cdist), (2, inv)):
        d = np.where(mask, d, 0.0)
        d = d / (np.abs(d).max() + EPS)
        region = out[ch][sl]
        region[mask] = d[mask]


def _dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    num = (pred * target).sum()
    den = (pred * pred).sum() + (target * target).sum()
    return 1.0 - 2.0 * num / den.clamp(min=EPS)


def instance_loss(maps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``maps``/``target`` (3, H, W) (or (B, 3, H, W)): Dice of the foreground + Dice of both distance maps inside the
    true foreground."""
    fg = target[..., 0:1, :, :]
    loss = _dice(maps[..., 0:1, :, :], fg)
    for ch in (1, 2):
        loss = loss + _dice(maps[..., ch: ch + 1, :, :] * fg, target[..., ch: ch + 1, :, :] * fg)
    return loss


def setup_instance_decoder(sam, spec, decoder=None, *, only: bool = False):
    """The decoder a run trains: ``decoder`` (from the base checkpoint's ``decoder_state``, or the run's own on
    resume) or a fresh one (torch's default initialisation, seeded by the run); with ``only`` SAM is frozen whole."""
    # lazy: pulls PIL, segment_anything, torchvision
    from peft_export.models.instance_decoder import build_instance_decoder

    if only:
        for p in sam.parameters():
            p.requires_grad = False
    if decoder is None:
        decoder = build_instance_decoder(sam, spec.instance_features)
    for p in decoder.parameters():
        p.requires_grad = True
    return decoder
