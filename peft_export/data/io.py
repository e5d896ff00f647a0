"""Reading and writing images, stacks and label images (tif via tifffile, png/jpg via Pillow). Torch-free.

A *stack* is a TIFF with one axis besides height, width and colour: z (a 3D volume), t (a time-lapse) or any
other (ImageJ channels, an unnamed page axis): each plane is segmented as a 2D image. :func:`open_image` looks at
a file's shape and axes without reading its pixels; :meth:`ImageSource.planes` reads one plane at a time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peft_export.errors import DataError, first_line
from peft_export.files import atomic_write as _atomic_write

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")

log = logging.getLogger(__name__)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file into a numpy array (dtype kept). Raises DataError with a one-line reason."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"image not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(p) as tif:
                arr = tif.asarray()
                if arr.ndim == 3 and tif.series and tif.series[0].axes == "SYX" and arr.shape[0] in (3, 4):
                    arr = np.moveaxis(arr, 0, -1)  # planar RGB(A) -> channel-last (open_image warns)
        else:
            from PIL import Image

            with Image.open(p) as im:
                arr = np.asarray(im)
    except Exception as exc:  # any decoder failure is a user-facing "unreadable image"
        raise DataError(f"cannot read image {p}: {first_line(exc)}") from None
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # channel-first tif -> channel-last
    return arr


COLOUR_AXES = "S"  # tifffile's samples axis (RGB)


@dataclass(frozen=True)
class ImageSource:
    """One input file: a 2D image (``planes == 0``) or a stack of ``planes`` 2D planes along ``plane_axis``."""

    path: Path
    shape: tuple[int, ...]
    axes: str
    planes: int = 0
    plane_axis: str = ""

    @property
    def is_stack(self) -> bool:
        return self.planes > 0

    @property
    def count(self) -> int:
        """2D images it holds (1 for a 2D image)."""
        return max(self.planes, 1)

    def read(self) -> Iterator[np.ndarray]:
        """The image (one array), or the stack's planes one at a time."""
        if not self.is_stack:
            yield read_image(self.path)
            return
        yield from _tiff_planes(self)


