"""The README's napari screenshot: the plugin's widget on the DSB2018 sample with box and point prompts and the
masks they gave. Needs a display (a virtual one is fine) and the ``napari`` and ``samples`` extras::

    peft-export export lite_medsam -o lite_onnx          # zero-shot LiteMedSAM answers box prompts well
    xvfb-run -a -s "-screen 0 1600x1000x24" python examples/napari_screenshot.py lite_onnx -o docs/napari.png

The prompts are boxes around some of the image's hand-labelled nuclei (its ground truth, only to place them), a
positive point added to one box's object and a negative point beside another; everything else is what the widget
does when a user draws them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def wait_idle(widget, app, timeout: float = 600.0) -> None:
    t0 = last = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if time.monotonic() - last > 10:
            last = time.monotonic()
            print(f"  {widget.status_label.text()} {widget.progress.value()}/{widget.progress.maximum()}", flush=True)
        app.processEvents()
        if not widget.busy:
            for _ in range(20):
                app.processEvents()
                time.sleep(0.01)
            if not widget.busy:
                return
        time.sleep(0.05)
    raise TimeoutError("the widget did not finish in time")


def nucleus_boxes(labels: np.ndarray, region: tuple[int, int, int, int], count: int) -> list[tuple[float, ...]]:
    """Boxes (x0, y0, x1, y1) of the ``count`` largest labelled nuclei whose centre lies in ``region``."""
    from scipy import ndimage

    x0, y0, x1, y1 = region
    found = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        cy, cx = (sl[0].start + sl[0].stop) / 2, (sl[1].start + sl[1].stop) / 2
        if x0 <= cx < x1 and y0 <= cy < y1:
            area = int((labels[sl] == i).sum())
            found.append((area, (sl[1].start - 1.0, sl[0].start - 1.0, sl[1].stop + 0.0, sl[0].stop + 0.0)))
    found.sort(key=lambda t: -t[0])
    return [box for _, box in found[:count]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", help="an export folder (peft-export export / merge-and-export)")
    ap.add_argument("-o", "--out", default="docs/napari.png")
    ap.add_argument("--boxes", type=int, default=14, help="how many nuclei get a box")
    args = ap.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    from peft_export.data.samples import dsb2018

    _image, truth = dsb2018()
    viewer = napari.Viewer(title="peft-export in napari", show=True)
    viewer.window._qt_window.resize(1500, 900)
    viewer.open_sample("peft-export", "dsb2018")
    _dock, widget = viewer.window.add_plugin_dock_widget("peft-export", "SAM export segmenter")
    app = QApplication.instance()
    if not widget.open_model(args.export):
        raise SystemExit("could not open the export (see the notification above)")
    shapes, points = widget.add_prompt_layers()
    boxes = nucleus_boxes(truth, (40, 40, 472, 472), args.boxes)
    for x0, y0, x1, y1 in boxes:
        shapes.add_rectangles(np.array([[y0, x0], [y1, x1]]))
        wait_idle(widget, app)
    # a positive point refines the first box's object; a negative point beside the second
    widget.object_spin.setValue(int(shapes.features["object"].iloc[0]))
    bx = boxes[0]
    points.add([[(bx[1] + bx[3]) / 2, (bx[0] + bx[2]) / 2]])
    wait_idle(widget, app)
    widget.negative_radio.setChecked(True)
    widget.object_spin.setValue(int(shapes.features["object"].iloc[1]))
    bx = boxes[1]
    points.add([[bx[3] + 4, bx[2] + 4]])
    wait_idle(widget, app)
    widget.positive_radio.setChecked(True)
    viewer.layers.selection.active = shapes
    shapes.mode = "pan_zoom"
    viewer.reset_view()
    for _ in range(50):
        app.processEvents()
        time.sleep(0.02)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    shot = viewer.screenshot(canvas_only=False, flash=False)  # RGBA array of the whole window
    Image.fromarray(np.ascontiguousarray(shot[..., :3])).save(out, optimize=True)
    labels = viewer.layers["DSB2018 nuclei objects"].data
    print(f"{out}: {len(boxes)} boxes, {len(points.data)} points, {len(np.unique(labels)) - 1} objects; "
          f"{widget.status_label.text()}")
    viewer.close()


if __name__ == "__main__":
    main()
