"""Training data: patches of labelled images, augmentation, model-input tensors and per-object targets (numpy).

Every training view goes through the same numpy preprocessing as the runtime
(:func:`peft_export.imaging.resize_for_model` + :func:`~peft_export.imaging.normalize_and_pad`), so the model is
trained on exactly the tensors it will see in ``evaluate``/``predict`` and in the exported runtime.

Patches
- ``tiles`` (default): a fixed grid of ``patch_size`` tiles covering every image (the last row/column of tiles
  is shifted inward so no tile leaves the image); an image not larger than the patch is one tile. Tiles
  without an object are dropped. Fixed tiles repeat every epoch, which the frozen-trunk cache exploits.
- ``random``: a fresh random crop of ``patch_size`` per visit (one that holds an object; up to 20 tries).

Augmentation: ``flip`` (horizontal/vertical), ``rot90`` — a finite set of transforms, so inputs still repeat —
and ``intensity`` (a random gamma in [0.7, 1.4]), which makes inputs non-repeating.

Randomness is counter-based: every draw comes from ``numpy.random.default_rng([seed, stream, epoch, ...])``, so
the data order and every prompt of a run depend only on the seed and the position in the run. That makes
``--resume`` exact without saving generator states, and gives every DDP rank the same images and prompts a
single process would use.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from peft_export.data.objects import objects_from_labels
from peft_export.errors import DataError
from peft_export.imaging import PreprocessSpec, normalize_and_pad, resize_for_model, resize_labels

STREAM_ORDER = 0
STREAM_IMAGE = 1
GAMMA_RANGE = (0.7, 1.4)


def rng_for(seed: int, stream: int, *counters: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(stream), *(int(c) for c in counters)])


@dataclass(frozen=True)
class Patch:
    sample: int
    y: int
    x: int
    h: int
    w: int
    name: str


@dataclass
class View:
    """One training input: the model tensor and the objects in model-input pixels."""

    tensor: np.ndarray  # (3, S, S) float32
    labels: np.ndarray  # (rh, rw) int32 instance ids at model-input resolution (no padding)
    ids: np.ndarray  # (N,) object ids present (area >= min_object_area)
    boxes: np.ndarray  # (N, 4) x0, y0, x1, y1 in model-input pixels (x1/y1 exclusive), as evaluate does
    resized_hw: tuple[int, int]
    name: str


def tile_starts(size: int, patch: int) -> list[int]:
    if size <= patch:
        return [0]
    n = -(-size // patch)
    return sorted({round(float(v)) for v in np.linspace(0, size - patch, n)})


def data_fingerprint(samples) -> str:
    h = hashlib.blake2b(digest_size=12)
    for s in samples:
        for arr in (np.ascontiguousarray(s.image), np.ascontiguousarray(s.labels)):
            h.update(str(arr.shape).encode())
            h.update(str(arr.dtype).encode())
            h.update(arr.tobytes())
    return h.hexdigest()


def _dihedral(arr: np.ndarray, k: int, flip_h: bool, flip_v: bool) -> np.ndarray:
    if flip_h:
        arr = arr[:, ::-1]
    if flip_v:
        arr = arr[::-1]
    if k:
        arr = np.rot90(arr, k, axes=(0, 1))
    return np.ascontiguousarray(arr)


class TrainData:
    """Patches of ``samples`` for a model with preprocessing ``spec``."""

    def __init__(self, samples, spec: PreprocessSpec, *, patch_size: int | None, sampling: str = "tiles",
                 augment: list[str] | tuple[str, ...] = (), min_object_area: int = 10):
        if not samples:
            raise DataError("no training images")
        self.samples = list(samples)
        self.spec = spec
        self.patch_size = min(spec.img_size, 512) if patch_size is None else int(patch_size)
        self.sampling = sampling
        self.augment = tuple(augment)
        self.min_object_area = int(min_object_area)
        self.patches = self._tiles()
        if not self.patches:
            raise DataError(f"no training patch holds an object of at least {self.min_object_area} pixels "
                            f"(patch size {self.patch_size or 'whole image'}); check the labels or lower "
                            "--min-object-area")

    # -- patches ---------------------------------------------------------------------------------------
    def _tiles(self) -> list[Patch]:
        out = []
        for i, s in enumerate(self.samples):
            h, w = s.labels.shape
            if self.sampling == "random":  # one entry per image; the crop is drawn at every visit
                if self._has_objects(s.labels):
                    out.append(Patch(i, 0, 0, h, w, s.name))
                continue
            p = self.patch_size
            if p == 0:
                ys, xs, ph, pw = [0], [0], h, w
            else:
                ys, xs, ph, pw = tile_starts(h, p), tile_starts(w, p), min(p, h), min(p, w)
            for y in ys:
                for x in xs:
                    if self._has_objects(s.labels[y: y + ph, x: x + pw]):
                        name = s.name if (ph, pw) == (h, w) else f"{s.name}@y{y}x{x}"
                        out.append(Patch(i, y, x, ph, pw, name))
        return out

    def _has_objects(self, labels: np.ndarray) -> bool:
        _, counts = np.unique(labels[labels > 0], return_counts=True)
        return bool((counts >= self.min_object_area).any())

    @property
    def repeating(self) -> bool:
        """Whether the same inputs come back every epoch (fixed tiles, a finite set of transforms)."""
        return self.sampling == "tiles" and "intensity" not in self.augment

    @property
    def non_repeating_reason(self) -> str:
        if self.sampling != "tiles":
            return "random patch sampling draws a new crop at every visit"
        if "intensity" in self.augment:
            return "intensity augmentation changes every input"
        return ""

    def __len__(self) -> int:
        return len(self.patches)

    def describe(self) -> dict[str, Any]:
        return {"images": len(self.samples), "patches": len(self.patches), "patch_size": self.patch_size,
                "patch_sampling": self.sampling, "augment": list(self.augment),
                "names": [s.name for s in self.samples][:50], "fingerprint": data_fingerprint(self.samples)}

    # -- epoch order -----------------------------------------------------------------------------------
    def epoch_order(self, seed: int, epoch: int, samples_per_epoch: int | None, batch_size: int) -> list[int]:
        """Patch indices visited in ``epoch``: permutations chained to ``samples_per_epoch``, padded to whole
        batches (the same sequence whatever the number of processes)."""
        n = samples_per_epoch or len(self.patches)
        total = -(-n // batch_size) * batch_size
        rng = rng_for(seed, STREAM_ORDER, epoch)
        order: list[int] = []
        while len(order) < total:
            order.extend(rng.permutation(len(self.patches)).tolist())
        return order[:total]

    # -- one view --------------------------------------------------------------------------------------
    def view(self, index: int, rng: np.random.Generator) -> View:
        """The training view of patch ``index`` (crop, augmentation and preprocessing drawn from ``rng``)."""
        patch = self.patches[index]
        sample = self.samples[patch.sample]
        if self.sampling == "random":
            image, labels = self._random_crop(sample, rng)
        else:
            sl = (slice(patch.y, patch.y + patch.h), slice(patch.x, patch.x + patch.w))
            image, labels = np.asarray(sample.image)[sl], np.asarray(sample.labels)[sl]
        k, fh, fv = 0, False, False
        if "flip" in self.augment:
            fh, fv = bool(rng.integers(2)), bool(rng.integers(2))
        if "rot90" in self.augment:
            k = int(rng.integers(4))
        if k or fh or fv:
            image, labels = _dihedral(image, k, fh, fv), _dihedral(labels, k, fh, fv)
        if "intensity" in self.augment:
            image = _gamma(image, float(rng.uniform(*GAMMA_RANGE)))
        return make_view(image, labels, self.spec, self.min_object_area, patch.name)

    def _random_crop(self, sample, rng):
        h, w = sample.labels.shape
        ph, pw = min(self.patch_size, h), min(self.patch_size, w)
        for _ in range(20):
            y, x = int(rng.integers(h - ph + 1)), int(rng.integers(w - pw + 1))
            lab = np.asarray(sample.labels)[y: y + ph, x: x + pw]
            if self._has_objects(lab):
                break
        return np.asarray(sample.image)[y: y + ph, x: x + pw], lab


def _gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    img = np.asarray(image, np.float32)
    lo, hi = float(img.min()), float(img.max())
    if hi <= lo:
        return img
    return (((img - lo) / (hi - lo)) ** gamma * (hi - lo) + lo).astype(np.float32)


def make_view(image: np.ndarray, labels: np.ndarray, spec: PreprocessSpec, min_object_area: int,
              name: str) -> View:
    """Preprocess one image/label pair exactly as the runtime does; objects and boxes in model pixels."""
    resized = resize_for_model(image, spec, name=name)
    tensor = normalize_and_pad(resized, spec)[0]
    rh, rw = resized.shape[:2]
    lab = resize_labels(np.asarray(labels), (rh, rw)).astype(np.int32)
    # boxes as evaluate() makes them: from the labels at their own resolution, scaled to the model input
    objs = objects_from_labels(np.asarray(labels), min_area=1)
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    keep = set(ids[counts >= min_object_area].tolist())
    sel = [n for n, i in enumerate(objs.ids.tolist()) if i in keep]
    sy, sx = rh / labels.shape[0], rw / labels.shape[1]
    boxes = objs.boxes[sel].astype(np.float32) * np.array([sx, sy, sx, sy], np.float32)
    return View(tensor.astype(np.float32), lab, objs.ids[sel].astype(np.int32), boxes, (rh, rw), name)
