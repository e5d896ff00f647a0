"""Microscope-scale runtime, without a model: tile geometry, stitching, merging cut objects, stacks, folders,
shards and the one-line errors of bad input (issue 13). Fast: numpy and tifffile only."""

from __future__ import annotations

import numpy as np
import pytest

from peft_export.errors import DataError, UsageError

# ---- tile geometry -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,tile,halo", [((1024, 1024), 256, 32), ((700, 300), 256, 32), ((257, 4096), 256, 0),
                                             ((1000, 1000), 100, 49), ((200, 180), 256, 32)])
def test_tile_cores_partition_the_image_with_a_halo_of_context(shape, tile, halo):
    from peft_export.runtime.tiling import TileGrid

    grid = TileGrid.build(shape, tile, halo)
    owner = np.full(shape, -1)
    for t in grid.tiles:
        y0, y1, x0, x1 = t.window
        cy0, cy1, cx0, cx1 = t.core
        assert (y1 - y0, x1 - x0) == (min(tile, shape[0]), min(tile, shape[1]))  # native size, never stretched
        assert y0 >= 0 and y1 <= shape[0] and x0 >= 0 and x1 <= shape[1]
        assert (owner[cy0:cy1, cx0:cx1] == -1).all(), "cores overlap"
        owner[cy0:cy1, cx0:cx1] = t.index
        # a core boundary inside the image lies >= halo pixels inside the window
        for core_edge, win_edge, inside in ((cy0, y0, cy0 > 0), (cx0, x0, cx0 > 0)):
            assert not inside or core_edge - win_edge >= halo
        for core_edge, win_edge, inside in ((cy1, y1, cy1 < shape[0]), (cx1, x1, cx1 < shape[1])):
            assert not inside or win_edge - core_edge >= halo
    assert (owner >= 0).all(), "cores leave pixels uncovered"
    ys, xs = np.mgrid[: shape[0]: 7, : shape[1]: 7]
    assert (grid.core_index(ys.ravel(), xs.ravel()) == owner[ys.ravel(), xs.ravel()]).all()


def test_prompts_route_to_the_tile_whose_core_holds_them():
    from peft_export.runtime.tiling import TileGrid

    grid = TileGrid.build((1024, 1024), 256, 32)
    core = grid.tiles[7].core  # y0, y1, x0, x1
    cy, cx = (core[0] + core[1]) / 2, (core[2] + core[3]) / 2
    idx, fits = grid.route(np.array([[cy - 10, cx - 10, cy + 10, cx + 10]]))
    assert idx.tolist() == [7] and fits.tolist() == [True]
    # an object larger than a tile does not fit any window: reported, not silently dropped
    _, fits = grid.route(np.array([[0, 0, 600, 600]]))
    assert fits.tolist() == [False]


@pytest.mark.parametrize("kwargs,needle", [
    ({"tile": 64, "halo": 40}, "smaller than twice the halo"),
    ({"tile": 64, "halo": 80}, "larger than the tile"),
    ({"tile": 8, "halo": 1}, "too small"),
    ({"tile": 256, "halo": -1}, "must be >= 0"),
    ({"scale": 0.0}, "--scale: Input should be greater than 0"),
])
def test_bad_tiling_options_say_what_to_change(kwargs, needle):
    from peft_export.runtime.tiling import Tiling

    with pytest.raises(UsageError, match=needle) as exc:
        Tiling.from_options(**kwargs).sizes(256)
    assert "\n" not in str(exc.value)


def test_no_tile_with_tile_options_is_refused():
    from peft_export.runtime.tiling import Tiling

    with pytest.raises(UsageError, match="--no-tile"):
        Tiling.from_options(tile=256, no_tile=True)


def test_cli_tile_smaller_than_twice_the_halo_is_one_line(run_cli, tmp_path):
    code, _, err = run_cli("predict", str(tmp_path / "no_export"), str(tmp_path / "x.tif"), "--auto", "-o",
                           str(tmp_path / "out.tif"), "--tile", "64", "--halo", "40")
    assert code == 2 and "twice the halo" in err and len(err.strip().splitlines()) == 1, err


def test_prompts_outside_the_image_are_refused():
    from peft_export.runtime.tiling import check_prompts_inside

    with pytest.raises(DataError, match="outside every tile of the 1024x512 image"):
        check_prompts_inside(np.array([[10, 10, 20, 1030]]), (512, 1024), "box corner", tiled=True)


# ---- stitching and merging -----------------------------------------------------------------------------

@pytest.mark.parametrize("blend", ["core", "linear"])
def test_stitched_tiles_give_back_the_map(blend):
    from peft_export.runtime.tiling import Stitcher, TileGrid

    rng = np.random.default_rng(0)
    grid = TileGrid.build((300, 520), 128, 16)
    truth = rng.normal(size=(2, 300, 520)).astype(np.float32)
    st = Stitcher(grid, 2, blend)
    for t in grid.tiles:
        st.add(t, truth[(slice(None), *t.slices)])
    np.testing.assert_allclose(st.result(), truth, atol=1e-5)


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_an_object_cut_by_a_tile_border_is_one_object():
    """Two tiles each see a part of a disk lying across the seam: their pieces become one object; a duplicate
    of a whole object (two tiles seeing all of it) stays one object; ids are 1..N without gaps."""
    from peft_export.runtime.pieces import crop_piece, merge_pieces
    from peft_export.runtime.tiling import TileGrid

    grid = TileGrid.build((256, 448), 256, 32)  # two windows: x 0..256 and 192..448, seam at 224
    left, right = grid.tiles
    shape = grid.shape
    across = _disk(shape, 128, 250, 20)  # beyond the left window's right edge (256): cut there
    whole = _disk(shape, 40, 215, 10)  # inside both windows (the overlap 192..256)
    alone = _disk(shape, 200, 60, 12)
    pieces = []
    for t in (left, right):
        sy, sx = t.slices
        edges = grid.interior_edges(t)
        for m in (across, whole, alone):
            local = m[sy, sx]
            if local.any():
                pieces.append(crop_piece(local, t.window[0], t.window[2], 0.9, t.index, edges))
    assert any(p.cut for p in pieces)
    labels = merge_pieces(pieces, shape, 0.5, grid)
    assert sorted(np.unique(labels)) == [0, 1, 2, 3]
    for m in (across, whole, alone):
        ids, counts = np.unique(labels[m], return_counts=True)
        assert len(ids) == 1 and ids[0] > 0, f"object split into {ids}"
        assert counts[0] == m.sum()


