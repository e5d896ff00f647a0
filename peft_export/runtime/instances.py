"""Automatic instance segmentation from the instance decoder's three maps (micro-sam's AIS), torch-free.

The export's ``instance_decoder.onnx`` maps the image embedding to (B, 3, S, S) sigmoid maps — foreground, centre
distance, boundary distance (:mod:`peft_export.models.instance_decoder`). Here, in numpy with scipy and
scikit-image (micro-sam's ``watershed_from_center_and_boundary_distances``):

1. The maps are cropped to the image area of the model input and resized to the image (bilinear), exactly like
   SAM's masks (:func:`peft_export.imaging.upscale_masks`).
2. Gaussian smoothing: the foreground map with ``foreground_smoothing``, both distance maps with
   ``distance_smoothing`` (sigmas in image pixels; 0 turns it off).
3. Foreground: ``foreground > foreground_threshold``.
4. Seeds: connected components (8-connected) of the foreground pixels whose centre distance is below
   ``center_distance_threshold`` *and* whose boundary distance is below ``boundary_distance_threshold``
   (near an object's centre and far from its boundary: touching objects get one seed each).
5. Seeded watershed on the boundary-distance map, inside the foreground.
6. Objects smaller than ``min_size`` pixels are removed; ids are relabelled 1..N.

:class:`InstanceStrategy` runs the whole chain on an embedded image (strategy ``instance`` of
:mod:`peft_export.runtime.strategies`; ``Segmenter.segment(method="instance")``).
"""

from __future__ import annotations

import numpy as np
from pydantic import ConfigDict

from peft_export.options import Options, option
from peft_export.runtime.watershed_op import seeded_watershed

CHANNELS = ("foreground", "center_distance", "boundary_distance")


class InstanceOptions(Options):
    """Post-processing of the instance decoder's maps; the defaults are micro-sam's
    (``InstanceSegmentationWithDecoder.generate``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    family = "instance"
    panel = "Automatic segmentation: instance decoder"

    foreground_threshold: float = option(0.5, "Foreground probability above which a pixel belongs to an object.",
                                         ge=0, le=1)
    center_distance_threshold: float = option(0.5, "Seeds: normalised centre distance below this ...", ge=0, le=1)
    boundary_distance_threshold: float = option(0.5, "... and inverted boundary distance below this.", ge=0, le=1)
    foreground_smoothing: float = option(1.0, "Gaussian sigma (image pixels) on the foreground map; 0: none.", ge=0)
    distance_smoothing: float = option(1.6, "Gaussian sigma (image pixels) on both distance maps; 0: none.", ge=0)
    min_size: int = option(0, "Objects with fewer pixels are removed (0: keep all).", ge=0)

    @classmethod
    def from_dict(cls, d: dict | None) -> InstanceOptions:
        """Recorded settings (a package's, a manifest's): the known keys."""
        return cls.parse({k: v for k, v in (d or {}).items() if k in cls.model_fields})


def maps_to_instances(maps: np.ndarray, config: InstanceOptions | None = None) -> np.ndarray:
    """(3, H, W) maps (foreground, centre distance, boundary distance) -> int32 instance labels (0 = background);
    the code is :mod:`peft_export.runtime.watershed_op` (self-contained: also the bioimage.io packages' custom
    post-processing step)."""
    return seeded_watershed(maps, **(config or InstanceOptions()).to_dict())


# ---- the strategy ------------------------------------------------------------------------------------------

class InstanceStrategy:
    """Strategy ``instance`` (:mod:`peft_export.runtime.strategies`): the maps of every tile, stitched, then one
    watershed."""

    name = "instance"
    description = "the instance decoder + seeded watershed (micro-sam's AIS)"

    def __init__(self, options):
        self.cfg: InstanceOptions = options.instance

    def steps(self, image) -> int:
        return len(image.plan.grid)

    def segment(self, image, progress=None) -> np.ndarray:
        return maps_to_instances(image_maps(image, progress), self.cfg)

    def advice(self) -> str | None:
        return None


def image_maps(image, progress=None) -> np.ndarray:
    """The (3, H, W) maps of an embedded image at its own size: per tile cropped and resized like SAM's masks,
    blended linearly across the tiles' overlap (halo), then resized to the original image."""
    return image.map_tiles(image.backend.instance_maps, channels=len(CHANNELS), blend="linear", progress=progress)
