"""``Segmenter``: the microscope-side API. numpy + ONNX Runtime (or TensorRT), never torch.

    seg = Segmenter("export_dir")              # reads manifest.json, checks every file's sha256
    seg.set_image(image)                       # any 2D grayscale/RGB, uint8/uint16/float
    out = seg.predict(boxes=[[10, 20, 60, 80]])
    out.masks      # (B, H, W) bool at the image's size
    out.scores     # (B,) predicted IoU of the returned masks
    out.low_res    # (B, 4h, 4w) logits, reusable as ``mask_input`` for a refinement step
    labels = seg.segment_everything()          # automatic instance segmentation -> label image

The image embedding is computed once per ``set_image`` and reused for any number of prompts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from peft_export.errors import DataError, UsageError
from peft_export.imaging import Prepared, upscale_masks
from peft_export.prompts import box_prompts, pad_points
from peft_export.runtime.backend import Backend, prepare_input, select_masks


@dataclass
class Prediction:
    masks: np.ndarray  # (B, H, W) bool
    scores: np.ndarray  # (B,) float32
    low_res: np.ndarray  # (B, 4h, 4w) float32 logits


def open_backend(out_dir: str | os.PathLike, backend: str = "onnxruntime", providers: list[str] | None = None
                 ) -> Backend:
    """A runtime backend for an export folder."""
    if backend == "onnxruntime":
        from peft_export.runtime.onnx_backend import OnnxBackend

        return OnnxBackend(out_dir, providers)
    if backend == "tensorrt":
        from peft_export.runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(out_dir)
    raise UsageError(f"unknown runtime backend {backend!r}; choose onnxruntime or tensorrt")


def _as_batch(arr, last: int, what: str) -> np.ndarray:
    a = np.asarray(arr, np.float32)
    if a.ndim == 1:
        a = a[None]
    if a.shape[-1] != last:
        raise DataError(f"{what} must have {last} numbers each, got shape {a.shape}")
    return a


class Segmenter:
    def __init__(self, out_dir: str | os.PathLike | None = None, backend: str | Backend = "onnxruntime",
                 providers: list[str] | None = None):
        if isinstance(backend, str):
            if out_dir is None:
                raise UsageError("Segmenter needs an export folder")
            backend = open_backend(out_dir, backend, providers)
        self.backend = backend
        self.prepared: Prepared | None = None
        self.embedding: np.ndarray | None = None

    # ---- bioimage.io packages (peft-export package; peft_export.runtime.package) ------------------------
    @classmethod
    def from_package(cls, path: str | os.PathLike, backend: str = "onnxruntime",
                     providers: list[str] | None = None, **kwargs) -> Segmenter:
        """A Segmenter on a package made by ``peft-export package`` (.zip, its folder or rdf.yaml); ONNX Runtime."""
        from peft_export.runtime.package import package_backend

        if backend != "onnxruntime":
            raise UsageError(f"a bioimage.io package runs with ONNX Runtime, not {backend}")
        return cls(backend=package_backend(path, providers), **kwargs)
    # ---- end bioimage.io packages ------------------------------------------------------------------------

    @property
    def multimask(self) -> bool:
        return bool(getattr(self.backend, "multimask", True))

    def set_image(self, image: np.ndarray, *, name: str = "image") -> None:
        x, self.prepared = prepare_input(self.backend, image, name=name)
        self.embedding = self.backend.embed(x)

    def _require_image(self) -> Prepared:
        if self.prepared is None:
            raise UsageError("call set_image(image) before predict()")
        return self.prepared

    def check_inside(self, coords_xy: np.ndarray, what: str) -> None:
        h, w = self._require_image().original_hw
        c = np.asarray(coords_xy, np.float32).reshape(-1, 2)
        bad = (c[:, 0] < 0) | (c[:, 1] < 0) | (c[:, 0] > w) | (c[:, 1] > h)
        if bad.any():
            x, y = c[np.argmax(bad)]
            raise DataError(f"{what} ({x:g}, {y:g}) lies outside the {w}x{h} image")

    def encode_prompts(self, points=None, labels=None, boxes=None) -> tuple[np.ndarray, np.ndarray]:
        """Prompts in image pixels -> model-space coords/labels in Meta's convention (B, N, 2)/(B, N)."""
        prep = self._require_image()
        parts_c, parts_l = [], []
        b = None
        if points is not None:
            pts = np.asarray(points, np.float32)
            if pts.ndim == 2:
                pts = pts[None]
            if pts.ndim != 3 or pts.shape[-1] != 2 or pts.shape[1] == 0:
                raise DataError(f"points must be (N, 2) or (B, N, 2) x/y pixel coordinates, got shape {pts.shape}")
            lab = np.ones(pts.shape[:2], np.float32) if labels is None else np.asarray(labels, np.float32)
            lab = lab.reshape(pts.shape[:2]) if lab.size == pts.shape[0] * pts.shape[1] else lab
            if lab.shape != pts.shape[:2]:
                raise DataError(f"labels shape {lab.shape} does not match points {pts.shape[:2]}")
            if not np.isin(lab, (0, 1)).all():
                raise DataError("point labels must be 1 (object) or 0 (background)")
            self.check_inside(pts, "point")
            parts_c.append(prep.transform_coords(pts))
            parts_l.append(lab)
            b = pts.shape[0]
        if boxes is not None:
            bx = _as_batch(boxes, 4, "boxes")
            if (bx[:, 2] < bx[:, 0]).any() or (bx[:, 3] < bx[:, 1]).any():
                raise DataError("boxes must be x0, y0, x1, y1 with x1 >= x0 and y1 >= y0")
            self.check_inside(bx.reshape(-1, 2), "box corner")
            if b is not None and bx.shape[0] != b:
                raise DataError(f"{bx.shape[0]} boxes but {b} point prompts: give one box per prompt")
            c, lab = box_prompts(prep.transform_boxes(bx))
            parts_c.append(c)
            parts_l.append(lab)
            b = bx.shape[0]
        if b is None:
            raise UsageError("give points and/or boxes")
        coords = np.concatenate(parts_c, axis=1)
        labs = np.concatenate(parts_l, axis=1)
        if boxes is None:  # SAM's padding point for prompts without a box
            coords, labs = pad_points(coords, labs)
        return coords, labs

    def predict(self, points=None, labels=None, boxes=None, mask_input=None, multimask: bool | None = None,
                batch_size: int = 64) -> Prediction:
        """Masks for a batch of prompts: points (B, N, 2) + labels (B, N), and/or boxes (B, 4), in image pixels.

        ``multimask`` (default: when the model's multimask outputs are trained and a prompt is one point) picks the
        best of SAM's three masks; otherwise SAM's single-mask output is returned.
        """
        prep = self._require_image()
        coords, labs = self.encode_prompts(points, labels, boxes)
        if multimask is None:
            multimask = self.multimask and boxes is None and coords.shape[1] == 2
        if mask_input is not None:
            mask_input = np.asarray(mask_input, np.float32)
            if mask_input.ndim == 3:
                mask_input = mask_input[:, None]
        masks, scores, lows = [], [], []
        for s in range(0, len(coords), batch_size):
            mi = None if mask_input is None else mask_input[s: s + batch_size]
            low, iou = self.backend.decode(self.embedding, coords[s: s + batch_size], labs[s: s + batch_size], mi)
            low, iou = select_masks(low, iou, multimask)
            masks.append(upscale_masks(low, prep.img_size, prep.resized_hw, prep.original_hw) > 0)
            scores.append(iou)
            lows.append(low)
        return Prediction(np.concatenate(masks), np.concatenate(scores).astype(np.float32), np.concatenate(lows))

    def segment_everything(self, **kwargs) -> np.ndarray:
        """Automatic instance segmentation of the current image (see :mod:`peft_export.runtime.auto`)."""
        from peft_export.runtime.auto import segment_everything

        return segment_everything(self, **kwargs)
