"""``peft-export export`` and ``peft-export merge-and-export``: ONNX folders, gated by parity with PyTorch."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from peft_export.errors import UsageError
from peft_export.export.options import ExportOptions, MergeOptions
from peft_export.peft.options import PeftOverride
from peft_export_cli import common
from peft_export_cli.options import with_options

OUTPUT = typer.Option(..., "--output", "-o", help="Export folder to create (encoder.onnx, decoder.onnx, "
                      "decoder_lowres.onnx, manifest.json).")
FORCE = typer.Option(False, "--force", help="Replace OUT_DIR if it exists.")
JSON = typer.Option(False, "--json", help="Print the result as JSON on stdout.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress output.")


def _parity_table(report) -> Table:
    table = Table(title=f"parity gate: {report.precision} ONNX vs PyTorch fp32 ({report.sample})")
    for col in ("check", "value", "limit", "result"):
        table.add_column(col, justify="left" if col == "check" else "right")
    for c in report.checks:
        op = "≤" if c.kind == "max" else "≥"
        value = f"{c.value:.2e}" if c.kind == "max" else f"{c.value:.4f}"
        limit = f"{op} {c.limit:.1e}" if c.kind == "max" else f"{op} {c.limit:.3f}"
        result = "[green]pass[/]" if c.passed else "[bold red]FAIL[/]"
        table.add_row(c.name + (f" ({c.note})" if c.note else ""), value, limit, result)
    f = report.figures
    if report.precision == "fp32":
        table.add_row("mask IoU of the whole ONNX chain (mean, info)", f"{f['mask_iou_mean']:.4f}", "", "")
    return table


def _run(prepared, output: Path, opts, *, json_out: bool, quiet: bool):
    from peft_export.export.exporter import ExportParityError, check_out_dir, export_model, export_steps

    check_out_dir(output, opts.force)
    steps = export_steps(opts)
    with common.progress_bar(f"export {prepared.spec.name} ({opts.precision})", steps,
                             enabled=not (json_out or quiet)) as bar:
        def progress(msg: str, advance: bool = True) -> None:
            if advance:
                bar.advance(1)
            bar.update(description=msg)

        try:
            result = export_model(prepared, output, opts, progress=progress)
        except ExportParityError as exc:
            common.err.print(_parity_table(exc.report))
            raise
        bar.update(description=f"exported {prepared.spec.name}", completed=steps)
    if result.report is None:  # on stderr, so also with --json
        common.warn("exported with --no-verify: the graphs were NOT compared with PyTorch (manifest: verified=false)")
    if json_out:
        common.print_json(result.to_dict())
        return result
    if result.report is not None:
        common.out.print(_parity_table(result.report))
    src = result.manifest.source
    how = ""
    if src.get("peft"):
        how = f" ({src['peft'].get('method')}, {'merged' if src.get('merged') else 'adapter modules kept'})"
    common.out.print(f"[green]exported[/] {result.manifest.model}{how} -> {output} "
                     f"[{result.manifest.precision}, opset {result.manifest.opset}]")
    return result


def register(app: typer.Typer) -> None:
    @app.command("export")
    @with_options(export=ExportOptions)
    def export_cmd(
        model: str = typer.Argument(..., help="Zoo model name (with --checkpoint; lite_medsam has bundled weights), "
                                    "a merged checkpoint, or a peft-export training checkpoint."),
        output: Path = OUTPUT,
        checkpoint: str = typer.Option(None, "--checkpoint", "-c", help="Weights for a zoo MODEL."),
        force: bool = FORCE, json_out: bool = JSON, quiet: bool = QUIET,
        *, export: ExportOptions,
    ):
        """Export a model to an ONNX folder: [bold]encoder.onnx[/], [bold]decoder.onnx[/] (Meta's SamOnnxModel
        signature, for existing SAM ONNX clients), [bold]decoder_lowres.onnx[/] (no orig_im_size; for TensorRT)
        and [bold]manifest.json[/] (preprocessing, provenance, sha256 of every file, parity figures).

        Training checkpoints are merged first (verified, as [cyan]merge[/] does); AdaptFormer is exported with
        its adapter modules. Every export is compared with the PyTorch model on the real DSB2018 validation tile
        (max |diff| for fp32, mask IoU for fp16/int8); a failure is an error and leaves no OUT_DIR.

        Examples:
        [bold]peft-export export lite_medsam -o lite_onnx[/]
        [bold]peft-export export run/best.pt -o run_onnx --precision fp16[/]
        [bold]peft-export export vit_b --checkpoint sam_vit_b_01ec64.pth -o vit_b_onnx --bake-preprocessing[/]
        """
        from peft_export.export import prepare_for_export
        from peft_export.export.exporter import check_out_dir
        from peft_export.loading import load_model

        opts = export.replace(force=force)
        calibration = opts.int8.calibration
        check_out_dir(output, force, [p for p in (model, checkpoint, calibration) if p and Path(p).exists()])
        if checkpoint is not None and not Path(checkpoint).exists():
            raise UsageError(f"checkpoint not found: {checkpoint}")
        common.info(f"loading {model}", quiet=json_out or quiet)
        loaded = load_model(model, checkpoint)
        prepared = prepare_for_export(loaded)
        _run(prepared, output, opts, json_out=json_out, quiet=quiet)

    @app.command("merge-and-export")
    @with_options(merge=MergeOptions, export=ExportOptions, peft=PeftOverride)
    def merge_and_export_cmd(
        checkpoint: str = typer.Argument(..., help="Training checkpoint: peft-export's own, or micro-sam's."),
        output: Path = OUTPUT,
        force: bool = FORCE, json_out: bool = JSON, quiet: bool = QUIET,
        *, merge: MergeOptions, export: ExportOptions, peft: PeftOverride,
    ):
        """Fold a training checkpoint's adapters into plain SAM weights (verified) and export to ONNX, in one step.

        The same as [cyan]merge[/] followed by [cyan]export[/], without the intermediate file: the merged model
        is compared with the unmerged one, then the ONNX graphs with the merged model (see [cyan]export --help[/]).
        AdaptFormer cannot be folded; it is exported with its adapter modules.

        micro-sam checkpoints do not store their PEFT settings; give them, e.g.
        [bold]peft-export merge-and-export best.pt --from micro-sam --model vit_b --peft lora --rank 32
        --blocks 6-11 -o vit_b_lora_onnx[/]

        Example: [bold]peft-export merge-and-export runs/lora/best.pt -o lora_onnx --precision int8[/]
        """
        from peft_export.export import prepare_for_export
        from peft_export.export.exporter import check_out_dir
        from peft_export.loading import load_for_merge

        opts = export.replace(force=force)
        calibration = opts.int8.calibration
        check_out_dir(output, force, [p for p in (checkpoint, calibration) if p and Path(p).exists()])
        common.info(f"loading {checkpoint}", quiet=json_out or quiet)
        loaded = load_for_merge(checkpoint, source=merge.source, model=merge.model, peft=peft.peft,
                                blocks=peft.blocks, options=peft.method_options(), warn=common.warn)
        prepared = prepare_for_export(loaded, merge_atol=merge.merge_atol, merge_rtol=merge.merge_rtol)
        if prepared.merge_report is not None and not (json_out or quiet):
            r = prepared.merge_report
            common.info(f"merge check passed: embedding max |diff| {r.embedding_max_abs_diff:.1e}, "
                        f"masks {r.masks_max_abs_diff:.1e} ({r.sample})")
        elif prepared.source.get("note"):
            common.warn(prepared.source["note"])
        _run(prepared, output, opts, json_out=json_out, quiet=quiet)
