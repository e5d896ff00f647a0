"""``peft-export export`` and ``peft-export merge-and-export``: ONNX folders, gated by parity with PyTorch."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from peft_export.errors import UsageError
from peft_export.export import DEFAULT_OPSET
from peft_export_cli import common
from peft_export_cli import peft_options as po

PANEL = "Export"
PRECISION = typer.Option("fp32", "--precision", "-p", help="fp32, fp16 (fp32 normalisations/softmax inside) or int8 "
                         "(the encoder calibrated and quantized, its most sensitive nodes kept float until the int8 "
                         "gate passes; decoders fp32). See the Int8 options.", rich_help_panel=PANEL)
OPSET = typer.Option(DEFAULT_OPSET, "--opset", help="ONNX opset (>= 18, the dynamo exporter's floor; 20 has a native "
                     "Gelu op, which ONNX Runtime runs much faster on CPUs).", rich_help_panel=PANEL)
INT8 = "Int8"
INT8_MODE = typer.Option("static", "--int8-mode", help="static: calibrated QDQ graph (also what TensorRT builds int8 "
                         "engines from); dynamic: ONNX Runtime measures activation ranges at run time (MatMuls only; "
                         "CPUs only; often the faster one on CPUs).", rich_help_panel=INT8)
INT8_TARGET = typer.Option("cpu", "--int8-target", help="cpu: uint8 activations (ONNX Runtime's CPU layout); tensorrt: "
                           "symmetric int8 activations, zero point 0 (TensorRT's explicit quantization; ONNX Runtime "
                           "runs it too).", rich_help_panel=INT8)
CALIBRATION = typer.Option(None, "--calibration", help="Calibration images: sample:dsb2018, or a folder (train/ + "
                           "val/, images/ + labels/, or plain images; the last quarter is held out for the gate). "
                           "Default: the checkpoint's training data when it recorded it, else sample:dsb2018.",
                           rich_help_panel=INT8)
CAL_IMAGES = typer.Option(16, "--calibration-images", help="Calibration inputs (the images, then their flips and "
                          "rotations).", rich_help_panel=INT8)
GATE_IMAGES = typer.Option(8, "--gate-images", help="Held-out gate inputs (the images, then their flips and "
                           "rotations); never used for calibration.", rich_help_panel=INT8)
BAKE = typer.Option(False, "--bake-preprocessing", help="Encoder takes the resized image as uint8 (H', W', 3) and "
                    "normalises + pads inside the graph.", rich_help_panel=PANEL)
SINGLE = typer.Option(False, "--single-mask", help="decoder.onnx returns one mask per prompt (Meta's "
                      "return_single_mask; mask 0 for models without trained multimask outputs). "
                      "decoder_lowres.onnx always returns all four.", rich_help_panel=PANEL)
SIMPLIFY = typer.Option(False, "--simplify", help="Simplify the graphs with onnxslim (verified like the rest).",
                        rich_help_panel=PANEL)
NO_VERIFY = typer.Option(False, "--no-verify", help="Skip the parity gate (recorded in the manifest as unverified).",
                         rich_help_panel="Parity gate")
ATOL = typer.Option(1e-4, "--atol", help="fp32: absolute tolerance of max |diff| vs PyTorch.",
                    rich_help_panel="Parity gate")
RTOL = typer.Option(1e-4, "--rtol", help="fp32: tolerance relative to the output's largest magnitude.",
                    rich_help_panel="Parity gate")
FP16_IOU = typer.Option(0.99, "--fp16-iou", help="fp16: minimum mean mask IoU vs the fp32 PyTorch model.",
                        rich_help_panel="Parity gate")
INT8_IOU = typer.Option(0.97, "--int8-iou", help="int8: minimum mean mask IoU vs fp32 on held-out images, for box "
                        "prompts and for point prompts (one per object). The most sensitive encoder nodes stay float "
                        "until it holds.", rich_help_panel="Parity gate")
OUTPUT = typer.Option(..., "--output", "-o", help="Export folder to create (encoder.onnx, decoder.onnx, "
                      "decoder_lowres.onnx, manifest.json).")
FORCE = typer.Option(False, "--force", help="Replace OUT_DIR if it exists.")
JSON = typer.Option(False, "--json", help="Print the result as JSON on stdout.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress output.")


def _options(precision, opset, bake, single, simplify, no_verify, atol, rtol, fp16_iou, int8_iou, force, int8):
    from peft_export.export import ExportOptions, Thresholds
    from peft_export.export.quantize import Int8Options

    opts = ExportOptions(precision=precision, opset=opset, bake_preprocessing=bake, single_mask=single,
                         simplify=simplify, verify=not no_verify, force=force, int8=Int8Options(**int8),
                         thresholds=Thresholds(atol=atol, rtol=rtol, fp16_iou=fp16_iou, int8_iou=int8_iou))
    opts.validate()
    return opts


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
    def export_cmd(
        model: str = typer.Argument(..., help="Zoo model name (with --checkpoint; lite_medsam has bundled weights), "
                                    "a merged checkpoint, or a peft-export training checkpoint."),
        output: Path = OUTPUT,
        checkpoint: str = typer.Option(None, "--checkpoint", "-c", help="Weights for a zoo MODEL."),
        precision: str = PRECISION, opset: int = OPSET, bake_preprocessing: bool = BAKE, single_mask: bool = SINGLE,
        simplify: bool = SIMPLIFY, no_verify: bool = NO_VERIFY, atol: float = ATOL, rtol: float = RTOL,
        fp16_iou: float = FP16_IOU, int8_iou: float = INT8_IOU, int8_mode: str = INT8_MODE,
        int8_target: str = INT8_TARGET, calibration: str = CALIBRATION, calibration_images: int = CAL_IMAGES,
        gate_images: int = GATE_IMAGES, force: bool = FORCE, json_out: bool = JSON, quiet: bool = QUIET,
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
        from peft_export.models.loading import load_model

        int8 = dict(mode=int8_mode, target=int8_target, calibration=calibration,
                    calibration_images=calibration_images, gate_images=gate_images)
        opts = _options(precision, opset, bake_preprocessing, single_mask, simplify, no_verify, atol, rtol, fp16_iou,
                        int8_iou, force, int8)
        from peft_export.export.exporter import check_out_dir

        check_out_dir(output, force, [p for p in (model, checkpoint, calibration) if p and Path(p).exists()])
        if checkpoint is not None and not Path(checkpoint).exists():
            raise UsageError(f"checkpoint not found: {checkpoint}")
        common.info(f"loading {model}", quiet=json_out or quiet)
        loaded = load_model(model, checkpoint)
        prepared = prepare_for_export(loaded)
        _run(prepared, output, opts, json_out=json_out, quiet=quiet)

    @app.command("merge-and-export")
    @po.with_peft_options()
    def merge_and_export_cmd(
        checkpoint: str = typer.Argument(..., help="Training checkpoint: peft-export's own, or micro-sam's."),
        output: Path = OUTPUT,
        source: str = typer.Option("auto", "--from", help="Checkpoint kind: auto, peft-export or micro-sam."),
        model: str = typer.Option(None, "--model", help="Model name for checkpoints that do not record it."),
        merge_atol: float = typer.Option(1e-4, "--merge-atol", help="Absolute tolerance of the merge check.",
                                         rich_help_panel="Parity gate"),
        merge_rtol: float = typer.Option(1e-4, "--merge-rtol", help="Relative tolerance of the merge check.",
                                         rich_help_panel="Parity gate"),
        precision: str = PRECISION, opset: int = OPSET, bake_preprocessing: bool = BAKE, single_mask: bool = SINGLE,
        simplify: bool = SIMPLIFY, no_verify: bool = NO_VERIFY, atol: float = ATOL, rtol: float = RTOL,
        fp16_iou: float = FP16_IOU, int8_iou: float = INT8_IOU, int8_mode: str = INT8_MODE,
        int8_target: str = INT8_TARGET, calibration: str = CALIBRATION, calibration_images: int = CAL_IMAGES,
        gate_images: int = GATE_IMAGES, force: bool = FORCE, json_out: bool = JSON, quiet: bool = QUIET,
        *, peft_args: po.PeftArgs,
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
        from peft_export.models.loading import load_for_merge

        int8 = dict(mode=int8_mode, target=int8_target, calibration=calibration,
                    calibration_images=calibration_images, gate_images=gate_images)
        opts = _options(precision, opset, bake_preprocessing, single_mask, simplify, no_verify, atol, rtol, fp16_iou,
                        int8_iou, force, int8)
        check_out_dir(output, force, [p for p in (checkpoint, calibration) if p and Path(p).exists()])
        common.info(f"loading {checkpoint}", quiet=json_out or quiet)
        loaded = load_for_merge(checkpoint, source=source, model=model, peft=peft_args.method,
                                blocks=peft_args.blocks, options=peft_args.options, warn=common.warn)
        prepared = prepare_for_export(loaded, merge_atol=merge_atol, merge_rtol=merge_rtol)
        if prepared.merge_report is not None and not (json_out or quiet):
            r = prepared.merge_report
            common.info(f"merge check passed: embedding max |diff| {r.embedding_max_abs_diff:.1e}, "
                        f"masks {r.masks_max_abs_diff:.1e} ({r.sample})")
        elif prepared.source.get("note"):
            common.warn(prepared.source["note"])
        _run(prepared, output, opts, json_out=json_out, quiet=quiet)
