"""The dock widget's controls, laid out in five groups: Model, Image, Prompts, Segment everything, Save. Each
control becomes an attribute of the widget and is connected to the widget's action."""

from __future__ import annotations

from pathlib import Path

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QVBoxLayout,
)

from peft_export.runtime.auto import GridOptions
from peft_export.runtime.backends import BACKENDS as REGISTERED
from peft_export.runtime.strategies import AutoOptions

BACKENDS = ("auto", *REGISTERED)  # the runtime's registry (--backend)
GRID_FIELDS = ("points_per_side", "pred_iou_thresh", "stability_thresh", "min_area")  # shown in the widget
SCOPES = ("current plane", "whole stack")


def build_panel(w) -> None:
    """The controls of ``w`` (a :class:`~peft_export.napari.widget.SegmenterWidget`), from its remembered settings."""
    root = QVBoxLayout(w)
    s = w._settings

    box = QGroupBox("Model")
    grid = QGridLayout(box)
    w.path_edit = QLineEdit(str(s.value("model_path", "") or ""))
    w.path_edit.setPlaceholderText("export folder or bioimage.io package (.zip)")
    folder_btn, package_btn = QPushButton("Folder…"), QPushButton("Package…")
    w.open_btn = QPushButton("Open")
    folder_btn.clicked.connect(lambda: pick_model(w, package=False))
    package_btn.clicked.connect(lambda: pick_model(w, package=True))
    w.open_btn.clicked.connect(lambda: w.open_model())
    w.backend_combo = QComboBox()
    w.backend_combo.addItems(BACKENDS)
    w.cache_edit = QLineEdit(str(s.value("cache", "") or ""))
    w.cache_edit.setPlaceholderText("embedding cache folder (optional)")
    cache_btn = QPushButton("…")
    cache_btn.clicked.connect(lambda: pick_cache(w))
    w.info_label = QLabel("no model open")
    w.info_label.setWordWrap(True)
    grid.addWidget(w.path_edit, 0, 0, 1, 3)
    grid.addWidget(folder_btn, 1, 0)
    grid.addWidget(package_btn, 1, 1)
    grid.addWidget(w.open_btn, 1, 2)
    grid.addWidget(QLabel("backend"), 2, 0)
    grid.addWidget(w.backend_combo, 2, 1, 1, 2)
    grid.addWidget(w.cache_edit, 3, 0, 1, 2)
    grid.addWidget(cache_btn, 3, 2)
    grid.addWidget(w.info_label, 4, 0, 1, 3)
    root.addWidget(box)

    box = QGroupBox("Image")
    form = QGridLayout(box)
    w.image_combo = QComboBox()
    w.image_combo.currentTextChanged.connect(w._image_changed)
    w.embed_btn = QPushButton("Embed")
    w.embed_btn.clicked.connect(lambda: w.embed())
    w.progress = QProgressBar()
    w.progress.setFormat("%p%")
    w.cancel_btn = QPushButton("Cancel")
    w.cancel_btn.clicked.connect(w.cancel)
    w.status_label = QLabel("")
    w.status_label.setWordWrap(True)
    form.addWidget(w.image_combo, 0, 0, 1, 2)
    form.addWidget(w.embed_btn, 0, 2)
    form.addWidget(w.progress, 1, 0, 1, 2)
    form.addWidget(w.cancel_btn, 1, 2)
    form.addWidget(w.status_label, 2, 0, 1, 3)
    root.addWidget(box)

    box = QGroupBox("Prompts (boxes, points)")
    form = QGridLayout(box)
    w.layers_btn = QPushButton("Prompt layers")
    w.layers_btn.setToolTip("add a Shapes layer for boxes and a Points layer for points to the image")
    w.layers_btn.clicked.connect(lambda: w.add_prompt_layers())
    w.positive_radio, w.negative_radio = QRadioButton("positive"), QRadioButton("negative")
    w.positive_radio.setChecked(True)
    w.positive_radio.toggled.connect(w._sync_point_defaults)
    w.object_spin = QSpinBox()
    w.object_spin.setRange(1, 2**31 - 1)
    w.object_spin.setToolTip("the object new points refine (a new box starts a new object)")
    w.object_spin.valueChanged.connect(w._sync_point_defaults)
    w.new_object_btn = QPushButton("New object")
    w.new_object_btn.clicked.connect(lambda: w.new_object())
    w.live_check = QCheckBox("segment as I draw")
    w.live_check.setChecked(True)
    w.prompt_btn = QPushButton("Segment prompts")
    w.prompt_btn.clicked.connect(lambda: w.segment_prompts(force=True))
    form.addWidget(w.layers_btn, 0, 0)
    form.addWidget(w.positive_radio, 0, 1)
    form.addWidget(w.negative_radio, 0, 2)
    form.addWidget(QLabel("object"), 1, 0)
    form.addWidget(w.object_spin, 1, 1)
    form.addWidget(w.new_object_btn, 1, 2)
    form.addWidget(w.live_check, 2, 0, 1, 2)
    form.addWidget(w.prompt_btn, 2, 2)
    root.addWidget(box)

    box = QGroupBox("Segment everything")
    form = QFormLayout(box)
    d, fields = GridOptions(), GridOptions.model_fields
    w.scope_combo = QComboBox()
    w.scope_combo.addItems(SCOPES)
    w.method_combo = QComboBox()
    w.method_combo.addItems(list(AutoOptions.model_fields["method"].annotation.__args__))
    w.method_combo.setToolTip(AutoOptions.model_fields["method"].description)
    w.pps_spin = QSpinBox()
    w.pps_spin.setRange(1, 256)
    w.pps_spin.setValue(d.points_per_side)
    w.iou_spin, w.stab_spin = QDoubleSpinBox(), QDoubleSpinBox()
    for spin, value in ((w.iou_spin, d.pred_iou_thresh), (w.stab_spin, d.stability_thresh)):
        spin.setRange(0.0, 1.0)
        spin.setSingleStep(0.05)
        spin.setDecimals(2)
        spin.setValue(value)
    w.area_spin = QSpinBox()
    w.area_spin.setRange(0, 10**9)
    w.area_spin.setValue(d.min_area)
    for name, spin in zip(GRID_FIELDS, (w.pps_spin, w.iou_spin, w.stab_spin, w.area_spin)):
        spin.setToolTip(f"grid: {fields[name].description}")
    w.auto_btn = QPushButton("Segment everything")
    w.auto_btn.clicked.connect(lambda: w.segment_everything())
    form.addRow("scope", w.scope_combo)
    form.addRow("method", w.method_combo)
    form.addRow("grid points per side", w.pps_spin)
    form.addRow("grid min. predicted IoU", w.iou_spin)
    form.addRow("grid min. stability", w.stab_spin)
    form.addRow("min. area (px)", w.area_spin)
    form.addRow(w.auto_btn)
    root.addWidget(box)

    box = QGroupBox("Save")
    row = QHBoxLayout(box)
    w.save_btn = QPushButton("Save annotations…")
    w.save_btn.setToolTip("images/ + labels/ (finetune --data DIR), points/ (predict --points DIR/points) and, "
                          "for boxes alone, boxes/ (predict --boxes DIR/boxes)")
    w.save_btn.clicked.connect(lambda: w.save())
    row.addWidget(w.save_btn)
    root.addWidget(box)
    root.addStretch(1)


def start_dir(settings, key: str) -> str:
    """Where a file dialog opens: beside the last model / cache, in the last save folder, else the home folder."""
    last = Path(str(settings.value(key, "") or "")).expanduser()
    if str(last) in ("", "."):
        return str(Path.home())
    return str(last if last.is_dir() and key == "save_folder" else last.parent)


def pick_model(w, *, package: bool) -> None:
    if package:
        path, _ = QFileDialog.getOpenFileName(w, "bioimage.io package", start_dir(w._settings, "model_path"),
                                              "bioimage.io packages (*.zip rdf.yaml bioimageio.yaml)")
    else:
        path = QFileDialog.getExistingDirectory(w, "Export folder", start_dir(w._settings, "model_path"))
    if path:
        w.open_model(path)


def pick_cache(w) -> None:
    path = QFileDialog.getExistingDirectory(w, "Embedding cache folder", start_dir(w._settings, "cache"))
    if path:
        w.cache_edit.setText(path)
