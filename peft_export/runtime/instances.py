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

:func:`segment_instances` runs the whole chain for a :class:`~peft_export.runtime.segmenter.Segmenter` with an
image set; :func:`evaluate_instances` scores it against instance labels (mSA, precision/recall/F1 at IoU 0.5,
object counts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from peft_export.errors import UsageError

CHANNELS = ("foreground", "center_distance", "boundary_distance")
ROLE = "instance_decoder"
NO_DECODER = ("has no instance decoder ({role}.onnx); make one with `peft-export finetune --instance-decoder ...` "
              "(or `--instance-decoder-only --model RUN/best.pt` on a finetuned run), then `peft-export "
              "merge-and-export RUN/best.pt -o DIR`; or use --method grid (point-grid prompts)")


@dataclass(frozen=True)
class InstanceConfig:
    """Post-processing parameters; the defaults are micro-sam's (``InstanceSegmentationWithDecoder.generate``)."""

    foreground_threshold: float = 0.5  # foreground probability above which a pixel belongs to an object
    center_distance_threshold: float = 0.5  # seeds: normalised centre distance below this ...
    boundary_distance_threshold: float = 0.5  # ... and inverted boundary distance below this
    foreground_smoothing: float = 1.0  # Gaussian sigma (image pixels) on the foreground map; 0: none
    distance_smoothing: float = 1.6  # Gaussian sigma (image pixels) on both distance maps; 0: none
    min_size: int = 0  # objects with fewer pixels are removed (0: keep all)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> InstanceConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})

    def validate(self) -> InstanceConfig:
        for name in ("foreground_threshold", "center_distance_threshold", "boundary_distance_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise UsageError(f"{name.replace('_', ' ')} must be in [0, 1], got {getattr(self, name)}")
        if self.foreground_smoothing < 0 or self.distance_smoothing < 0 or self.min_size < 0:
            raise UsageError("smoothing sigmas and the minimum object size must be >= 0")
        return self


def maps_to_instances(maps: np.ndarray, config: InstanceConfig | None = None) -> np.ndarray:
    """(3, H, W) maps (foreground, centre distance, boundary distance) -> int32 instance labels (0 = background);
    the code is :mod:`peft_export.runtime.watershed_op` (self-contained: also the bioimage.io packages' step)."""
    from peft_export.runtime.watershed_op import seeded_watershed

    return seeded_watershed(maps, **(config or InstanceConfig()).to_dict())


# ---- running the decoder ---------------------------------------------------------------------------------

def has_instance_decoder(backend) -> bool:
    """Whether ``backend`` can run an instance decoder (its own ``instance_maps``, or the export's ONNX file)."""
    if callable(getattr(backend, "instance_maps", None)):
        return getattr(backend, "instance_decoder_available", True)
    manifest = getattr(backend, "manifest", None)
    return manifest is not None and ROLE in manifest.files


class InstanceMaps:
    """Runs the instance decoder for a backend: the backend's own ``instance_maps(embedding)`` (PyTorch,
    TensorRT), else ONNX Runtime on the export folder's ``instance_decoder.onnx`` (with the backend's providers)."""

    def __init__(self, backend):
        self.backend = backend
        self._session = None
        if not has_instance_decoder(backend):
            where = getattr(backend, "out_dir", None)
            raise UsageError(f"{'this model' if where is None else where} " + NO_DECODER.format(role=ROLE))

    def __call__(self, embedding: np.ndarray) -> np.ndarray:
        """(B, C, h, w) embedding -> (B, 3, S, S) maps."""
        own = getattr(self.backend, "instance_maps", None)
        if callable(own):
            return np.asarray(own(embedding), np.float32)
        if self._session is None:
            from peft_export.runtime.onnx_backend import ort_session

            b = self.backend
            self._session = ort_session(b.manifest.path_of(b.out_dir, ROLE), getattr(b, "providers", None))
        return self._session.run(["instance_maps"], {"image_embeddings": np.ascontiguousarray(embedding,
                                                                                              np.float32)})[0]


def require_instance_decoder(backend, method: str = "instance") -> None:
    """One line (``UsageError``) when ``backend`` has no instance decoder for ``--method apg|instance``."""
    if not has_instance_decoder(backend):
        where = getattr(backend, "out_dir", None)
        what = "this model" if where is None else where
        raise UsageError(f"--method {method}: {what} " + NO_DECODER.format(role=ROLE))


def resolve_method(backend, method: str = "auto") -> str:
    """The automatic segmentation strategy, chosen once (:func:`peft_export.runtime.strategy.choose`)."""
    from peft_export.runtime.strategy import choose

    return choose(backend, method).method


def auto_note(method: str, backend, note, grid_steps):
    """``predict --auto``: say which method runs; the progress-bar step count for it (tiles for the decoder)."""
    if note is not None and method == "instance":
        note("automatic segmentation: the export's instance decoder + seeded watershed")
    elif note is not None:
        note("automatic segmentation: a grid of point prompts" + ("" if has_instance_decoder(backend) else
             " (this export has no instance decoder; finetune --instance-decoder makes one)"))
    if method == "instance":
        return lambda seg, _config=None: len(seg._require_plan().grid)
    return grid_steps


def image_maps(segmenter, runner: InstanceMaps | None = None, progress=None) -> np.ndarray:
    """The (3, H, W) maps of the segmenter's current image at its own size: per tile cropped and resized like SAM's
    masks, blended linearly across the tiles' overlap (halo), then resized to the original image."""
    runner = runner or InstanceMaps(segmenter.backend)
    return segmenter.map_tiles(runner, channels=len(CHANNELS), blend="linear", progress=progress)


def segment_instances(segmenter, config: InstanceConfig | None = None, *, runner: InstanceMaps | None = None,
                      return_maps: bool = False, progress=None):
    """Instance labels (int32) of the segmenter's current image (tiled: the stitched maps, then one watershed);
    with ``return_maps`` also the (3, H, W) maps."""
    maps = image_maps(segmenter, runner, progress)
    labels = maps_to_instances(maps, config)
    return (labels, maps) if return_maps else labels


# ---- evaluation ------------------------------------------------------------------------------------------

def evaluate_instances(backend, samples: Sequence, *, method: str = "instance", config: InstanceConfig | None = None,
                       grid_config=None, tiling=None, batch_size: int | None = None,
                       progress: Callable[[int], None] | None = None, configs=None) -> dict:
    """Automatic segmentation without prompts, scored against each sample's labels (see
    :func:`peft_export.metrics.instance_scores`); ``method``: ``instance`` (this module), ``apg``
    (:mod:`peft_export.runtime.apg`), ``grid`` (point grid) or ``auto`` (chosen once:
    :func:`peft_export.runtime.strategy.choose`); ``configs``: a :class:`peft_export.runtime.strategy.Configs`
    (else ``config`` / ``grid_config``). ``seconds_after_embedding``: the decoder(s) and post-processing per image."""
    import time

    from peft_export.metrics import instance_scores, merge_instance_scores
    from peft_export.runtime import strategy
    from peft_export.runtime.segmenter import Segmenter

    choice = strategy.choose(backend, method)
    configs = configs or strategy.Configs(grid=grid_config, instance=config)
    seg = Segmenter(backend=backend, tiling=tiling, batch_size=batch_size)
    runner = InstanceMaps(backend) if choice.method in ("instance", "apg") else None
    stats = strategy.Stats()
    per_image = []
    for sample in samples:
        name = getattr(sample, "name", "image")
        t0 = time.perf_counter()
        seg.set_image(sample.image, name=name)
        t1 = time.perf_counter()
        pred = strategy.run(seg, choice.method, configs, runner=runner, stats=stats)
        t2 = time.perf_counter()
        scores = {"name": name, **instance_scores(pred, sample.labels)}
        scores["seconds_embedding"], scores["seconds_after_embedding"] = round(t1 - t0, 3), round(t2 - t1, 3)
        per_image.append(scores)
        if progress is not None:
            progress(1)
    advice = strategy.quality_advice(choice, stats, backend)
    return {"method": choice.method, "reason": choice.reason, **({"advice": advice} if advice else {}),
            **merge_instance_scores(per_image), "per_image": per_image}
