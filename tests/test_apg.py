"""APG (micro-sam's automatic prompt generation) in the torch-free runtime, the strategy choice, --3d linking.

Independent references: micro-sam's own functions (``_derive_point_prompts``, ``apply_nms``,
``merge_instance_segmentation_3d``), installed without its dependencies as the README's test command does, plus
``xxhash`` (imported by ``micro_sam.util``); without them those tests skip with the install line. ONNX Runtime
vs the checkpoint's PyTorch model for the whole chain; hand-made cases for the rest.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

MICRO_SAM = "micro-sam is the oracle here: pip install --no-deps 'micro-sam>=1.6' xxhash (and torch-em)"


def _micro_sam(module: str):
    try:
        return pytest.importorskip(module, reason=MICRO_SAM)
    except ImportError:
        pytest.skip(MICRO_SAM)


def _smooth_maps(rng, h: int, w: int) -> np.ndarray:
    from scipy import ndimage

    out = []
    for sigma in (3, 2, 2):
        m = ndimage.gaussian_filter(rng.random((h, w)), sigma)
        out.append((m - m.min()) / (m.max() - m.min()))
    return np.stack(out).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# seeds and NMS against micro-sam's own functions


@pytest.mark.parametrize("shape", [(96, 128), (131, 77)])
def test_point_prompts_are_micro_sams(shape):
    """Seeds (fg >= 0.5, centre < 0.5, boundary < 0.5, 4-connected) and their most interior pixels: the same
    points, in the same order, as micro-sam's ``_derive_point_prompts``; also at other thresholds."""
    mis = _micro_sam("micro_sam.instance_segmentation")
    from peft_export.runtime.apg import APGOptions, point_prompts

    maps = _smooth_maps(np.random.default_rng(sum(shape)), *shape)
    for cfg in (APGOptions(), APGOptions(foreground_threshold=0.3, center_distance_threshold=0.6,
                                         boundary_distance_threshold=0.4)):
        ref = mis._derive_point_prompts(*maps, foreground_threshold=cfg.foreground_threshold,
                                        center_distance_threshold=cfg.center_distance_threshold,
                                        boundary_distance_threshold=cfg.boundary_distance_threshold)
        ours = point_prompts(maps, cfg)
        assert len(ours) > 10
        np.testing.assert_array_equal(ours, ref["points"][:, 0, :].astype(np.float32))


def test_point_prompts_hand_made():
    """Seeds of a hand-made map: a 5x5 square (its centre); a 3x7 bar (its middle row is 2 px from the boundary
    from column 6 to 10: the first of those ties in raster order, as argmax); two diagonal pixels are two seeds
    (4-connectivity), and none where the foreground is low."""
    from peft_export.runtime.apg import point_prompts

    fg = np.ones((20, 20), np.float32)
    center = np.ones((20, 20), np.float32)
    boundary = np.zeros((20, 20), np.float32)
    center[2:7, 2:7] = 0  # square, centre (4, 4)
    center[10:13, 5:12] = 0  # bar: (11, 6)
    center[15, 15] = center[16, 16] = 0  # two diagonal pixels: two seeds
    fg[16, 16] = 0.2  # ... one of which is background
    pts = point_prompts(np.stack([fg, center, boundary]))
    assert pts.tolist() == [[4, 4], [6, 11], [15, 15]]


