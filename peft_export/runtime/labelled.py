"""Image/label pairs for ``evaluate``, streamed one 2D image at a time (stacks plane by plane), torch-free.

- ``sample:dsb2018``: the bundled tiles (:func:`peft_export.data.dataset.load_samples`);
- a folder with ``images/`` + ``labels/`` (or ``train/`` and ``val/`` sub-folders holding them): pairs with the
  same relative path and stem;
- any image input of :func:`peft_export.runtime.sources.resolve_inputs` (a file, a folder, a glob) with
  ``labels``: a folder holding a label image of the same relative path and stem for each.

A label stack goes with an image stack of the same shape. Unreadable files and pairs that do not fit are skipped
with a warning and listed in ``failed``; label images without objects are skipped with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from peft_export.data.dataset import SAMPLE_PREFIX, Sample, check_labels, load_samples
from peft_export.data.io import IMAGE_SUFFIXES, open_image
from peft_export.errors import DataError, PeftExportError, first_line
from peft_export.runtime.batch import plane_name
from peft_export.runtime.sources import InputItem, resolve_inputs

log = logging.getLogger(__name__)


@dataclass
class LabelledSet:
    pairs: list[tuple[InputItem, Path]]
    samples: list[Sample] | None = None  # in memory (the bundled sample data)
    failed: list[dict] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)

    def count(self) -> int:
        """How many 2D images (planes) it yields (reads only the files' headers)."""
        if self.samples is not None:
            return len(self.samples)
        n = 0
        for item, _ in self.pairs:
            try:
                n += open_image(item.path).count
            except PeftExportError:
                n += 1
        return n

    def __iter__(self) -> Iterator[Sample]:
        if self.samples is not None:
            yield from self.samples
            return
        for item, label_path in self.pairs:
            try:
                yield from _pair_samples(item, label_path, self.empty)
            except PeftExportError as exc:
                log.warning("skipped %s: %s", item.path, first_line(exc))
                self.failed.append({"input": str(item.path), "error": first_line(exc)})


def _pair_samples(item: InputItem, label_path: Path, empty: list) -> Iterator[Sample]:
    src, lab_src = open_image(item.path), open_image(label_path)
    if src.count != lab_src.count:
        raise DataError(f"{item.path.name} has {src.count} plane(s) but its labels {label_path.name} have "
                        f"{lab_src.count}")
    for k, (image, labels) in enumerate(zip(src.read(), lab_src.read())):
        name = plane_name(src, k if src.is_stack else None)
        labels = check_labels(labels, name)
        if labels.shape != np.asarray(image).shape[:2]:
            raise DataError(f"{name}: image is {image.shape[0]}x{image.shape[1]} but its labels are "
                            f"{labels.shape[0]}x{labels.shape[1]}")
        if labels.max() == 0:
            log.warning("%s: its labels have no objects; skipped", name)
            empty.append(name)
            continue
        yield Sample(image, labels, name if src.is_stack else item.path.stem)


def _label_for(item: InputItem, labels_root: Path) -> Path:
    for suffix in IMAGE_SUFFIXES:
        p = labels_root / item.rel.with_suffix(suffix)
        if p.is_file():
            return p
    raise DataError(f"{item.rel}: no label image with the same name in {labels_root}")


def _pairs(images: str | Path, labels_root: Path) -> tuple[list, list]:
    inputs = resolve_inputs(images)
    pairs, failed = [], []
    for item in inputs.items:
        try:
            pairs.append((item, _label_for(item, labels_root)))
        except DataError as exc:
            failed.append({"input": str(item.path), "error": first_line(exc)})
    if not pairs:
        raise DataError(f"no image in {images} has a label image in {labels_root}"
                        + (f" (first: {failed[0]['error']})" if failed else ""))
    return pairs, failed


def labelled_set(data: str, split: str = "val", labels: str | Path | None = None) -> LabelledSet:
    """The pairs ``evaluate`` reads (see the module docstring)."""
    if str(data).startswith(SAMPLE_PREFIX):
        if labels is not None:
            raise DataError("--labels does not apply to the bundled sample data")
        return LabelledSet([], load_samples(data, split))
    if labels is not None:
        lab = Path(labels)
        if not lab.is_dir():
            raise DataError(f"label folder not found: {lab}")
        pairs, failed = _pairs(data, lab)
        return LabelledSet(pairs, failed=failed)
    folder = Path(data)
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder} (or give --labels DIR with an image file or glob)")
    if split in ("train", "val") and (folder / split).is_dir():
        folder = folder / split
    elif split == "all" and (folder / "train").is_dir() and (folder / "val").is_dir():
        a, b = labelled_set(str(folder / "train")), labelled_set(str(folder / "val"))
        return LabelledSet(a.pairs + b.pairs, failed=a.failed + b.failed)
    if not (folder / "images").is_dir() or not (folder / "labels").is_dir():
        raise DataError(f"{folder}: expected sub-folders images/ and labels/ (pairs with the same file name), or "
                        "give the label folder with --labels")
    pairs, failed = _pairs(folder / "images", folder / "labels")
    return LabelledSet(pairs, failed=failed)
