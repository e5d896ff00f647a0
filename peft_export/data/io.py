"""Reading and writing 2D images and label images (tif via tifffile, png/jpg via Pillow). Torch-free."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from peft_export.errors import DataError, first_line

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file into a numpy array (dtype kept). Raises DataError with a one-line reason."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"image not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(p)
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


def atomic_write(path: str | os.PathLike, write_fn) -> Path:
    """Write a file through ``write_fn(tmp_path)`` and move it into place only when that succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write_fn(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
