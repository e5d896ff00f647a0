"""Microscope-scale runtime with models (issue 13): the batched encoder, tiled images, the embedding cache,
folders / stacks / shards through the CLI (tiny random-weight export: structure), and tiled quality on a large
DSB2018 mosaic whose truth is known (LoRA LiteMedSAM with the real weights)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from peft_export.errors import DataError

POINT_MODEL_ENV = "PEFT_EXPORT_TEST_POINT_MODEL"


def _image(shape, seed=0):
    """A uint8 image with bright disks (something for a random model to look at; structure tests only)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(30, 5, shape)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(12):
        cy, cx, r = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(6, 20)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 200
    return np.clip(img, 0, 255).astype(np.uint8)


# ---- the batched encoder -------------------------------------------------------------------------------

def test_encoder_batch_axis_is_exported_and_checked(tiny_export):
    from peft_export.manifest import read_manifest
    from peft_export.runtime.onnx_backend import OnnxBackend

    be = OnnxBackend(tiny_export.out_dir)
    assert be.info.max_batch is None  # a symbolic batch axis
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 3, 256, 256)).astype(np.float32)
    batched = be.embed(x)
    single = np.concatenate([be.embed(x[i: i + 1]) for i in range(3)])
    assert batched.shape[0] == 3
    np.testing.assert_allclose(batched, single, atol=1e-4 * float(np.abs(single).max()))
    figures = json.dumps(read_manifest(tiny_export.out_dir).parity)
    assert '"encoder_batch": {"checked": true' in figures, figures[:500]


def test_default_batch_size_is_one_tile_on_a_cpu_and_four_on_a_gpu(tiny_export):
    """Batches gain ~5% per tile on a CPU for several times the peak memory (benchmarks/runtime_scale.py), so
    the default follows where the encoder runs (the backend's ``info.on_gpu``: ONNX Runtime's first provider in
    use, a torch device, TensorRT)."""
    from dataclasses import replace

    from peft_export.runtime.segmenter import Segmenter

    seg = Segmenter(tiny_export.out_dir, backend="onnxruntime")  # auto may pick OpenVINO (no providers) on a CPU
    assert seg.info.details["providers"][0] == "CPUExecutionProvider" and not seg.info.on_gpu
    assert seg.batch_size == 1 and seg.info.default_batch_size == 1
    assert Segmenter(tiny_export.out_dir, batch_size=3).batch_size == 3
    assert replace(seg.info, on_gpu=True).default_batch_size == 4


def test_tiled_image_gives_the_same_masks_at_any_batch_size(tiny_export):
    from peft_export.runtime.segmenter import Segmenter

    img = _image((600, 520))
    boxes = np.array([[10, 10, 60, 70], [250, 240, 300, 290], [470, 540, 515, 595]], np.float32)
    outs = []
    for bs in (1, 3):
        seg = Segmenter(tiny_export.out_dir, batch_size=bs)
        plan = seg.set_image(img)
        assert plan.tiled and len(plan.grid) == 9
        outs.append((seg.tile_embeddings(range(len(plan.grid))), seg.predict(boxes=boxes)))
    np.testing.assert_allclose(outs[0][0], outs[1][0], atol=1e-4 * float(np.abs(outs[0][0]).max()))
    assert outs[0][1].masks.shape == (3, 600, 520)
    assert (outs[0][1].masks != outs[1][1].masks).mean() < 1e-4
    assert outs[0][1].tiles.tolist() == [0, 4, 8]


def test_a_prompt_outside_every_tile_is_refused(tiny_export):
    from peft_export.runtime.segmenter import Segmenter

    seg = Segmenter(tiny_export.out_dir)
    seg.set_image(_image((300, 600)))
    with pytest.raises(DataError, match="outside every tile of the 600x300 image") as exc:
        seg.predict(boxes=[[580, 10, 640, 40]])
    assert "\n" not in str(exc.value)


def test_map_tiles_stitches_per_tile_outputs(tiny_export):
    """The hook for per-tile decoders (e.g. instance maps): untiled it is exactly un-padding + resizing the
    one output; tiled, every pixel gets its own tile's value."""
    from peft_export.imaging import upscale_masks
    from peft_export.runtime.segmenter import Segmenter

    seg = Segmenter(tiny_export.out_dir, batch_size=2)

    def fn(emb):  # (k, C, h, w) -> (k, 2, S, S): a smooth map of each tile's own embedding
        m = emb[:, :2]
        return np.repeat(np.repeat(m, 16, axis=2), 16, axis=3)

    seg.set_image(_image((200, 150)), tiled=False)
    geo = seg.plan.geometry[0]
    want = upscale_masks(fn(seg.tile_embeddings([0]))[0], geo.img_size, geo.resized_hw, geo.original_hw)
    np.testing.assert_allclose(seg.map_tiles(fn), want, atol=1e-5)
    seg.set_image(_image((520, 700)))
    const = seg.map_tiles(lambda emb: np.ones((len(emb), 3, 256, 256), np.float32) * emb.mean((1, 2, 3))[:, None,
                                                                                                         None, None])
    assert const.shape == (3, 520, 700)
    means = seg.tile_embeddings(range(len(seg.plan.grid))).mean((1, 2, 3))
    for t in seg.plan.tiles:
        cy0, cy1, cx0, cx1 = t.core
        np.testing.assert_allclose(const[:, cy0:cy1, cx0:cx1], means[t.index], rtol=1e-5)


