"""numpy pre/post-processing against segment_anything/torch, and the metrics against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from peft_export.imaging import PreprocessSpec, normalize_and_pad, preprocess, resized_shape, upscale_masks
from peft_export.metrics import (
    iou_matrix,
    mask_iou,
    masks_to_labels,
    mean_segmentation_accuracy,
    segmentation_accuracy,
)


@pytest.mark.parametrize("hw", [(300, 200), (200, 300), (256, 256), (97, 513)])
def test_coords_and_shapes_match_segment_anything(hw):
    from segment_anything.utils.transforms import ResizeLongestSide

    t = ResizeLongestSide(256)
    assert resized_shape(*hw, 256) == ResizeLongestSide.get_preprocess_shape(*hw, 256)
    prep = preprocess(np.zeros((*hw, 3), np.uint8), PreprocessSpec(256))
    coords = np.array([[10.0, 20.0], [hw[1] - 1, hw[0] - 1]])
    np.testing.assert_allclose(prep.transform_coords(coords), t.apply_coords(coords, hw), rtol=1e-6)
    boxes = np.array([[1.0, 2.0, 50.0, 60.0]])
    np.testing.assert_allclose(prep.transform_boxes(boxes), t.apply_boxes(boxes, hw), rtol=1e-6)


def test_normalize_and_pad_matches_sam_preprocess():
    from peft_export.models import build_sam

    sam = build_sam("vit_tiny")
    resized = np.random.default_rng(0).uniform(0, 255, (256, 180, 3)).astype(np.float32)
    ours = normalize_and_pad(resized, PreprocessSpec(256))
    ref = sam.preprocess(torch.from_numpy(resized).permute(2, 0, 1)[None])
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)


def test_minmax_mode_scales_to_unit_range():
    img = np.random.default_rng(0).integers(100, 4000, (100, 50), dtype=np.uint16)
    x = preprocess(img, PreprocessSpec(256, mode="minmax")).tensor
    valid = x[0, :, :256, :128]
    assert valid.min() == pytest.approx(0.0, abs=1e-6) and valid.max() == pytest.approx(1.0, abs=1e-6)
    assert (x[0, :, :, 128:] == 0).all()  # zero padding on the right


@pytest.mark.parametrize("orig", [(512, 512), (300, 200), (123, 457)])
def test_upscale_masks_matches_sam_postprocess(orig):
    """numpy upscaling == segment_anything's Sam.postprocess_masks (torch bilinear, crop, bilinear)."""
    from peft_export.models import build_sam

    sam = build_sam("vit_tiny")  # img_size 256, low-res 64x64
    low = torch.randn(2, 3, 64, 64)
    rh, rw = resized_shape(*orig, 256)
    ref = sam.postprocess_masks(low, (rh, rw), orig).numpy()
    ours = upscale_masks(low.numpy(), 256, (rh, rw), orig)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    # and plain torch for a 4x upsample without cropping
    np.testing.assert_allclose(upscale_masks(low.numpy(), 256, (256, 256), (256, 256)),
                               F.interpolate(low, (256, 256), mode="bilinear", align_corners=False).numpy(),
                               atol=2e-5)


def _brute_iou(pred, gt):
    p_ids = [i for i in np.unique(pred) if i]
    g_ids = [i for i in np.unique(gt) if i]
    return np.array([[mask_iou(pred == p, gt == g) for g in g_ids] for p in p_ids]).reshape(len(p_ids), len(g_ids))


def test_iou_matrix_matches_brute_force(rng):
    gt = rng.integers(0, 5, (40, 30))
    pred = rng.integers(0, 4, (40, 30))
    np.testing.assert_allclose(iou_matrix(pred, gt), _brute_iou(pred, gt))


def test_msa_cases():
    gt = np.zeros((20, 20), int)
    gt[0:10, 0:10] = 1
    gt[12:20, 12:20] = 2
    assert mean_segmentation_accuracy(gt, gt) == 1.0
    assert mean_segmentation_accuracy(np.zeros_like(gt), gt) == 0.0
    pred = gt.copy()
    pred[0:10, 0:5] = 0  # object 1 IoU 0.5 -> matched at no threshold (> 0.5 required); object 2 perfect
    # at each threshold: TP=1, FP=1 (half object unmatched), FN=1 -> SA = 1/3
    assert segmentation_accuracy(pred, gt, 0.5) == pytest.approx(1 / 3)
    assert mean_segmentation_accuracy(pred, gt) == pytest.approx(1 / 3)
    pred2 = gt.copy()
    pred2[0:10, 0:2] = 0  # IoU 0.8: matched for t < 0.8 (t = .5 … .75: 6 thresholds), not above
    expected = (6 * 1.0 + 4 * (1 / 3)) / 10
    assert mean_segmentation_accuracy(pred2, gt) == pytest.approx(expected)


def test_masks_to_labels_high_score_wins():
    m = np.zeros((2, 5, 5), bool)
    m[0, :3] = True
    m[1, 2:] = True
    lab = masks_to_labels(m, np.array([0.9, 0.1]))
    assert (lab[2] == 1).all()  # overlap row goes to the higher score
    lab = masks_to_labels(m, np.array([0.1, 0.9]))
    assert (lab[2] == 2).all()
