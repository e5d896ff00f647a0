"""The study's interactive training step (micro-sam's ``SamTrainer``), one image at a time.

For one image with its embedding: sample up to ``objects_per_image`` objects; the first prompt is one positive
point per object or its box (:func:`prompt_kind`: the study alternates, even iterations points, odd iterations boxes;
``point_fraction`` sets another share); the point is a random pixel of the object (the study) or of its inner core
(``point_sampling="central"``: where APG's seeds put their points); then ``sub_iterations`` rounds of:
decode -> loss -> pick the best mask per object by predicted IoU -> add one positive point sampled from its
false-negative pixels and one negative point from its false-positive pixels (fallbacks as micro-sam: the
correct foreground / a ring inside the dilated box / the background) -> with probability ``mask_prob`` feed the
best mask's low-resolution logits back as ``mask_input``.

Loss per sub-iteration: Dice of the sigmoid masks (the best of the multimask outputs when those are used)
plus the MSE between predicted and true IoU (prediction binarised at 0.5), averaged over objects; the image
loss averages the sub-iterations. Masks are compared at model-input resolution inside the image area (the
padding is cropped away, as SAM's ``postprocess_masks`` does).

Multimask: the study predicts 3 masks for the first point prompt. ``multimask=False`` (LiteMedSAM: its
multimask outputs were never trained and the runtime uses the single-mask output) trains the single-mask
output for every prompt instead, so training optimises the output that evaluation and deployment use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from peft_export.models.prompt_decoder import PromptDecoder
from peft_export.prompts import box_prompts, pad_points
from peft_export.train.data import View

DICE_EPS = 1e-7
BOX_RING = 3  # micro-sam's dilation of the box when looking for a negative point


@dataclass
class RecipeSettings:
    objects_per_image: int = 25
    sub_iterations: int = 8
    mask_prob: float = 0.5
    multimask: bool = True
    point_sampling: str = "random"  # random (the study) or central


CORE = 0.5  # "central" first points: pixels at least this fraction of the object's largest border distance inside


def prompt_kind(iteration: int, point_fraction: float = 0.5) -> str:
    """The first prompt of ``iteration``: ``"point"`` (one per object) or ``"box"``, boxes spread evenly at a share
    of ``1 - point_fraction``; 0.5 is the study's alternation (even iterations points, odd iterations boxes)."""
    box = 1.0 - point_fraction
    return "box" if int((iteration + 1) * box + 1e-9) > int(iteration * box + 1e-9) else "point"


def dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - Dice per (object, output): ``prob``/``target`` (P, M, H, W) -> (P, M) (torch-em's squared form)."""
    num = (prob * target).sum(dim=(-2, -1))
    den = (prob * prob).sum(dim=(-2, -1)) + (target * target).sum(dim=(-2, -1))
    return 1.0 - 2.0 * num / den.clamp(min=DICE_EPS)


def _sample_pixel(region: np.ndarray, rng: np.random.Generator) -> tuple[int, int] | None:
    idx = np.flatnonzero(region)
    if idx.size == 0:
        return None
    i = int(idx[rng.integers(idx.size)])
    return i % region.shape[1], i // region.shape[1]  # (x, y)


def _ring(target: np.ndarray, box: np.ndarray) -> np.ndarray:
    h, w = target.shape
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    m = np.zeros_like(target)
    m[max(y0 - BOX_RING, 0): min(y1 + BOX_RING, h), max(x0 - BOX_RING, 0): min(x1 + BOX_RING, w)] = True
    return m & ~target


def corrective_points(pred: np.ndarray, target: np.ndarray, boxes: np.ndarray,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One positive (false-negative pixel) and one negative (false-positive pixel) point per object.

    ``pred``/``target`` (P, H, W) bool. Returns coords (P, 2, 2) (x, y in model pixels) and labels (P, 2).
    """
    coords = np.zeros((len(pred), 2, 2), np.float32)
    for n, (p, t) in enumerate(zip(pred, target)):
        pos = _sample_pixel(t & ~p, rng)
        if pos is None:
            pos = _sample_pixel(t & p, rng) or _sample_pixel(t, rng) or (0, 0)
        neg = _sample_pixel(p & ~t, rng)
        if neg is None:
            neg = _sample_pixel(_ring(t, boxes[n]), rng) or _sample_pixel(~t, rng) or (0, 0)
        coords[n, 0] = pos
        coords[n, 1] = neg
    labels = np.tile(np.array([[1.0, 0.0]], np.float32), (len(pred), 1))
    return coords, labels


@dataclass
class ImageLoss:
    loss: torch.Tensor
    mask_loss: float
    iou_loss: float
    objects: int


def inner_core(target: np.ndarray) -> np.ndarray:
    """The pixels of a (H, W) bool object whose distance to its border is at least ``CORE`` of the largest."""
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(np.pad(target, 1))[1:-1, 1:-1]
    return dist >= CORE * dist.max()


def _first_prompts(kind: str, boxes: np.ndarray, target: np.ndarray, rng: np.random.Generator,
                   sampling: str = "random") -> tuple[np.ndarray, np.ndarray]:
    """Each object's box (``kind == "box"``) or one positive point, a random pixel of the object (``sampling``
    "random") or of its :func:`inner_core` ("central"): coords (P, n, 2), labels (P, n)."""
    p = len(boxes)
    if kind == "box":
        return box_prompts(boxes)
    coords = np.zeros((p, 1, 2), np.float32)
    for n in range(p):
        coords[n, 0] = _sample_pixel(inner_core(target[n]) if sampling == "central" else target[n], rng)
    return coords, np.ones((p, 1), np.float32)


def _round_losses(up: torch.Tensor, ious: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice (best of the outputs) and the MSE of the predicted IoU, for one round's upscaled logits (P, M, H, W)."""
    prob = torch.sigmoid(up)
    t = target[:, None].expand_as(prob)
    mask_loss = dice_loss(prob, t).min(dim=1).values.mean()  # dice (P, M): the best output per object
    with torch.no_grad():
        binar = prob > 0.5
        inter = (binar & (t > 0)).sum(dim=(-2, -1)).float()
        union = (binar | (t > 0)).sum(dim=(-2, -1)).float()
        true_iou = inter / (union + DICE_EPS)
    return mask_loss, F.mse_loss(ious, true_iou)


def image_loss(decoder: PromptDecoder, embedding: torch.Tensor, view: View, kind: str,
               settings: RecipeSettings, rng: np.random.Generator) -> ImageLoss:
    """The interactive loss of one image. ``embedding`` (1, C, h, w) keeps its autograd graph."""
    device = embedding.device
    n_avail = len(view.ids)
    choose = rng.choice(n_avail, size=min(settings.objects_per_image, n_avail), replace=False)
    choose = np.sort(choose)
    ids = view.ids[choose]
    boxes = view.boxes[choose]
    rh, rw = view.resized_hw
    target_np = view.labels[None] == ids[:, None, None]  # (P, rh, rw)
    target = torch.from_numpy(target_np).to(device=device, dtype=torch.float32)
    p = len(ids)
    base_c, base_l = _first_prompts(kind, boxes, target_np, rng, settings.point_sampling)
    extra_c = np.zeros((p, 0, 2), np.float32)
    extra_l = np.zeros((p, 0), np.float32)

    s = decoder.img_size
    lh, lw = 4 * embedding.shape[-2], 4 * embedding.shape[-1]
    mask_in = torch.zeros((p, 1, lh, lw), device=device)
    has_mask = torch.zeros(p, device=device)
    total = embedding.new_zeros((), dtype=torch.float32)
    mask_sum = iou_sum = 0.0
    k_total = settings.sub_iterations
    for k in range(k_total):
        coords = np.concatenate([base_c, extra_c], axis=1)
        labels = np.concatenate([base_l, extra_l], axis=1)
        if kind == "point":  # points-only prompts carry SAM's padding point
            coords, labels = pad_points(coords, labels)
        masks, iou_pred = decoder(embedding, torch.from_numpy(coords).to(device),
                                  torch.from_numpy(labels).to(device), mask_in, has_mask)
        multi = settings.multimask and k == 0 and kind == "point"
        sel = slice(1, 4) if multi else slice(0, 1)
        logits = masks[:, sel].float()
        ious = iou_pred[:, sel].float()
        up = logits if (lh, lw) == (s, s) else F.interpolate(logits, (s, s), mode="bilinear", align_corners=False)
        up = up[..., :rh, :rw]
        mask_loss, iou_loss = _round_losses(up, ious, target)
        total = total + mask_loss + iou_loss
        mask_sum += float(mask_loss.detach())
        iou_sum += float(iou_loss.detach())
        if k < k_total - 1:
            with torch.no_grad():
                best = ious.argmax(dim=1)
                idx = torch.arange(p, device=device)
                best_up = (up[idx, best] > 0).cpu().numpy()
                best_logits = logits[idx, best][:, None].detach()
            new_c, new_l = corrective_points(best_up, target_np, boxes, rng)
            extra_c = np.concatenate([extra_c, new_c], axis=1)
            extra_l = np.concatenate([extra_l, new_l], axis=1)
            if settings.mask_prob > 0 and rng.random() < settings.mask_prob:
                mask_in, has_mask = best_logits.to(mask_in.dtype), torch.ones(p, device=device)
            else:
                mask_in, has_mask = torch.zeros((p, 1, lh, lw), device=device), torch.zeros(p, device=device)
    return ImageLoss(total / k_total, mask_sum / k_total, iou_sum / k_total, p)
