"""Runs over many images (``predict`` and ``embed`` on a file, a folder, a glob or stacks), torch-free.

Images are streamed: one image (one plane of a stack) is in memory at a time, whatever the number of inputs.
Each input gives one output (a label image; a label stack for a stack, written plane by plane) and a JSON summary
beside it, its provenance record (:mod:`peft_export.runtime.outputs`); they are written together and atomically,
so an interrupted run leaves only finished outputs and ``skip_existing`` resumes it. An unreadable input is skipped
with a warning, listed in the report, and the run goes on (the CLI exits non-zero at the end); a write error (a
full disk) stops the run with one line.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from peft_export.data.io import ImageSource, atomic_write, open_image, write_label_stack, write_labels
from peft_export.errors import DataError, PeftExportError, UsageError, WriteError, first_line
from peft_export.files import clean_stale, together
from peft_export.runtime.cpu import describe_run
from peft_export.runtime.link3d import link_planes
from peft_export.runtime.outputs import (
    LABELS_FORMAT,
    LABELS_FORMAT_VERSION,
    check_outputs,
    export_record,
    file_record,
    output_files,
    run_settings,
    settings_sha256,
    survey,
)
from peft_export.runtime.overlay import write_overlay
from peft_export.runtime.prompts_io import read_boxes, read_points
from peft_export.runtime.sources import InputItem, Inputs, output_path, prompt_file
from peft_export.runtime.strategies import AutoOptions

log = logging.getLogger(__name__)

MODES = ("boxes", "points", "auto")


@dataclass
class PredictRequest:
    mode: str  # boxes | points | auto
    prompts: Path | None = None  # one prompt file for every image/plane, or a folder of <name>.json|.csv
    auto: AutoOptions = field(default_factory=AutoOptions)  # automatic mode: strategy and its settings
    overlay: Path | None = None  # a .png for one image, a folder for many
    skip_existing: bool = False
    force: bool = False
    method: str | None = None  # automatic mode: the strategy chosen for the run (recorded with its settings)
    # which export makes the outputs (runtime/outputs.py:export_record); None: taken from the segmenter's backend
    export: dict | None = None


@dataclass
class RunReport:
    done: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"done": len(self.done), "skipped": len(self.skipped), "failed": len(self.failed),
                "images": self.done, "skipped_inputs": self.skipped, "failed_inputs": self.failed}

    def raise_if_failed(self, total: int) -> None:
        if self.failed:
            first = self.failed[0]
            raise DataError(f"{len(self.failed)} of {total} input(s) failed (listed in the summary); first: "
                            f"{first['input']}: {first['error']}")


def plane_name(src: ImageSource, k: int | None) -> str:
    return src.path.name if k is None else f"{src.path.name}[{src.plane_axis.lower()}={k}]"


def read_prompts(req: PredictRequest, item: InputItem):
    path = prompt_file(req.prompts, item)
    if req.mode == "boxes":
        return read_boxes(path)
    if req.mode == "points":
        return read_points(path)
    return None


def segment_image(seg, image: np.ndarray, req: PredictRequest, prompts, name: str, progress=None
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """One 2D image -> (instance labels, per-prompt scores or None)."""
    seg.set_image(image, name=name, lazy=True)
    if req.mode == "boxes":
        return seg.predict_labels(boxes=prompts)
    if req.mode == "points":
        return seg.predict_point_prompts(prompts)
    return seg.segment(req.auto, progress=progress), None


def _objects(labels: np.ndarray) -> int:
    return len(np.unique(labels[labels > 0]))


def _plane_hw(src: ImageSource) -> tuple[int, int]:
    return tuple(int(n) for a, n in zip(src.axes, src.shape) if a in "YX")[:2]


def predict_item(seg, item: InputItem, out: Path, req: PredictRequest, *, single: bool,
                 progress=None) -> dict:
    """Segment one input (a 2D image or a stack) and write its outputs: the labels, the overlay and the summary
    that records them (runtime/outputs.py), moved into place together, the summary first; returns the summary."""
    t0 = time.perf_counter()
    src = open_image(item.path)
    prompts = read_prompts(req, item)
    labels_path, record_path, overlay_path = output_files(item, out, single, req.overlay)
    settings = run_settings(req, seg.tiling, prompt_file(req.prompts, item))
    summary = {"format": LABELS_FORMAT, "format_version": LABELS_FORMAT_VERSION, "input": str(item.path),
               "output": str(labels_path), "mode": req.mode, "backend": seg.info.name,
               "runtime": describe_run(seg.info)}
    link_3d = req.mode == "auto" and req.auto.link_3d
    if link_3d and not src.is_stack:
        raise UsageError(f"--3d links the planes of a stack into 3D objects; {item.path.name} is a 2D image "
                         "(drop --3d)")
    with together() as group:
        if not src.is_stack:
            image = next(src.read())
            labels, scores = segment_image(seg, image, req, prompts, item.path.name, progress)
            write_labels(labels_path, labels)
            if overlay_path is not None:
                write_overlay(overlay_path, image, labels)
                summary["overlay"] = str(overlay_path)
            summary.update(objects=_objects(labels), tiles=seg.plan.describe(),
                           scores=None if scores is None else [round(float(s), 4) for s in scores])
        else:
            counts: list[int] = []

            def _planes():
                for k, plane in enumerate(src.read()):
                    lab, _ = segment_image(seg, plane, req, prompts, plane_name(src, k))
                    counts.append(_objects(lab))
                    yield lab

            if labels_path.suffix.lower() not in (".tif", ".tiff"):
                raise UsageError(f"{item.path.name} is a stack ({src.planes} planes): write its labels to a .tif")
            planes = _planes()
            if link_3d:  # every plane's labels first, then linked across planes (runtime/link3d.py)
                linked = link_planes(np.stack(list(planes)))
                summary["objects_3d"] = int(linked.max(initial=0))
                planes = iter(linked)
            write_label_stack(labels_path, planes, src.planes, _plane_hw(src), src.plane_axis)
            summary.update(planes=src.planes, plane_axis=src.plane_axis, objects=int(sum(counts)),
                           objects_per_plane=counts, tiles=seg.plan.describe())
        summary["cache_hit"] = bool(seg.cache_hit) if seg.cache is not None else None
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        summary.update(export=req.export, settings=settings, settings_sha256=settings_sha256(settings))
        summary["files"] = {"labels": file_record(group.staged(labels_path), labels_path.name)}
        if overlay_path is not None:
            summary["files"]["overlay"] = file_record(group.staged(overlay_path), overlay_path.name)
        text = json.dumps(summary, indent=2) + "\n"
        atomic_write(record_path, lambda tmp: tmp.write_text(text))
    return summary


def existing_outputs(inputs: Inputs, out: Path) -> list[Path]:
    """Inputs whose outputs are complete and were written by this tool (a summary of ours describes them)."""
    return list(survey(inputs, out).ours)


def output_root(inputs: Inputs, out: Path) -> Path:
    """The folder a run writes into (where a crashed run's temporary files are looked for)."""
    return out if not inputs.single or out.is_dir() else out.parent


def run_predict(seg, inputs: Inputs, out: Path, req: PredictRequest, *, on_image: Callable | None = None,
                on_skip: Callable | None = None, progress=None,
                on_note: Callable[[str], None] | None = None) -> RunReport:
    """Segment every input; for many inputs, failures are collected (a single input raises). Outputs are checked
    first (:func:`peft_export.runtime.outputs.check_outputs`); ``on_image(item)`` after each input segmented,
    ``on_skip(item)`` for each one kept (``skip_existing``)."""
    report = RunReport()
    if req.export is None:
        req.export = export_record(seg.info.source)
    protect = tuple(p for p in (Path(seg.info.source), seg.cache.folder if seg.cache is not None else None)
                    if p is not None)
    done_before = check_outputs(inputs, out, req, export=req.export, tiling=seg.tiling, protect=protect)
    clean_stale(output_root(inputs, out), recursive=not inputs.single)
    if req.overlay is not None:
        clean_stale(req.overlay if req.overlay.is_dir() else req.overlay.parent, recursive=not inputs.single)
    noted = False
    for item in inputs.items:
        if output_path(item, out, inputs.single) in done_before:
            report.skipped.append(str(item.path))
            if on_skip is not None:
                on_skip(item)
            continue
        try:
            report.done.append(predict_item(seg, item, out, req, single=inputs.single, progress=progress))
        except WriteError:
            raise  # a full disk fails every input: stop with one line
        except PeftExportError as exc:
            if inputs.single:
                raise
            log.warning("skipped %s: %s", item.path, first_line(exc))
            report.failed.append({"input": str(item.path), "error": first_line(exc)})
        if not noted and on_note is not None and seg.plan is not None and seg.plan.tiled \
                and seg.tiling.mode == "auto":
            on_note(tiling_note(seg))
            noted = True
        if on_image is not None:
            on_image(item)
    return report


def tiling_note(seg) -> str:
    g = seg.plan.grid
    return (f"images larger than the model input ({seg.info.img_size} px) are embedded in tiles of {g.tile} px with a "
            f"{g.halo} px halo at native resolution (--tile/--halo/--scale to change, --no-tile to resize the whole "
            "image instead)")


def run_embed(seg, inputs: Inputs, *, on_image: Callable | None = None, on_note=None) -> RunReport:
    """Fill ``seg``'s embedding cache for every input (every plane of a stack); entries already there are
    counted, not recomputed."""
    report = RunReport()
    noted = False
    for item in inputs.items:
        t0 = time.perf_counter()
        try:
            src = open_image(item.path)
            hits = tiles = 0
            for k, plane in enumerate(src.read()):
                plan = seg.set_image(plane, name=plane_name(src, k if src.is_stack else None))
                hits += int(seg.cache_hit)
                tiles += len(plan.grid)
                if not noted and on_note is not None and plan.tiled and seg.tiling.mode == "auto":
                    on_note(tiling_note(seg))
                    noted = True
            report.done.append({"input": str(item.path), "images": src.count, "cached_before": hits, "tiles": tiles,
                                "seconds": round(time.perf_counter() - t0, 2)})
        except WriteError:
            raise
        except PeftExportError as exc:
            if inputs.single:
                raise
            log.warning("skipped %s: %s", item.path, first_line(exc))
            report.failed.append({"input": str(item.path), "error": first_line(exc)})
        if on_image is not None:
            on_image(item)
    return report
