"""Images for static int8: a calibration set and a held-out gate set (torch-free).

Where they come from (:func:`calibration_sets`):

- the checkpoint's own training data when it recorded it (``peft-export finetune`` does) and it is readable here:
  its training images calibrate, its validation images gate;
- otherwise ``--calibration SPEC``: ``sample:dsb2018`` (the three training tiles calibrate, the held-out tile
  gates), or a folder: ``DIR/train`` + ``DIR/val`` (each ``images/`` + ``labels/``), ``DIR/images`` + ``DIR/labels``,
  or just images (``DIR/images/`` or ``DIR/*.tif|png|jpg``). Without a val split the last quarter of the images
  (at least one) is held out for the gate; the gate never sees a calibration image.

Both sets are widened with the eight flips/rotations of their images (the dihedral group: distinct encoder
inputs with known truth) up to the requested counts. Labelled gate images give one box and one point prompt per
object; unlabelled ones a fixed grid of point and box prompts (the gate compares int8 with fp32 on the same
prompts, so agreement is measured either way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from peft_export.data.dataset import SAMPLE_PREFIX, load_samples
from peft_export.data.io import IMAGE_SUFFIXES, read_image
from peft_export.errors import DataError, PeftExportError, UsageError
from peft_export.imaging import as_rgb

DEFAULT_CALIBRATION = "sample:dsb2018"


@dataclass(frozen=True)
class CalImage:
    image: np.ndarray
    labels: np.ndarray | None
    name: str


@dataclass
class CalibrationSets:
    calibration: list[CalImage]
    gate: list[CalImage]
    source: str
    how: str  # where the source came from: checkpoint, option, default
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"source": self.source, "chosen_by": self.how,
                "calibration_images": [c.name for c in self.calibration],
                "gate_images": [g.name for g in self.gate],
                "labelled_gate": all(g.labels is not None for g in self.gate)}


def dihedral(a: np.ndarray, k: int) -> np.ndarray:
    """The k-th (0..7) flip/rotation of the first two axes."""
    out = np.rot90(a, k % 4, axes=(0, 1))
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


def widen(images: list[CalImage], count: int) -> list[CalImage]:
    """The images, then their flips/rotations (variant by variant), up to ``count``."""
    out: list[CalImage] = []
    for k in range(8):
        for c in images:
            if len(out) >= count:
                return out
            lab = None if c.labels is None else dihedral(c.labels, k)
            out.append(CalImage(dihedral(c.image, k), lab, c.name if k == 0 else f"{c.name}#d{k}"))
    return out


def _plain_images(folder: Path) -> list[CalImage]:
    root = folder / "images" if (folder / "images").is_dir() else folder
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"calibration folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for p in files:
        img = read_image(p)
        as_rgb(img, name=f"calibration image {p.name}")  # 2D grayscale/RGB, finite: one line otherwise
        out.append(CalImage(img, None, p.stem))
    return out


def _from_samples(samples) -> list[CalImage]:
    return [CalImage(s.image, s.labels, s.name) for s in samples]


def _load(spec: str) -> tuple[list[CalImage], list[CalImage]]:
    """(calibration, gate) images of a source before widening."""
    if spec.startswith(SAMPLE_PREFIX):
        return _from_samples(load_samples(spec, "train")), _from_samples(load_samples(spec, "val"))
    folder = Path(spec)
    if not folder.is_dir():
        raise DataError(f"calibration folder not found: {folder}")
    if (folder / "train").is_dir() and (folder / "val").is_dir():
        return _from_samples(load_samples(folder, "train")), _from_samples(load_samples(folder, "val"))
    images = _from_samples(load_samples(folder, "all")) if (folder / "labels").is_dir() else _plain_images(folder)
    if len(images) < 2:
        raise DataError(f"calibration folder {folder} has {len(images)} image; int8 needs at least 2 (some calibrate, "
                        "the others are held out for the gate)")
    n_gate = max(1, len(images) // 4)
    return images[:-n_gate], images[-n_gate:]


def training_data_source(training_data: dict | None) -> str | None:
    """The training-data source a checkpoint recorded (``data.train.source``), if any."""
    if not isinstance(training_data, dict):
        return None
    src = (training_data.get("train") or {}).get("source")
    return str(src) if src else None


def calibration_sets(spec: str | None, *, training_data: dict | None = None, calibration_images: int = 16,
                     gate_images: int = 8) -> CalibrationSets:
    """Calibration and gate images (see the module docstring); one clear line for every problem."""
    if calibration_images < 1 or gate_images < 1:
        raise UsageError("--calibration-images and --gate-images must be >= 1")
    notes = []
    how = "option"
    if spec is None:
        recorded = training_data_source(training_data)
        if recorded is not None:
            try:
                cal, gate = _load(recorded)
                return CalibrationSets(widen(cal, calibration_images), widen(gate, gate_images), recorded,
                                       "checkpoint training data")
            except PeftExportError as exc:
                notes.append(f"the checkpoint's training data {recorded!r} is not usable here ({exc}); "
                             f"using {DEFAULT_CALIBRATION}")
        spec, how = DEFAULT_CALIBRATION, "default"
    try:
        cal, gate = _load(spec)
    except PeftExportError as exc:
        if how == "default":
            raise UsageError(f"int8 needs calibration images: pass --calibration DIR ({exc})") from None
        raise
    if not cal or not gate:
        raise DataError(f"calibration source {spec} gave no {'calibration' if not cal else 'gate'} images")
    return CalibrationSets(widen(cal, calibration_images), widen(gate, gate_images), spec, how, notes)