def _candidates(rng, h=80, w=100, n=40):
    from peft_export.runtime.apg import _crop

    masks, cands = [], []
    yy, xx = np.mgrid[:h, :w]
    for k in range(n):
        if k % 4 == 3:  # a near-duplicate of the previous mask (IoU > 0.9 or not)
            m = masks[-1].copy()
            rows = np.flatnonzero(m.any(1))
            m[rows[0]] = False if k % 8 == 3 else m[rows[0]]
        else:
            cy, cx = rng.integers(5, h - 5), rng.integers(5, w - 5)
            ry, rx = rng.integers(2, 12, size=2)
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        masks.append(m)
        cands.append(_crop(m, 0, 0, float(rng.uniform(0.5, 1)), float(rng.uniform(0.7, 1)), 0))
    return masks, cands


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_and_painting_are_micro_sams(seed):
    """Size filter, mask NMS (IoU 0.9 and 0.5; intersection over min), largest-first painting, components and the
    final size filter: the same label image as micro-sam's ``apply_nms`` on the same masks and scores."""
    util = _micro_sam("micro_sam.util")
    from peft_export.runtime.apg import APGOptions, candidates_to_labels, nms

    masks, cands = _candidates(np.random.default_rng(seed))
    preds = []
    for m, c in zip(masks, cands):
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        preds.append({"segmentation": torch.from_numpy(m), "predicted_iou": c.iou, "stability_score": c.stability,
                      "bbox": [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]})
    dropped = 0
    for thr, over_min in ((0.9, False), (0.5, False), (0.7, True)):
        ref = util.apply_nms(preds, min_size=25, nms_thresh=thr, intersection_over_min=over_min)
        cfg = APGOptions(nms_threshold=thr, intersection_over_min=over_min)
        ours = candidates_to_labels(cands, masks[0].shape, cfg)
        np.testing.assert_array_equal(ours, ref.astype(np.int32))
        dropped = max(dropped, len(cands) - len(nms(cands, thr, over_min)))
    assert dropped >= 3, "the case should have duplicates for NMS to remove"


def _square(shape, y0, x0, h, w, iou, stab=1.0):
    from peft_export.runtime.apg import _crop

    m = np.zeros(shape, bool)
    m[y0:y0 + h, x0:x0 + w] = True
    return _crop(m, 0, 0, iou, stab, 0)


def test_score_merge_hand_made():
    """The score merge (micro-sam's SAM2 merge_by_score) on hand-made masks: a low-scored mask spanning two
    squares loses to them (NMS keeps it, IoU 0.33 with each, and largest-first painting lets it win); a half-covered
    duplicate is dropped at max_overlap 0.15 and truncated at 0.6; a mask under min_size is dropped, and so is one
    with too few free pixels (which then claims nothing); ids follow the score."""
    from peft_export.runtime.apg import APGOptions, candidates_to_labels

    shape = (30, 40)
    a = _square(shape, 0, 0, 10, 10, 0.9)  # 100 px
    c = _square(shape, 0, 20, 10, 10, 0.8)
    b = _square(shape, 0, 0, 10, 30, 0.5)  # spans a, c and the gap between them
    d = _square(shape, 0, 5, 10, 10, 0.7)  # half on a
    e = _square(shape, 10, 0, 4, 4, 0.95)  # 16 px < min_size, on f: painted, it would push f out
    f = _square(shape, 10, 0, 9, 3, 0.6)  # 27 px below a: free
    g = _square(shape, 9, 35, 9, 3, 0.65)  # 27 px, 3 of them (row 9) on h: 0.11 claimed, but 24 free < 25
    h = _square(shape, 0, 33, 10, 7, 0.85)  # 70 px
    k = _square(shape, 12, 35, 9, 3, 0.55)  # where g would be: painted only because g was dropped
    cands = [b, a, c, d, e, f, g, h, k]
    want = np.zeros(shape, np.int32)
    want[0:10, 0:10] = 1  # a (0.9)
    want[0:10, 33:40] = 2  # h (0.85)
    want[0:10, 20:30] = 3  # c (0.8); d (0.7): 50 of 100 px claimed -> dropped; g (0.65): 24 free -> dropped
    want[10:19, 0:3] = 4  # f (0.6)
    want[12:21, 35:38] = 5  # k (0.55); b (0.5): 200 of 300 claimed -> dropped
    got = candidates_to_labels(cands, shape, APGOptions(merge="score", max_overlap=0.15, min_size=25))
    np.testing.assert_array_equal(got, want)
    want[0:10, 10:15] = 4  # max_overlap 0.6: d keeps its free half, painted 4th; f becomes 5
    want[10:19, 0:3] = 5
    want[12:21, 35:38] = 6
    got = candidates_to_labels(cands, shape, APGOptions(merge="score", max_overlap=0.6, min_size=25))
    np.testing.assert_array_equal(got, want)
    nms = candidates_to_labels(cands, shape, APGOptions(min_size=25))  # micro-sam's APG for SAM
    assert len(np.unique(nms[0:10, 0:30])) == 1 and nms[0, 0] > 0, "NMS + largest first: b swallows a and c"


