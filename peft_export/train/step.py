"""One training step: the forward pass with its losses (:class:`StepModule`) and the update (:class:`TrainStep`).

The step module returns the total loss and a dict of its named terms, so another loss (a jointly trained
decoder) is one more entry, reported per epoch as ``train_<term>`` without further changes. The instance decoder
(micro-sam's AIS) adds ``instance_loss``: it runs on the same image embedding, one image at a time (its BatchNorm
statistics are then those of one image however the batch is split over DDP ranks).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from peft_export.models.devices import autocast, autocast_tag
from peft_export.models.prompt_decoder import PromptDecoder
from peft_export.train.distributed import Dist
from peft_export.train.instance import instance_loss, instance_targets
from peft_export.train.recipe import RecipeSettings, image_loss
from peft_export.train.trunk import TrunkCache


class StepModule(nn.Module):
    """One training step's forward pass (encoder + interactive decoding) -> (total loss, {term: value}, objects).

    Wrapped in DistributedDataParallel when distributed; the loss of each image is weighted by
    ``1 / global_batch``, so the sum over ranks is the single-process mean.
    """

    def __init__(self, model: nn.Module, settings: RecipeSettings, instance_decoder: nn.Module | None = None,
                 *, instance_only: bool = False, prompt_losses: bool | None = None):
        super().__init__()
        self.model = model
        self.settings = settings
        self.instance_decoder = instance_decoder  # registered: DDP averages its gradients too
        self.instance_only = instance_only  # SAM's encoder frozen: the embedding without autograd
        # the interactive recipe's losses: always with a trained encoder; with a frozen one only when the prompt
        # decoder trains (--prompt-decoder)
        self.prompt_losses = not instance_only if prompt_losses is None else prompt_losses
        self._aux = {"decoder": PromptDecoder(model), "cache": None}  # not registered: shares model params

    def set_cache(self, cache: TrunkCache | None) -> None:
        self._aux["cache"] = cache

    def embed(self, xs: list[np.ndarray], device: torch.device) -> torch.Tensor:
        cache = self._aux["cache"]
        if cache is not None:
            return cache.encode(xs, device, tag=autocast_tag(device))
        x = torch.from_numpy(np.stack(xs)).to(device)
        return self.model.image_encoder(x)

    def forward(self, views, kind: str, rngs, weight: float):
        device = next(self.model.parameters()).device
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.instance_only):
            emb = self.embed([v.tensor for v in views], device)
        total = emb.new_zeros((), dtype=torch.float32)
        terms: dict[str, float] = {}
        objects = 0
        if self.prompt_losses:
            terms = {"mask_loss": 0.0, "iou_loss": 0.0}
            for i, (view, rng) in enumerate(zip(views, rngs)):
                res = image_loss(self._aux["decoder"], emb[i: i + 1], view, kind, self.settings, rng)
                total = total + res.loss * weight
                terms["mask_loss"] += res.mask_loss * weight
                terms["iou_loss"] += res.iou_loss * weight
                objects += res.objects
        if self.instance_decoder is not None:
            terms["instance_loss"] = 0.0
            for i, view in enumerate(views):
                loss = self.view_instance_loss(emb[i: i + 1], view)
                total = total + loss * weight
                terms["instance_loss"] += float(loss.detach()) * weight
                if not self.prompt_losses:
                    objects += len(view.ids)
        return total, terms, objects

    def view_instance_loss(self, embedding: torch.Tensor, view) -> torch.Tensor:
        """micro-sam's instance loss of one view: the decoder's maps inside the image area vs its distance targets."""
        rh, rw = view.resized_hw
        maps = self.instance_decoder(embedding)[0, :, :rh, :rw].float()
        target = torch.from_numpy(instance_targets(view.labels, view.ids)).to(maps.device)
        return instance_loss(maps, target)


class StepResult(NamedTuple):
    """A step's figures, summed over the ranks."""

    loss: float
    terms: dict[str, float]
    objects: int


class NonFiniteLoss(Exception):
    def __init__(self, value: float):
        super().__init__(str(value))
        self.value = value


class TrainStep:
    """zero_grad -> forward (autocast) -> one agreed loss over the ranks (NaN: :class:`NonFiniteLoss` before any
    update) -> backward (GradScaler for fp16) -> optimizer step. ``in_update`` is True while parameters change."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, *, precision: str, batch_size: int,
                 dist: Dist):
        self.module = module  # the StepModule, or its DDP wrapper
        self.optimizer = optimizer
        self.precision = precision
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.batch_size = batch_size
        self.dist = dist
        self.in_update = False

    def __call__(self, views, kind: str, rngs) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.precision):
            loss, terms, objects = self.module(views, kind, rngs, 1.0 / self.batch_size)
        # one agreed value on all ranks (a NaN anywhere stops everyone before the update)
        total, *sums, n_obj = self.dist.all_reduce_sum([float(loss.detach()), *terms.values(), objects])
        if not math.isfinite(total):
            raise NonFiniteLoss(total)
        self.in_update = True
        if self.dist.active:
            # DDP averages gradients over the ranks; each rank's loss holds its images weighted by
            # 1 / global batch, so scaling by the world size makes the average the single-process gradient
            loss = loss * self.dist.world
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.in_update = False
        return StepResult(total, dict(zip(terms, sums)), int(n_obj))
