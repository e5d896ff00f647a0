"""One image as the encoder sees it: whole (resized to the model input) or tiled at native resolution, its
tiles embedded in batches, optionally through an on-disk cache (torch-free).

Preprocessing matches :func:`peft_export.runtime.backend.prepare_input` exactly for an untiled image. For tiles:
the intensity scale that SAM models need (0-255; min-max for non-uint8 images) is computed once over the whole
image, so tiles keep one contrast; each window is then resized by the common factor ``img_size / tile`` and
normalised and padded like a whole image (LiteMedSAM's per-input min-max, as in training on patches).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from peft_export.errors import DataError
from peft_export.imaging import (
    ModelInput,
    PreprocessSpec,
    as_rgb,
    normalize_and_pad,
    resize_image,
    resize_labels,
    resized_shape,
    to_uint8_scale,
)
from peft_export.runtime.tiling import Tile, TileGrid, Tiling

log = logging.getLogger(__name__)


def embed_batched(backend, feeds: list[np.ndarray], batch_size: int,
                  progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Embed (1, 3, S, S) inputs (or baked uint8 images) in batches of at most ``batch_size``: (n, C, h, w);
    ``progress(k)`` after each call of k inputs."""
    limit = backend.info.encoder_batch
    step = max(1, batch_size if limit is None else min(batch_size, limit))
    out = []
    for s in range(0, len(feeds), step):
        chunk = feeds[s: s + step]
        out.append(backend.embed(chunk[0] if len(chunk) == 1 else np.concatenate(chunk)))
        if progress is not None:
            progress(len(chunk))
    return np.concatenate(out)


