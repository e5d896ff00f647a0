"""Overlay pictures of instance labels on the image (numpy + Pillow, torch-free)."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np

from peft_export.data.io import atomic_write
from peft_export.imaging import as_rgb


def label_colors(n: int, seed: int = 0) -> np.ndarray:
    """n distinct bright colours (uint8, (n, 3)), deterministic: golden-ratio steps around the hue circle."""
    start = np.random.default_rng(seed).random()
    rgb = [colorsys.hsv_to_rgb((start + k * 0.618033988749895) % 1.0, 0.75, 1.0) for k in range(n)]
    return (np.asarray(rgb, float).reshape(n, 3) * 255).astype(np.uint8)


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 picture: the image (min-max scaled), objects tinted, object borders drawn white."""
    rgb = as_rgb(image)
    lo, hi = float(rgb.min()), float(rgb.max())
    base = ((rgb - lo) * (255.0 / max(hi - lo, 1e-8))).astype(np.float32)
    labels = np.asarray(labels)
    n = int(labels.max(initial=0))
    colors = np.vstack([np.zeros((1, 3), np.uint8), label_colors(n)]).astype(np.float32)
    tint = colors[labels]
    fg = labels > 0
    out = base.copy()
    out[fg] = (1 - alpha) * base[fg] + alpha * tint[fg]
    edge = np.zeros_like(fg)
    dy = labels[:-1] != labels[1:]
    dx = labels[:, :-1] != labels[:, 1:]
    edge[:-1] |= dy
    edge[1:] |= dy
    edge[:, :-1] |= dx
    edge[:, 1:] |= dx
    edge &= fg
    out[edge] = 255
    return np.clip(out, 0, 255).astype(np.uint8)


def write_overlay(path: str | Path, image: np.ndarray, labels: np.ndarray) -> Path:
    from PIL import Image

    pic = overlay(image, labels)
    return atomic_write(path, lambda tmp: Image.fromarray(pic).save(tmp, format="PNG"))