def test_bad_apg_options_give_one_line():
    from peft_export.errors import UsageError
    from peft_export.runtime.strategies import AutoOptions

    for key, value, flag in (("apg.foreground_threshold", 1.5, "--apg-foreground-threshold"),
                             ("apg.nms_threshold", -0.1, "--nms-threshold"), ("apg.min_size", -1, "--apg-min-size"),
                             ("apg.prompts_per_batch", 0, "--apg-prompts-per-batch"),
                             ("apg.merge", "best", "--apg-merge"), ("apg.max_overlap", 1.5, "--apg-max-overlap"),
                             ("apg.mask_threshold", float("nan"), "--mask-threshold")):
        with pytest.raises(UsageError, match=flag) as err:
            AutoOptions.parse({key: value})
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# the whole chain on an export: ONNX Runtime vs PyTorch, tiles, CLI


def _median_config(seg, q: float = 25, **extra):
    """Random weights give maps near 0.5: thresholds at quantiles of the maps (each condition holds on about ``q``%
    of the pixels), so that there are seeds: a few dozen per 256-pixel tile (the medians give ~600, for no more
    coverage and ten times the decoding)."""
    from peft_export.runtime.apg import APGOptions
    from peft_export.runtime.instances import image_maps

    fg, center, boundary = image_maps(seg)
    return APGOptions(foreground_threshold=float(np.percentile(fg, 100 - q)),
                      center_distance_threshold=float(np.percentile(center, q)),
                      boundary_distance_threshold=float(np.percentile(boundary, q)), **extra)


def _apg(seg, cfg):
    """(labels, the strategy) of strategy ``apg`` with ``cfg`` on the segmenter's image."""
    from peft_export.runtime.strategies import AutoOptions, choose_strategy

    strategy, why = choose_strategy(seg.info, AutoOptions(method="apg", apg=cfg))
    assert strategy.name == "apg" and "APG" in why
    return strategy.segment(seg), strategy


def test_onnx_runtime_and_pytorch_give_the_same_apg_labels(inst_export, dsb_val):
    """APG on the export (ONNX Runtime: encoder, instance_decoder.onnx, decoder_lowres.onnx) vs the
    checkpoint's PyTorch model + decoder: object-matched IoU >= 0.99, untiled and tiled (a 2x2 mosaic: seeds routed
    to the tile whose core holds them)."""
    from peft_export.loading import load_model
    from peft_export.metrics import matched_iou
    from peft_export.models.torch_backend import TorchBackend
    from peft_export.runtime.segmenter import Segmenter
    from peft_export.runtime.tiling import Tiling

    ckpt, out = inst_export.checkpoint, inst_export.out_dir
    loaded = load_model(str(ckpt))
    torch_be = TorchBackend(loaded.model, loaded.spec.preprocess, multimask=True,
                            instance_decoder=loaded.instance_decoder)
    image = dsb_val[0].image
    for tiling, img in ((None, image), (Tiling(tile=256, halo=32), np.tile(image, (2, 2)))):
        ours, ref = Segmenter(out, tiling=tiling), Segmenter(torch_be, tiling=tiling)
        ours.set_image(img)
        ref.set_image(img)
        cfg = _median_config(ref, min_size=5)
        (a, strategy), (b, _) = _apg(ours, cfg), _apg(ref, cfg)
        assert a.shape == img.shape[:2] and b.max() >= 3, "the maps should give a few objects"
        assert matched_iou(a, b) >= 0.99, (tiling, a.max(), b.max())
        assert len(strategy.ious) > 0  # the decoded prompts' predicted IoUs (for its advice)
        if tiling is not None:
            assert len(ours.plan.grid) > 1


