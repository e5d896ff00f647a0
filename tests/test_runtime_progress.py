"""``Segmenter.set_image(progress=...)``: the hook the napari widget's progress bar and Cancel button use."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import disk_image


class Stop(Exception):
    pass


def tiled_image() -> np.ndarray:
    img, _ = disk_image(np.random.default_rng(2), size=128, n=6)
    return np.pad(img, ((0, 172), (0, 140)), mode="reflect")  # 300 x 268: tiles of vit_tiny's 256


@pytest.mark.parametrize("batch_size", [1, 3])
def test_progress_counts_every_tile_and_changes_nothing(tiny_export, batch_size):
    from peft_export.runtime.segmenter import Segmenter

    image = tiled_image()
    calls: list[int] = []
    seg = Segmenter(tiny_export.out_dir, batch_size=batch_size)
    plan = seg.set_image(image, progress=calls.append)
    ref = Segmenter(tiny_export.out_dir, batch_size=batch_size)
    ref.set_image(image)
    assert plan.tiled and sum(calls) == len(plan.grid) > 1 and max(calls) <= batch_size
    assert np.array_equal(seg.embedding, ref.embedding)


def test_a_progress_error_stops_embedding_and_writes_no_cache_entry(tiny_export, tmp_path):
    from peft_export.runtime.segmenter import Segmenter

    image = tiled_image()
    seg = Segmenter(tiny_export.out_dir, cache=tmp_path / "cache")
    seen: list[int] = []

    def stop_at_second(n):
        seen.append(n)
        if len(seen) == 2:
            raise Stop

    with pytest.raises(Stop):
        seg.set_image(image, progress=stop_at_second)
    assert len(seen) == 2 and not list((tmp_path / "cache").glob("*.npy"))
    calls: list[int] = []
    plan = seg.set_image(image, progress=calls.append)
    assert sum(calls) == len(plan.grid) and not seg.cache_hit
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    calls.clear()
    seg.set_image(image, progress=calls.append)
    assert seg.cache_hit and calls == [len(plan.grid)]