# ---- the embedding cache -------------------------------------------------------------------------------

def test_embedding_cache_is_reused_and_refused_for_another_export(tiny_export, tmp_path, run_cli):
    import tifffile

    from peft_export.runtime.segmenter import Segmenter

    img = _image((400, 560))
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, img)
    cache = tmp_path / "cache"
    code, out, err = run_cli("embed", str(tiny_export.out_dir), str(path), "-o", str(cache), "--json")
    assert code == 0, err
    assert json.loads(out)["tiles"] == 6 and json.loads(out)["already_cached"] == 0
    code, out, err = run_cli("embed", str(tiny_export.out_dir), str(path), "-o", str(cache), "--json")
    assert code == 0 and json.loads(out)["already_cached"] == 1, err

    boxes = np.array([[20, 30, 80, 90], [300, 200, 360, 260]], np.float32)
    fresh = Segmenter(tiny_export.out_dir)
    fresh.set_image(img)
    cached = Segmenter(tiny_export.out_dir, cache=cache)
    cached.set_image(img)
    assert cached.cache_hit and not fresh.cache_hit
    assert cached._emb.computed == 0  # nothing embedded: read from the cache
    every = list(range(len(fresh.plan.grid)))
    np.testing.assert_allclose(cached.tile_embeddings(every), fresh.tile_embeddings(every), atol=1e-6)
    np.testing.assert_array_equal(cached.predict(boxes=boxes).masks, fresh.predict(boxes=boxes).masks)
    other_tiling = Segmenter(tiny_export.out_dir, cache=cache)
    other_tiling.set_image(img, tile=200, halo=20)  # another recipe: another entry, not a wrong one
    assert not other_tiling.cache_hit

    box_file = tmp_path / "boxes.json"
    box_file.write_text(json.dumps(boxes.tolist()))
    code, out, err = run_cli("predict", str(tiny_export.out_dir), str(path), "--boxes", str(box_file), "-o",
                             str(tmp_path / "labels.tif"), "--embeddings", str(cache), "--json")
    assert code == 0 and json.loads(out)["cache_hit"] is True, err

    meta = cache / "cache.json"
    doc = json.loads(meta.read_text())
    doc["export"]["encoder_sha256"] = "0" * 64
    meta.write_text(json.dumps(doc))
    code, _, err = run_cli("predict", str(tiny_export.out_dir), str(path), "--boxes", str(box_file), "-o",
                           str(tmp_path / "labels2.tif"), "--embeddings", str(cache))
    assert code == 1 and "embeddings of another export" in err and len(err.strip().splitlines()) == 1, err


# ---- folders, stacks, shards, resuming -----------------------------------------------------------------

@pytest.fixture
def plate(tmp_path):
    """A folder: two 2D images (one in a sub-folder), a 2-plane z-stack, and an unreadable file."""
    import tifffile

    root = tmp_path / "plate"
    (root / "well_b").mkdir(parents=True)
    tifffile.imwrite(root / "a.tif", _image((300, 300), 1))
    tifffile.imwrite(root / "well_b" / "b.tif", _image((200, 240), 2))
    tifffile.imwrite(root / "stack.tif", np.stack([_image((260, 280), 3), _image((260, 280), 4)]),
                     photometric="minisblack", metadata={"axes": "ZYX"})
    (root / "broken.tif").write_bytes(b"not a tiff at all")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([[10, 10, 60, 60], [100, 120, 150, 170]]))
    return root, boxes


