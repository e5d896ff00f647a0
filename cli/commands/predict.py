"""``peft-export predict``: segment images, stacks or folders with an export folder (torch-free)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from peft_export.errors import UsageError
from peft_export_cli import common
from peft_export_cli import runtime_options as ro

RUNTIME_BACKENDS = ro.RUNTIME_CHOICES
LABEL_SUFFIXES = (".tif", ".tiff", ".png", ".npy")


def tiling_options(tile, halo, scale, no_tile):
    from peft_export.runtime.tiling import Tiling

    return Tiling.from_options(tile, halo, scale, no_tile)


# the tiling options shared by predict, evaluate and embed
TILE_HELP = ("Tile size in pixels (of the image after --scale); default: the model input (256 LiteMedSAM, 1024 "
             "SAM). Images larger than it are embedded tile by tile at native resolution.")
HALO_HELP = "Context added on each side of a tile's core, in pixels; default: tile / 8. Needs tile > 2 x halo."
SCALE_HELP = "Resize images by this factor before tiling (e.g. 0.5 when objects are twice the trained size)."
NO_TILE_HELP = "Resize the whole image to the model input instead of tiling (the behaviour before tiling)."
BATCH_HELP = ("Tiles per encoder call [default: 1 on a CPU (batches gained at most ~5% there, for several times the "
              "memory), 4 on a GPU]. Older exports without a batch axis run one at a time.")


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict_cmd(
        out_dir: Path = typer.Argument(..., help="Export folder (from `peft-export export` / `merge-and-export`), "
                                       "or a bioimage.io package from `peft-export package` (model.zip)."),
        images: str = typer.Argument(..., help="An image (tif/png/jpg; grayscale or RGB; a multi-page or 3D tif is a "
                                     "stack), a folder (searched recursively) or a quoted glob ('data/*.tif')."),
        output: Path = typer.Option(..., "--output", "-o", help="Label image for one 2D image (.tif, .png, .npy); "
                                    "a folder for a folder or glob (outputs mirror the inputs, + a .json each)."),
        boxes: Path = typer.Option(None, "--boxes", help="Box prompts, JSON or CSV (x0,y0,x1,y1): one object each; "
                                   "a folder of <name>.json/.csv for many images."),
        points: Path = typer.Option(None, "--points", help="Point prompts, JSON or CSV (x,y[,label][,object])."),
        auto: bool = typer.Option(False, "--auto", help="Segment everything without prompts (see --method)."),
        method: str = typer.Option("auto", "--method", help="--auto with: instance (the export's instance decoder "
                                   "+ seeded watershed, micro-sam's AIS: from finetune --instance-decoder), grid (a "
                                   "grid of point prompts, filtered), or auto: instance when the export has one."),
        points_per_side: int = typer.Option(32, help="--auto: grid points per side (of each tile when tiled)."),
        pred_iou_thresh: float = typer.Option(0.8, help="--auto: minimum predicted IoU of a mask."),
        stability_thresh: float = typer.Option(0.9, help="--auto: minimum stability score of a mask."),
        min_area: int = typer.Option(10, help="--auto: smallest object in pixels."),
        tile: int = typer.Option(None, "--tile", help=TILE_HELP),
        halo: int = typer.Option(None, "--halo", help=HALO_HELP),
        scale: float = typer.Option(None, "--scale", help=SCALE_HELP),
        no_tile: bool = typer.Option(False, "--no-tile", help=NO_TILE_HELP),
        batch_size: int = typer.Option(None, "--batch-size", help=BATCH_HELP),
        embeddings: Path = typer.Option(None, "--embeddings", help="Embedding cache folder (`peft-export embed`): "
                                        "reused where present, filled where missing."),
        skip_existing: bool = typer.Option(False, "--skip-existing", help="Skip inputs whose outputs exist (resume "
                                           "an interrupted run)."),
        shard: str = typer.Option(None, "--shard", help="K/N: process every N-th input starting at K (0 <= K < N), "
                                  "e.g. --shard $SLURM_ARRAY_TASK_ID/8."),
        overlay: Path = typer.Option(None, "--overlay", help="Also write a PNG of the objects over the image (a "
                                     "folder for many images; 2D images only)."),
        backend: str = typer.Option("onnxruntime", help=ro.BACKEND_HELP),
        inference_precision: str = ro.PRECISION_OPTION,
        force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    ):
        """Segment IMAGES with prompts or automatically; write instance label images. Needs no PyTorch.

        Prompts are in pixel coordinates of the image. Images larger than the model input are cut into tiles with a
        halo at native resolution (say so once; --no-tile resizes instead); prompts go to the tile whose core holds
        them, objects cut by a tile border are joined. Examples:

        [bold]peft-export predict export/ cells.tif --boxes boxes.json -o labels.tif --overlay check.png[/]

        [bold]peft-export predict export/ plates/ --auto -o labels/ --skip-existing[/]      (a folder, resumable)

        [bold]peft-export predict export/ 'run1/*.tif' --auto -o labels/ --shard $SLURM_ARRAY_TASK_ID/8[/]

        boxes.json: \\[\\[x0, y0, x1, y1], ...]; points.csv: x,y,label,object (rows with one object id form one prompt).
        Objects overlap-resolved by predicted IoU (higher wins); label ids follow the prompt order. A stack (z or t)
        gives a label stack (uint32 tif), one plane per plane; a prompt file applies to every plane.
        """
        from peft_export.runtime.auto import AutoConfig, auto_steps
        from peft_export.runtime.batch import PredictRequest, run_predict
        from peft_export.runtime.segmenter import Segmenter
        from peft_export.runtime.sources import parse_shard, resolve_inputs, take_shard

        modes = [m for m, on in (("boxes", boxes), ("points", points), ("auto", auto)) if on]
        if len(modes) != 1:
            raise UsageError("give exactly one of --boxes FILE, --points FILE or --auto")
        ro.check_backend(backend)
        tiling = tiling_options(tile, halo, scale, no_tile)
        shard_kn = parse_shard(shard)
        inputs = take_shard(resolve_inputs(images, exclude=output), shard_kn)
        _check_outputs(inputs, output, overlay, force, skip_existing)
        req = PredictRequest(modes[0], boxes or points, AutoConfig(
            points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh, stability_thresh=stability_thresh,
            min_area=min_area), overlay, skip_existing, force)
        if req.prompts is not None and not req.prompts.exists():
            raise UsageError(f"prompt file not found: {req.prompts}")
        from peft_export.runtime.package import is_package  # bioimage.io packages (peft-export package)

        show = not (quiet or json_out)
        note = (lambda msg: common.info(f"note: {msg}")) if not quiet else None
        if is_package(out_dir):
            seg = Segmenter.from_package(out_dir, backend="onnxruntime" if backend == "auto" else backend,
                                         tiling=tiling, batch_size=batch_size, cache=embeddings)
        else:
            seg = Segmenter(backend=ro.open_runtime(out_dir, backend, inference_precision, note), tiling=tiling,
                            batch_size=batch_size, cache=embeddings)
        if req.mode == "auto":  # instance decoder or point grid (issue 14): say which
            from peft_export.runtime.instances import auto_note, resolve_method

            req.method = resolve_method(seg.backend, method)
            auto_steps = auto_note(req.method, seg.backend, None, auto_steps)
        if inputs.single:
            report = _run_single(seg, inputs, output, req, show, note, auto_steps)
        else:
            with common.progress_bar("segmenting", len(inputs.items), enabled=show) as bar:
                report = run_predict(seg, inputs, output, req, on_image=lambda item: bar.advance(), on_note=note)
        if req.mode == "auto" and report.done:  # said once it worked (errors stay one line)
            auto_note(req.method, seg.backend, note, None)
        _print(report, inputs, output, json_out, quiet, req)
        report.raise_if_failed(len(inputs.items))


def _check_outputs(inputs, output: Path, overlay: Path | None, force: bool, skip_existing: bool) -> None:
    from peft_export.runtime.batch import existing_outputs

    if inputs.single:
        if not output.is_dir() and output.suffix.lower() not in LABEL_SUFFIXES:
            raise UsageError(f"unsupported output {output.name}: use .tif, .png or .npy")
        if not skip_existing:
            for path in (output, overlay):
                if path is not None and not path.is_dir():
                    common.refuse_overwrite(path, force)
        return
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output} is a file: a folder or glob of images needs an output folder (-o labels/)")
    if overlay is not None and overlay.suffix:
        raise UsageError(f"--overlay {overlay}: give a folder for many images")
    done = existing_outputs(inputs, output)
    if done and not (force or skip_existing):
        raise UsageError(f"{len(done)} of {len(inputs.items)} outputs already exist (first: {done[0]}): pass "
                         "--skip-existing to resume, or --force to overwrite them")


def _run_single(seg, inputs, output, req, show, note, auto_steps):
    from peft_export.runtime.batch import run_predict

    if req.mode != "auto" or not show:
        return run_predict(seg, inputs, output, req, on_note=note)
    # one image, automatic: a progress bar over grid batches (untiled) or tiles, shown once the image is read,
    # embedded and planned (an unreadable image gives its one-line error and nothing else)
    with contextlib.ExitStack() as stack:
        bars: list = []

        def step(n=1):
            if not bars:
                bars.append(stack.enter_context(common.progress_bar("segmenting", auto_steps(seg, req.auto))))
            bars[0].advance(n)

        return run_predict(seg, inputs, output, req, progress=step, on_note=note)


def _print(report, inputs, output: Path, json_out: bool, quiet: bool, req) -> None:
    if inputs.single and report.done:
        summary = report.done[0]
        if req.mode == "auto" and req.method == "grid" and summary["objects"] == 0 and not quiet:
            cfg = req.auto
            common.err.print(
                f"warning: no mask passed the filters (predicted IoU >= {cfg.pred_iou_thresh}, stability >= "
                f"{cfg.stability_thresh}); try lower --pred-iou-thresh / --stability-thresh. Automatic segmentation "
                "uses point prompts: a model never trained with points (zero-shot LiteMedSAM) finds little; "
                "finetune with point prompts first (peft-export finetune).", highlight=False)
        if json_out:
            common.print_json({**summary, "image": summary["input"]})
        else:
            extra = f" (overlay: {summary['overlay']})" if summary.get("overlay") else ""
            common.out.print(f"[green]{summary['objects']} objects[/] -> {summary['output']}{extra}")
        return
    if inputs.single:  # skipped
        if json_out:
            common.print_json(report.to_dict())
        elif not quiet:
            common.out.print(f"{output} exists: skipped (--skip-existing)")
        return
    if json_out:
        common.print_json({"output": str(output), "inputs": len(inputs.items), **report.to_dict()})
    else:
        objects = sum(d["objects"] for d in report.done)
        common.out.print(f"[green]{len(report.done)} image(s)[/], {objects} objects -> {output}"
                         + (f"; {len(report.skipped)} skipped (existing)" if report.skipped else "")
                         + (f"; [red]{len(report.failed)} failed[/]" if report.failed else ""))
