"""The backend contract every inference engine implements (ONNX Runtime, OpenVINO, TensorRT, PyTorch): a frozen
info record and three calls. Torch-free."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from peft_export.errors import UsageError
from peft_export.imaging import ModelInput, PreprocessSpec, normalize_and_pad, resize_for_model, to_uint8_scale


@dataclass(frozen=True)
class BackendInfo:
    """What a backend is and runs: everything a caller may ask of it besides its three calls."""

    name: str  # registry name: onnxruntime | openvino | tensorrt | torch
    model: str  # model entry (lite_medsam, vit_b, ...)
    source: str  # the export folder / package / checkpoint it was opened from
    preprocess: PreprocessSpec
    multimask: bool  # whether the model's three multimask outputs are trained (False for LiteMedSAM)
    embedding_shape: tuple[int, int, int]  # (C, h, w) of one image's embedding
    mask_input_size: tuple[int, int]  # (4h, 4w): the decoder's low-res masks and mask_input
    baked_preprocessing: bool = False  # the encoder takes the resized uint8 image (one per call)
    max_batch: int | None = 1  # images per encoder call (None: any number)
    on_gpu: bool = False
    prompt_decoder: bool = True  # False for instance packages (their graph gives instance maps only)
    instance_decoder: bool = False
    precision: str = "fp32"  # what the graphs store: fp32 | fp16 | int8
    compute: str = "fp32"  # what ran: fp32, or a backend's reduced arithmetic (OpenVINO's bf16)
    encoder_sha256: str | None = None  # the encoder graph's identity (embedding caches); None: no export file
    details: Mapping[str, Any] = field(default_factory=dict)  # backend specifics for summaries (providers, ...)

    @property
    def img_size(self) -> int:
        return int(self.preprocess.img_size)

    @property
    def encoder_batch(self) -> int | None:
        """Images per ``embed`` call: 1 for baked preprocessing (one resized image), else ``max_batch``."""
        return 1 if self.baked_preprocessing else self.max_batch

    @property
    def default_batch_size(self) -> int:
        """Tiles per encoder call when none is asked for: 1 on a CPU, 4 on a GPU (see CPU_BATCH)."""
        return GPU_BATCH if self.on_gpu else CPU_BATCH

    def describe(self) -> dict[str, Any]:
        """What ran, for summaries and reports."""
        return {"backend": self.name, "model": self.model, "source": self.source, "precision": self.precision,
                "compute": self.compute, "instance_decoder": self.instance_decoder,
                "encoder_sha256": self.encoder_sha256, **dict(self.details)}


class Backend(Protocol):
    """One SAM model behind three calls. Arrays are numpy float32.

    ``embed(x)``: preprocessed images (B, 3, S, S) -> image embeddings (B, C, h, w); B up to ``info.max_batch``
    (the caller batches). ``decode(embedding, coords, labels, mask_input)``: prompts in Meta's convention
    (coords (B, N, 2) in model-input pixels, labels (B, N) with 1/0 points, 2/3 box corners, -1 padding), optional
    previous low-res logits (B, 1, 4h, 4w) -> all four low-res mask logits (B, 4, 4h, 4w) and IoU predictions
    (B, 4); index 0 is the single-mask output, 1..3 the multimask outputs. ``instance_maps(embedding)``: (B, C, h,
    w) -> the instance decoder's (B, 3, S, S) maps (foreground, centre and boundary distance), only when
    ``info.instance_decoder`` (else a one-line UsageError).
    """

    info: BackendInfo

    def embed(self, x: np.ndarray) -> np.ndarray: ...

    def decode(self, embedding: np.ndarray, coords: np.ndarray, labels: np.ndarray,
               mask_input: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]: ...

    def instance_maps(self, embedding: np.ndarray) -> np.ndarray: ...


# Tiles per encoder call when none is asked for. Measured on 2 CPU cores (Intel Xeon, ONNX Runtime, LiteMedSAM
# encoder, one run): batch 4 was 0.82 s/tile vs 0.86 s/tile at batch 1 (5%) for 3.6x the peak memory (2769 vs 769
# MiB), so a CPU embeds one tile at a time; a GPU needs batches for throughput.
CPU_BATCH, GPU_BATCH = 1, 4

NO_INSTANCE_DECODER = (
    "has no instance decoder (instance_decoder.onnx); make one with `peft-export finetune --instance-decoder ...` "
    "(or `--instance-decoder-only --model RUN/best.pt` on a finetuned run), then `peft-export merge-and-export "
    "RUN/best.pt -o DIR`; or use --method grid (point-grid prompts)")


def no_instance_decoder(info: BackendInfo) -> UsageError:
    return UsageError(f"{info.source} {NO_INSTANCE_DECODER}")


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


def prepare_input(backend: Backend, image: np.ndarray, *, name: str = "image") -> tuple[np.ndarray, ModelInput]:
    """What ``backend.embed`` takes for ``image``, and the geometry to map prompts and masks."""
    return prepare_image(image, backend.info.preprocess, baked=backend.info.baked_preprocessing, name=name)


def prepare_image(image: np.ndarray, spec: PreprocessSpec, *, baked: bool = False,
                  name: str = "image") -> tuple[np.ndarray, ModelInput]:
    """The encoder feed for ``image`` under ``spec``, and its geometry.

    Normally the fully preprocessed (1, 3, S, S) float32 tensor. For an export with preprocessing baked into the
    encoder graph: the resized image as uint8 (h', w', 3) on a 0-255 scale (the graph normalises and pads).
    """
    h, w = np.asarray(image).shape[:2]
    if baked:
        scaled = to_uint8_scale(image)  # uint8 as is, other types min-max scaled to 0-255
        as_u8 = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
        resized = resize_for_model(as_u8, PreprocessSpec(spec.img_size, "sam"), name=name)
        x = np.clip(np.round(resized), 0, 255).astype(np.uint8)
    else:
        resized = resize_for_model(image, spec, name=name)
        x = normalize_and_pad(resized, spec)
    return x, ModelInput(x, (int(h), int(w)), resized.shape[:2], spec.img_size)