def test_apg_decodes_one_prompt_per_seed_in_batches(inst_export, dsb_val):
    """Each seed is decoded once, in batches of batch_size, with the tile of its core (a counting backend)."""
    from peft_export.runtime.apg import point_prompts
    from peft_export.runtime.instances import image_maps
    from peft_export.runtime.segmenter import Segmenter
    from peft_export.runtime.tiling import Tiling

    out = inst_export.out_dir
    seg = Segmenter(out, tiling=Tiling(tile=256, halo=32))
    calls = []
    real = seg.backend.decode
    seg.backend.decode = lambda emb, c, lab, mi=None: (calls.append(len(c)), real(emb, c, lab, mi))[1]
    seg.set_image(np.tile(dsb_val[0].image, (2, 2)))
    cfg = _median_config(seg, prompts_per_batch=5)
    n = len(point_prompts(image_maps(seg), cfg))
    _apg(seg, cfg)
    assert sum(calls) == n and max(calls) <= 5 and n > 5


def test_strategy_choice(inst_export, tiny_export):
    """auto: AIS with an instance decoder (measured better and faster: strategies.AUTO_WITH_DECODER), grid without
    (with a line saying what to train); apg / instance on an export without a decoder: one line."""
    from peft_export.errors import UsageError
    from peft_export.runtime.backends import open_model
    from peft_export.runtime.strategies import AutoOptions, choose_strategy

    def choose(info, method="auto"):
        return choose_strategy(info, AutoOptions.parse({"method": method}))

    with_dec, without = open_model(inst_export.out_dir).info, open_model(tiny_export.out_dir).info
    strategy, why = choose(with_dec)
    assert strategy.name == "instance" and "has an instance decoder" in why and "--method apg" in why
    assert strategy.advice() is None
    strategy, why = choose(without)
    assert strategy.name == "grid" and "no instance decoder" in why and "--instance-decoder" in why
    assert choose(with_dec, "apg")[0].name == "apg" and choose(with_dec, "grid")[0].name == "grid"
    for m in ("apg", "instance"):
        with pytest.raises(UsageError, match=r"no instance decoder.*--instance-decoder") as err:
            choose(without, m)
        assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="--method: unknown value 'amg'"):
        choose(with_dec, "amg")
    # settings the chosen APG merge ignores are named in the line (not refused: configs carry every field)
    for given, unused in (({"apg.max_overlap": 0.3}, "--apg-max-overlap unused with --apg-merge nms"),
                          ({"apg.merge": "score", "apg.nms_threshold": 0.5, "apg.intersection_over_min": True},
                           "--nms-threshold, --apg-intersection-over-min unused with --apg-merge score")):
        _, why = choose_strategy(with_dec, AutoOptions.parse({"method": "apg", **given}))
        assert why.endswith(f"(--method apg; {unused})"), why
    for given in ({}, {"apg.merge": "score", "apg.max_overlap": 0.3}, {"apg.nms_threshold": 0.5}):
        assert "unused" not in choose_strategy(with_dec, AutoOptions.parse({"method": "apg", **given}))[1]


def test_predict_and_evaluate_auto_apg(run_cli, inst_export, dsb_val, tmp_path):
    """predict --auto --method apg (says so), on a stack with --3d (objects linked across planes), and evaluate
    --auto --method apg."""
    import tifffile

    out = inst_export.out_dir
    img = tmp_path / "tile.tif"
    tifffile.imwrite(img, dsb_val[0].image)
    thr = ("--apg-foreground-threshold", "0.5", "--apg-center-distance-threshold", "0.6",
           "--apg-boundary-distance-threshold", "0.6", "--apg-min-size", "5")
    code, stdout, err = run_cli("predict", str(out), str(img), "--auto", "--method", "apg", "-o",
                                str(tmp_path / "a.tif"), "--json", *thr)
    assert code == 0, err
    assert "APG" in err and json.loads(stdout)["objects"] >= 0
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.stack([dsb_val[0].image] * 3), photometric="minisblack", metadata={"axes": "ZYX"})
    code, stdout, err = run_cli("predict", str(out), str(stack), "--auto", "--method", "apg", "--3d", "-o",
                                str(tmp_path / "s.tif"), "--json", *thr)
    assert code == 0, err
    summary = json.loads(stdout)
    labels = tifffile.imread(tmp_path / "s.tif")
    assert labels.shape == (3, *dsb_val[0].image.shape[:2])
    assert summary["objects_3d"] == labels.max() == summary["objects_per_plane"][0]  # 3 equal planes: one object each
    code, stdout, err = run_cli("evaluate", str(out), "--auto", "--method", "apg", "--json", *thr)
    assert code == 0, err
    auto = json.loads(stdout)["auto"]
    assert auto["method"] == "apg" and "APG" in auto["why"] and {"msa", "f1", "objects_pred"} <= set(auto)


