"""Torch-free runtime: prompt files, Segmenter prompt handling, automatic segmentation, overlays, and the
predict / evaluate commands. Export-folder tests (ONNX Runtime vs PyTorch) are in test_runtime_export.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from peft_export.errors import DataError, UsageError
from peft_export.runtime.auto import point_grid, stability_scores
from peft_export.runtime.overlay import overlay
from peft_export.runtime.prompts_io import read_boxes, read_points


def test_runtime_and_data_import_no_torch():
    code = ("import sys\n"
            "import peft_export.runtime.segmenter, peft_export.runtime.onnx_backend, peft_export.runtime.auto\n"
            "import peft_export.runtime.evaluate, peft_export.runtime.prompts_io, peft_export.runtime.overlay\n"
            "import peft_export.data.dataset, peft_export.manifest, peft_export.metrics\n"
            "import peft_export_cli.app\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


# ---- prompt files --------------------------------------------------------------------------------------

def test_boxes_json_and_csv(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps([[1, 2, 30, 40], [5, 6, 7, 8]]))
    (tmp_path / "b2.json").write_text(json.dumps({"boxes": [[1, 2, 30, 40]]}))
    (tmp_path / "b.csv").write_text("x0,y0,x1,y1,name\n1,2,30,40,a\n5,6,7,8,b\n")
    np.testing.assert_array_equal(read_boxes(tmp_path / "b.json"), [[1, 2, 30, 40], [5, 6, 7, 8]])
    np.testing.assert_array_equal(read_boxes(tmp_path / "b2.json"), [[1, 2, 30, 40]])
    np.testing.assert_array_equal(read_boxes(tmp_path / "b.csv"), [[1, 2, 30, 40], [5, 6, 7, 8]])


def test_points_formats(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps([[3, 4], [5, 6]]))
    (tmp_path / "p2.json").write_text(json.dumps({"points": [[3, 4], [5, 6]], "labels": [1, 0]}))
    (tmp_path / "p3.json").write_text(json.dumps([{"points": [[3, 4], [9, 9]], "labels": [1, 0]}]))
    (tmp_path / "p.csv").write_text("x,y,label,object\n3,4,1,a\n9,9,0,a\n5,6,,b\n")
    assert [len(p.points) for p in read_points(tmp_path / "p.json")] == [1, 1]
    assert [p.labels.tolist() for p in read_points(tmp_path / "p2.json")] == [[1.0], [0.0]]
    ((pts, lab, box),) = read_points(tmp_path / "p3.json")
    assert pts.shape == (2, 2) and lab.tolist() == [1.0, 0.0] and box is None
    groups = read_points(tmp_path / "p.csv")
    assert [p.labels.tolist() for p in groups] == [[1.0, 0.0], [1.0]]
    # a box with an object's points, and a box alone (as the napari plugin saves them)
    (tmp_path / "p4.json").write_text(json.dumps([{"points": [[3, 4]], "labels": [0], "box": [1, 2, 30, 40]},
                                                  {"box": [5, 6, 7, 8]}]))
    refined, alone = read_points(tmp_path / "p4.json")
    assert refined.points.tolist() == [[3, 4]] and refined.labels.tolist() == [0]
    assert refined.box.tolist() == [1, 2, 30, 40]
    assert alone.points.shape == (0, 2) and alone.labels.shape == (0,) and alone.box.tolist() == [5, 6, 7, 8]


@pytest.mark.parametrize("name,content,match", [
    ("e.json", "", "is empty"),
    ("e.csv", "x0,y0,x1,y1\n", "no rows"),
    ("e2.json", "[]", "no boxes"),
    ("bad.json", "{not json", "not valid JSON"),
    ("short.json", "[[1, 2, 3]]", "4 numbers"),
    ("cols.csv", "a,b\n1,2\n", "needs the columns"),
    ("x.txt2", "1", "unsupported prompt file"),
])
def test_bad_box_files(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        read_boxes(p)


def test_bad_point_files(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"points": [[1, 2]], "labels": [3]}))
    with pytest.raises(DataError, match="labels must be 1"):
        read_points(p)
    for bad, match in (([{"labels": []}], "needs 'points'"), ([{"box": [1, 2, 3]}], "box must be 4 numbers"),
                       ([{"points": [], "labels": []}], "pairs of numbers")):
        p.write_text(json.dumps(bad))
        with pytest.raises(DataError, match=match):
            read_points(p)
    with pytest.raises(DataError, match="not found"):
        read_points(tmp_path / "missing.json")


# ---- segmenter with a backend (PyTorch backend of a tiny model: numbers are structural here) -----------

@pytest.fixture(scope="module")
def tiny_segmenter():
    from peft_export.models import build_sam, get_spec
    from peft_export.models.torch_backend import TorchBackend
    from peft_export.runtime.segmenter import Segmenter

    return Segmenter(TorchBackend(build_sam("vit_tiny"), get_spec("vit_tiny").preprocess))


def test_segmenter_prompt_validation(tiny_segmenter):
    seg = tiny_segmenter
    with pytest.raises(UsageError, match="set_image"):
        type(seg)(seg.backend).predict(boxes=[[0, 0, 5, 5]])
    seg.set_image(np.random.default_rng(0).integers(0, 255, (120, 200), dtype=np.uint8))
    out = seg.predict(boxes=[[10, 10, 50, 60], [100, 20, 190, 110]])
    assert out.masks.shape == (2, 120, 200) and out.scores.shape == (2,) and out.low_res.shape == (2, 64, 64)
    out = seg.predict(points=[[[30, 40]], [[150, 60]]], labels=[[1], [1]])
    assert out.masks.shape == (2, 120, 200)
    with pytest.raises(DataError, match="outside the 200x120 image"):
        seg.predict(boxes=[[10, 10, 250, 60]])
    with pytest.raises(DataError, match="outside"):
        seg.predict(points=[[-3, 5]])
    with pytest.raises(DataError, match="x1 >= x0"):
        seg.predict(boxes=[[50, 10, 10, 60]])
    with pytest.raises(DataError, match="labels must be 1"):
        seg.predict(points=[[3, 5]], labels=[2])
    with pytest.raises(UsageError, match="give points and/or boxes"):
        seg.predict()


def test_segmenter_matches_direct_decoding(tiny_segmenter):
    """Segmenter's coordinate mapping + upscaling == preprocessing + PromptDecoder + SAM's postprocess."""
    import torch

    from peft_export.imaging import preprocess
    from peft_export.models.prompt_decoder import PromptDecoder

    seg = tiny_segmenter
    img = np.random.default_rng(1).integers(0, 255, (150, 90, 3), dtype=np.uint8)
    seg.set_image(img)
    out = seg.predict(boxes=[[5, 10, 60, 100]])
    model = seg.backend.model
    prep = preprocess(img, seg.info.preprocess)
    with torch.no_grad():
        emb = model.image_encoder(torch.from_numpy(prep.tensor))
        coords = torch.from_numpy(prep.transform_boxes(np.array([[5, 10, 60, 100]], np.float32)).reshape(1, 2, 2))
        low, _ = PromptDecoder(model)(emb, coords, torch.tensor([[2.0, 3.0]]), torch.zeros(1, 1, 64, 64),
                                      torch.zeros(1))
        ref = model.postprocess_masks(low[:, :1], prep.resized_hw, (150, 90))[0, 0].numpy() > 0
    assert (out.masks[0] != ref).mean() < 1e-3


# ---- automatic segmentation pieces -----------------------------------------------------------------------

def test_point_grid_covers_cell_centres():
    g = point_grid(100, 200, 4)
    assert g.shape == (16, 2)
    assert g[0].tolist() == [25.0, 12.5] and g[-1].tolist() == [175.0, 87.5]


def test_stability_score():
    low = np.full((1, 8, 8), -5.0)
    low[0, :4, :4] = 5.0
    low[0, 4, :4] = 0.5  # unstable fringe
    assert stability_scores(low, (8, 8), 1.0)[0] == pytest.approx(16 / 20)


def test_auto_finds_synthetic_blobs():
    """A backend whose decoder returns the blob under the prompt point: auto must recover every blob once."""
    from peft_export.imaging import PreprocessSpec
    from peft_export.runtime.backend import BackendInfo
    from peft_export.runtime.segmenter import Segmenter
    from peft_export.runtime.strategies import AutoOptions

    h = w = 64
    truth = np.zeros((h, w), np.int32)
    for k, (y, x) in enumerate([(10, 10), (12, 45), (40, 20), (50, 50)], start=1):
        yy, xx = np.ogrid[:h, :w]
        truth[(yy - y) ** 2 + (xx - x) ** 2 <= 36] = k

    class BlobBackend:
        info = BackendInfo(name="blobs", model="blobs", source="test", preprocess=PreprocessSpec(64),
                           multimask=False, embedding_shape=(1, 16, 16), mask_input_size=(64, 64))

        def embed(self, x):
            return np.zeros((1, 1, 16, 16), np.float32)

        def decode(self, emb, coords, labels, mask_input=None):
            b = coords.shape[0]
            low = np.full((b, 4, 64, 64), -10.0, np.float32)
            iou = np.zeros((b, 4), np.float32)
            for i in range(b):
                x, y = coords[i, 0].astype(int)
                k = truth[min(y, 63), min(x, 63)]
                if k:
                    low[i, :, truth == k] = 10.0
                    iou[i] = 0.95
            return low, iou

    seg = Segmenter(BlobBackend())
    seg.set_image(np.zeros((h, w), np.uint8))
    labels = seg.segment(AutoOptions.parse({"grid.points_per_side": 16, "grid.min_area": 5}))
    from peft_export.metrics import mean_segmentation_accuracy

    assert labels.max() == 4
    assert mean_segmentation_accuracy(labels, truth) == 1.0


# ---- overlay -------------------------------------------------------------------------------------------

def test_overlay_tints_objects_and_keeps_background():
    img = np.full((20, 30), 100, np.uint16)
    img[0, 0] = 0
    lab = np.zeros((20, 30), np.int32)
    lab[5:10, 5:10] = 1
    pic = overlay(img, lab)
    assert pic.shape == (20, 30, 3) and pic.dtype == np.uint8
    assert (pic[15, 15] == pic[15, 15, 0]).all()  # background stays gray
    assert not (pic[7, 7] == pic[7, 7, 0]).all()  # object interior is tinted
    assert (pic[5, 5] == 255).all()  # border drawn white
