"""``Segmenter.on_tiles`` as the napari widget uses it: its progress bar follows the tiles, and its Cancel button
raises from the callback, which must stop the embedding without caching anything and leave the segmenter usable.
(Counting tiles for the CLI's progress rows: tests/test_safety.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import disk_image


class Stop(Exception):
    pass


def tiled_image() -> np.ndarray:
    img, _ = disk_image(np.random.default_rng(2), size=128, n=6)
    return np.pad(img, ((0, 172), (0, 140)), mode="reflect")  # 300 x 268: tiles of vit_tiny's 256


def test_a_tile_callback_error_stops_embedding_and_writes_no_cache_entry(tiny_export, tmp_path):
    from peft_export.runtime.segmenter import Segmenter

    image = tiled_image()
    seg = Segmenter(tiny_export.out_dir, cache=tmp_path / "cache", batch_size=1)
    seen: list[tuple[int, int]] = []

    def stop_at_second(k, n):
        seen.append((k, n))
        if len(seen) == 2:
            raise Stop

    seg.on_tiles = stop_at_second
    with pytest.raises(Stop):
        seg.set_image(image)
    assert len(seen) == 2 and seen[0][1] > 2 and not list((tmp_path / "cache").glob("*.npy"))

    calls: list[tuple[int, int]] = []
    seg.on_tiles = lambda k, n: calls.append((k, n))
    plan = seg.set_image(image)
    n = len(plan.grid)
    assert sum(k for k, _ in calls) == n and {m for _, m in calls} == {n} and not seg.cache_hit
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1

    ref = Segmenter(tiny_export.out_dir, batch_size=1)  # the interrupted segmenter embeds as a fresh one does
    ref.set_image(image)
    assert np.array_equal(seg.tile_embeddings(range(n)), ref.tile_embeddings(range(n)))

    calls.clear()
    seg.set_image(image)
    assert seg.cache_hit and calls == []  # a cache hit embeds nothing (the widget shows the bar full after it)
