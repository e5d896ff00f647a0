"""``peft-export predict``: segment an image with an export folder (torch-free)."""

from __future__ import annotations

from pathlib import Path

import typer

from peft_export.errors import UsageError
from peft_export_cli import common

RUNTIME_BACKENDS = ("onnxruntime", "tensorrt")


def _predict_points(seg, prompts):
    """Decode point prompts grouped by their number of points (uniform batches, no extra padding)."""
    import numpy as np

    masks = [None] * len(prompts)
    scores = np.zeros(len(prompts), np.float32)
    by_len: dict[int, list[int]] = {}
    for i, (pts, _) in enumerate(prompts):
        by_len.setdefault(len(pts), []).append(i)
    for idx in by_len.values():
        pts = np.stack([prompts[i][0] for i in idx])
        labels = np.stack([prompts[i][1] for i in idx])
        out = seg.predict(points=pts, labels=labels)
        for j, i in enumerate(idx):
            masks[i] = out.masks[j]
            scores[i] = out.scores[j]
    return np.stack(masks), scores


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict_cmd(
        out_dir: Path = typer.Argument(..., help="Export folder (from `peft-export export` / `merge-and-export`), "
                                       "or a bioimage.io package from `peft-export package` (model.zip)."),
        image: Path = typer.Argument(..., help="2D image: tif, png or jpg; grayscale or RGB; uint8/uint16/float."),
        output: Path = typer.Option(..., "--output", "-o", help="Instance label image to write (.tif, .png, .npy)."),
        boxes: Path = typer.Option(None, "--boxes", help="Box prompts, JSON or CSV (x0,y0,x1,y1): one object each."),
        points: Path = typer.Option(None, "--points", help="Point prompts, JSON or CSV (x,y[,label][,object])."),
        auto: bool = typer.Option(False, "--auto", help="Segment everything: a grid of point prompts, filtered."),
        points_per_side: int = typer.Option(32, help="--auto: grid points per side."),
        pred_iou_thresh: float = typer.Option(0.8, help="--auto: minimum predicted IoU of a mask."),
        stability_thresh: float = typer.Option(0.9, help="--auto: minimum stability score of a mask."),
        min_area: int = typer.Option(10, help="--auto: smallest object in pixels."),
        overlay: Path = typer.Option(None, "--overlay", help="Also write a PNG of the objects over the image."),
        backend: str = typer.Option("onnxruntime", help="onnxruntime or tensorrt (engines from build-engine)."),
        force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    ):
        """Segment IMAGE with prompts or automatically; write an instance label image. Needs no PyTorch.

        Prompts are in pixel coordinates of IMAGE. Examples:

        [bold]peft-export predict export/ cells.tif --boxes boxes.json -o labels.tif --overlay check.png[/]

        [bold]peft-export predict export/ cells.tif --auto -o labels.tif[/]

        boxes.json: \\[\\[x0, y0, x1, y1], ...]; points.csv: x,y,label,object (rows with one object id form one prompt).
        Objects overlap-resolved by predicted IoU (higher wins); label ids follow the prompt order.
        """
        import numpy as np

        from peft_export.data.io import read_image, write_labels
        from peft_export.metrics import masks_to_labels
        from peft_export.runtime.auto import AutoConfig, n_batches
        from peft_export.runtime.prompts_io import read_boxes, read_points
        from peft_export.runtime.segmenter import Segmenter

        modes = [m for m, on in (("--boxes", boxes), ("--points", points), ("--auto", auto)) if on]
        if len(modes) != 1:
            raise UsageError("give exactly one of --boxes FILE, --points FILE or --auto")
        if backend not in RUNTIME_BACKENDS:
            raise UsageError(f"unknown backend {backend!r}; choose onnxruntime or tensorrt")
        if output.suffix.lower() not in (".tif", ".tiff", ".png", ".npy"):
            raise UsageError(f"unsupported output {output.name}: use .tif, .png or .npy")
        for path in (output, overlay):
            if path is not None:
                common.refuse_overwrite(path, force)
        img = read_image(image)
        box_arr = read_boxes(boxes) if boxes else None
        point_prompts = read_points(points) if points else None
        from peft_export.runtime.package import is_package  # bioimage.io packages (peft-export package)

        make = Segmenter.from_package if is_package(out_dir) else Segmenter
        seg = make(out_dir, backend=backend)
        seg.set_image(img, name=image.name)
        if box_arr is not None:
            pred = seg.predict(boxes=box_arr)
            labels, scores = masks_to_labels(pred.masks, pred.scores), pred.scores
        elif point_prompts is not None:
            masks, scores = _predict_points(seg, point_prompts)
            labels = masks_to_labels(masks, scores)
        else:
            cfg = AutoConfig(points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh,
                             stability_thresh=stability_thresh, min_area=min_area)
            with common.progress_bar("segmenting", n_batches(cfg), enabled=not (quiet or json_out)) as bar:
                labels = seg.segment_everything(config=cfg, progress=bar.advance)
            scores = None
        write_labels(output, labels)
        if overlay is not None:
            from peft_export.runtime.overlay import write_overlay

            write_overlay(overlay, img, labels)
        n = len(np.unique(labels[labels > 0]))
        if auto and n == 0 and not quiet:
            common.err.print(
                f"warning: no mask passed the filters (predicted IoU >= {pred_iou_thresh}, stability >= "
                f"{stability_thresh}); try lower --pred-iou-thresh / --stability-thresh. Automatic segmentation "
                "uses point prompts: a model never trained with points (zero-shot LiteMedSAM) finds little; "
                "finetune with point prompts first (peft-export finetune).", highlight=False)
        summary = {"image": str(image), "output": str(output), "overlay": str(overlay) if overlay else None,
                   "mode": modes[0].lstrip("-"), "objects": n, "backend": backend,
                   "scores": None if scores is None else [round(float(s), 4) for s in scores]}
        if json_out:
            common.print_json(summary)
        else:
            common.out.print(f"[green]{n} objects[/] -> {output}" + (f" (overlay: {overlay})" if overlay else ""))