def test_predict_apg_score_merge_is_the_librarys(run_cli, inst_export, dsb_val, tmp_path):
    """predict --auto --method apg --apg-merge score --apg-max-overlap 0.9 writes the labels the library's score
    merge gives with those settings (ONNX Runtime both; random weights: each mask covers much of the tile, so only a
    high max_overlap keeps several), and its JSON summary records them."""
    import tifffile

    from peft_export.runtime.segmenter import Segmenter

    out = inst_export.out_dir
    image = dsb_val[0].image
    seg = Segmenter(out, backend="onnxruntime")
    seg.set_image(image)
    cfg = _median_config(seg, min_size=5, merge="score", max_overlap=0.9)
    want, _ = _apg(seg, cfg)
    assert want.max() >= 3, "the maps should give a few objects"
    img = tmp_path / "tile.tif"
    tifffile.imwrite(img, image)
    args = ("--apg-foreground-threshold", str(cfg.foreground_threshold),
            "--apg-center-distance-threshold", str(cfg.center_distance_threshold),
            "--apg-boundary-distance-threshold", str(cfg.boundary_distance_threshold),
            "--apg-min-size", "5", "--apg-merge", "score", "--apg-max-overlap", "0.9")
    code, stdout, err = run_cli("predict", str(out), str(img), "--auto", "--method", "apg", "--backend", "onnxruntime",
                                "-o", str(tmp_path / "a.tif"), "--json", *args)
    assert code == 0, err
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a.tif"), want)
    apg = json.loads(stdout)["settings"]["apg"]  # the summary says which merge made the labels
    assert (apg["merge"], apg["max_overlap"]) == ("score", 0.9)


