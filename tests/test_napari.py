"""The napari plugin (issue 24): the widget against the runtime it is built on and the CLI it must agree with.

Headless, with napari's own fixtures (``make_napari_viewer``, pytest-qt's ``qtbot``). napari's canvas needs OpenGL,
which Qt's ``offscreen`` platform does not give it (vispy: "QOpenGLWidget is not supported on this platform", then
no GL context), so the tests draw on an X server: pytest-xvfb starts Xvfb for the session when it is installed
(``apt-get install xvfb libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1``: Qt's xcb platform needs the three
libraries; nothing is shown on screen). Without any display, or where Qt cannot start on it, they skip with the
reason (``QT_QPA_PLATFORM=offscreen`` is set then, so nothing tries to open a window).

References: a fresh :class:`Segmenter` (``predict``) for prompts, ``peft-export predict`` (in process) for segment
everything and for the files the widget saves, ``finetune --data``'s folder reader for the saved labels.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

# Mesa's OpenGL (napari's canvas) and triton (which torch's exporter imports for the export fixtures) each carry
# LLVM; importing triton after a GL context exists segfaults (both orders tried here: only triton first works), so
# this process loads it at collection, before any viewer.
if importlib.util.find_spec("triton") is not None:
    importlib.import_module("triton")

HAS_DISPLAY = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
if not HAS_DISPLAY:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("napari", reason="napari is not installed: pip install 'peft-export[napari]' pytest-qt")
pytest.importorskip("qtpy", reason="no Qt binding: pip install 'peft-export[napari]'")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed: pip install pytest-qt")

from conftest import disk_image  # noqa: E402

SETTLE_MS = 240_000  # embedding on a busy 2-core machine
APT = "apt-get install xvfb libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1"  # Xvfb and what Qt's xcb platform needs


@functools.lru_cache(maxsize=1)
def _canvas_problem() -> str | None:
    """Why napari cannot draw here (None when it can): a viewer with an image layer, in a fresh process."""
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        return ("no display: napari's canvas needs OpenGL, which Qt's offscreen platform does not provide; install "
                f"Xvfb ({APT}) and pytest-xvfb, which starts it for the tests")
    code = "import napari, numpy\nv = napari.Viewer(show=False)\nv.add_image(numpy.zeros((8, 8)))\nv.close()\n"
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "napari did not start within 300 s"
    if run.returncode == 0:
        return None
    lines = run.stderr.strip().splitlines() or ["?"]
    tail = next((ln for ln in lines if "Could not load" in ln), lines[-1])  # Qt's platform-plugin line, if any
    return (f"napari cannot start here ({tail}; DISPLAY={os.environ.get('DISPLAY')!r}): its canvas needs Qt on an "
            f"X server with OpenGL, e.g. Xvfb ({APT}; pytest-xvfb starts it)")


@pytest.fixture(scope="session")
def canvas():
    """Skip (saying why) where napari cannot draw, before napari's own fixtures are set up (their teardown
    expects a test that ran). Session-scoped so that it runs before pytest-qt's session-scoped ``qapp``: a Qt
    whose platform plugin cannot load (Xvfb present, a system library such as libxcb-icccm4 missing) aborts the
    whole process when the QApplication is made, where the probe's fresh process only fails."""
    problem = _canvas_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture
def viewer(canvas, make_napari_viewer, tmp_path):
    from qtpy.QtCore import QSettings

    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path / "qsettings"))
    return make_napari_viewer()


@pytest.fixture
def notes(monkeypatch):
    """Every notification the widget shows: [(level, message)]."""
    import peft_export.napari.widget as widget_mod

    got: list[tuple[str, str]] = []
    for level in ("error", "info"):
        monkeypatch.setattr(widget_mod, f"show_{level}", lambda msg, _level=level: got.append((_level, str(msg))))
    return got


def errors(notes) -> list[str]:
    return [m for level, m in notes if level == "error"]


def settle(qtbot, w, timeout: int = SETTLE_MS) -> None:
    """Let queued handlers run, wait for the worker, let its results land."""
    qtbot.wait(30)
    qtbot.waitUntil(lambda: not w.busy, timeout=timeout)
    qtbot.wait(30)


