"""The backend protocol every inference engine implements (PyTorch, ONNX Runtime, TensorRT). Torch-free."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from peft_export.imaging import Prepared, PreprocessSpec, normalize_and_pad, resize_for_model, to_uint8_scale


class Backend(Protocol):
    """One SAM model behind two calls. Arrays are numpy float32.

    ``embed(x)``: preprocessed images (B, 3, S, S) -> image embeddings (B, C, h, w). ``max_batch`` (optional):
    how many images one call takes (1 when absent, e.g. a static-batch graph; None: any number).
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


# Tiles per encoder call when none is asked for. Measured on 2 CPU cores (Intel Xeon, ONNX Runtime, LiteMedSAM
# encoder, one run): batch 4 was 0.82 s/tile vs 0.86 s/tile at batch 1 (5%) for 3.6x the peak memory (2769 vs 769
# MiB), so a CPU embeds one tile at a time; a GPU needs batches for throughput.
CPU_BATCH, GPU_BATCH = 1, 4


def on_gpu(backend) -> bool:
    """Whether the backend's encoder runs on a GPU: its ``on_gpu`` attribute, else its ONNX Runtime providers
    (the first one used), else its torch device."""
    flag = getattr(backend, "on_gpu", None)
    if flag is not None:
        return bool(flag)
    providers = getattr(backend, "providers", None)
    if providers:
        return providers[0] != "CPUExecutionProvider"
    device = getattr(backend, "device", None)
    return getattr(device, "type", "cpu") == "cuda"


def default_batch_size(backend) -> int:
    return GPU_BATCH if on_gpu(backend) else CPU_BATCH


def mask_prompt_inputs(batch: int, mask_input, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The decoder's ``mask_input`` (B, 1, *size) and ``has_mask_input`` (B,) float32: zeros when no previous
    logits are given, else those logits and ones."""
    if mask_input is None:
        return np.zeros((batch, 1, *size), np.float32), np.zeros(batch, np.float32)
    return np.ascontiguousarray(mask_input, np.float32), np.ones(batch, np.float32)


def select_masks(low_res: np.ndarray, iou: np.ndarray, multimask: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pick one mask per prompt: the single-mask output, or the best-scoring of the three multimask outputs."""
    if not multimask:
        return low_res[:, 0], iou[:, 0]
    best = 1 + np.argmax(iou[:, 1:], axis=1)
    idx = np.arange(low_res.shape[0])
    return low_res[idx, best], iou[idx, best]


def prepare_input(backend: Backend, image: np.ndarray, *, name: str = "image") -> tuple[np.ndarray, Prepared]:
    """What ``backend.embed`` takes for ``image``, and the geometry to map prompts and masks.

    Normally the fully preprocessed (1, 3, S, S) float32 tensor. For an export with preprocessing baked into the
    encoder graph: the resized image as uint8 (h', w', 3) on a 0-255 scale (the graph normalises and pads).
    """
    spec = backend.preprocess
    h, w = np.asarray(image).shape[:2]
    if getattr(backend, "baked", False):
        scaled = to_uint8_scale(image)  # uint8 as is, other types min-max scaled to 0-255
        as_u8 = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
        resized = resize_for_model(as_u8, PreprocessSpec(spec.img_size, "sam"), name=name)
        x = np.clip(np.round(resized), 0, 255).astype(np.uint8)
    else:
        resized = resize_for_model(image, spec, name=name)
        x = normalize_and_pad(resized, spec)
    return x, Prepared(x, (int(h), int(w)), resized.shape[:2], spec.img_size)
