"""Validation during training (rank 0): box/point mean IoU and mSA, the same code as ``peft-export evaluate``,
with the encoder's frozen trunk served from the training cache (same numbers, less work). With an instance decoder
also the automatic segmentation (``instance``: mSA, precision/recall/F1 at IoU 0.5, object counts), the code of
``peft-export evaluate --auto``."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from peft_export.runtime.evaluate import evaluate, evaluate_instances
from peft_export.runtime.strategies import AutoOptions
from peft_export.train.distributed import Dist
from peft_export.train.trunk import TrunkCache


def set_train_mode(model: nn.Module, *trained: nn.Module | None) -> None:
    """Training mode, except BatchNorm layers (TinyViT): their running statistics are part of the pretrained
    model, and batch statistics of 1-2 images would change a frozen trunk's output. Modules in ``trained``
    (a new instance decoder) train whole, BatchNorm included."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    for m in trained:
        if m is not None:
            m.train()


class _ValBackend:
    """TorchBackend for validation that reuses the trunk cache for the encoder."""

    def __init__(self, model, spec, device, cache: TrunkCache | None, instance_decoder: nn.Module | None = None):
        from peft_export.models.torch_backend import TorchBackend  # lazy: pulls PIL, segment_anything, torchvision

        self._inner = TorchBackend(model, spec.preprocess, device, multimask=spec.multimask,
                                   instance_decoder=instance_decoder, name=spec.name, source="training")
        self.info = replace(self._inner.info, max_batch=1)  # the trunk cache encodes one image per call
        self.cache = cache
        self.device = torch.device(device)

    def embed(self, x: np.ndarray) -> np.ndarray:
        if self.cache is None:
            return self._inner.embed(x)
        with torch.no_grad():
            return self.cache.encode([x[0]], self.device, tag="fp32").float().cpu().numpy()

    def decode(self, embedding, coords, labels, mask_input=None):
        return self._inner.decode(embedding, coords, labels, mask_input)

    def instance_maps(self, embedding):
        return self._inner.instance_maps(embedding)


class Validator:
    """``validator()`` -> ``{"val": {prompt: figures}, "val_metric": ..., "val_seconds": ...}`` on every rank
    (computed on rank 0, broadcast), or None without a validation set."""

    def __init__(self, model, spec, device, samples, *, prompts: list[str], metric: str, dist: Dist,
                 cache: TrunkCache | None = None, instance_decoder: nn.Module | None = None):
        self.model, self.spec, self.device, self.samples = model, spec, device, samples
        self.prompts, self.metric, self.dist, self.cache = prompts, metric, dist, cache
        self.instance_decoder = instance_decoder

    @property
    def mode(self) -> str:
        """Whether a better metric is larger (validation IoU) or smaller (the training loss, without a set)."""
        return "max" if self.samples else "min"

    def __call__(self) -> dict | None:
        if not self.samples:
            return None
        record = None
        if self.dist.main:
            t0 = time.perf_counter()
            backend = _ValBackend(self.model, self.spec, self.device, self.cache, self.instance_decoder)
            try:
                results = evaluate(backend, self.samples, self.prompts)
                if self.instance_decoder is not None:
                    results["instance"] = _instance_figures(backend, self.samples)
            finally:
                set_train_mode(self.model, self.instance_decoder)
            vals = [results[k]["mean_iou"] for k in self.prompts]
            if self.metric == "instance":
                metric = results["instance"]["msa"]
            else:
                metric = results[self.metric]["mean_iou"] if self.metric != "mean" else float(np.mean(vals))
            record = {"val": results, "val_metric": metric, "val_seconds": round(time.perf_counter() - t0, 2)}
        return self.dist.broadcast(record)


def _instance_figures(backend, samples) -> dict:
    """Automatic segmentation with the instance decoder (default post-processing), without the per-image list."""
    res = evaluate_instances(backend, samples, AutoOptions(method="instance"))
    keys = ("msa", "f1", "precision", "recall", "mean_iou", "objects_pred", "objects_true")
    return {k: res[k] for k in keys}
