"""What goes into a package besides the graph: the test image, the test tensors, the cover picture.

The expected test output is computed by the export folder's own runtime (the graphs the export wrote, run one
after the other by ONNX Runtime) — independently of the package's composed graph and of its declared
preprocessing, so that reproducing it checks both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peft_export.data.io import read_image
from peft_export.errors import DataError, MissingDependencyError, UsageError
from peft_export.imaging import as_rgb, resize_image, resize_labels, to_uint8_scale
from peft_export.manifest import Manifest
from peft_export.runtime.backend import prepare_input
from peft_export.runtime.onnx_backend import OnnxBackend, ort_session
from peft_export.runtime.overlay import overlay
from peft_export.runtime.segmenter import Segmenter

SAMPLE_TEST_IMAGE = "sample:dsb2018"


@dataclass
class SampleImage:
    image: np.ndarray  # as read (2D grayscale or RGB, any dtype)
    name: str
    description: str
    labels: np.ndarray | None = None  # instance labels (the DSB2018 tile's hand-drawn ones), for the cover


def load_test_image(spec: str | None) -> SampleImage:
    """``None`` / ``sample:dsb2018``: the real DSB2018 validation tile; else an image file."""
    if spec is None or spec == SAMPLE_TEST_IMAGE:
        from peft_export.data.dataset import dsb2018_tiles

        try:
            tile = dsb2018_tiles("val")[0]
        except MissingDependencyError:
            raise UsageError("no test image for the package's test tensors: the DSB2018 sample is not installed "
                             "(pip install 'peft-export[samples]'); or pass --test-image FILE") from None
        return SampleImage(tile.image, tile.name, "the DSB2018 validation tile (bottom-right 256x256 quadrant of the "
                                                "stardist package's img2d.tif; BBBC038, Caicedo et al. 2019)",
                           tile.labels)
    path = Path(spec)
    return SampleImage(read_image(path), path.stem, f"the image {path.name}")


def _central(h: int, w: int) -> tuple[slice, slice]:
    side = min(h, w)
    y, x = (h - side) // 2, (w - side) // 2
    return slice(y, y + side), slice(x, x + side)


def square_input(image: np.ndarray, size: int, *, name: str = "test image") -> np.ndarray:
    """The image's central square, resized to ``size`` x ``size``: (size, size, 3) float32 raw intensities."""
    rgb = as_rgb(image, name=name)
    h, w = rgb.shape[:2]
    if min(h, w) < 16:
        raise DataError(f"{name}: {w}x{h} is too small for test tensors (need at least 16x16)")
    return resize_image(rgb[_central(h, w)], (size, size))


def prompted_labels(export_dir: Path, manifest: Manifest, square: np.ndarray, labels: np.ndarray | None,
                    max_objects: int = 64) -> np.ndarray | None:
    """For the cover of an encoder package: the export's prompt decoder on ``square``, one box per labelled object
    (the labels' central square, as the image's) -> a label image; None without labels."""
    if labels is None:
        return None
    lab = resize_labels(np.asarray(labels)[_central(*labels.shape[:2])], square.shape[:2])
    boxes = []
    for i in [i for i in np.unique(lab) if i][:max_objects]:
        ys, xs = np.nonzero(lab == i)
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
    if not boxes:
        return None
    seg = Segmenter(OnnxBackend(export_dir, manifest))
    seg.set_image(square)
    return seg.predict_labels(boxes=np.asarray(boxes, np.float32))[0]


def make_test_input(square: np.ndarray, baked: bool) -> np.ndarray:
    """The package's raw test input: (1, 3, S, S) float32, or for a baked export (S, S, 3) uint8."""
    if baked:
        return np.clip(np.round(to_uint8_scale(square)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(square.transpose(2, 0, 1)[None], np.float32)


def reference_output(export_dir: Path, manifest: Manifest, test_input: np.ndarray, kind: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The export folder's own answer on the test input: (output tensor, image embedding).

    Runs ``encoder.onnx`` through the runtime's preprocessing (``prepare_input``) and, for ``kind ==
    "instance"``, ``instance_decoder.onnx`` on its embedding."""
    backend = OnnxBackend(export_dir, manifest)
    image = test_input if backend.info.baked_preprocessing else test_input[0].transpose(1, 2, 0)
    x, _ = prepare_input(backend, image)
    embedding = backend.embed(x)
    if kind != "instance":
        return embedding, embedding
    session = ort_session(manifest.path_of(export_dir, "instance_decoder"))
    maps = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(embedding, np.float32)})[0]
    return maps, embedding


# ---- the cover: the test image beside what the package computes ------------------------------------------

def gray_u8(square: np.ndarray) -> np.ndarray:
    lo, hi = float(square.min()), float(square.max())
    return ((square - lo) * (255.0 / max(hi - lo, 1e-8))).clip(0, 255).astype(np.uint8)


def embedding_pca(embedding: np.ndarray) -> np.ndarray:
    """(1, C, h, w) embedding -> (h, w, 3) uint8: its first three principal components as colours."""
    e = np.asarray(embedding, np.float64)[0]
    c, h, w = e.shape
    flat = e.reshape(c, -1).T
    flat = flat - flat.mean(axis=0)
    _, vecs = np.linalg.eigh(flat.T @ flat)  # C x C: cheaper than an SVD of the (h*w) x C matrix
    comp = flat @ vecs[:, ::-1][:, :3]
    lo, hi = np.percentile(comp, 1, axis=0), np.percentile(comp, 99, axis=0)
    return (((comp - lo) / np.maximum(hi - lo, 1e-8)).clip(0, 1).reshape(h, w, 3) * 255).astype(np.uint8)


def instance_labels(maps: np.ndarray, settings: dict | None = None) -> np.ndarray:
    """Instance labels from (3, S, S) maps with the runtime's watershed (``settings``: its parameters); where
    that module is missing, connected components of foreground > 0.5 (only ever used for the cover picture)."""
    try:
        from peft_export.runtime.instances import InstanceOptions, maps_to_instances
    except ImportError:
        from scipy import ndimage

        return ndimage.label(maps[0] > 0.5)[0]
    return maps_to_instances(maps, InstanceOptions.from_dict(settings))


def cover_image(square: np.ndarray, kind: str, output: np.ndarray, pca: np.ndarray | None = None,
                settings: dict | None = None, height: int = 256, prompted: np.ndarray | None = None) -> np.ndarray:
    """A 2:1 picture (the zoo's recommended cover ratio): the test image, and beside it the overlay of the
    instances found from the package's maps, or (encoder packages) of the objects segmented by box prompts through
    the attached decoder (``prompted``), else the embedding's principal components (``pca``)."""
    s = square.shape[0]
    gray = gray_u8(square)
    if kind == "instance":
        right = overlay(square, instance_labels(output[0], settings))
    elif prompted is not None:
        right = overlay(square, prompted)
    else:
        right = resize_image(pca.astype(np.float32), (s, s)).clip(0, 255).astype(np.uint8)
    pic = np.concatenate([gray, right], axis=1)
    if s != height:
        pic = resize_image(pic.astype(np.float32), (height, 2 * height)).clip(0, 255).astype(np.uint8)
    return pic


def save_png(path: Path, picture: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(picture).save(path, format="PNG", optimize=True)
    return path
