"""Datasets of 2D images with instance labels (torch-free).

Two sources, one type (:class:`Sample`):
- ``sample:dsb2018`` — the real DSB2018 nuclei image split deterministically into 256x256 tiles at native
  resolution: the top-left, top-right and bottom-left quadrants are ``train``, the bottom-right quadrant is
  ``val``. Label ids are relabelled 1..N per tile; fragments of nuclei cut by a tile border that are smaller
  than :data:`MIN_FRAGMENT_AREA` pixels are set to background.
- a folder with ``images/`` and ``labels/`` holding pairs with the same file stem (tif/png/jpg), 2D
  grayscale or RGB, uint8/uint16/float images, integer instance labels. Optional ``train/`` and ``val/``
  sub-folders (each with ``images/`` + ``labels/``) give the splits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from peft_export.data.io import IMAGE_SUFFIXES, read_image
from peft_export.data.samples import dsb2018, relabel_sequential
from peft_export.errors import DataError, PeftExportError, UsageError
from peft_export.imaging import as_rgb

log = logging.getLogger("peft_export")

DSB_TILE = 256
DSB_SPLITS = {"train": ((0, 0), (0, 256), (256, 0)), "val": ((256, 256),)}
MIN_FRAGMENT_AREA = 20
SAMPLE_PREFIX = "sample:"
SAMPLE_DATASETS = ("dsb2018",)


@dataclass(frozen=True)
class Sample:
    image: np.ndarray
    labels: np.ndarray  # int32 instance ids, 0 = background
    name: str

    @property
    def num_objects(self) -> int:
        return len(np.unique(self.labels[self.labels > 0]))


def remove_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    ids, counts = np.unique(labels, return_counts=True)
    small = ids[(counts < min_area) & (ids != 0)]
    out = labels.copy()
    out[np.isin(out, small)] = 0
    return relabel_sequential(out)


def dsb2018_tiles(split: str = "val") -> list[Sample]:
    """The DSB2018 train/val tiles (see module docstring). ``split``: train, val or all."""
    if split == "all":
        return dsb2018_tiles("train") + dsb2018_tiles("val")
    if split not in DSB_SPLITS:
        raise UsageError(f"unknown split {split!r} for sample:dsb2018; choose train, val or all")
    image, labels = dsb2018()
    out = []
    for y, x in DSB_SPLITS[split]:
        img = np.array(image[y: y + DSB_TILE, x: x + DSB_TILE])
        lab = remove_small(np.array(labels[y: y + DSB_TILE, x: x + DSB_TILE]), MIN_FRAGMENT_AREA)
        out.append(Sample(img, lab.astype(np.int32), f"dsb2018_{split}_y{y}_x{x}"))
    return out


def sample_image(img_size: int) -> tuple[np.ndarray, str]:
    """The image the merge check, the export parity gate and the engine comparison run on: the DSB2018 validation
    tile when the sample data is installed, else a fixed synthetic nuclei image of ``img_size`` (uint8)."""
    try:
        tile = dsb2018_tiles("val")[0]
        return tile.image, tile.name
    except (PeftExportError, ImportError, OSError):
        rng = np.random.default_rng(0)
        size = int(img_size)
        yy, xx = np.mgrid[:size, :size]
        img = rng.normal(20, 5, (size, size))
        for _ in range(12):
            cy, cx, r = rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size, rng.uniform(0.04, 0.1) * size
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += rng.uniform(100, 200)
        return np.clip(img, 0, 255).astype(np.uint8), "synthetic nuclei image (sample data not installed)"


def check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    """Validate an instance label image and return it as int32 ids relabelled 1..N."""
    lab = np.asarray(labels)
    if lab.ndim == 3 and lab.shape[-1] == 1:
        lab = lab[..., 0]
    if lab.ndim != 2:
        raise DataError(f"{name}: labels must be a 2D instance label image, got shape {lab.shape}")
    if lab.dtype == bool:
        lab = lab.astype(np.uint8)
    if np.issubdtype(lab.dtype, np.floating):
        if not np.isfinite(lab).all() or not np.array_equal(lab, np.round(lab)):
            raise DataError(f"{name}: labels are not integer instance ids (found fractional or NaN values)")
    elif not np.issubdtype(lab.dtype, np.integer):
        raise DataError(f"{name}: unsupported label type {lab.dtype}")
    if lab.min(initial=0) < 0:
        raise DataError(f"{name}: labels contain negative ids")
    lab = lab.astype(np.int64)
    if lab.max(initial=0) == 1:
        cc, n = ndimage.label(lab == 1)
        if n > 1:
            log.warning("%s: labels are a binary mask; split into %d connected components as instances", name, n)
            lab = cc
    return relabel_sequential(lab).astype(np.int32)


def _pairs(folder: Path) -> list[tuple[Path, Path]]:
    img_dir, lab_dir = folder / "images", folder / "labels"
    if not img_dir.is_dir() or not lab_dir.is_dir():
        raise DataError(f"{folder}: expected sub-folders images/ and labels/ (pairs with the same file name)")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DataError(f"{img_dir}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    labels = {p.stem: p for p in lab_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
    pairs = []
    for img in images:
        lab = labels.get(img.stem)
        if lab is None:
            raise DataError(f"{img.name}: no label image with the same name in {lab_dir}")
        pairs.append((img, lab))
    return pairs


def folder_dataset(folder: str | Path) -> list[Sample]:
    """Load and check every image/label pair of ``folder``; label images without objects are skipped."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"data folder not found: {folder}")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    samples, skipped = [], []
    for img_p, lab_p in _pairs(folder):
        image = read_image(img_p)
        as_rgb(image, name=img_p.name)  # shape, dtype and NaN checks
        labels = check_labels(read_image(lab_p), lab_p.name)
        if labels.shape != image.shape[:2]:
            raise DataError(f"{img_p.name}: image is {image.shape[0]}x{image.shape[1]} but its labels are "
                            f"{labels.shape[0]}x{labels.shape[1]}")
        if labels.max() == 0:
            skipped.append(lab_p.name)
            continue
        samples.append(Sample(image, labels, img_p.stem))
    if skipped:
        log.warning("skipped %d image(s) whose labels have no objects: %s", len(skipped), ", ".join(skipped[:5]))
    if not samples:
        raise DataError(f"{folder}: no labelled objects in any of the {len(skipped)} label images")
    return samples


def load_samples(source: str | Path, split: str = "val") -> list[Sample]:
    """Samples from ``sample:dsb2018`` (split train/val/all) or a folder (split sub-folder if present)."""
    src = str(source)
    if src.startswith(SAMPLE_PREFIX):
        name = src[len(SAMPLE_PREFIX):]
        if name != "dsb2018":
            raise UsageError(f"unknown sample dataset {name!r}; available: {', '.join(SAMPLE_DATASETS)}")
        return dsb2018_tiles(split)
    folder = Path(src)
    if split in ("train", "val") and (folder / split).is_dir():
        return folder_dataset(folder / split)
    if split == "all" and (folder / "train").is_dir() and (folder / "val").is_dir():
        return folder_dataset(folder / "train") + folder_dataset(folder / "val")
    return folder_dataset(folder)
