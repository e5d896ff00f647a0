"""Sample data location/verification, the deterministic DSB2018 split, and folder-dataset checks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tifffile
from PIL import Image

from peft_export.data import samples
from peft_export.data.dataset import DSB_TILE, dsb2018_tiles, folder_dataset, load_samples
from peft_export.errors import DataError, MissingDependencyError, PeftExportError


def test_lite_medsam_weights_verified():
    p = samples.lite_medsam_checkpoint()
    assert p.stat().st_size == samples.LITE_MEDSAM_SIZE
    assert samples.sha256_file(p) == samples.LITE_MEDSAM_SHA256


def test_sha_mismatch_is_refused(monkeypatch):
    samples.lite_medsam_checkpoint.cache_clear()
    monkeypatch.setattr(samples, "LITE_MEDSAM_SHA256", "0" * 64)
    try:
        with pytest.raises(PeftExportError, match="corrupt install"):
            samples.lite_medsam_checkpoint()
    finally:
        samples.lite_medsam_checkpoint.cache_clear()


def test_missing_package_names_the_extra(monkeypatch):
    import importlib.metadata as md

    def _missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(samples.importlib.metadata, "distribution", _missing)
    with pytest.raises(MissingDependencyError, match=r"peft-export\[samples\]"):
        samples.dsb2018_paths()


def test_dsb2018_image_and_labels():
    image, labels = samples.dsb2018()
    assert image.shape == labels.shape == (512, 512)
    ids = np.unique(labels)
    assert ids[0] == 0 and np.array_equal(ids[1:], np.arange(1, len(ids)))  # relabelled 1..N
    assert len(ids) - 1 == 125


def test_dsb2018_split_is_deterministic_and_disjoint():
    image, _ = samples.dsb2018()
    train, val = dsb2018_tiles("train"), dsb2018_tiles("val")
    assert len(train) == 3 and len(val) == 1
    assert [s.name for s in dsb2018_tiles("train")] == [s.name for s in train]
    covered = np.zeros(image.shape, int)
    for s in train + val:
        y, x = (int(v[1:]) for v in s.name.split("_")[-2:])
        covered[y: y + DSB_TILE, x: x + DSB_TILE] += 1
        assert np.array_equal(s.image, image[y: y + DSB_TILE, x: x + DSB_TILE])
        ids = np.unique(s.labels)
        assert np.array_equal(ids, np.arange(len(ids)))
        assert np.bincount(s.labels.ravel())[1:].min() >= 20  # border fragments removed
    assert (covered == 1).all()  # every pixel in exactly one tile: no train/val overlap
    assert val[0].num_objects >= 20


def _write_pair(folder, name, image, labels, ext=".tif"):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    if ext == ".tif":
        tifffile.imwrite(folder / "images" / f"{name}.tif", image)
        tifffile.imwrite(folder / "labels" / f"{name}.tif", labels)
    else:
        Image.fromarray(image).save(folder / "images" / f"{name}{ext}")
        Image.fromarray(labels).save(folder / "labels" / f"{name}{ext}")


def _labels(h=32, w=40):
    lab = np.zeros((h, w), np.uint16)
    lab[2:10, 3:12] = 7
    lab[15:25, 20:30] = 3
    return lab


@pytest.mark.parametrize("image", [
    np.random.default_rng(0).integers(0, 255, (32, 40), dtype=np.uint8),
    np.random.default_rng(0).integers(0, 65535, (32, 40), dtype=np.uint16),
    np.random.default_rng(0).random((32, 40)).astype(np.float32),
    np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8),
])
def test_folder_dataset_accepts_common_images(tmp_path, image):
    _write_pair(tmp_path, "a", image, _labels())
    (s,) = folder_dataset(tmp_path)
    assert s.num_objects == 2 and s.labels.max() == 2 and s.labels.dtype == np.int32


def test_folder_dataset_png(tmp_path):
    _write_pair(tmp_path, "a", np.zeros((32, 40), np.uint8) + 9, _labels().astype(np.uint8), ext=".png")
    assert folder_dataset(tmp_path)[0].num_objects == 2


def test_shape_mismatch(tmp_path):
    _write_pair(tmp_path, "a", np.zeros((30, 40), np.uint8), _labels())
    with pytest.raises(DataError, match="image is 30x40 but its labels are 32x40"):
        folder_dataset(tmp_path)


def test_non_integer_labels(tmp_path):
    _write_pair(tmp_path, "a", np.zeros((32, 40), np.uint8), _labels().astype(np.float32) + 0.5)
    with pytest.raises(DataError, match="not integer instance ids"):
        folder_dataset(tmp_path)


def test_nan_image(tmp_path):
    img = np.zeros((32, 40), np.float32)
    img[3, 3] = np.nan
    _write_pair(tmp_path, "a", img, _labels())
    with pytest.raises(DataError, match="NaN"):
        folder_dataset(tmp_path)


def test_empty_labels_are_skipped_with_a_warning(tmp_path, caplog):
    _write_pair(tmp_path, "a", np.zeros((32, 40), np.uint8), _labels())
    _write_pair(tmp_path, "b", np.zeros((32, 40), np.uint8), np.zeros((32, 40), np.uint16))
    with caplog.at_level(logging.WARNING, logger="peft_export"):
        out = folder_dataset(tmp_path)
    assert [s.name for s in out] == ["a"]
    assert "b.tif" in caplog.text


def test_all_empty_labels_is_an_error(tmp_path):
    _write_pair(tmp_path, "b", np.zeros((32, 40), np.uint8), np.zeros((32, 40), np.uint16))
    with pytest.raises(DataError, match="no labelled objects"):
        folder_dataset(tmp_path)


def test_binary_mask_is_split_into_components(tmp_path, caplog):
    lab = (_labels() > 0).astype(np.uint8)
    _write_pair(tmp_path, "a", np.zeros((32, 40), np.uint8), lab)
    with caplog.at_level(logging.WARNING, logger="peft_export"):
        (s,) = folder_dataset(tmp_path)
    assert s.num_objects == 2 and "binary mask" in caplog.text


@pytest.mark.parametrize("setup,match", [
    ("missing", "data folder not found"),
    ("nosub", "expected sub-folders images/ and labels/"),
    ("noimages", "no images found"),
    ("nolabel", "no label image with the same name"),
    ("3d", "2D grayscale"),
])
def test_folder_errors(tmp_path, setup, match):
    root = tmp_path / "data"
    if setup != "missing":
        root.mkdir()
    if setup in ("noimages", "nolabel", "3d"):
        (root / "images").mkdir()
        (root / "labels").mkdir()
    if setup == "nolabel":
        tifffile.imwrite(root / "images" / "x.tif", np.zeros((8, 8), np.uint8))
    if setup == "3d":
        tifffile.imwrite(root / "images" / "x.tif", np.zeros((5, 8, 8, 2), np.uint8))
        tifffile.imwrite(root / "labels" / "x.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=match):
        folder_dataset(root)


def test_unreadable_image(tmp_path):
    _write_pair(tmp_path, "a", np.zeros((32, 40), np.uint8), _labels())
    (tmp_path / "images" / "a.tif").write_bytes(b"not a tiff")
    with pytest.raises(DataError, match="cannot read image"):
        folder_dataset(tmp_path)


def test_split_subfolders(tmp_path):
    _write_pair(tmp_path / "train", "a", np.zeros((32, 40), np.uint8), _labels())
    _write_pair(tmp_path / "val", "b", np.zeros((32, 40), np.uint8), _labels())
    assert [s.name for s in load_samples(tmp_path, "train")] == ["a"]
    assert [s.name for s in load_samples(tmp_path, "val")] == ["b"]
    assert len(load_samples(tmp_path, "all")) == 2
    with pytest.raises(PeftExportError, match="unknown sample dataset"):
        load_samples("sample:nope")
