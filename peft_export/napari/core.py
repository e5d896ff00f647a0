"""What the napari widget does, without Qt or napari: open a model, say what it is, turn layer data into prompts,
decode them with the Segmenter, segment everything as ``predict --auto`` does, and save annotations in the CLI's
formats. numpy + the torch-free runtime only.

Coordinates: napari layers hold (…, y, x) (a stack: (z, y, x)); the runtime and the prompt files take x, y image
pixels. An object is one id in the labels layer; its prompt is at most one box (the ``object`` feature of a Shapes
layer) and any positive/negative points (the ``positive`` and ``object`` features of a Points layer).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from peft_export.data.io import write_labels
from peft_export.errors import DataError, UsageError
from peft_export.files import atomic_write, together
from peft_export.runtime.backend import BackendInfo
from peft_export.runtime.backends import RuntimeOptions
from peft_export.runtime.batch import PredictRequest, segment_image
from peft_export.runtime.segmenter import Segmenter
from peft_export.runtime.strategies import AutoOptions

# ---- the model -------------------------------------------------------------------------------------------


def open_segmenter(path: str | Path, backend: str = "auto", cache: str | Path | None = None):
    """A Segmenter on an export folder or a bioimage.io package (``runtime.backends.open_model``: a checkpoint or a
    run folder gets the command that exports it)."""
    text = str(path).strip()
    if not text:
        raise UsageError("choose an export folder (peft-export export / merge-and-export) or a bioimage.io package")
    p = Path(text).expanduser()
    if not p.exists():
        raise DataError(f"not found: {p}")
    cache = str(cache).strip() if cache is not None and str(cache).strip() else None
    return Segmenter(p, runtime=RuntimeOptions.parse({"backend": backend}), cache=cache)


def describe_model(info: BackendInfo) -> str:
    """What the widget shows about the open model (its ``BackendInfo``)."""
    providers = list(info.details.get("providers") or [])
    device = providers[0].replace("ExecutionProvider", "") if providers else ("GPU" if info.on_gpu else "CPU")
    precision = info.precision if info.compute in (info.precision, "fp32") else f"{info.precision} ({info.compute})"
    return (f"model: {info.model}\nbackend: {info.name} ({device})\nprecision: {precision}\n"
            f"instance decoder: {'yes' if info.instance_decoder else 'no'}"
            + ("" if info.prompt_decoder else "\nprompts: no (an instance package has no prompt decoder)"))


# ---- images ----------------------------------------------------------------------------------------------

def image_layout(shape: tuple[int, ...], rgb: bool, name: str) -> tuple[int, tuple[int, int]]:
    """(number of planes, (H, W)) of a 2D image (1 plane) or a 3D stack; one clear error for anything else."""
    spatial = tuple(int(s) for s in (shape[:-1] if rgb else shape))
    if len(spatial) == 2:
        return 1, spatial
    if len(spatial) == 3:
        return spatial[0], spatial[1:]
    raise UsageError(f"image {name!r} is {len(spatial)}D {tuple(shape)}: the plugin segments 2D images (grayscale "
                     "or RGB) and 3D stacks (z or t), one plane at a time; make a 2D or 3D layer of it first (one "
                     "channel, one time point)")


def check_prompt_layer(layer_name: str, layer_ndim: int, image_name: str, image_ndim: int) -> None:
    if layer_ndim != image_ndim:
        raise UsageError(f"prompt layer {layer_name!r} has {layer_ndim} dimensions but image {image_name!r} has "
                         f"{image_ndim}: draw prompts on the layers the widget makes for this image ('Prompt layers')")


# ---- prompts ---------------------------------------------------------------------------------------------

@dataclass
class ObjectPrompt:
    """One object's prompt in image pixels: a box x0, y0, x1, y1 and/or points (N, 2) x, y with labels (N,) 1/0."""

    object_id: int
    box: np.ndarray | None = None
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    @property
    def decodable(self) -> bool:
        """A box, or at least one positive point (negative points alone say nothing about an object)."""
        return self.box is not None or bool((self.labels == 1).any())

    def signature(self) -> tuple:
        box = None if self.box is None else tuple(float(v) for v in self.box)
        return box, tuple((float(x), float(y), float(v)) for (x, y), v in zip(self.points, self.labels))


