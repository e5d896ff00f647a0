"""Segmentation metrics in numpy (torch-free): per-object IoU and mean segmentation accuracy (mSA)."""

from __future__ import annotations

import numpy as np

MSA_THRESHOLDS = tuple(np.round(np.arange(0.5, 1.0, 0.05), 2).tolist())


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks (1.0 when both are empty)."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def mask_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of two stacks of boolean masks, one value per leading index (1.0 where both masks are empty)."""
    a = np.asarray(a, bool).reshape(len(a), -1)
    b = np.asarray(b, bool).reshape(len(b), -1)
    inter = (a & b).sum(1)
    union = (a | b).sum(1)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def iou_matrix(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU between every predicted instance (rows) and every true instance (columns); 0 is background.

    Instance ids are taken in sorted order of their nonzero values in each image.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    p_ids, p_inv = np.unique(pred, return_inverse=True)
    g_ids, g_inv = np.unique(gt, return_inverse=True)
    counts = np.bincount(p_inv.ravel() * len(g_ids) + g_inv.ravel(), minlength=len(p_ids) * len(g_ids))
    counts = counts.reshape(len(p_ids), len(g_ids)).astype(np.float64)
    area_p = counts.sum(1, keepdims=True)
    area_g = counts.sum(0, keepdims=True)
    union = area_p + area_g - counts
    iou = np.divide(counts, union, out=np.zeros_like(counts), where=union > 0)
    keep_p = p_ids != 0
    keep_g = g_ids != 0
    return iou[np.ix_(keep_p, keep_g)]


def segmentation_accuracy(pred: np.ndarray, gt: np.ndarray, threshold: float) -> float:
    """SA(t) = TP / (TP + FP + FN) with instances matched at IoU > t (one-to-one for t >= 0.5)."""
    if threshold < 0.5:
        raise ValueError("matching is only unique for IoU thresholds >= 0.5")
    iou = iou_matrix(pred, gt)
    n_pred, n_gt = iou.shape
    if n_pred == 0 and n_gt == 0:
        return 1.0
    tp = int((iou > threshold).sum())
    fp = n_pred - tp
    fn = n_gt - tp
    return tp / (tp + fp + fn)


def mean_segmentation_accuracy(pred: np.ndarray, gt: np.ndarray,
                               thresholds: tuple[float, ...] = MSA_THRESHOLDS) -> float:
    """mSA: SA averaged over IoU thresholds 0.5, 0.55, …, 0.95 (as in the study and micro-sam)."""
    iou = iou_matrix(pred, gt)
    n_pred, n_gt = iou.shape
    if n_pred == 0 and n_gt == 0:
        return 1.0
    scores = []
    for t in thresholds:
        tp = int((iou > t).sum())
        scores.append(tp / (n_pred + n_gt - tp))
    return float(np.mean(scores))


def masks_to_labels(masks: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
    """Paint boolean masks (N, H, W) into one label image (ids 1..N); higher-scoring masks win overlaps."""
    masks = np.asarray(masks, bool)
    n = masks.shape[0]
    labels = np.zeros(masks.shape[1:], np.int32)
    order = np.arange(n) if scores is None else np.argsort(np.asarray(scores), kind="stable")
    for i in order:  # low score first, so high scores are painted last and win
        labels[masks[i]] = i + 1
    return labels


# ---- instance segmentation without prompts (automatic segmentation) -------------------------------------------

def instance_scores(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> dict:
    """One image's automatic segmentation against its labels: mSA, and precision / recall / F1 of instances matched
    one-to-one at IoU > ``threshold`` (0.5: a match is unique), the object counts and each true object's best IoU
    (mean)."""
    iou = iou_matrix(pred, gt)
    n_pred, n_true = iou.shape
    tp = int((iou > threshold).sum())
    precision = tp / n_pred if n_pred else float(n_true == 0)
    recall = tp / n_true if n_true else float(n_pred == 0)
    f1 = 2 * tp / (n_pred + n_true) if n_pred + n_true else 1.0
    best = iou.max(axis=0) if n_pred else np.zeros(n_true)
    return {"msa": mean_segmentation_accuracy(pred, gt), "precision": precision, "recall": recall, "f1": f1,
            "tp": tp, "fp": n_pred - tp, "fn": n_true - tp, "objects_pred": n_pred, "objects_true": n_true,
            "mean_iou": float(best.mean()) if n_true else float("nan")}


def matched_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Object-matched IoU of two label images: each object's best IoU with the other's objects, averaged, the
    lower of both directions (1.0 when both are empty)."""
    iou = iou_matrix(a, b)
    if iou.size == 0:
        return 1.0 if iou.shape == (0, 0) else 0.0
    return float(min(iou.max(axis=1).mean(), iou.max(axis=0).mean()))


def merge_instance_scores(per_image: list[dict]) -> dict:
    """Over images: mSA and mean IoU averaged per image (as ``evaluate`` does), precision / recall / F1 from the
    summed matches, summed object counts."""
    if not per_image:
        return {"msa": float("nan"), "precision": float("nan"), "recall": float("nan"), "f1": float("nan"),
                "tp": 0, "fp": 0, "fn": 0, "objects_pred": 0, "objects_true": 0, "mean_iou": float("nan"), "images": 0}
    tp, fp, fn = (sum(r[k] for r in per_image) for k in ("tp", "fp", "fn"))
    n_pred, n_true = tp + fp, tp + fn
    return {"msa": float(np.mean([r["msa"] for r in per_image])),
            "precision": tp / n_pred if n_pred else float(n_true == 0),
            "recall": tp / n_true if n_true else float(n_pred == 0),
            "f1": 2 * tp / (n_pred + n_true) if n_pred + n_true else 1.0,
            "tp": tp, "fp": fp, "fn": fn, "objects_pred": n_pred, "objects_true": n_true,
            "mean_iou": float(np.nanmean([r["mean_iou"] for r in per_image])), "images": len(per_image)}