def open_image(path: str | os.PathLike) -> ImageSource:
    """Inspect an image file: a 2D image or a stack (one non-spatial, non-colour axis; axes of size 1 are
    dropped). DataError with one line for unreadable files, stacks whose planes differ in shape, and images with
    more than one extra axis."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"image not found: {p}")
    if p.suffix.lower() not in (".tif", ".tiff"):
        return ImageSource(p, (), "YX")
    try:
        import tifffile

        with tifffile.TiffFile(p) as tif:
            series = list(tif.series)
            if not series:
                raise DataError(f"cannot read image {p}: no image data in the file")
            if len(series) > 1:  # pages of different shapes (or separately written series): a stack of pages
                shapes = [tuple(pg.shape) for s in series for pg in s.pages]
                for k, sh in enumerate(shapes):
                    if sh != shapes[0]:
                        raise DataError(f"{p.name}: plane {k} is {'x'.join(map(str, sh))} but plane 0 is "
                                        f"{'x'.join(map(str, shapes[0]))}: every plane of a stack must have one shape")
                return ImageSource(p, (len(shapes), *shapes[0]), "I" + series[0].axes, len(shapes), "I")
            shape, axes = tuple(series[0].shape), series[0].axes
    except DataError:
        raise
    except Exception as exc:  # any decoder failure is a user-facing "unreadable image"
        raise DataError(f"cannot read image {p}: {first_line(exc)}") from None
    planar = axes == "SYX" and shape[0] in (3, 4)
    channel_first = len(shape) == 3 and axes[0] in "QC" and shape[0] in (1, 3) and shape[-1] not in (1, 3, 4)
    if planar or (channel_first and shape[0] == 3):
        log.warning("%s: %s planes without axis metadata are read as one %s image; for a stack of %d planes save "
                    "its axes (tifffile.imwrite(..., photometric='minisblack', metadata={'axes': 'ZYX'}))", p.name,
                    "x".join(map(str, shape)), "RGBA" if shape[0] == 4 else "RGB", shape[0])
    extra = [(a, n) for a, n in zip(axes, shape) if a not in ("Y", "X", COLOUR_AXES) and n > 1]
    if not extra or channel_first:
        return ImageSource(p, shape, axes)  # 2D (channel-first colour is moved last by read_image)
    if len(extra) > 1:
        names = "".join(a for a, _ in extra)
        raise DataError(f"{p.name}: an image of shape {shape} (axes {axes}) has {len(extra)} axes besides height, "
                        f"width and colour ({names}); predict takes 2D images and stacks along one axis (z or t): "
                        "save one channel or one time point per file")
    return ImageSource(p, shape, axes, extra[0][1], extra[0][0])


def _tiff_planes(src: ImageSource) -> Iterator[np.ndarray]:
    import tifffile

    try:
        with tifffile.TiffFile(src.path) as tif:
            pages = [pg for s in tif.series for pg in s.pages]
            if len(pages) == src.planes:
                for pg in pages:
                    yield _channels_last(np.asarray(pg.asarray()))
                return
            data = tif.series[0].asarray()  # planes not stored one per page: the whole stack once
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read image {src.path}: {first_line(exc)}") from None
    axis = [a for a, n in zip(src.axes, src.shape) if not (a not in ("Y", "X", COLOUR_AXES) and n == 1)]
    data = data.reshape([n for a, n in zip(src.axes, src.shape) if a in axis])
    data = np.moveaxis(data, "".join(axis).index(src.plane_axis), 0)
    for plane in data:
        yield _channels_last(np.asarray(plane))


def _channels_last(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        return np.moveaxis(arr, 0, -1)
    return arr


def write_label_stack(path: str | os.PathLike, planes: Iterable[np.ndarray], count: int,
                      shape: tuple[int, int], axis: str = "Z") -> Path:
    """Write ``count`` label planes (streamed: one plane in memory at a time) as one multi-page uint32 tif with
    axes ``axis`` + YX; atomically (nothing at ``path`` unless every plane was written)."""
    import tifffile

    axis = axis if axis in "ZTC" else "Z"

    def _planes():
        for k, lab in enumerate(planes):
            lab = np.asarray(lab)
            if lab.shape != tuple(shape):
                raise DataError(f"label plane {k} is {lab.shape}, expected {tuple(shape)}")
            yield lab.astype(np.uint32)

    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, _planes(), shape=(count, *shape), dtype=np.uint32,
                                                           photometric="minisblack",
                                                           metadata={"axes": axis + "YX"}))


def atomic_write(path: str | os.PathLike, write_fn) -> Path:
    """Write a file through ``write_fn(tmp_path)`` and move it into place only when that succeeded
    (:func:`peft_export.files.atomic_write`: recognisable temporary name, user's umask, one-line disk errors)."""
    return _atomic_write(path, write_fn)


def write_labels(path: str | os.PathLike, labels: np.ndarray) -> Path:
    """Write an instance label image (tif: uint16/uint32; png: uint16 up to 65535 objects)."""
    labels = np.asarray(labels)
    dtype = np.uint16 if labels.max(initial=0) < 65536 else np.uint32
    suffix = Path(path).suffix.lower()

    def _write(tmp: Path):
        if suffix in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(tmp, labels.astype(dtype), compression=None)
        elif suffix == ".png":
            from PIL import Image

            if dtype != np.uint16:
                raise DataError("more than 65535 objects do not fit a png label image; use .tif")
            Image.fromarray(labels.astype(np.uint16)).save(tmp, format="PNG")
        elif suffix == ".npy":
            with open(tmp, "wb") as fh:
                np.save(fh, labels.astype(dtype))
        else:
            raise DataError(f"unsupported label image format {suffix!r}; use .tif, .png or .npy")

    return atomic_write(path, _write)