def _on_plane(lead: np.ndarray, plane: tuple[int, ...]) -> np.ndarray:
    """Which rows of leading (non-YX) coordinates lie on ``plane``."""
    if not plane:
        return np.ones(len(lead), bool)
    return np.all(np.round(lead) == np.asarray(plane, np.float64), axis=1)


def boxes_on_plane(shapes: Iterable[np.ndarray], object_ids: Iterable[int], plane: tuple[int, ...]
                   ) -> dict[int, np.ndarray]:
    """Each shape's bounding box (x0, y0, x1, y1) by object id, for shapes drawn on ``plane`` (the last shape of an
    id wins)."""
    out: dict[int, np.ndarray] = {}
    for verts, oid in zip(shapes, object_ids):
        v = np.asarray(verts, np.float64)
        if len(v) == 0 or int(oid) <= 0 or not _on_plane(v[:, :-2], plane).all():
            continue
        y, x = v[:, -2], v[:, -1]
        out[int(oid)] = np.array([x.min(), y.min(), x.max(), y.max()], np.float32)
    return out


def points_on_plane(coords: np.ndarray, positive: Iterable[bool], object_ids: Iterable[int], plane: tuple[int, ...]
                    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Points on ``plane`` grouped by object id: {id: (points (N, 2) x, y, labels (N,) 1/0)}."""
    c = np.asarray(coords, np.float64).reshape(-1, len(plane) + 2)
    pos = np.asarray(list(positive), bool)
    ids = np.asarray(list(object_ids), np.int64)
    keep = _on_plane(c[:, :-2], plane) & (ids > 0)
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for oid in np.unique(ids[keep]):
        sel = keep & (ids == oid)
        out[int(oid)] = (c[sel][:, [-1, -2]].astype(np.float32), pos[sel].astype(np.float32))
    return out


def collect_prompts(boxes: dict[int, np.ndarray], points: dict[int, tuple[np.ndarray, np.ndarray]]
                    ) -> dict[int, ObjectPrompt]:
    out = {}
    for oid in sorted(set(boxes) | set(points)):
        pts, labs = points.get(oid, (np.zeros((0, 2), np.float32), np.zeros(0, np.float32)))
        out[oid] = ObjectPrompt(oid, boxes.get(oid), pts, labs)
    return out


def decode_object(seg, prompt: ObjectPrompt) -> tuple[np.ndarray, float]:
    """One object's mask (H, W) bool and predicted IoU: ``Segmenter.predict`` with its box and/or points."""
    boxes = None if prompt.box is None else prompt.box[None]
    pts = labs = None
    if len(prompt.points):
        pts, labs = prompt.points[None], prompt.labels[None]
    out = seg.predict(points=pts, labels=labs, boxes=boxes)
    return out.masks[0], float(out.scores[0])


def paint_object(plane_labels: np.ndarray, object_id: int, mask: np.ndarray | None) -> None:
    """Replace object ``object_id`` in a label plane by ``mask`` (in place; None removes it)."""
    plane_labels[plane_labels == object_id] = 0
    if mask is not None:
        plane_labels[mask] = object_id


# ---- segment everything ----------------------------------------------------------------------------------

def auto_options(method: str = "auto", **grid) -> AutoOptions:
    """``predict --auto``'s options (:class:`~peft_export.runtime.strategies.AutoOptions`): the method and the
    grid strategy's settings by field name; one line for a bad value."""
    return AutoOptions.parse({"method": method, **{f"grid.{k}": v for k, v in grid.items()}})


def segment_planes(seg, planes: Iterable[np.ndarray], options: AutoOptions, names: Iterable[str],
                   on_plane: Callable[[int], None] | None = None, progress=None) -> list[np.ndarray]:
    """Every plane of a stack, one at a time, as ``predict --auto`` segments a stack (``runtime.batch.segment_image``:
    the plane set lazily, then ``Segmenter.segment``)."""
    req = PredictRequest("auto", auto=options)
    out = []
    for k, (plane, name) in enumerate(zip(planes, names)):
        labels, _ = segment_image(seg, plane, req, None, name, progress)
        out.append(labels)
        if on_plane is not None:
            on_plane(k)
    return out


def offset_labels(labels: np.ndarray, offset: int) -> np.ndarray:
    """Ids shifted by ``offset`` (0 stays background), so automatic objects keep clear of prompted objects' ids."""
    if offset <= 0:
        return labels
    out = labels.astype(np.int64, copy=True)
    out[out > 0] += offset
    return out.astype(labels.dtype if out.max(initial=0) <= np.iinfo(np.int32).max else np.int64)


# ---- saving ----------------------------------------------------------------------------------------------

@dataclass
class Annotation:
    """One 2D image (a plane of a stack) to save: its pixels, labels (H, W) and prompts."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    prompts: dict[int, ObjectPrompt] = field(default_factory=dict)


def safe_name(name: str) -> str:
    """A file stem from a layer name."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._") or "image"
    return stem


