"""Image pre- and post-processing in numpy (torch-free; shared by training, export checks and the runtime).

One implementation serves every backend, so that a PyTorch model and its ONNX/TensorRT export see exactly
the same input tensors and their low-resolution mask logits are upscaled by exactly the same arithmetic.

Conventions (SAM's): resize so the longest side is ``img_size``, normalise, zero-pad bottom/right to a square.
Prompt coordinates are (x, y) in pixels of the original image and are scaled like the image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from peft_export.errors import DataError

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class PreprocessSpec:
    """How a model wants its input image. Recorded in every export manifest.

    mode ``sam``: intensities on a 0-255 scale (uint8 as is; any other dtype min-max scaled to 0-255 per
    image), then ``(x - pixel_mean) / pixel_std``.
    mode ``minmax``: each resized image scaled to [0, 1] by its own min and max (LiteMedSAM).
    """

    img_size: int
    mode: str = "sam"
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD
    pad: str = "bottom-right-zero"
    resize: str = "longest-side-bilinear"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pixel_mean"] = list(self.pixel_mean)
        d["pixel_std"] = list(self.pixel_std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        return cls(
            img_size=int(d["img_size"]),
            mode=d.get("mode", "sam"),
            pixel_mean=tuple(d.get("pixel_mean", SAM_PIXEL_MEAN)),
            pixel_std=tuple(d.get("pixel_std", SAM_PIXEL_STD)),
        )


def as_rgb(image: np.ndarray, *, name: str = "image") -> np.ndarray:
    """Check a 2D image and return it as float32 (H, W, 3). Accepts (H,W), (H,W,1), (H,W,3), (H,W,4: alpha dropped)."""
    img = np.asarray(image)
    if img.dtype == bool or not (np.issubdtype(img.dtype, np.integer) or np.issubdtype(img.dtype, np.floating)):
        raise DataError(f"{name}: unsupported pixel type {img.dtype}; use uint8, uint16 or float")
    if img.ndim == 3 and img.shape[-1] in (1, 3, 4):
        img = img[..., :3] if img.shape[-1] != 1 else img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise DataError(
            f"{name}: expected a 2D grayscale (H, W) or RGB (H, W, 3) image, got shape {tuple(np.shape(image))}"
        )
    if img.shape[0] < 2 or img.shape[1] < 2:
        raise DataError(f"{name}: image of shape {tuple(img.shape[:2])} is too small")
    img = img.astype(np.float32, copy=False)
    if not np.isfinite(img).all():
        raise DataError(f"{name}: image contains NaN or infinite values")
    return img


def to_uint8_scale(image: np.ndarray, rgb: np.ndarray | None = None) -> np.ndarray:
    """SAM's input scale: uint8 stays as it is, anything else is min-max scaled to 0-255 (float32)."""
    rgb = as_rgb(image) if rgb is None else rgb
    if np.asarray(image).dtype == np.uint8:
        return rgb
    lo, hi = float(rgb.min()), float(rgb.max())
    return (rgb - lo) * (255.0 / max(hi - lo, 1e-8))


def resized_shape(h: int, w: int, target: int) -> tuple[int, int]:
    """SAM's ResizeLongestSide arithmetic."""
    scale = target / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_image(img: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float (H, W, C) image (antialiased when shrinking), per channel."""
    h, w = size_hw
    if img.shape[:2] == (h, w):
        return img.astype(np.float32, copy=True)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], dtype=np.float32), mode="F")
                        .resize((w, h), Image.BILINEAR)) for c in range(img.shape[-1])]
    return np.stack(chans, axis=-1).astype(np.float32)


def resize_labels(labels: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer label image."""
    h, w = size_hw
    if labels.shape == (h, w):
        return labels.copy()
    ys = np.minimum(((np.arange(h) + 0.5) * labels.shape[0] / h).astype(np.int64), labels.shape[0] - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * labels.shape[1] / w).astype(np.int64), labels.shape[1] - 1)
    return labels[ys[:, None], xs[None, :]]


