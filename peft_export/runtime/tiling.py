"""Tiles with halos over large images (torch-free geometry): where each tile sits, which tile a prompt goes to,
and how per-tile outputs are stitched back.

A tile is a square *window* of ``tile`` pixels (of the image after ``scale``) fed to the encoder at native
resolution (every window is resized by the same factor ``img_size / tile``: 1 when the tile is the model input
size; windows smaller than a tile at the image's border are zero-padded, never stretched). Windows overlap by at
least ``2 * halo`` pixels; each owns a *core*: the windows' cores partition the image, and every core boundary
lies at least ``halo`` pixels inside both windows that meet there, so whatever a core holds is seen with
``halo`` pixels of context. Prompts go to the tile whose core holds them; per-tile maps are stitched from the
cores (or blended across the overlap).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import ConfigDict, model_validator

from peft_export.errors import DataError, UsageError
from peft_export.options import Options, option

HALO_DIVISOR = 8  # default halo: tile // 8 (a core of 3/4 of the tile; 32 px for LiteMedSAM, 128 px for SAM)
MIN_TILE = 16


class Tiling(Options):
    """How ``Segmenter.set_image`` embeds an image (the tiling option family of predict, evaluate, embed).

    ``mode``: ``auto`` tiles when the (scaled) image is larger than ``tile`` (default: the model input size) in
    either direction, ``on`` always tiles (an explicit ``--tile`` turns it on), ``off`` resizes the whole image to
    the model input (``--no-tile``). ``halo``: default ``tile // 8``. ``scale``: the image is resized by this
    factor before tiling (e.g. 0.5 for objects twice as large as the model was trained on).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    family = "tiling"
    panel = "Tiling"

    tile: int | None = option(None, "Tile size in pixels (of the image after --scale). Images larger than it are "
                              "embedded tile by tile at native resolution.",
                              default_text="the model input: 256 LiteMedSAM, 1024 SAM")
    halo: int | None = option(None, "Context added on each side of a tile's core, in pixels. Needs tile > 2 x halo.",
                              default_text="tile / 8")
    scale: float = option(1.0, "Resize images by this factor before tiling (e.g. 0.5 when objects are twice the "
                          "trained size).", gt=0, le=16, allow_inf_nan=False)
    no_tile: bool = option(False, "Resize the whole image to the model input instead of tiling.", cli="--no-tile")
    mode: Literal["auto", "on", "off"] = option("auto", "auto, on or off (see the class docstring).", cli=False)

    @model_validator(mode="after")
    def _mode(self):
        if self.halo is not None and self.halo < 0:
            raise ValueError(f"--halo must be >= 0, got {self.halo}")
        if self.tile is not None:  # one line per mistake, saying what to change (the halo's default: tile / 8)
            check_tile(self.tile, self.halo if self.halo is not None else self.tile // HALO_DIVISOR)
        if self.no_tile:
            if self.tile is not None or self.halo is not None or self.scale != 1.0:
                raise ValueError("--no-tile resizes the whole image to the model input: drop --tile/--halo/--scale")
            object.__setattr__(self, "mode", "off")
        elif self.tile is not None and self.mode == "auto":
            object.__setattr__(self, "mode", "on")  # an explicit tile size turns tiling on
        return self

    @classmethod
    def from_options(cls, tile: int | None = None, halo: int | None = None, scale: float | None = None,
                     no_tile: bool = False) -> Tiling:
        """The CLI's ``--tile/--halo/--scale/--no-tile``."""
        return cls.parse(tile=tile, halo=halo, scale=scale, no_tile=no_tile or None)

    def sizes(self, img_size: int | None = None) -> tuple[int, int] | None:
        """(tile, halo) after defaults (None without ``img_size`` when no tile was given); UsageError if bad."""
        tile = self.tile if self.tile is not None else img_size
        if tile is None:
            return None
        halo = self.halo if self.halo is not None else tile // HALO_DIVISOR
        check_tile(int(tile), int(halo))
        return int(tile), int(halo)


def check_tile(tile: int, halo: int) -> None:
    """A tile needs a core of its own: tile > 2 * halo (one line per mistake)."""
    if tile < MIN_TILE:
        raise UsageError(f"--tile {tile} is too small: use at least {MIN_TILE} pixels (the model input size is the "
                         "natural choice)")
    if halo < 0:
        raise UsageError(f"--halo must be >= 0, got {halo}")
    if halo >= tile:
        raise UsageError(f"--halo {halo} is larger than the tile ({tile} px): the halo is the context added on each "
                         f"side of a tile's core; use a halo below {tile // 2}")
    if tile <= 2 * halo:
        raise UsageError(f"--tile {tile} is smaller than twice the halo (2 x {halo} = {2 * halo}): every tile needs a "
                         f"core besides its two halos; use --tile > {2 * halo} or --halo < {(tile + 1) // 2}")


def axis_windows(length: int, tile: int, halo: int) -> list[tuple[int, int, int, int]]:
    """Windows and cores along one axis: [(w0, w1, c0, c1)], windows of ``tile`` pixels spread evenly (the last one
    ends at the border), cores split each overlap in the middle; a short axis is one window."""
    if length <= tile:
        return [(0, length, 0, length)]
    core = tile - 2 * halo
    n = 1 + math.ceil((length - tile) / core)
    starts = [round(i * (length - tile) / (n - 1)) for i in range(n)]
    bounds = [0] + [s + (p + tile - s + 1) // 2 for p, s in itertools.pairwise(starts)] + [length]
    return [(s, s + tile, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)]


@dataclass(frozen=True)
class Tile:
    index: int
    window: tuple[int, int, int, int]  # y0, y1, x0, x1 in pixels of the (scaled) image
    core: tuple[int, int, int, int]

    @property
    def hw(self) -> tuple[int, int]:
        y0, y1, x0, x1 = self.window
        return y1 - y0, x1 - x0

    @property
    def slices(self) -> tuple[slice, slice]:
        y0, y1, x0, x1 = self.window
        return slice(y0, y1), slice(x0, x1)

    @property
    def core_in_window(self) -> tuple[slice, slice]:
        (y0, _, x0, _), (cy0, cy1, cx0, cx1) = self.window, self.core
        return slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0)


@dataclass(frozen=True)
class TileGrid:
    shape: tuple[int, int]  # (H, W) of the (scaled) image
    tile: int
    halo: int
    rows: tuple[tuple[int, int, int, int], ...]
    cols: tuple[tuple[int, int, int, int], ...]

    @classmethod
    def build(cls, shape: tuple[int, int], tile: int, halo: int) -> TileGrid:
        check_tile(tile, halo)
        h, w = (int(v) for v in shape)
        return cls((h, w), tile, halo, tuple(axis_windows(h, tile, halo)), tuple(axis_windows(w, tile, halo)))

    @classmethod
    def whole(cls, shape: tuple[int, int]) -> TileGrid:
        """One window: the whole image (untiled)."""
        h, w = (int(v) for v in shape)
        return cls((h, w), max(h, w), 0, ((0, h, 0, h),), ((0, w, 0, w),))

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def tiles(self) -> list[Tile]:
        return [Tile(r * len(self.cols) + c, (ry[0], ry[1], cx[0], cx[1]), (ry[2], ry[3], cx[2], cx[3]))
                for r, ry in enumerate(self.rows) for c, cx in enumerate(self.cols)]

    def windows(self) -> np.ndarray:
        """(n, 4) y0, y1, x0, x1 of every window."""
        return np.array([t.window for t in self.tiles], np.float64).reshape(-1, 4)

    def core_index(self, y, x) -> np.ndarray:
        """The tile whose core holds each (y, x) point (pixel coordinates; clipped to the image)."""
        y = np.clip(np.asarray(y, np.float64), 0, self.shape[0] - 1e-6)
        x = np.clip(np.asarray(x, np.float64), 0, self.shape[1] - 1e-6)
        r = np.searchsorted([c[3] for c in self.rows], y, side="right")
        c = np.searchsorted([c[3] for c in self.cols], x, side="right")
        return (np.minimum(r, len(self.rows) - 1) * len(self.cols) + np.minimum(c, len(self.cols) - 1)).astype(int)

    def route(self, extents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tile per prompt from its extent (N, 4) y0, x0, y1, x1: the tile whose core holds the extent's centre
        when its window holds the whole extent, else the window that holds it with the widest margin; (tile
        index (N,), whether the extent fits in that window (N,))."""
        e = np.asarray(extents, np.float64).reshape(-1, 4)
        idx = self.core_index((e[:, 0] + e[:, 2]) / 2, (e[:, 1] + e[:, 3]) / 2)
        win = self.windows()
        margin = np.minimum.reduce([e[:, None, 0] - win[None, :, 0], win[None, :, 1] - e[:, None, 2],
                                    e[:, None, 1] - win[None, :, 2], win[None, :, 3] - e[:, None, 3]])
        fits = margin >= 0
        own = fits[np.arange(len(e)), idx]
        best = np.argmax(margin, axis=1)
        idx = np.where(own, idx, np.where(fits[np.arange(len(e)), best], best, idx))
        return idx, fits[np.arange(len(e)), idx]

    def interior_edges(self, tile: Tile) -> tuple[bool, bool, bool, bool]:
        """Which window edges (top, bottom, left, right) lie inside the image: objects touching them are cut."""
        y0, y1, x0, x1 = tile.window
        return y0 > 0, y1 < self.shape[0], x0 > 0, x1 < self.shape[1]


def check_prompts_inside(extents: np.ndarray, shape: tuple[int, int], what: str, tiled: bool) -> None:
    """Prompts (N, 4) y0, x0, y1, x1 must lie inside the image (inside some tile)."""
    e = np.asarray(extents, np.float64).reshape(-1, 4)
    h, w = shape
    bad = (e[:, 0] < 0) | (e[:, 1] < 0) | (e[:, 2] > h) | (e[:, 3] > w)
    if bad.any():
        y0, x0, y1, x1 = e[np.argmax(bad)]
        where = f"({x0:g}, {y0:g})" if (y0, x0) == (y1, x1) else f"({x0:g}, {y0:g}, {x1:g}, {y1:g})"
        place = "outside every tile of" if tiled else "outside"
        raise DataError(f"{what} {where} lies {place} the {w}x{h} image")


# ---- stitching per-tile maps -------------------------------------------------------------------------

BLENDS = ("core", "linear")


def _ramp(length: int, ramp: int, low_edge: bool, high_edge: bool) -> np.ndarray:
    """1D weights: rising linearly over ``ramp`` pixels from each interior edge of a window, 1 elsewhere."""
    w = np.ones(length, np.float32)
    pos = np.arange(length, dtype=np.float32)
    if ramp > 0 and low_edge:
        w = np.minimum(w, (pos + 0.5) / ramp)
    if ramp > 0 and high_edge:
        w = np.minimum(w, (length - pos - 0.5) / ramp)
    return np.clip(w, 1e-3, 1)


def blend_weights(grid: TileGrid, tile: Tile) -> np.ndarray:
    """(h, w) weights of a window for ``linear`` blending: a ramp of ``2 * halo`` pixels from interior edges."""
    top, bottom, left, right = grid.interior_edges(tile)
    h, w = tile.hw
    ramp = 2 * grid.halo
    return _ramp(h, ramp, top, bottom)[:, None] * _ramp(w, ramp, left, right)[None, :]


class Stitcher:
    """Accumulates per-tile maps (K, h, w) at window size into one (K, H, W) image.

    ``core``: every pixel comes from the one tile whose core holds it (a hard seam in the middle of each overlap);
    ``linear``: a weighted mean over the tiles that see the pixel, weights ramping across the overlap."""

    def __init__(self, grid: TileGrid, channels: int, blend: str = "core"):
        if blend not in BLENDS:
            raise UsageError(f"unknown blend {blend!r}; choose {', '.join(BLENDS)}")
        self.grid, self.blend = grid, blend
        self.out = np.zeros((channels, *grid.shape), np.float32)
        self.weight = np.zeros(grid.shape, np.float32) if blend == "linear" else None

    def add(self, tile: Tile, maps: np.ndarray) -> None:
        maps = np.asarray(maps, np.float32)
        if maps.shape[-2:] != tile.hw:
            raise ValueError(f"tile {tile.index}: map of shape {maps.shape[-2:]} for a window of {tile.hw}")
        if self.blend == "core":
            ys, xs = tile.core_in_window
            cy0, cy1, cx0, cx1 = tile.core
            self.out[:, cy0:cy1, cx0:cx1] = maps[:, ys, xs]
            return
        wgt = blend_weights(self.grid, tile)
        sy, sx = tile.slices
        self.out[:, sy, sx] += maps * wgt
        self.weight[sy, sx] += wgt

    def result(self) -> np.ndarray:
        if self.weight is not None:
            return self.out / np.maximum(self.weight, 1e-6)
        return self.out