def test_predict_on_a_folder_mirrors_it_and_resumes(tiny_export, plate, tmp_path, run_cli):
    import tifffile

    root, boxes = plate
    out = tmp_path / "labels"
    args = ("predict", str(tiny_export.out_dir), str(root), "--boxes", str(boxes), "-o", str(out))
    code, stdout, err = run_cli(*args, "--json")
    assert code == 1, err  # the unreadable file fails the run, at the end
    assert "1 of 4 input(s) failed" in err and "broken.tif" in err
    report = json.loads(stdout)
    assert report["done"] == 3 and report["failed_inputs"][0]["input"].endswith("broken.tif")
    assert tifffile.imread(out / "a.tif").shape == (300, 300)
    assert tifffile.imread(out / "well_b" / "b.tif").shape == (200, 240)
    stack = tifffile.imread(out / "stack.tif")
    assert stack.shape == (2, 260, 280) and stack.dtype == np.uint32
    summary = json.loads((out / "stack.json").read_text())
    assert summary["planes"] == 2 and summary["tiles"]["tiled"] is True
    assert json.loads((out / "a.json").read_text())["objects"] >= 1

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.tif")}
    code, _, err = run_cli(*args)
    assert code == 2 and "--skip-existing" in err  # nothing overwritten without being asked
    code, stdout, err = run_cli(*args, "--skip-existing", "--json")
    assert code == 1 and json.loads(stdout)["skipped"] == 3 and json.loads(stdout)["done"] == 0, err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tif")} == before

    sharded = tmp_path / "sharded"
    made = []
    for k in range(2):
        (root / "broken.tif").unlink(missing_ok=True)
        code, stdout, err = run_cli(*args[:-1], str(sharded), "--shard", f"{k}/2", "--json")
        assert code == 0, err
        made.append({d["output"] for d in json.loads(stdout)["images"]})
    assert not made[0] & made[1] and len(made[0] | made[1]) == 3
    for p in before:
        np.testing.assert_array_equal(tifffile.imread(sharded / p.relative_to(out)), tifffile.imread(p))


# ---- quality on a large image: the DSB2018 mosaic ------------------------------------------------------

def dsb_mosaic() -> tuple[np.ndarray, np.ndarray]:
    """1024x1024: the DSB2018 512x512 image and its flips (x, y, both) side by side; labels to match (ids
    1..4N: every nucleus once per copy; nuclei on the image's edges meet their mirror copies at the seams)."""
    from peft_export.data.samples import dsb2018

    img, lab = dsb2018()
    n = int(lab.max())
    flips = [lab, lab[:, ::-1], lab[::-1], lab[::-1, ::-1]]
    labs = [np.where(f > 0, f + k * n, 0) for k, f in enumerate(flips)]
    image = np.block([[img, img[:, ::-1]], [img[::-1], img[::-1, ::-1]]])
    labels = np.block([[labs[0], labs[1]], [labs[2], labs[3]]]).astype(np.int32)
    return image, labels


