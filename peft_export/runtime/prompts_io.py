"""Prompt files for ``peft-export predict`` (torch-free).

Boxes, one object each (pixel coordinates of the image, x0 y0 x1 y1):
- JSON: ``[[x0, y0, x1, y1], ...]`` or ``{"boxes": [[...], ...]}``
- CSV with a header: ``x0,y0,x1,y1`` (other columns are ignored)

Points, one object per point unless grouped:
- JSON: ``[[x, y], ...]`` (all positive), ``{"points": [[x, y], ...], "labels": [1, 0, ...]}``, or a list of
  prompts ``[{"points": [[x, y], ...], "labels": [...], "box": [x0, y0, x1, y1]}, ...]`` (several points for one
  object; ``box`` is optional and, with it, ``points`` too: a box refined by points, as napari saves them)
- CSV with a header: ``x,y`` and optional ``label`` (1 object / 0 background) and ``object`` (rows with the same
  object id form one prompt)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from peft_export.errors import DataError, first_line


def _load(path: str | Path):
    p = Path(path)
    if not p.is_file():
        raise DataError(f"prompt file not found: {p}")
    text = p.read_text().strip()
    if not text:
        raise DataError(f"prompt file {p} is empty")
    if p.suffix.lower() == ".json":
        try:
            return json.loads(text), p
        except ValueError as exc:
            raise DataError(f"{p} is not valid JSON: {first_line(exc)}") from None
    if p.suffix.lower() in (".csv", ".txt"):
        rows = list(csv.DictReader(text.splitlines()))
        if not rows:
            raise DataError(f"{p} has a header but no rows")
        return rows, p
    raise DataError(f"unsupported prompt file {p.name}: use .json or .csv")


def _floats(row: dict, keys: tuple[str, ...], p: Path, n: int) -> list[float]:
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{p}: CSV needs the columns {', '.join(keys)} (missing {missing[0]!r})")
    try:
        return [float(row[k]) for k in keys]
    except (TypeError, ValueError):
        raise DataError(f"{p}: row {n} has a non-numeric value") from None


def read_boxes(path: str | Path) -> np.ndarray:
    data, p = _load(path)
    if isinstance(data, dict):
        data = data.get("boxes")
    if isinstance(data, list) and data and isinstance(data[0], dict):  # CSV rows
        boxes = [_floats(r, ("x0", "y0", "x1", "y1"), p, i + 2) for i, r in enumerate(data)]
    else:
        boxes = data
    try:
        arr = np.asarray(boxes, np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{p}: boxes must be lists of 4 numbers") from None
    if arr.size == 0:
        raise DataError(f"{p} holds no boxes")
    if arr.ndim != 2 or arr.shape[1] != 4 or not np.isfinite(arr).all():
        raise DataError(f"{p}: boxes must be lists of 4 numbers x0, y0, x1, y1")
    return arr.astype(np.float32)


class PointPrompt(NamedTuple):
    """One object's prompt: points (N, 2) x, y with labels (N,) 1/0, and optionally a box x0, y0, x1, y1 (then N may
    be 0)."""

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None = None


def _box(value, p: Path) -> np.ndarray:
    try:
        box = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        box = np.zeros(0)
    if box.shape != (4,) or not np.isfinite(box).all():
        raise DataError(f"{p}: a prompt's box must be 4 numbers x0, y0, x1, y1")
    return box.astype(np.float32)


def read_points(path: str | Path) -> list[PointPrompt]:
    """A list of prompts, each (points (N, 2), labels (N,), box (4,) or None)."""
    data, p = _load(path)
    prompts: list[tuple[list, list]] = []
    boxes: list = []
    if isinstance(data, list) and data and isinstance(data[0], dict) and "x" in data[0]:  # CSV rows
        groups: dict[str, tuple[list, list]] = {}
        for i, row in enumerate(data):
            x, y = _floats(row, ("x", "y"), p, i + 2)
            label = _floats(row, ("label",), p, i + 2)[0] if row.get("label") not in (None, "") else 1.0
            key = row.get("object") or f"_row{i}"
            groups.setdefault(key, ([], []))
            groups[key][0].append([x, y])
            groups[key][1].append(label)
        prompts = list(groups.values())
    elif isinstance(data, dict) and "points" in data:
        pts = data["points"]
        labels = data.get("labels", [1] * len(pts))
        prompts = [([pt], [lab]) for pt, lab in zip(pts, labels)]
    elif isinstance(data, list) and data and isinstance(data[0], dict):
        for d in data:
            pts = d.get("points")
            if pts is None and d.get("box") is None:
                raise DataError(f"{p}: each prompt object needs 'points' (or a 'box')")
            pts = [] if pts is None else pts
            prompts.append((pts, d.get("labels", [1] * len(pts))))
            boxes.append(None if d.get("box") is None else _box(d["box"], p))
    elif isinstance(data, list):
        prompts = [([pt], [1]) for pt in data]
    else:
        raise DataError(f"{p}: unrecognised points format (see peft-export predict --help)")
    if not prompts:
        raise DataError(f"{p} holds no points")
    boxes = boxes or [None] * len(prompts)
    out = []
    for (pts, labels), box in zip(prompts, boxes):
        try:
            a = np.asarray(pts, np.float64) if len(pts) else np.zeros((0, 2))  # no points: a box alone
            lab = np.asarray(labels, np.float64)
        except (TypeError, ValueError):
            raise DataError(f"{p}: points must be [x, y] pairs of numbers") from None
        if a.ndim != 2 or a.shape[1] != 2 or (a.shape[0] == 0 and box is None) or not np.isfinite(a).all():
            raise DataError(f"{p}: points must be [x, y] pairs of numbers")
        if lab.shape != (a.shape[0],) or not np.isin(lab, (0, 1)).all():
            raise DataError(f"{p}: labels must be 1 (object) or 0 (background), one per point")
        out.append(PointPrompt(a.astype(np.float32), lab.astype(np.float32), box))
    return out
