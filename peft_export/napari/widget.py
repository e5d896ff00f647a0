"""The dock widget: open an export, embed, prompt, segment everything, save — over the runtime's Segmenter.

Layers the widget makes for an image layer ``NAME`` (same scale/translate): ``NAME boxes`` (Shapes: one box per
object, feature ``object``), ``NAME points`` (Points: features ``positive`` and ``object``; key ``n`` starts a
new object), ``NAME objects`` (Labels: one id per object; corrected with napari's own label tools).

Long work (embedding, segment everything) runs in a napari thread worker with a progress bar and a Cancel button;
its results reach the layers only when it finished, so a cancelled or failed run changes nothing. Errors are one
notification line (never a traceback dialog).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from pathlib import Path

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog, QMessageBox, QWidget
from superqt.utils import ensure_main_thread

from peft_export.errors import PeftExportError, UsageError, first_line
from peft_export.napari import core
from peft_export.napari.jobs import Cancelled, Progress, guarded, user_settings
from peft_export.napari.layers import ImageLayers
from peft_export.napari.panel import GRID_FIELDS, SCOPES, build_panel, start_dir
from peft_export.runtime.backend import BackendInfo
from peft_export.runtime.strategies import AutoOptions

log = logging.getLogger(__name__)


class SegmenterWidget(ImageLayers, QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.seg = None
        self.info: BackendInfo | None = None
        self._embedded: tuple | None = None  # (layer unique_id, plane, data id) whose embedding the segmenter has
        self._decoded: dict[tuple, tuple] = {}  # (image name, plane, object id) -> the prompt painted for it
        self._worker = None
        self._job = ""
        self._cancel = threading.Event()
        self._pending_prompts = False
        self._hooked: set = set()  # unique_id of the prompt layers whose edits the widget follows
        self._settings = user_settings()
        build_panel(self)
        self._refresh_images()
        events = self.viewer.layers.events
        events.inserted.connect(self._refresh_images)
        events.removed.connect(self._refresh_images)
        self.viewer.dims.events.current_step.connect(self._show_plane_state)
        self._update_state()

    # ---- state and messages ------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._worker is not None

    def report(self, exc: BaseException, what: str) -> None:
        """One notification line for an error (a library error's own line; others: what failed and why)."""
        if isinstance(exc, Cancelled):
            show_info(f"{what} cancelled: nothing was changed")
        elif isinstance(exc, PeftExportError):
            show_error(str(exc))
        else:
            log.warning("%s failed", what, exc_info=exc)
            show_error(f"{what} failed: {type(exc).__name__}: {first_line(exc)}")

    def _update_state(self) -> None:
        idle, ready = not self.busy, self.seg is not None
        prompts = ready and bool(self.info and self.info.prompt_decoder)
        for w in (self.open_btn, self.save_btn):
            w.setEnabled(idle)
        self.embed_btn.setEnabled(idle and ready)
        self.auto_btn.setEnabled(idle and ready)
        self.prompt_btn.setEnabled(idle and prompts)
        self.cancel_btn.setEnabled(not idle)

    @ensure_main_thread
    def _show_progress(self, what: str, done: int, total: int) -> None:
        self.progress.setMaximum(max(total, 1))
        self.progress.setValue(min(done, max(total, 1)))
        self.progress.setFormat(f"{what}: %v / %m")

    def _show_plane_state(self, *_args) -> None:
        try:
            layer = self._image_layer()
            plane = self._plane(layer)
        except PeftExportError:
            return
        where = f" plane {plane[0]}" if plane else ""
        state = "embedded" if self._embedded == self._key(layer, plane) else "not embedded"
        if not self.busy:
            self.status_label.setText(f"{layer.name}{where}: {state}")

    # ---- the model ---------------------------------------------------------------------------------------

    @guarded("opening the model")
    def open_model(self, path: str | Path | None = None) -> bool:
        """Open an export folder or a bioimage.io package (the path field's when ``path`` is None)."""
        if self.busy:
            raise UsageError(f"busy ({self._job}): wait or cancel first")
        path = self.path_edit.text() if path is None else str(path)
        self.path_edit.setText(path)
        cache = self.cache_edit.text().strip() or None
        seg = core.open_segmenter(path, self.backend_combo.currentText(), cache)
        info = seg.info
        self.seg, self.info = seg, info
        self._embedded = None
        self._decoded.clear()
        self.info_label.setText(core.describe_model(info))
        self._settings.setValue("model_path", str(Path(path).expanduser()))
        self._settings.setValue("cache", cache or "")
        self._settings.sync()
        self._update_state()
        self._show_plane_state()
        show_info(f"opened {info.model} ({info.precision}, {info.name}) from {Path(path).name}")
        return True

    def _require_model(self):
        if self.seg is None:
            raise UsageError("open an export folder or a bioimage.io package first")
        return self.seg

    # ---- prompts -----------------------------------------------------------------------------------------

    def _object_ids(self, layer) -> np.ndarray:
        if "object" not in layer.features:  # a layer the widget did not make
            layer.features = layer.features.assign(object=np.zeros(len(layer.data), np.int64))
        return np.array(layer.features["object"], np.int64)

    def next_object_id(self) -> int:
        """An id no object of the current image has (labels, boxes, points)."""
        image = self._image_layer()
        top = 0
        labels = self._labels_layer(image, create=False)
        if labels is not None:
            top = int(np.max(labels.data, initial=0))
        for role in ("boxes", "points"):
            layer = self._find(image, role)
            if layer is not None and len(layer.data):
                top = max(top, int(self._object_ids(layer).max(initial=0)))
        return top + 1

    @guarded("starting a new object")
    def new_object(self) -> int:
        oid = self.next_object_id()
        self.object_spin.setValue(oid)
        return oid

    def _sync_point_defaults(self, *_args) -> None:
        try:
            layer = self._find(self._image_layer(), "points")
        except PeftExportError:
            return
        if layer is not None and "positive" in layer.feature_defaults:
            layer.feature_defaults["positive"] = self.positive_radio.isChecked()
            layer.feature_defaults["object"] = self.object_spin.value()

    def _on_prompt_data(self, role: str, event) -> None:
        if str(getattr(event, "action", "")) in ("adding", "removing", "changing"):
            return
        layer = event.source
        try:
            ids = self._object_ids(layer)
            fresh = np.flatnonzero(ids <= 0)
            if len(fresh):  # new boxes start new objects; stray points join the current one
                if role == "boxes":
                    first = self.next_object_id()
                    ids[fresh] = first + np.arange(len(fresh))
                    self.object_spin.setValue(int(ids[fresh[-1]]))
                else:
                    ids[fresh] = self.object_spin.value()
                layer.features["object"] = ids
        except Exception as exc:
            self.report(exc, "reading the prompts")
            return
        if self.live_check.isChecked():
            QTimer.singleShot(0, self.segment_prompts)  # after napari finished its own handling of the edit

    def _prompts(self, image, plane: tuple[int, ...]) -> dict[int, core.ObjectPrompt]:
        boxes, points = {}, {}
        shapes = self._find(image, "boxes")
        if shapes is not None and len(shapes.data):
            core.check_prompt_layer(shapes.name, shapes.ndim, image.name, image.ndim)
            boxes = core.boxes_on_plane(shapes.data, self._object_ids(shapes), plane)
        pts = self._find(image, "points")
        if pts is not None and len(pts.data):
            core.check_prompt_layer(pts.name, pts.ndim, image.name, image.ndim)
            positive = pts.features["positive"] if "positive" in pts.features else np.ones(len(pts.data), bool)
            points = core.points_on_plane(pts.data, positive, self._object_ids(pts), plane)
        return core.collect_prompts(boxes, points)

    @guarded("segmenting the prompts")
    def segment_prompts(self, force: bool = False) -> int | None:
        """Decode the current plane's objects whose prompts changed (``force``: all) into the labels layer;
        objects whose prompts were deleted are removed. Returns how many objects were decoded."""
        if self.busy:
            self._pending_prompts = True
            return 0
        seg = self._require_model()
        image = self._image_layer()
        plane = self._plane(image)
        prompts = self._prompts(image, plane)
        mine = {k[2]: sig for k, sig in self._decoded.items() if k[:2] == (image.name, plane)}
        todo = [oid for oid, p in prompts.items() if p.decodable and (force or mine.get(oid) != p.signature())]
        gone = [oid for oid in mine if oid not in prompts or not prompts[oid].decodable]
        if not todo and not gone:
            return 0
        if todo and not self.info.prompt_decoder:
            raise UsageError(f"{self.info.source} is an instance package: it has no prompt decoder (use Segment "
                             "everything, or package an export without an instance decoder)")
        if todo and self._embedded != self._key(image, plane):
            self.embed(then=functools.partial(self.segment_prompts, force))
            return 0
        masks = {oid: core.decode_object(seg, prompts[oid])[0] for oid in todo}  # all decoded before any paint
        labels = self._labels_layer(image, create=True)
        target = labels.data[plane] if plane else labels.data
        for oid in gone:
            core.paint_object(target, oid, None)
            self._decoded.pop((image.name, plane, oid), None)
        for oid, mask in masks.items():
            core.paint_object(target, oid, mask)
            self._decoded[(image.name, plane, oid)] = prompts[oid].signature()
        labels.refresh()
        return len(todo)

    # ---- long work in a thread ---------------------------------------------------------------------------

    def _start(self, what: str, job, on_done, *, invalidates: bool):
        """Run ``job(progress)`` in a napari thread worker; ``on_done(result)`` back in the main thread."""
        if self.busy:
            raise UsageError(f"busy ({self._job}): wait or cancel first")
        if invalidates:  # the segmenter's image changes: no embedding is known to be current until it succeeded
            self._embedded = None
        self._cancel.clear()
        progress = Progress(self, self._cancel)

        def run():
            t0 = time.perf_counter()
            try:
                return "ok", job(progress), time.perf_counter() - t0
            except Exception as exc:
                return "error", exc, time.perf_counter() - t0

        worker = create_worker(run, _start_thread=False)
        progress.worker = worker
        worker.returned.connect(functools.partial(self._finish, what, on_done))
        self._worker, self._job = worker, what
        self.status_label.setText(f"{what}…")
        self._update_state()
        worker.start()
        return worker

    def _finish(self, what: str, on_done, outcome) -> None:
        status, value, seconds = outcome
        self._worker, self._job = None, ""
        self._update_state()
        if status == "ok":
            try:
                self.status_label.setText(f"{what}: done in {seconds:.1f} s")
                on_done(value)
            except Exception as exc:
                self.report(exc, what)
        else:
            self.progress.setValue(0)
            self.status_label.setText(f"{what}: {'cancelled' if isinstance(value, Cancelled) else 'failed'}")
            self.report(value, what)
        if self._pending_prompts and status == "ok":
            self._pending_prompts = False
            self.segment_prompts()

    def cancel(self) -> None:
        """Stop the running work at its next step (tile, grid batch or plane); nothing it made is kept."""
        if self.busy:
            self._cancel.set()
            self._pending_prompts = False
            self.status_label.setText(f"{self._job}: cancelling…")

    @staticmethod
    def _embed_plane(seg, progress, pixels: np.ndarray, name: str, *, lazy: bool = False) -> None:
        """``Segmenter.set_image`` with its tile progress (``on_tiles``) on the worker's bar (Cancel stops it
        between encoder calls: nothing is cached)."""
        seg.on_tiles = progress.tiles
        try:
            seg.set_image(pixels, name=name, lazy=lazy)
        finally:
            seg.on_tiles = None

    @guarded("embedding")
    def embed(self, then=None):
        """Embed the current image (the plane shown, for a stack) in a worker; ``then()`` after it succeeded."""
        seg = self._require_model()
        image = self._image_layer()
        self._layout(image)
        plane = self._plane(image)
        pixels, name, key = self._pixels(image, plane), self._plane_name(image, plane), self._key(image, plane)

        def job(progress):
            self._embed_plane(seg, progress, pixels, name)
            return bool(seg.cache_hit), len(seg.plan.grid)

        def done(result):
            hit, tiles = result
            self._embedded = key
            self._show_progress("embedding tiles", tiles, tiles)
            if then is not None:
                then()
            self.status_label.setText(f"{name}: embedded, {tiles} tile{'s' * (tiles > 1)}"
                                      f"{' (from the cache)' if hit else ''}")

        return self._start("embedding", job, done, invalidates=True)

    def auto_options(self) -> AutoOptions:
        """``predict --auto``'s options from the widget's controls."""
        values = (self.pps_spin.value(), self.iou_spin.value(), self.stab_spin.value(), self.area_spin.value())
        return core.auto_options(self.method_combo.currentText(), **dict(zip(GRID_FIELDS, values)))

    @guarded("segment everything")
    def segment_everything(self, scope: str | None = None):
        """``predict --auto`` on the current plane (``scope="plane"``) or every plane (``"stack"``) in a worker;
        the labels layer gets the result only when it finished (the plane's or stack's labels are replaced)."""
        seg = self._require_model()
        image = self._image_layer()
        planes, _hw = self._layout(image)
        scope = scope or ("stack" if self.scope_combo.currentText() == SCOPES[1] else "plane")
        if scope not in ("plane", "stack"):
            raise UsageError(f"scope must be plane or stack, got {scope!r}")
        options = self.auto_options()
        strategy, _why = seg.strategy(options)  # chosen once, from the model's BackendInfo (a bad choice: one line)
        self._labels_layer(image, create=False)  # a labels layer of another shape: one line now, not after the work
        if scope == "stack" and image.ndim == 3:
            data, names = self._data(image), [self._plane_name(image, (k,)) for k in range(planes)]

            def job(progress):
                progress.phase("segmenting planes", planes)
                seg.on_tiles = lambda _k, _n: progress.check()  # lazy planes embed tile by tile: Cancel between
                try:
                    return core.segment_planes(seg, (np.asarray(data[k]) for k in range(planes)), options, names,
                                               on_plane=lambda _k: progress(1), progress=progress.check)
                finally:
                    seg.on_tiles = None

            def done(result):
                self._put_auto(image, [(k,) for k in range(planes)], result, strategy)

            return self._start("segment everything", job, done, invalidates=True)
        plane = self._plane(image)
        key = self._key(image, plane)
        ready = self._embedded == key
        pixels, name = self._pixels(image, plane), self._plane_name(image, plane)

        def job(progress):
            if not ready:
                self._embed_plane(seg, progress, pixels, name)
            progress.phase("segmenting", strategy.steps(seg))
            return seg.segment(options, progress=progress)  # what predict --auto runs on an image

        def done(result):
            self._embedded = key
            self._put_auto(image, [plane], [result], strategy)

        return self._start("segment everything", job, done, invalidates=not ready)

    def _put_auto(self, image, planes: list[tuple[int, ...]], results: list[np.ndarray], strategy) -> None:
        """Automatic labels into the labels layer (ids above every prompted object's), then prompted objects of
        the current plane decoded on top again."""
        labels = self._labels_layer(image, create=True)
        offset = 0
        for role in ("boxes", "points"):
            layer = self._find(image, role)
            if layer is not None and len(layer.data):
                offset = max(offset, int(self._object_ids(layer).max(initial=0)))
        for plane, result in zip(planes, results):
            if plane:
                labels.data[plane] = core.offset_labels(result, offset)
            else:
                labels.data[...] = core.offset_labels(result, offset)
            for k in [k for k in self._decoded if k[:2] == (image.name, plane)]:
                del self._decoded[k]
        labels.refresh()
        n = sum(len(np.unique(r[r > 0])) for r in results)
        show_info(f"segment everything ({strategy.description}): {n} objects")
        if offset:
            self.segment_prompts()

    # ---- saving ------------------------------------------------------------------------------------------

    @guarded("saving")
    def save(self, folder: str | Path | None = None, scope: str | None = None,
             overwrite: bool | None = None) -> list[Path] | None:
        """Save the current plane (``scope="plane"``) or every annotated plane (``"stack"``): ``images/``,
        ``labels/`` (``finetune --data FOLDER``), ``boxes/`` and ``points/`` (``predict --boxes FOLDER/boxes``).
        Without ``folder`` a folder dialog asks; existing files are overwritten only after a question (or
        ``overwrite=True``)."""
        if self.busy:
            raise UsageError(f"busy ({self._job}): wait or cancel first")
        image = self._image_layer()
        planes, _ = self._layout(image)
        labels = self._labels_layer(image, create=False)
        if labels is None:
            raise UsageError(f"nothing to save for {image.name!r}: segment or prompt first")
        scope = scope or ("stack" if self.scope_combo.currentText() == SCOPES[1] else "plane")
        chosen = [(k,) for k in range(planes)] if scope == "stack" and image.ndim == 3 else [self._plane(image)]
        stem = core.safe_name(image.name)
        annotations = []
        for plane in chosen:
            lab = np.asarray(labels.data[plane] if plane else labels.data)
            prompts = self._prompts(image, plane)
            if len(chosen) > 1 and not lab.any() and not prompts:
                continue
            name = stem if not plane else f"{stem}_z{plane[0]:03d}"
            annotations.append(core.Annotation(name, self._pixels(image, plane), lab.copy(), prompts))
        if folder is None:
            folder = QFileDialog.getExistingDirectory(self, "Save annotations to",
                                                      start_dir(self._settings, "save_folder"))
            if not folder:
                return None
        if overwrite is None:
            existing = [p for a in annotations for p in core.annotation_paths(folder, a.name).values() if p.exists()]
            overwrite = False
            if existing:
                answer = QMessageBox.question(self, "Overwrite?", f"{len(existing)} file(s) exist in {folder} "
                                              f"(first: {existing[0].name}). Overwrite them?")
                if answer != QMessageBox.StandardButton.Yes:
                    return None
                overwrite = True
        written = core.save_annotations(folder, annotations, overwrite=overwrite)
        self._settings.setValue("save_folder", str(folder))
        self._settings.sync()
        show_info(f"saved {len(annotations)} image(s) to {folder}: images/ + labels/ (finetune --data {folder}), "
                  f"boxes/ + points/ (predict … --boxes {Path(folder) / 'boxes'})")
        return written
