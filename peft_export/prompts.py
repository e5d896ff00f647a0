"""Prompts in Meta's SAM convention, in numpy (torch-free; training, export checks, runtime and benchmarks).

``point_coords`` (B, N, 2) in model-input pixels, ``point_labels`` (B, N): 1 = positive point, 0 = negative,
2 / 3 = top-left / bottom-right box corner, -1 = padding. A prompt without a box gets one padding point (0, 0)/-1
appended, exactly as segment_anything's ``PromptEncoder`` does for points-only prompts.
"""

from __future__ import annotations

import numpy as np

BOX_LABELS = (2.0, 3.0)


def box_prompts(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (B, 4) x0, y0, x1, y1 -> corner points (B, 2, 2) with labels 2, 3."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return boxes.reshape(-1, 2, 2), np.tile(np.array([BOX_LABELS], np.float32), (len(boxes), 1))


def pad_points(coords: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Append SAM's padding point (0, 0)/-1 to point-only prompts (B, N, 2)/(B, N)."""
    coords = np.asarray(coords, np.float32)
    labels = np.asarray(labels, np.float32)
    b = coords.shape[0]
    return (np.concatenate([coords, np.zeros((b, 1, 2), np.float32)], axis=1),
            np.concatenate([labels, -np.ones((b, 1), np.float32)], axis=1))


def sample_prompts(resized_hw: tuple[int, int], n_points: int, count: int, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` reproducible prompts of ``n_points`` each, spread over an image of ``resized_hw`` (model-input
    pixels): a box (labels 2, 3) plus random positive/negative points when ``n_points >= 2``; else single positive
    points. Used by the merge check, the export parity gate and the engine comparison."""
    h, w = resized_hw
    rng = np.random.default_rng(seed)
    coords = np.zeros((count, n_points, 2), np.float32)
    labels = np.zeros((count, n_points), np.float32)
    for i in range(count):
        k = 0
        if n_points >= 2:
            x0, y0 = rng.uniform(0.05, 0.6) * w, rng.uniform(0.05, 0.6) * h
            x1, y1 = x0 + rng.uniform(0.1, 0.35) * w, y0 + rng.uniform(0.1, 0.35) * h
            coords[i, :2] = [[x0, y0], [min(x1, w - 1), min(y1, h - 1)]]
            labels[i, :2] = BOX_LABELS
            k = 2
        coords[i, k:] = rng.uniform(0.05, 0.95, (n_points - k, 2)) * [w, h]
        labels[i, k:] = 1 if k == 0 else rng.integers(0, 2, n_points - k)
    return coords, labels