# ---- stacks ----------------------------------------------------------------------------------------------

def test_stack_planes_are_read_one_at_a_time(tmp_path):
    import tifffile

    from peft_export.data.io import open_image, write_label_stack

    stack = np.arange(3 * 40 * 50, dtype=np.uint16).reshape(3, 40, 50)
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, stack, photometric="minisblack", metadata={"axes": "ZYX"})
    src = open_image(path)
    assert src.is_stack and src.planes == 3 and src.plane_axis == "Z"
    planes = list(src.read())
    np.testing.assert_array_equal(np.stack(planes), stack)
    out = write_label_stack(tmp_path / "labels.tif", iter(planes), 3, (40, 50), "Z")
    np.testing.assert_array_equal(tifffile.imread(out), stack.astype(np.uint32))


@pytest.mark.parametrize("planes,kwargs,want", [
    # tifffile's default (up to now) for 3 or 4 planes: planar RGB / RGBA (as_rgb drops the alpha later)
    (3, {"photometric": "rgb", "planarconfig": "separate"}, (40, 50, 3)),
    (4, {"photometric": "rgb", "planarconfig": "separate", "extrasamples": ["unassalpha"]}, (40, 50, 4)),
    (3, {"photometric": "minisblack"}, (40, 50, 3)),  # no axes: channel-first colour, as before
], ids=["planar-rgb", "planar-rgba", "minisblack-3"])
def test_three_or_four_planes_without_axes_are_one_colour_image_with_a_warning(tmp_path, caplog, planes, kwargs,
                                                                               want):
    import tifffile

    from peft_export.data.io import open_image

    data = np.random.default_rng(0).integers(0, 255, (planes, 40, 50), dtype=np.uint8)
    path = tmp_path / "planes.tif"
    tifffile.imwrite(path, data, **kwargs)
    with caplog.at_level("WARNING"):
        src = open_image(path)
    assert not src.is_stack
    (image,) = list(src.read())
    assert image.shape == want
    np.testing.assert_array_equal(np.moveaxis(image, -1, 0), data)
    assert "metadata={'axes': 'ZYX'}" in caplog.text and "planes.tif" in caplog.text
    # with its axes saved, the same planes are a stack
    tifffile.imwrite(path, data, photometric="minisblack", metadata={"axes": "ZYX"})
    assert open_image(path).planes == planes


def test_a_stack_with_a_plane_of_another_shape_is_refused(tmp_path):
    import tifffile

    from peft_export.data.io import open_image

    path = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(np.zeros((40, 50), np.uint8))
        tw.write(np.zeros((40, 60), np.uint8))
    with pytest.raises(DataError, match="plane 1 is 40x60 but plane 0 is 40x50") as exc:
        open_image(path)
    assert "\n" not in str(exc.value)


# ---- folders and shards ----------------------------------------------------------------------------------

def _folder(tmp_path, n=7):
    import tifffile

    root = tmp_path / "plates"
    (root / "a").mkdir(parents=True)
    for i in range(n):
        tifffile.imwrite(root / ("a" if i % 2 else ".") / f"img{i}.tif", np.zeros((8, 8), np.uint8))
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_inputs_are_sorted_and_shards_split_them(tmp_path):
    from peft_export.runtime.sources import parse_shard, resolve_inputs, take_shard

    root = _folder(tmp_path)
    inputs = resolve_inputs(root)
    rels = [str(i.rel) for i in inputs.items]
    assert len(rels) == 7 and rels == sorted(rels) and "a/img1.tif" in rels
    shards = [[str(i.rel) for i in take_shard(inputs, parse_shard(f"{k}/3")).items] for k in range(3)]
    assert sorted(r for s in shards for r in s) == rels and all(shards)  # disjoint, complete
    assert shards == [[str(i.rel) for i in take_shard(resolve_inputs(root), (k, 3)).items] for k in range(3)]
    glob_rels = [str(i.rel) for i in resolve_inputs(str(root / "**" / "*.tif")).items]
    assert sorted(glob_rels) == rels


@pytest.mark.parametrize("text", ["3/3", "1", "a/b", "-1/2"])
def test_bad_shard_is_refused(text):
    from peft_export.runtime.sources import parse_shard

    with pytest.raises(UsageError, match="--shard"):
        parse_shard(text)


def test_a_folder_without_images_is_refused(tmp_path):
    from peft_export.runtime.sources import resolve_inputs

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images in this folder"):
        resolve_inputs(tmp_path / "empty")
    with pytest.raises(DataError, match="no images match"):
        resolve_inputs(str(tmp_path / "empty" / "*.tif"))
