"""The dock widget's access to napari's layers: the chosen image, its planes, and the layers made for it
(``NAME boxes``, ``NAME points``, ``NAME objects``; see :mod:`peft_export.napari.widget`)."""

from __future__ import annotations

import functools

import numpy as np

from peft_export.errors import PeftExportError, UsageError
from peft_export.napari import core
from peft_export.napari.jobs import guarded

POSITIVE, NEGATIVE = "#33ff33", "#ff3333"
BOX_COLOR = "#ffd000"


class ImageLayers:
    """Mixed into the widget (which gives ``viewer``, ``image_combo``, ``_hooked`` and the prompt handlers)."""

    def _refresh_images(self, *_args) -> None:
        from napari.layers import Image

        current = self.image_combo.currentText()
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        active = self.viewer.layers.selection.active
        pick = current if current in names else (active.name if active is not None and active.name in names else "")
        if pick:
            self.image_combo.setCurrentText(pick)
        self.image_combo.blockSignals(False)
        if self.image_combo.currentText() != current:
            self._image_changed(self.image_combo.currentText())

    def _image_changed(self, _name: str) -> None:
        try:
            layer = self._image_layer()
        except PeftExportError:
            return
        for role in ("boxes", "points"):
            found = self._find(layer, role)
            if found is not None:
                self._hook(found, role)
        self._show_plane_state()

    def _image_layer(self):
        name = self.image_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise UsageError("add an image layer first (File > Open, or File > Open Sample > peft-export)")
        return self.viewer.layers[name]

    @staticmethod
    def _data(layer):
        return layer.data[0] if getattr(layer, "multiscale", False) else layer.data

    def _layout(self, layer) -> tuple[int, tuple[int, int]]:
        return core.image_layout(tuple(self._data(layer).shape), bool(getattr(layer, "rgb", False)), layer.name)

    def _plane(self, layer) -> tuple[int, ...]:
        """() for a 2D image; (k,) for the plane of a stack the viewer shows."""
        planes, _ = self._layout(layer)
        if layer.ndim == 2:
            return ()
        k = int(np.round(layer.world_to_data(self.viewer.dims.point)[0]))
        return (min(max(k, 0), planes - 1),)

    def _pixels(self, layer, plane: tuple[int, ...]) -> np.ndarray:
        data = self._data(layer)
        return np.asarray(data[plane] if plane else data)

    def _plane_name(self, layer, plane: tuple[int, ...]) -> str:
        return layer.name if not plane else f"{layer.name}[z={plane[0]}]"

    def _key(self, layer, plane: tuple[int, ...]) -> tuple:
        """Which pixels an embedding is of. (napari hands plugins proxies of its objects, a new one per access:
        layers are told apart by their ``unique_id``, not by ``id()``.)"""
        return layer.unique_id, plane, id(layer.data)

    def _find(self, image, role: str):
        name = f"{image.name} {role}"
        return self.viewer.layers[name] if name in self.viewer.layers else None  # noqa: SIM401 (a LayerList)

    def _labels_layer(self, image, *, create: bool):
        planes, hw = self._layout(image)
        shape = hw if image.ndim == 2 else (planes, *hw)
        layer = self._find(image, "objects")
        if layer is not None:
            if tuple(layer.data.shape) != tuple(shape):
                raise UsageError(f"labels layer {layer.name!r} is {tuple(layer.data.shape)} but image {image.name!r} "
                                 f"is {tuple(shape)}: rename or delete it")
            return layer
        if not create:
            return None
        return self.viewer.add_labels(np.zeros(shape, np.int32), name=f"{image.name} objects", scale=image.scale,
                                      translate=image.translate, opacity=0.5)

    @guarded("adding prompt layers")
    def add_prompt_layers(self):
        """The image's Shapes (boxes) and Points layers (made once), the Shapes layer ready for drawing boxes."""
        from napari.utils.colormaps.categorical_colormap import CategoricalColormap

        image = self._image_layer()
        _, hw = self._layout(image)
        nd = image.ndim
        self._labels_layer(image, create=True)
        shapes = self._find(image, "boxes")
        if shapes is None:
            shapes = self.viewer.add_shapes(
                ndim=nd, name=f"{image.name} boxes", scale=image.scale, translate=image.translate,
                features={"object": np.zeros(0, np.int64)}, edge_color=BOX_COLOR, face_color="transparent",
                edge_width=max(1.0, max(hw) / 256))
            shapes.feature_defaults["object"] = 0
        points = self._find(image, "points")
        if points is None:
            points = self.viewer.add_points(
                np.zeros((0, nd)), ndim=nd, name=f"{image.name} points", scale=image.scale,
                translate=image.translate, features={"positive": np.zeros(0, bool), "object": np.zeros(0, np.int64)},
                face_color="positive", border_color="white", size=max(4.0, max(hw) / 48),
                face_color_cycle=CategoricalColormap(colormap={True: POSITIVE, False: NEGATIVE}))
        self._hook(shapes, "boxes")
        self._hook(points, "points")
        self._sync_point_defaults()
        self.viewer.layers.selection.active = shapes
        shapes.mode = "add_rectangle"
        return shapes, points

    def _hook(self, layer, role: str) -> None:
        if layer.unique_id in self._hooked:
            return
        self._hooked.add(layer.unique_id)
        layer.events.data.connect(functools.partial(self._on_prompt_data, role))
        if role == "points":
            layer.bind_key("n", lambda _layer: self.new_object(), overwrite=True)
            self._sync_point_defaults()