@pytest.fixture(scope="module")
def mosaic_tiled(lite_export_fp32):
    """The mosaic, tiled (the default for an image larger than the model input), the boxes of its top half (the
    image and its x-flip: 250 nuclei, 42 of them crossing a tile's core boundary), and those box prompts decoded
    once (pieces, predicted IoUs) for the two tests below. Tiles are embedded when first needed (the top half's)."""
    from peft_export.data.objects import objects_from_labels
    from peft_export.runtime.segmenter import Segmenter

    image, labels = dsb_mosaic()
    seg = Segmenter(lite_export_fp32.out_dir, batch_size=4)
    plan = seg.set_image(image, name="mosaic", lazy=True)
    objs = objects_from_labels(np.where(labels <= 2 * (int(labels.max()) // 4), labels, 0))
    pieces, out = seg.decode_pieces(boxes=objs.boxes, batch_size=32)  # every box once, in the tile that holds it
    assert plan.scaled_hw == plan.original_hw  # tiled at native resolution: pieces are in image pixels
    return image, plan, labels, objs, pieces, out.scores


def test_tiled_mosaic_matches_native_tiles_and_beats_resizing(lite_export_fp32, mosaic_tiled):
    """Box prompt per nucleus on the 1024x1024 mosaic: tiled (256 px tiles, 32 px halo, native resolution; the top
    half's nuclei) within 0.02 mean IoU of the same nuclei on the image's native 256x256 tiles, and clearly above
    resizing the whole mosaic to 256x256 (nuclei 4x smaller)."""
    from scipy import ndimage

    from peft_export.data.dataset import Sample, dsb2018_tiles
    from peft_export.runtime.backends import open_model
    from peft_export.runtime.evaluate import evaluate
    from peft_export.runtime.pieces import piece_iou
    from peft_export.runtime.tiling import Tiling

    image, plan, labels, objs, pieces, _scores = mosaic_tiled
    assert plan.tiled and len(plan.grid) == 25
    found = ndimage.find_objects(labels)
    tiled = float(np.mean([piece_iou(p, labels, int(i), found[int(i) - 1]) for p, i in zip(pieces, objs.ids)]))
    be = open_model(lite_export_fp32.out_dir)
    native = evaluate(be, dsb2018_tiles("all"), ["box"])["box"]["mean_iou"]
    per: list = []
    some = np.where(labels % 4 == 1, labels, 0)  # resized: every 4th nucleus (125 of 500) is enough to compare
    resized = evaluate(be, [Sample(image, some, "mosaic")], ["box"], tiling=Tiling(mode="off"),
                       per_image=per)["box"]["mean_iou"]
    assert per[0]["tiles"] == 1 and per[0]["objects"] == len(np.unique(some)) - 1 > 100
    print(f"box mean IoU: tiled {tiled:.4f} ({len(objs)} nuclei), native 256 px tiles {native:.4f}, whole mosaic "
          f"resized {resized:.4f} (every 4th nucleus)")
    assert abs(tiled - native) <= 0.02
    assert tiled >= resized + 0.1


def test_nuclei_cut_by_tile_borders_are_single_objects(mosaic_tiled):
    """Nuclei that cross a tile's core boundary are segmented in one tile with its halo: each one object that
    spans the boundary (not truncated at the seam), as good as the nuclei inside a core."""
    from peft_export.metrics import iou_matrix
    from peft_export.runtime.pieces import paint

    _image, plan, labels, objs, all_pieces, scores = mosaic_tiled
    # prompt k -> id k + 1, higher predicted IoU winning overlaps (Segmenter.predict_labels on these pieces)
    pred = paint(all_pieces, labels.shape, order=np.argsort(scores, kind="stable"))
    core_owner = np.zeros(labels.shape, int)
    for t in plan.tiles:
        cy0, cy1, cx0, cx1 = t.core
        core_owner[cy0:cy1, cx0:cx1] = t.index
    crossing = [k for k, i in enumerate(objs.ids) if len(np.unique(core_owner[labels == i])) > 1]
    assert len(crossing) >= 20, len(crossing)
    # the object spans the seam (zero-shot LiteMedSAM misses part of some nuclei: 86% measured) and is not cut
    # by its tile's window (a mask touching an interior window edge would be truncated there)
    spans = [len(np.unique(core_owner[(pred == k + 1) & (labels == objs.ids[k])])) > 1 for k in crossing]
    pieces = [all_pieces[k] for k in crossing]
    best = iou_matrix(pred, labels).max(0)  # (true ids,): each nucleus' best IoU with a predicted object
    cross = np.isin(np.arange(1, labels.max() + 1), [objs.ids[k] for k in crossing])
    print(f"{cross.sum()} nuclei cross a core boundary: {np.mean(spans):.0%} of their objects span it, "
          f"{np.mean([p.cut for p in pieces]):.0%} touch a window edge; mean IoU {best[cross].mean():.3f}; the others "
          f"{best[~cross].mean():.3f}")
    assert np.mean(spans) >= 0.75
    assert np.mean([p.cut for p in pieces]) <= 0.05
    assert best[cross].mean() >= best[~cross].mean() - 0.05


@pytest.mark.skipif(not os.environ.get(POINT_MODEL_ENV), reason=(
    f"needs an export of a LiteMedSAM finetuned with point prompts in ${POINT_MODEL_ENV} (zero-shot LiteMedSAM "
    "answers boxes only: automatic segmentation finds nothing); see test_runtime_export.py"))
def test_auto_on_the_tiled_mosaic_counts_nuclei_without_duplicates(tmp_path, run_cli):
    """--auto on the 1024x1024 mosaic, tiled: object count within 30% of the truth, and no nucleus claimed by
    two objects (a nucleus cut by a tile border is one object)."""
    import tifffile

    from peft_export.metrics import iou_matrix

    image, labels = dsb_mosaic()
    path = tmp_path / "mosaic.tif"
    tifffile.imwrite(path, image)
    out = tmp_path / "labels.tif"
    code, stdout, err = run_cli("predict", os.environ[POINT_MODEL_ENV], str(path), "--auto", "--method", "grid",
                                "--pred-iou-thresh", "0.6", "--stability-thresh", "0.8", "-o", str(out), "--json")
    assert code == 0, err
    n, truth = json.loads(stdout)["objects"], int(labels.max())
    pred = tifffile.imread(out)
    iou = iou_matrix(pred, labels)
    matched = (iou > 0.5).sum(0)  # predictions per true nucleus at IoU > 0.5 (at most 1 by construction)
    claims = (iou > 0.2).sum(0)
    print(f"--auto (tiled) found {n} objects; truth {truth}; nuclei with 2+ claims: {(claims > 1).sum()}; "
          f"matched at IoU 0.5: {(matched > 0).sum()}")
    assert abs(n - truth) <= 0.3 * truth, (n, truth)
    assert (claims > 1).sum() <= 0.05 * truth