def annotation_paths(folder: str | Path, name: str) -> dict[str, Path]:
    """``images/`` + ``labels/`` (what ``finetune --data`` reads), ``points/`` + ``boxes/`` (what ``predict
    --points DIR/points`` / ``--boxes DIR/boxes`` read for ``DIR/images``)."""
    f = Path(folder)
    return {"image": f / "images" / f"{name}.tif", "labels": f / "labels" / f"{name}.tif",
            "boxes": f / "boxes" / f"{name}.json", "points": f / "points" / f"{name}.json"}


def _saved(prompts: dict[int, ObjectPrompt]) -> list[ObjectPrompt]:
    """The objects a prompt file keeps, in id order: those the widget decodes (a box or a positive point)."""
    return [p for _, p in sorted(prompts.items()) if p.decodable]


def boxes_json(prompts: dict[int, ObjectPrompt]) -> str | None:
    """The CLI's box file (``[[x0, y0, x1, y1], ...]``, objects in id order), when every object is a box alone
    (else None: ``points_json`` holds them)."""
    saved = _saved(prompts)
    if not saved or any(p.box is None or len(p.points) for p in saved):
        return None
    return json.dumps([[float(v) for v in p.box] for p in saved]) + "\n"


def points_json(prompts: dict[int, ObjectPrompt]) -> str | None:
    """The CLI's point file as a list of prompts, one per object in id order, each with its points and labels and
    its box when it has one (``runtime.prompts_io.read_points``): every object, also boxes alone, so that
    ``predict --points`` rebuilds all of them; None without objects."""
    saved = _saved(prompts)
    if not saved:
        return None
    items = []
    for p in saved:
        item: dict = {"points": [[float(x), float(y)] for x, y in p.points], "labels": [int(v) for v in p.labels]}
        if p.box is not None:
            item["box"] = [float(v) for v in p.box]
        items.append(item)
    return json.dumps(items) + "\n"


def save_annotations(folder: str | Path, annotations: list[Annotation], *, overwrite: bool = False) -> list[Path]:
    """Write each annotation's image, labels and prompt files, all together (``peft_export.files.together``: every
    file under a temporary name first, moved into place only when all were written; otherwise none). Existing files
    are refused unless ``overwrite``; then prompt files the annotation no longer has are removed."""
    import tifffile

    if not annotations:
        raise UsageError("nothing to save: no labels or prompts on the chosen plane(s)")
    jobs: list[tuple[Path, Callable[[], object]]] = []
    stale: list[Path] = []
    for a in annotations:
        if a.labels.shape != a.image.shape[:2]:
            raise DataError(f"{a.name}: labels {a.labels.shape} do not match the image {a.image.shape[:2]}")
        paths = annotation_paths(folder, a.name)
        if not overwrite:
            existing = [p for p in paths.values() if p.exists()]
            if existing:
                raise UsageError(f"{existing[0]} exists: choose another folder, or overwrite")
        image, labels = np.ascontiguousarray(a.image), np.asarray(a.labels)
        jobs.append((paths["image"], lambda p=paths["image"], im=image: atomic_write(
            p, lambda tmp: tifffile.imwrite(tmp, im))))
        jobs.append((paths["labels"], lambda p=paths["labels"], lab=labels: write_labels(p, lab)))
        for role, text in (("boxes", boxes_json(a.prompts)), ("points", points_json(a.prompts))):
            if text is not None:
                jobs.append((paths[role], lambda p=paths[role], t=text: atomic_write(p, lambda tmp: tmp.write_text(t))))
            elif paths[role].exists():
                stale.append(paths[role])
    with together():
        for _path, write in jobs:
            write()
    for p in stale:
        p.unlink()
    return [path for path, _ in jobs]