@dataclass(frozen=True)
class ModelInput:
    """A preprocessed image: model input and the geometry needed to map prompts and masks back."""

    tensor: np.ndarray  # (1, 3, S, S) float32
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    img_size: int

    @property
    def scale_xy(self) -> tuple[float, float]:
        return self.resized_hw[1] / self.original_hw[1], self.resized_hw[0] / self.original_hw[0]

    def transform_coords(self, coords: np.ndarray) -> np.ndarray:
        """(…, 2) x/y pixel coordinates of the original image -> model input coordinates."""
        c = np.asarray(coords, dtype=np.float32).copy()
        sx, sy = self.scale_xy
        c[..., 0] *= sx
        c[..., 1] *= sy
        return c

    def transform_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """(…, 4) x0, y0, x1, y1 boxes of the original image -> model input coordinates."""
        b = np.asarray(boxes, dtype=np.float32)
        return self.transform_coords(b.reshape(*b.shape[:-1], 2, 2)).reshape(b.shape)


def resize_for_model(image: np.ndarray, spec: PreprocessSpec, *, name: str = "image") -> np.ndarray:
    """Step 1 of preprocessing: intensity scale (SAM mode: 0-255) and longest-side resize. (h, w, 3) float32."""
    rgb = as_rgb(image, name=name)
    if spec.mode == "sam":
        rgb = to_uint8_scale(image, rgb)
    elif spec.mode != "minmax":
        raise DataError(f"unknown preprocessing mode {spec.mode!r}")
    return resize_image(rgb, resized_shape(rgb.shape[0], rgb.shape[1], spec.img_size))


def normalize_and_pad(resized: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Step 2 of preprocessing (the part an export can bake into its graph): (h, w, 3) -> (1, 3, S, S)."""
    if spec.mode == "sam":
        x = (resized - np.asarray(spec.pixel_mean, np.float32)) / np.asarray(spec.pixel_std, np.float32)
    else:
        lo, hi = float(resized.min()), float(resized.max())
        x = (resized - lo) / max(hi - lo, 1e-8)
    s = spec.img_size
    out = np.zeros((1, 3, s, s), np.float32)
    out[0, :, : x.shape[0], : x.shape[1]] = x.transpose(2, 0, 1)
    return out


def preprocess(image: np.ndarray, spec: PreprocessSpec, *, name: str = "image") -> ModelInput:
    """Full preprocessing of one image for a model with ``spec``."""
    h, w = np.asarray(image).shape[:2]
    resized = resize_for_model(image, spec, name=name)
    return ModelInput(normalize_and_pad(resized, spec), (int(h), int(w)), resized.shape[:2], spec.img_size)


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1D bilinear interpolation, ``align_corners=False`` (as torch/ONNX Resize)."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.clip(src, 0, None)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    m[np.arange(n_out), i0] += 1 - w1
    m[np.arange(n_out), i1] += w1
    return m


def upscale_masks(low_res: np.ndarray, img_size: int, resized_hw: tuple[int, int],
                  original_hw: tuple[int, int]) -> np.ndarray:
    """SAM's ``postprocess_masks`` in numpy: low-res logits (…, h, w) -> logits at the original image size.

    Bilinear to (img_size, img_size), crop the padding away, bilinear to the original size.
    """
    lr = np.asarray(low_res, np.float32)
    h, w = lr.shape[-2:]
    rows = _interp_matrix(resized_hw[0], original_hw[0]) @ _interp_matrix(h, img_size)[: resized_hw[0]]
    cols = _interp_matrix(resized_hw[1], original_hw[1]) @ _interp_matrix(w, img_size)[: resized_hw[1]]
    rows = rows.astype(np.float32)
    cols = cols.astype(np.float32)
    return np.einsum("yh,...hw,xw->...yx", rows, lr, cols, optimize=True)