def test_bad_auto_input_gives_one_line_and_writes_nothing(run_cli, inst_export, tiny_export, dsb_val, tmp_path):
    import tifffile

    img = tmp_path / "tile.tif"
    tifffile.imwrite(img, dsb_val[0].image)
    out = tmp_path / "labels.tif"
    cases = [
        ((str(tiny_export.out_dir), str(img), "--auto", "--method", "apg"), "no instance decoder"),
        ((str(tiny_export.out_dir), str(img), "--auto", "--method", "instance"), "no instance decoder"),
        ((str(inst_export.out_dir), str(img), "--auto", "--3d"), "is a 2D image"),
        ((str(inst_export.out_dir), str(img), "--boxes", str(img), "--3d"), "--3d links the objects of automatic"),
        ((str(inst_export.out_dir), str(img), "--auto", "--foreground-threshold", "1.5"), "--foreground-threshold"),
        ((str(inst_export.out_dir), str(img), "--auto", "--nms-threshold", "-0.2"), "--nms-threshold"),
        ((str(inst_export.out_dir), str(img), "--auto", "--apg-min-size", "-1"), "--apg-min-size"),
        ((str(inst_export.out_dir), str(img), "--auto", "--method", "grid", "--pred-iou-thresh", "2"),
         "--pred-iou-thresh"),
    ]
    for args, message in cases:
        code, _, err = run_cli("predict", *args, "-o", str(out))
        assert code == 2 and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not list(tmp_path.glob(".labels*")), args
    for args, message in ((("--center-distance-threshold", "7"), "--center-distance-threshold"),
                          (("--3d",), "--3d")):
        code, _, err = run_cli("evaluate", str(inst_export.out_dir), "--auto", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------------------
# --3d: planes linked into 3D objects


def _sliced_blobs(rng, z=12, h=64, w=64, n=14):
    """3D ellipsoids, each plane labelled on its own (ids shuffled per plane), and the volume they came from."""
    from skimage.measure import label

    vol = np.zeros((z, h, w), np.int32)
    zz, yy, xx = np.mgrid[:z, :h, :w]
    for k in range(1, n + 1):
        c = rng.uniform([2, 8, 8], [z - 2, h - 8, w - 8])
        r = rng.uniform([1.5, 4, 4], [4, 9, 9])
        vol[((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1] = k
    planes = []
    for p in vol:
        lab = label(p > 0)
        perm = rng.permutation(int(lab.max()) + 1)
        perm = np.where(perm == 0, perm.max() + 1, perm)
        planes.append(np.where(lab > 0, perm[lab], 0))
    return np.stack(planes), vol


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


@pytest.mark.parametrize("seed", [0, 1])
def test_link_planes_is_micro_sams_merge(seed):
    """The same 3D objects as micro-sam's merge_instance_segmentation_3d (its multicut) on sliced ellipsoids."""
    mds = _micro_sam("micro_sam.multi_dimensional_segmentation")
    from peft_export.runtime.link3d import consecutive_ids, link_planes

    planes, _vol = _sliced_blobs(np.random.default_rng(seed))
    ours = link_planes(planes)
    ref = mds.merge_instance_segmentation_3d(consecutive_ids(planes), verbose=False)
    assert ours.max() >= 5 and ours.max() < len(np.unique(consecutive_ids(planes))) - 1
    assert _same_partition(ours, ref)


def test_link_planes_hand_made():
    """A column of squares through 3 planes (one object), a square that shifts by a quarter (one object), one that
    moves away entirely (two objects), two planes' objects overlapping by 20% (below ~0.27: not linked)."""
    from peft_export.runtime.link3d import link_planes

    s = np.zeros((3, 30, 60), np.int32)
    s[:, 2:8, 2:8] = 1  # column
    s[0, 10:18, 2:10], s[1, 10:18, 4:12] = 2, 5  # shifted by 2 of 8: 75% overlap
    s[0, 20:26, 2:8], s[1, 20:26, 20:26] = 3, 3  # moved away
    s[0, 2:12, 30:40], s[1, 2:12, 38:48] = 4, 4  # 20% overlap
    out = link_planes(s)
    assert len(np.unique(out[:, 4, 4])) == 1 and out[0, 4, 4] > 0
    assert out[0, 12, 5] == out[1, 12, 8]
    assert out[0, 22, 4] != out[1, 22, 22]
    assert out[0, 5, 32] != out[1, 5, 45]
    assert out.max() == 6


def test_box_refinement_and_mask_threshold(inst_export, dsb_val):
    """refine_with_boxes decodes once more per mask, with a box prompt from the mask's bounding box extended by 1%
    (micro-sam's refine_with_box_prompts); a lower mask threshold never gives smaller masks (same prompts)."""
    from peft_export.runtime.apg import APGOptions, Candidate, decode_points, point_prompts, refine_boxes
    from peft_export.runtime.instances import image_maps
    from peft_export.runtime.segmenter import Segmenter

    box = refine_boxes([Candidate(10, 20, np.ones((11, 21), bool), 0.9, 1.0)], (0, 256, 0, 256))
    np.testing.assert_allclose(box, [[20 - 0.2, 10 - 0.1, 20 + 1.01 * 20, 10 + 1.01 * 10]], rtol=1e-6)
    seg = Segmenter(inst_export.out_dir)
    seg.set_image(dsb_val[0].image)
    cfg = _median_config(seg)
    pts = point_prompts(image_maps(seg), cfg)[:6]
    emb = seg.tile_embeddings([0])
    a = decode_points(seg, 0, emb, pts, cfg)
    b = decode_points(seg, 0, emb, pts, APGOptions(**{**cfg.model_dump(), "mask_threshold": -1.0}))
    assert len(a) and sum(c.area for c in b) >= sum(c.area for c in a)
    boxes = refine_boxes(a, seg.plan.tiles[0].window)
    refined = decode_points(seg, 0, emb, pts, cfg, boxes=boxes)
    assert 0 < len(refined) <= len(boxes)
