"""``peft-export predict``: segment images, stacks or folders with an export folder (torch-free)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from peft_export.errors import UsageError
from peft_export.paths import refuse_inputs
from peft_export.runtime.backends import RuntimeOptions, explain_run
from peft_export.runtime.segmenter import Segmenter
from peft_export.runtime.strategies import AutoOptions
from peft_export.runtime.tiling import Tiling
from peft_export_cli import common
from peft_export_cli.options import with_options

LABEL_SUFFIXES = (".tif", ".tiff", ".png", ".npy")
EXPORT_HELP = ("Export folder (from `peft-export export` / `merge-and-export`), or a bioimage.io package from "
               "`peft-export package` (model.zip).")


def register(app: typer.Typer) -> None:
    @app.command("predict")
    @with_options(tiling=Tiling, auto=AutoOptions, runtime=RuntimeOptions)
    def predict_cmd(
        export: Path = typer.Argument(..., metavar="EXPORT", help=EXPORT_HELP),
        images: str = typer.Argument(..., help="An image (tif/png/jpg; grayscale or RGB; a multi-page or 3D tif is a "
                                     "stack), a folder (searched recursively) or a quoted glob ('data/*.tif')."),
        output: Path = typer.Option(..., "--output", "-o", help="Label image for one 2D image (.tif, .png, .npy); "
                                    "a folder for a folder or glob (outputs mirror the inputs, + a .json each)."),
        boxes: Path = typer.Option(None, "--boxes", help="Box prompts, JSON or CSV (x0,y0,x1,y1): one object each; "
                                   "a folder of <name>.json/.csv for many images."),
        points: Path = typer.Option(None, "--points", help="Point prompts, JSON or CSV (x,y[,label][,object]); "
                                    "JSON may give a box with an object's points."),
        auto_mode: bool = typer.Option(False, "--auto", help="Segment everything without prompts (see --method)."),
        embeddings: Path = typer.Option(None, "--embeddings", help="Embedding cache folder (`peft-export embed`): "
                                        "reused where present, filled where missing."),
        skip_existing: bool = typer.Option(False, "--skip-existing", help="Skip inputs whose outputs exist (resume "
                                           "an interrupted run)."),
        shard: str = typer.Option(None, "--shard", help="K/N: process every N-th input starting at K (0 <= K < N), "
                                  "e.g. --shard $SLURM_ARRAY_TASK_ID/8."),
        overlay: Path = typer.Option(None, "--overlay", help="Also write a PNG of the objects over the image (a "
                                     "folder for many images; 2D images only)."),
        force: bool = typer.Option(False, "--force", help="Overwrite existing output files (also files this tool "
                                   "did not write; never an input)."),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
        *, tiling: Tiling, auto: AutoOptions, runtime: RuntimeOptions,
    ):
        """Segment IMAGES with prompts or automatically; write instance label images. Needs no PyTorch.

        Prompts are in pixel coordinates of the image. Images larger than the model input are cut into tiles with a
        halo at native resolution (say so once; --no-tile resizes instead); prompts go to the tile whose core holds
        them, objects cut by a tile border are joined. Examples:

        [bold]peft-export predict export/ cells.tif --boxes boxes.json -o labels.tif --overlay check.png[/]

        [bold]peft-export predict export/ plates/ --auto -o labels/ --skip-existing[/]      (a folder, resumable)

        [bold]peft-export predict export/ 'run1/*.tif' --auto -o labels/ --shard $SLURM_ARRAY_TASK_ID/8[/]

        boxes.json: \\[\\[x0, y0, x1, y1], ...]; points.csv: x,y,label,object (rows with one object id form one prompt);
        points.json: \\[{"points": \\[\\[x, y], ...], "labels": \\[1, 0, ...], "box": \\[x0, y0, x1, y1]}, ...] (box and
        points together for one object, as the napari plugin saves them).
        Objects overlap-resolved by predicted IoU (higher wins); label ids follow the prompt order. A stack (z or t)
        gives a label stack (uint32 tif), one plane per plane (--auto --3d: objects linked across planes); a prompt
        file applies to every plane.
        """
        from peft_export.runtime.batch import PredictRequest, run_predict
        from peft_export.runtime.outputs import check_unique_outputs, export_record
        from peft_export.runtime.sources import parse_shard, resolve_inputs, take_shard

        modes = [m for m, on in (("boxes", boxes), ("points", points), ("auto", auto_mode)) if on]
        if len(modes) != 1:
            raise UsageError("give exactly one of --boxes FILE, --points FILE or --auto")
        if auto.link_3d and not auto_mode:
            raise UsageError("--3d links the objects of automatic segmentation (--auto) across a stack's planes; "
                             "prompted labels already share ids across planes")
        shard_kn = parse_shard(shard)
        if Path(images).is_dir():  # -o the image folder itself: labels would land on the images
            refuse_inputs([output], [images])
        everything = resolve_inputs(images, exclude=output)
        check_unique_outputs(everything)  # before sharding: every shard refuses the same collisions
        inputs = take_shard(everything, shard_kn)
        req = PredictRequest(modes[0], boxes or points, auto, overlay, skip_existing, force)
        if req.prompts is not None and not req.prompts.exists():
            raise UsageError(f"prompt file not found: {req.prompts}")
        seg = Segmenter(export, runtime=runtime, tiling=tiling, cache=embeddings)
        strategy = why = None
        if req.mode == "auto":  # the strategy is chosen once, before any image is read: say which and why
            strategy, why = seg.strategy(auto)
            req.method = strategy.name
        req.export = export_record(export)  # which export made each output: recorded in every summary
        _check_outputs(inputs, output, req, tiling, (export, embeddings))
        show = not (quiet or json_out)
        note = (lambda msg: common.info(f"note: {msg}")) if not quiet else None
        if inputs.single:
            report = _run_single(seg, inputs, output, req, show, note, strategy)
        else:
            with common.progress_bar("segmenting", len(inputs.items), enabled=show) as bar:
                seg.on_tiles = bar.tiles  # a row for the tiles of a large image
                report = run_predict(seg, inputs, output, req, on_image=lambda item: bar.advance(),
                                     on_skip=lambda item: bar.skip(), on_note=note)
        if report.done and note is not None and (runtime.backend == "auto" or seg.info.name == "openvino"):
            note(explain_run(seg.info))  # which backend ran, why, and in what arithmetic (once it worked)
        if why and report.done and note is not None:  # said once it worked (errors stay one line)
            note(why)
            advice = strategy.advice()
            if advice:
                common.warn(advice)
        _print(report, inputs, output, json_out, quiet, req, strategy)
        report.raise_if_failed(len(inputs.items))


def _check_outputs(inputs, output: Path, req, tiling, protect) -> None:
    """The output's form here; what may be written: the library's check (runtime/outputs.py), before any work."""
    from peft_export.runtime.outputs import check_outputs

    if inputs.single:
        if not output.is_dir() and output.suffix.lower() not in LABEL_SUFFIXES:
            raise UsageError(f"unsupported output {output.name}: use .tif, .png or .npy")
    else:
        if output.exists() and not output.is_dir():
            raise UsageError(f"{output} is a file: a folder or glob of images needs an output folder (-o labels/)")
        if req.overlay is not None and req.overlay.suffix:
            raise UsageError(f"--overlay {req.overlay}: give a folder for many images")
    check_outputs(inputs, output, req, export=req.export, tiling=tiling, protect=tuple(p for p in protect if p))


def _run_single(seg, inputs, output, req, show, note, strategy):
    from peft_export.runtime.batch import run_predict

    if not show:
        return run_predict(seg, inputs, output, req, on_note=note)
    with contextlib.ExitStack() as stack:
        bars: list = []
        if strategy is None:  # prompts on a large image: a progress bar over its tiles, once there are several

            def tiles(k, n):
                if n > 1 and not bars:
                    bars.append(stack.enter_context(common.progress_bar("segmenting", 1)))
                if bars:
                    bars[0].tiles(k, n)

            seg.on_tiles = tiles
            report = run_predict(seg, inputs, output, req, on_note=note)
            if bars:
                bars[0].advance()
            return report

        # automatic: a progress bar over the strategy's steps (grid batches, or tiles), shown once the image is read
        # and planned (an unreadable image gives its one-line error and nothing else)
        def step(n=1):
            if not bars:
                bars.append(stack.enter_context(common.progress_bar("segmenting", strategy.steps(seg))))
            bars[0].advance(n)

        return run_predict(seg, inputs, output, req, progress=step, on_note=note)


def _print(report, inputs, output: Path, json_out: bool, quiet: bool, req, strategy) -> None:
    if inputs.single and report.done:
        summary = report.done[0]
        if strategy is not None and strategy.name == "grid" and summary["objects"] == 0 and not quiet:
            cfg = req.auto.grid
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
