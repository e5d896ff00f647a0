"""The backend protocol every inference engine implements (PyTorch, ONNX Runtime, TensorRT). Torch-free."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from peft_export.imaging import PreprocessSpec


class Backend(Protocol):
    """One SAM model behind two calls. Arrays are numpy float32.

    ``embed(x)``: preprocessed image (1, 3, S, S) -> image embedding (1, C, h, w).
    ``decode(embedding, coords, labels, mask_input)``: prompts in Meta's convention (coords (B, N, 2) in
    model-input pixels, labels (B, N) with 1/0 points, 2/3 box corners, -1 padding), optional previous
    low-res logits (B, 1, 4h, 4w) -> all four low-res mask logits (B, 4, 4h, 4w) and IoU predictions (B, 4);
    index 0 is the single-mask output, 1..3 the multimask outputs.
    """

    name: str
    preprocess: PreprocessSpec
    multimask: bool  # whether the model's three multimask outputs are trained (False for LiteMedSAM)

    def embed(self, x: np.ndarray) -> np.ndarray: ...

    def decode(self, embedding: np.ndarray, coords: np.ndarray, labels: np.ndarray,
               mask_input: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]: ...


def select_masks(low_res: np.ndarray, iou: np.ndarray, multimask: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pick one mask per prompt: the single-mask output, or the best-scoring of the three multimask outputs."""
    if not multimask:
        return low_res[:, 0], iou[:, 0]
    best = 1 + np.argmax(iou[:, 1:], axis=1)
    idx = np.arange(low_res.shape[0])
    return low_res[idx, best], iou[idx, best]