def image_digest(image: np.ndarray) -> str:
    """sha256 of an image's pixels, shape and dtype (what the embedding cache keys on)."""
    a = np.ascontiguousarray(image)
    h = hashlib.sha256(f"{a.shape}|{a.dtype.str}|".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


@dataclass
class ImagePlan:
    """The geometry of one image: its size, the scaled size, the tile grid and each tile's model-input geometry."""

    name: str
    original_hw: tuple[int, int]
    scaled_hw: tuple[int, int]
    tiled: bool
    grid: TileGrid
    geometry: list[ModelInput]  # per tile: window size -> resized size (tensor not kept)
    img_size: int
    recipe: dict = field(default_factory=dict)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (kind, message): results may be poor

    @property
    def tiles(self) -> list[Tile]:
        return self.grid.tiles

    @property
    def scale_xy(self) -> tuple[float, float]:
        """(x, y) factors from original to scaled pixels."""
        return self.scaled_hw[1] / self.original_hw[1], self.scaled_hw[0] / self.original_hw[0]

    def to_scaled(self, coords: np.ndarray) -> np.ndarray:
        """(…, 2) x/y original pixels -> scaled pixels."""
        c = np.asarray(coords, np.float32).copy()
        if self.scaled_hw != self.original_hw:
            sx, sy = self.scale_xy
            c[..., 0] *= sx
            c[..., 1] *= sy
        return c

    def to_original(self, labels: np.ndarray) -> np.ndarray:
        """A (…, Hs, Ws) label image or mask stack at the scaled size -> the original size (nearest neighbour)."""
        if self.scaled_hw == self.original_hw:
            return labels
        if labels.ndim == 2:
            return resize_labels(labels, self.original_hw)
        return np.stack([resize_labels(m, self.original_hw) for m in labels])

    def maps_to_original(self, maps: np.ndarray) -> np.ndarray:
        """(K, Hs, Ws) float maps -> (K, H, W) (bilinear)."""
        if self.scaled_hw == self.original_hw:
            return maps
        return resize_image(np.moveaxis(maps, 0, -1), self.original_hw).transpose(2, 0, 1).copy()

    def describe(self) -> dict:
        return {"tiled": self.tiled, "tiles": len(self.grid), "image": list(self.original_hw),
                "scaled": list(self.scaled_hw), **({"tile": self.grid.tile, "halo": self.grid.halo}
                                                     if self.tiled else {})}


def plan_image(shape_hw: tuple[int, int], img_size: int, tiling: Tiling, name: str = "image") -> ImagePlan:
    """Whether and how to tile an image of ``shape_hw`` for a model of input size ``img_size``."""
    tile, halo = tiling.sizes(img_size)
    h, w = (int(v) for v in shape_hw)
    scale = tiling.scale if tiling.mode != "off" else 1.0
    scaled = (h, w) if scale == 1.0 else (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
    tiled = tiling.mode == "on" or (tiling.mode == "auto" and max(scaled) > tile)
    if not tiled:
        scaled = (h, w)
        grid = TileGrid.whole((h, w))
        geometry = [ModelInput(np.empty(0, np.float32), (h, w), resized_shape(h, w, img_size), img_size)]
        recipe = {"tiled": False, "img_size": img_size}
    else:
        grid = TileGrid.build(scaled, tile, halo)
        f = img_size / tile
        geometry = [ModelInput(np.empty(0, np.float32), t.hw, (min(img_size, int(t.hw[0] * f + 0.5)),
                                                            min(img_size, int(t.hw[1] * f + 0.5))), img_size)
                    for t in grid.tiles]
        recipe = {"tiled": True, "tile": tile, "halo": halo, "scale": scale, "img_size": img_size}
    return ImagePlan(name, (h, w), scaled, tiled, grid, geometry, img_size, recipe,
                     _plan_warnings(name, (h, w), scaled, tiled, tile, img_size))


SMALL_FACTOR = 4  # an untiled image enlarged more than this many times is far smaller than the model input


def _plan_warnings(name, hw, scaled, tiled, tile, img_size) -> list[tuple[str, str]]:
    """Where the results will be poor: a tile larger than the image (the image is shrunk like a tile of that
    size), an image far smaller than the model input (enlarged many times)."""
    out = []
    if tiled and tile > max(scaled):
        f = img_size / tile
        out.append(("tile", f"{name}: the tile ({tile} px) is larger than the {scaled[1]}x{scaled[0]} image, so the "
                    f"image is resized by {f:.2g} like a tile of that size (objects {1 / f:.2g}x smaller than at "
                    f"native resolution); use --tile {img_size} (the model input) unless objects are that large"))
    if not tiled and max(hw) * SMALL_FACTOR < img_size:
        f = img_size / max(hw)
        out.append(("small", f"{name}: the {hw[1]}x{hw[0]} image is far smaller than the model input ({img_size} px)"
                    f" and is enlarged {f:.0f}x: objects look {f:.0f}x larger than the model saw in training; "
                    "results will be poor unless they are that small"))
    return out


class TileInputs:
    """Encoder inputs of an image's tiles, prepared on demand from the intensity-scaled (and scaled) image.

    Construction checks the image (2D grayscale/RGB, supported dtype, finite) and computes its intensity scale;
    ``bind(plan)`` applies the plan's scale; ``release()`` drops the image once every tile is embedded."""

    def __init__(self, image: np.ndarray, spec: PreprocessSpec, baked: bool, *, name: str = "image"):
        rgb = as_rgb(image, name=name)
        if spec.mode == "sam" or baked:
            rgb = to_uint8_scale(image, rgb)
        if baked:
            rgb = np.clip(np.round(rgb), 0, 255).astype(np.float32)
        self.rgb, self.spec, self.baked, self.plan = rgb, spec, baked, None

    def bind(self, plan: ImagePlan) -> None:
        if plan.scaled_hw != self.rgb.shape[:2]:
            self.rgb = resize_image(self.rgb, plan.scaled_hw)
            if self.baked:
                self.rgb = np.clip(np.round(self.rgb), 0, 255).astype(np.float32)
        self.plan = plan

    def release(self) -> None:
        self.rgb = None

    def __call__(self, i: int) -> np.ndarray:
        if self.rgb is None:
            raise RuntimeError("tile inputs were released (every tile is embedded already)")
        tile, geo = self.plan.tiles[i], self.plan.geometry[i]
        resized = resize_image(self.rgb[tile.slices], geo.resized_hw)
        if self.baked:
            return np.clip(np.round(resized), 0, 255).astype(np.uint8)
        return normalize_and_pad(resized, self.spec)


class TileEmbeddings:
    """The embeddings (n, C, h, w) of one image's tiles: all computed at once, or each the first time it is asked
    for; for a lazy image (``keep=False``) ``release`` forgets tiles that will not be needed again (memory of very
    large images)."""

    def __init__(self, backend, inputs: Callable[[int], np.ndarray], n: int, batch_size: int,
                 stored: np.ndarray | None = None, *, keep: bool = True,
                 on_tiles: Callable[[int, int], None] | None = None):
        self.backend, self.inputs, self.n, self.batch_size = backend, inputs, n, batch_size
        self.on_tiles = on_tiles  # on_tiles(k, n): k more of the image's n tiles embedded (progress)
        self.keep = keep  # False (lazy images): release() may forget tiles
        self._have: dict[int, np.ndarray] = {}
        self.stored = stored  # (n, C, h, w), e.g. memory-mapped from the cache
        self.computed = 0

    def get(self, idx) -> np.ndarray:
        """Embeddings of the tiles ``idx`` (k, C, h, w), computing the missing ones in batches."""
        idx = [int(i) for i in np.atleast_1d(idx)]
        if self.stored is not None:
            return np.asarray(self.stored[idx], np.float32)
        missing = [i for i in dict.fromkeys(idx) if i not in self._have]
        if missing:
            report = None if self.on_tiles is None else (lambda k: self.on_tiles(k, self.n))
            embs = embed_batched(self.backend, [self.inputs(i) for i in missing], self.batch_size, report)
            self._have.update(zip(missing, embs))
            self.computed += len(missing)
        return np.stack([self._have[i] for i in idx])

    def all(self) -> np.ndarray:
        if self.stored is not None:
            return self.stored
        return self.get(range(self.n))

    def release(self, idx) -> None:
        if self.keep:
            return
        for i in np.atleast_1d(idx):
            self._have.pop(int(i), None)


def recipe_key(digest: str, recipe: dict, identity: str) -> str:
    """A cache key: image content, how it was tiled, and the encoder that embedded it."""
    text = json.dumps({"image": digest, "recipe": recipe, "encoder": identity}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def check_stored(stored: np.ndarray, plan: ImagePlan, embedding: tuple[int, ...] | None) -> None:
    """A cached embedding must have one entry per tile of this plan (and the model's embedding shape)."""
    want_n = len(plan.grid)
    if stored.ndim != 4 or stored.shape[0] != want_n or (embedding and tuple(stored.shape[1:]) != tuple(embedding)):
        raise DataError(f"cached embedding of {plan.name} has shape {tuple(stored.shape)}, expected "
                        f"({want_n}, {', '.join(map(str, embedding or ('C', 'h', 'w')))}); delete the cache entry")