def make_widget(viewer):
    """The widget as napari makes it from the plugin's manifest (it then sees napari's proxies of the viewer and
    its layers, a new proxy object per access)."""
    _dock, w = viewer.window.add_plugin_dock_widget("peft-export", "SAM export segmenter")
    return w


def image_96x128(seed: int = 0) -> np.ndarray:
    """A non-square uint8 image of bright disks (rows != columns catches x/y swaps)."""
    img, _ = disk_image(np.random.default_rng(seed), size=128, n=6)
    return np.ascontiguousarray(img[:96])


def rectangle(x0, y0, x1, y1, plane: tuple[int, ...] = ()) -> np.ndarray:
    """A napari rectangle (4 corners, (…, y, x)) for the box x0, y0, x1, y1."""
    corners = [(y0, x0), (y0, x1), (y1, x1), (y1, x0)]
    return np.array([(*plane, y, x) for y, x in corners], np.float64)


def reference(export, image, **prompts) -> np.ndarray:
    from peft_export.runtime.segmenter import Segmenter

    seg = Segmenter(export)
    seg.set_image(image)
    return seg.predict(**prompts).masks[0]


# ---- the plugin as a package ------------------------------------------------------------------------------

def test_plugin_modules_import_no_torch():
    code = textwrap.dedent("""
        import sys
        import peft_export.napari, peft_export.napari.core, peft_export.napari.sample, peft_export.napari.widget
        bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not bad, bad[:5]
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})  # imports only: no window
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_npe2_validate_passes():
    run = subprocess.run([sys.executable, "-m", "npe2", "validate", "--imports", "peft-export"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert run.returncode == 0 and "valid" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]


def test_manifest_contributions_open_in_napari(viewer):
    """The widget docks through its npe2 contribution; the sample opens the DSB2018 image."""
    from peft_export.napari.widget import SegmenterWidget

    _dock, w = viewer.window.add_plugin_dock_widget("peft-export", "SAM export segmenter")
    assert isinstance(w, SegmenterWidget)
    try:
        from peft_export.data.samples import dsb2018

        image, _ = dsb2018()
    except Exception as exc:  # the samples extra is optional
        pytest.skip(f"samples extra missing: {exc}")
    viewer.open_sample("peft-export", "dsb2018")
    layer = viewer.layers["DSB2018 nuclei"]
    assert np.array_equal(layer.data, image)
    assert w.image_combo.currentText() == "DSB2018 nuclei"


# ---- opening models ---------------------------------------------------------------------------------------

def test_open_export_shows_the_model_and_is_remembered(viewer, tiny_export, notes):
    w = make_widget(viewer)
    assert w.open_model(tiny_export.out_dir) is True, notes
    text = w.info_label.text()
    from peft_export.runtime.segmenter import Segmenter

    chosen = Segmenter(tiny_export.out_dir).info.name  # --backend auto: OpenVINO where installed, else ONNX Runtime
    for part in ("model: vit_tiny", f"backend: {chosen} (CPU)", "precision: fp32", "instance decoder: no"):
        assert part in text, text
    assert not errors(notes)
    from peft_export.napari.widget import SegmenterWidget

    again = SegmenterWidget(viewer)  # a new widget (a new napari session) starts from the last model
    assert again is not w and again.path_edit.text() == str(tiny_export.out_dir)
    again.deleteLater()


def test_bad_models_give_one_notification(viewer, tiny_export, tmp_path, notes):
    w = make_widget(viewer)
    (tmp_path / "not_export").mkdir()
    (tmp_path / "not_export" / "a.txt").write_text("x")
    pkg = tmp_path / "empty_pkg"
    pkg.mkdir()
    (pkg / "rdf.yaml").write_text("type: model\nname: nothing\nweights: {}\n")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as z:
        z.write(pkg / "rdf.yaml", "rdf.yaml")
    cases = [
        (tmp_path / "not_export", "has no manifest.json"),
        (tiny_export.checkpoint, f"export it first with `peft-export merge-and-export {tiny_export.checkpoint} -o "),
        (tiny_export.checkpoint.parent, "is a training run folder, not an export folder: export its checkpoint"),
        (pkg, "has no ONNX weights"),
        (tmp_path / "empty.zip", "has no ONNX weights"),
        (tmp_path / "missing", "not found"),
        ("", "choose an export folder"),
    ]
    for path, message in cases:
        notes.clear()
        assert w.open_model(path) is None
        (err,) = errors(notes)
        assert message in err and "\n" not in err, (path, err)
    assert w.seg is None and w.info_label.text() == "no model open"


# ---- prompts ----------------------------------------------------------------------------------------------

def test_drawn_box_gives_predicts_mask_and_points_refine_it(viewer, qtbot, tiny_export, notes):
    image = image_96x128()
    viewer.add_image(image, name="cells")
    w = make_widget(viewer)
    assert w.open_model(tiny_export.out_dir)
    shapes, points = w.add_prompt_layers()
    box = (20.0, 30.0, 70.0, 80.0)  # x0, y0, x1, y1
    shapes.add_rectangles(rectangle(*box))  # embeds first (worker), then decodes
    settle(qtbot, w)
    labels = viewer.layers["cells objects"]
    (oid,) = shapes.features["object"]
    want = reference(tiny_export.out_dir, image, boxes=[box])
    assert want.any() and oid == 1
    assert np.array_equal(labels.data == oid, want) and set(np.unique(labels.data)) == {0, oid}

    # a negative point for the same object re-segments it with box + point
    assert w.object_spin.value() == oid
    w.negative_radio.setChecked(True)
    points.add([[50.0, 40.0]])  # (y, x)
    settle(qtbot, w)
    want2 = reference(tiny_export.out_dir, image, boxes=[box], points=[[[40.0, 50.0]]], labels=[[0]])
    assert np.array_equal(labels.data == oid, want2)
    assert list(points.features["object"]) == [oid] and list(points.features["positive"]) == [False]

    # a new object from a positive point: its own id
    w.positive_radio.setChecked(True)
    new = w.new_object()
    points.add([[20.0, 100.0]])
    settle(qtbot, w)
    want3 = reference(tiny_export.out_dir, image, points=[[[100.0, 20.0]]], labels=[[1]])
    assert new == 2 and want3.any() and np.array_equal(labels.data == new, want3)  # painted over the first

    # deleting the box and its point removes that object, the other stays
    shapes.data = []
    points.selected_data = {0}
    points.remove_selected()
    settle(qtbot, w)
    assert not (labels.data == oid).any() and (labels.data == new).any()
    assert not errors(notes)


def test_stack_prompts_go_to_their_plane_and_tiles_count(viewer, qtbot, tiny_export, notes):
    """A stack: prompts on plane 2 are decoded with plane 2's embedding (tiled: 300 px > the model's 256)."""
    from peft_export.runtime.segmenter import Segmenter

    rng = np.random.default_rng(1)
    stack = np.stack([np.pad(disk_image(rng, size=128, n=6)[0], ((0, 172), (0, 140)), mode="reflect")
                      for _ in range(3)])  # (3, 300, 268)
    layer = viewer.add_image(stack, name="stack")
    w = make_widget(viewer)
    assert w.open_model(tiny_export.out_dir)
    viewer.dims.set_current_step(0, 2)
    shapes, _points = w.add_prompt_layers()
    box = (150.0, 180.0, 260.0, 290.0)  # crosses tile borders
    shapes.add_rectangles(rectangle(*box, plane=(2,)))
    settle(qtbot, w)
    seg = Segmenter(tiny_export.out_dir)
    plan = seg.set_image(stack[2])
    want = seg.predict(boxes=[box]).masks[0]
    labels = viewer.layers["stack objects"].data
    assert plan.tiled and w.progress.maximum() == len(plan.grid) == w.progress.value()
    assert want.any() and np.array_equal(labels[2] == 1, want) and not labels[:2].any()
    assert w._embedded == w._key(layer, (2,))
    assert not errors(notes)


# ---- segment everything -----------------------------------------------------------------------------------

def _cli_auto(run_cli, export, image_path, out, *extra) -> np.ndarray:
    import tifffile

    code, _out, err = run_cli("predict", str(export), str(image_path), "--auto", "-o", str(out), "--quiet", *extra)
    assert code == 0, err
    return tifffile.imread(out)


GRID = ("--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-thresh", "0")


def test_segment_everything_equals_predict_auto(viewer, qtbot, tiny_export, inst_export, run_cli, tmp_path, notes):
    """Point grid (tiny_export: no instance decoder) and the instance decoder (inst_export: the best method)."""
    import tifffile

    image = image_96x128(3)
    tifffile.imwrite(tmp_path / "img.tif", image)
    viewer.add_image(image, name="img")
    w = make_widget(viewer)
    assert w.open_model(tiny_export.out_dir)
    w.pps_spin.setValue(4)
    w.iou_spin.setValue(0.0)
    w.stab_spin.setValue(0.0)
    w.segment_everything("plane")
    settle(qtbot, w)
    got = viewer.layers["img objects"].data
    want = _cli_auto(run_cli, tiny_export.out_dir, tmp_path / "img.tif", tmp_path / "grid.tif", *GRID)
    assert want.max() >= 2 and np.array_equal(got, want)
    assert ("info", f"segment everything (a grid of point prompts): {want.max()} objects") in notes

    # with a prompted object: automatic ids start above it, and the object is decoded again on top
    shapes, _ = w.add_prompt_layers()
    box = (10.0, 20.0, 60.0, 70.0)
    shapes.add_rectangles(rectangle(*box))
    settle(qtbot, w)
    (oid,) = shapes.features["object"]
    assert oid == want.max() + 1
    w.segment_everything("plane")
    settle(qtbot, w)
    mask = reference(tiny_export.out_dir, image, boxes=[box])
    expected = np.where(mask, oid, np.where(want > 0, want + oid, 0))
    assert mask.any() and np.array_equal(viewer.layers["img objects"].data, expected)
    viewer.layers.remove("img boxes")  # no prompts: the instance run below is compared with the CLI's ids as they are

    assert w.open_model(inst_export.out_dir) and "instance decoder: yes" in w.info_label.text()
    w.segment_everything("plane")
    settle(qtbot, w)
    got = viewer.layers["img objects"].data
    want = _cli_auto(run_cli, inst_export.out_dir, tmp_path / "img.tif", tmp_path / "inst.tif")
    assert want.max() >= 1 and np.array_equal(got, want)
    assert ("info", "segment everything (the instance decoder + seeded watershed (micro-sam's AIS)): "
                    f"{len(np.unique(want)) - 1} objects") in notes
    assert not errors(notes)


def test_segment_everything_on_a_stack_and_cancel(viewer, qtbot, tiny_export, run_cli, tmp_path, notes):
    import tifffile

    stack = np.stack([image_96x128(s) for s in (4, 5, 6, 7)])
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack", metadata={"axes": "ZYX"})
    viewer.add_image(stack, name="stack")
    w = make_widget(viewer)
    assert w.open_model(tiny_export.out_dir)
    w.pps_spin.setValue(4)
    w.iou_spin.setValue(0.0)
    w.stab_spin.setValue(0.0)

    # cancelled at once: no labels layer appears, nothing is half-made
    assert w.segment_everything("stack") is not None
    w.cancel()
    settle(qtbot, w)
    assert "stack objects" not in viewer.layers
    assert ("info", "segment everything cancelled: nothing was changed") in notes

    w.segment_everything("stack")
    settle(qtbot, w)
    got = viewer.layers["stack objects"].data
    want = _cli_auto(run_cli, tiny_export.out_dir, tmp_path / "stack.tif", tmp_path / "labels.tif", *GRID)
    assert got.shape == want.shape == stack.shape and want.max() >= 2
    assert np.array_equal(got, want)
    assert w.progress.value() == w.progress.maximum() == 4
    assert not errors(notes)


def test_cancelled_embedding_leaves_no_cache_entry(viewer, qtbot, tiny_export, tmp_path, notes):
    image = image_96x128(8)
    viewer.add_image(image, name="img")
    w = make_widget(viewer)
    w.cache_edit.setText(str(tmp_path / "cache"))
    assert w.open_model(tiny_export.out_dir)
    w.embed()
    w.cancel()
    settle(qtbot, w)
    assert ("info", "embedding cancelled: nothing was changed") in notes
    assert w._embedded is None and not list((tmp_path / "cache").glob("*.npy"))
    w.embed()
    settle(qtbot, w)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    from peft_export.napari.widget import SegmenterWidget

    fresh = SegmenterWidget(viewer)  # remembers the cache folder too; the second embedding is a cache hit
    viewer.window.add_dock_widget(fresh, name="second")
    assert fresh is not w and fresh.cache_edit.text() == str(tmp_path / "cache")
    assert fresh.open_model(tiny_export.out_dir)
    fresh.embed()
    settle(qtbot, fresh)
    assert fresh.status_label.text() == "img: embedded, 1 tile (from the cache)"
    assert not errors(notes)


# ---- saving -----------------------------------------------------------------------------------------------

def test_saved_files_are_read_back_by_predict_and_finetune(viewer, qtbot, tiny_export, run_cli, tmp_path, notes):
    """Boxes alone are saved in both prompt formats; once an object mixes a box with points (or has points only),
    the point file holds every object, and ``predict --points`` rebuilds each of them (not a negative point as an
    object of its own)."""
    import tifffile

    from peft_export.data.dataset import load_samples
    from peft_export.runtime.prompts_io import read_boxes, read_points
    from peft_export.runtime.segmenter import Segmenter

    image = image_96x128(9)
    viewer.add_image(image, name="my cells")
    w = make_widget(viewer)
    assert w.open_model(tiny_export.out_dir)
    shapes, points = w.add_prompt_layers()
    boxes = [(5.0, 5.0, 40.0, 40.0), (80.0, 50.0, 120.0, 90.0)]
    for b in boxes:
        shapes.add_rectangles(rectangle(*b))
        settle(qtbot, w)
    seg = Segmenter(tiny_export.out_dir)
    seg.set_image(image)

    def predicted(flag: str, folder, name: str) -> np.ndarray:
        code, _o, err = run_cli("predict", str(tiny_export.out_dir), str(folder / "images"), flag,
                                str(folder / flag.strip("-")), "-o", str(tmp_path / name), "--quiet")
        assert code == 0, err
        return tifffile.imread(tmp_path / name / "my_cells.tif")

    only_boxes = tmp_path / "boxes_only"
    written = w.save(only_boxes, scope="plane")
    assert sorted(p.relative_to(only_boxes).as_posix() for p in written) == [
        "boxes/my_cells.json", "images/my_cells.tif", "labels/my_cells.tif", "points/my_cells.json"]
    assert np.array_equal(read_boxes(only_boxes / "boxes" / "my_cells.json"), np.array(boxes, np.float32))
    want = seg.predict_labels(boxes=np.array(boxes))[0]
    assert want.any() and np.array_equal(predicted("--boxes", only_boxes, "p1"), want)
    assert np.array_equal(predicted("--points", only_boxes, "p2"), want)

    # the first box refined by a negative point, and an object of two positive points
    w.object_spin.setValue(1)
    w.negative_radio.setChecked(True)
    points.add([[20.0, 25.0]])  # (y, x)
    settle(qtbot, w)
    w.positive_radio.setChecked(True)
    w.new_object()
    points.add([[60.0, 60.0], [70.0, 62.0]])
    settle(qtbot, w)
    labels = viewer.layers["my cells objects"].data.copy()
    assert list(shapes.features["object"]) == [1, 2] and list(points.features["object"]) == [1, 3, 3]
    assert set(np.unique(labels)) - {0} and set(np.unique(labels)) <= {0, 1, 2, 3}

    out = tmp_path / "ann"
    written = w.save(out, scope="plane")
    assert sorted(p.relative_to(out).as_posix() for p in written) == [
        "images/my_cells.tif", "labels/my_cells.tif", "points/my_cells.json"]
    assert np.array_equal(tifffile.imread(out / "images" / "my_cells.tif"), image)
    assert np.array_equal(tifffile.imread(out / "labels" / "my_cells.tif"), labels)
    drawn = [(np.array([[25.0, 20.0]]), [0], boxes[0]), (np.zeros((0, 2)), [], boxes[1]),
             (np.array([[60.0, 60.0], [62.0, 70.0]]), [1, 1], None)]
    saved = read_points(out / "points" / "my_cells.json")
    assert len(saved) == 3
    for got, (pts, labs, box) in zip(saved, drawn):
        assert np.array_equal(got.points, pts) and list(got.labels) == labs
        assert (got.box is None) == (box is None) and (box is None or np.array_equal(got.box, box))
    # predict --points on the saved folder = the runtime on the prompts that were drawn: three objects, the first
    # one the box with its negative point (as the widget decoded it)
    want = seg.predict_point_prompts(drawn)[0]
    got = predicted("--points", out, "p3")
    assert np.array_equal(got, want) and set(np.unique(got)) == {0, 1, 2, 3}
    first = seg.predict(points=drawn[0][0][None], labels=np.array([[0.0]]), boxes=np.array([boxes[0]]))
    assert np.array_equal(first.masks[0] & (got == 1), got == 1) and (got == 1).any()
    # finetune --data reads the pair
    (sample,) = load_samples(out, "train")
    assert sample.name == "my_cells" and np.array_equal(sample.labels > 0, labels > 0)

    # a second save is refused without overwrite, and nothing changes
    before = {p: p.stat().st_mtime_ns for p in written}
    notes.clear()
    assert w.save(out, scope="plane", overwrite=False) is None
    (err,) = errors(notes)
    assert "exists" in err and {p: p.stat().st_mtime_ns for p in written} == before


# ---- bad input in the widget ------------------------------------------------------------------------------

def test_bad_images_and_prompts_give_one_notification(viewer, qtbot, tiny_export, notes):
    w = make_widget(viewer)
    assert w.open_model(tiny_export.out_dir)
    viewer.add_image(np.zeros((2, 3, 40, 40), np.uint8), name="hyper")
    w.image_combo.setCurrentText("hyper")
    for action in (w.embed, w.add_prompt_layers, lambda: w.segment_everything("plane")):
        notes.clear()
        assert action() is None
        (err,) = errors(notes)
        assert "image 'hyper' is 4D" in err, err
    assert not w.busy and "hyper objects" not in viewer.layers

    # prompts on a layer of another shape than the image
    viewer.add_image(np.stack([image_96x128(s) for s in (1, 2)]), name="zs")
    w.image_combo.setCurrentText("zs")
    viewer.add_points(np.array([[10.0, 10.0]]), name="zs points", features={"positive": [True], "object": [1]})
    notes.clear()
    assert w.segment_prompts(force=True) is None
    (err,) = errors(notes)
    assert "prompt layer 'zs points' has 2 dimensions but image 'zs' has 3" in err, err

    # a labels layer of another shape than the image: refused before any work starts (no worker, nothing changed)
    viewer.add_labels(np.zeros((2, 50, 50), np.int32), name="zs objects")
    notes.clear()
    assert w.segment_everything("plane") is None
    (err,) = errors(notes)
    assert "labels layer 'zs objects' is (2, 50, 50) but image 'zs' is (2, 96, 128)" in err and not w.busy, err
    viewer.layers.remove("zs objects")

    # a box outside the image
    viewer.layers.remove("zs points")
    viewer.add_image(image_96x128(), name="small")
    w.image_combo.setCurrentText("small")
    shapes, _ = w.add_prompt_layers()
    notes.clear()
    shapes.add_rectangles(rectangle(100.0, 10.0, 400.0, 50.0))
    settle(qtbot, w)
    errs = errors(notes)
    assert len(errs) == 1 and "outside" in errs[0], errs
    assert not viewer.layers["small objects"].data.any()


def test_instance_package_without_prompt_decoder_says_so(viewer, qtbot, inst_export, tmp_path, notes):
    """An instance package (peft-export package of an export with an instance decoder) segments everything; a
    drawn box is refused with one line instead of a traceback."""
    from peft_export.package import PackageOptions, build_package

    if importlib.util.find_spec("bioimageio") is None or importlib.util.find_spec("bioimageio.spec") is None:
        pytest.skip("the bioimageio extra is not installed: pip install 'peft-export[bioimageio]'")
    build_package(inst_export.out_dir, tmp_path / "inst.zip", PackageOptions(authors=["Test"], validate_package=False))
    viewer.add_image(image_96x128(2), name="img")
    w = make_widget(viewer)
    assert w.open_model(tmp_path / "inst.zip"), notes
    assert "prompts: no" in w.info_label.text()
    shapes, _ = w.add_prompt_layers()
    notes.clear()
    shapes.add_rectangles(rectangle(10.0, 10.0, 40.0, 40.0))
    settle(qtbot, w)
    (err,) = errors(notes)
    assert "has no prompt decoder" in err
