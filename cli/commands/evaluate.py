"""``peft-export evaluate``: prompted segmentation quality against instance labels."""

from __future__ import annotations

import time

import typer
from rich.table import Table

from peft_export.errors import UsageError
from peft_export.runtime.backends import RuntimeOptions, explain_run
from peft_export.runtime.evaluate_options import EvaluateOptions
from peft_export.runtime.strategies import AutoOptions
from peft_export.runtime.tiling import Tiling
from peft_export_cli import common
from peft_export_cli.options import with_options


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    @with_options(evaluation=EvaluateOptions, tiling=Tiling, auto=AutoOptions, runtime=RuntimeOptions)
    def evaluate_cmd(
        model: str = typer.Argument("lite_medsam", help="Zoo model name, a checkpoint file, an export folder or a "
                                    "bioimage.io package."),
        checkpoint: str = typer.Option(None, "--checkpoint", "-c", help="Weights for a zoo MODEL."),
        data: str = typer.Option("sample:dsb2018", "--data", "-d",
                                 help="Folder with images/ + labels/, sample:dsb2018 (bundled real data), or with "
                                 "--labels: an image file, folder or quoted glob (stacks: every plane)."),
        labels: str = typer.Option(None, "--labels", help="Folder of label images named like the --data images."),
        split: str = typer.Option("val", help="train, val or all (sample data, or train/ val/ sub-folders)."),
        auto_mode: bool = typer.Option(False, "--auto", help="Automatic segmentation without prompts instead: mSA, "
                                       "precision / recall / F1 at IoU 0.5, object counts (see --method)."),
        json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON on stdout."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
        *, evaluation: EvaluateOptions, tiling: Tiling, auto: AutoOptions, runtime: RuntimeOptions,
    ):
        """Mean IoU and mSA of box / point / automatic prompts against instance labels.

        box / point: one prompt per ground-truth object (its bounding box, or its most interior point).
        auto: segment everything (the instance decoder, APG or a point grid: --method), then match instances; mean
        IoU is each true object's best IoU.
        mSA is the mean segmentation accuracy over IoU thresholds 0.5…0.95. Without arguments it evaluates the
        bundled LiteMedSAM weights on the held-out DSB2018 nuclei tile. Images larger than the model input are
        embedded in tiles at native resolution (--no-tile: resized whole); images are read one at a time.

        MODEL is a zoo name (+ --checkpoint), a checkpoint file (PyTorch), or an export folder (ONNX Runtime /
        TensorRT; no PyTorch needed). Examples:

        [bold]peft-export evaluate lite_medsam --data sample:dsb2018 --split val --json[/]

        [bold]peft-export evaluate runs/lora/best.pt[/]      [bold]peft-export evaluate export/ --prompts box,auto[/]

        [bold]peft-export evaluate export/ --data 'plates/*.tif' --labels truth/ --tile 256 --halo 32[/]
        """
        from peft_export.loading import evaluation_backend
        from peft_export.runtime.evaluate import evaluate
        from peft_export.runtime.labelled import labelled_set

        kinds = evaluation.prompts
        if auto.link_3d:
            raise UsageError("--3d: evaluate scores 2D images; --3d links a stack's planes in predict --auto")
        pairs = labelled_set(data, split, labels)
        be, desc = evaluation_backend(model, checkpoint, runtime.backend, evaluation.device, runtime)
        batch_size = runtime.batch_size
        t0 = time.perf_counter()
        if auto_mode:  # instance metrics without prompts (the strategy AutoOptions choose)
            from peft_export_cli.commands.instance_report import evaluate_auto

            return evaluate_auto(be, desc, pairs, data, split, auto, tiling, batch_size, json_out, quiet, t0)
        per_image: list = []
        with common.progress_bar("evaluating", pairs.count(), enabled=not (quiet or json_out)) as bar:
            results = evaluate(be, pairs, kinds, progress=bar.advance, tiling=tiling, batch_size=batch_size,
                               per_image=per_image, auto=auto)
        if not quiet and "chosen" in desc:  # which backend ran, why, and in what arithmetic (once it worked)
            common.info(f"note: {explain_run(be.info)}")
        tiled = sum(1 for r in per_image if r["tiles"] > 1)
        if tiled and tiling.mode == "auto" and not quiet:
            common.info(f"note: {tiled} of {len(per_image)} image(s) were larger than the model input and were "
                        "embedded in tiles at native resolution (--no-tile to resize them whole)")
        report = {**desc, "data": data, "split": split, "settings": {"prompts": kinds, "tiling": tiling.to_dict()},
                  "images": len(per_image), "results": results,
                  "per_image": per_image, "skipped": pairs.failed, "empty": pairs.empty,
                  "seconds": round(time.perf_counter() - t0, 2)}
        if json_out:
            common.print_json(report)
        else:
            table = Table(title=f"{desc['model']} on {data} ({split}, {len(per_image)} images, {desc['backend']}, "
                                f"{desc['precision']})")
            for col in ("prompt", "mean IoU", "mSA", "objects"):
                table.add_column(col, justify="right" if col != "prompt" else "left")
            for kind, r in results.items():
                found = f"{r['objects_found']} / " if "objects_found" in r else ""  # automatic: found / true
                name = f"{kind} ({r['method']})" if r.get("method") else kind
                table.add_row(name, f"{r['mean_iou']:.3f}", f"{r['msa']:.3f}", f"{found}{r['objects']}")
            common.out.print(table)
        if pairs.failed:
            first = pairs.failed[0]
            from peft_export.errors import DataError

            raise DataError(f"{len(pairs.failed)} input(s) skipped (listed in the report): first: {first['input']}: "
                            f"{first['error']}")
