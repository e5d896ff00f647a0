"""``peft-export merge``: fold PEFT adapters into plain SAM weights, verified."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from peft_export.errors import UsageError
from peft_export.export.options import MergeOptions
from peft_export.peft.options import PeftOverride
from peft_export_cli import common
from peft_export_cli.options import with_options


def _check_table(report, atol: float, rtol: float) -> Table:
    table = Table(title=f"merge check ({report.sample})", show_header=True)
    for col in ("output", "max |diff|", "largest value", "tolerance"):
        table.add_column(col, justify="right" if col != "output" else "left")
    table.add_row("image embedding", f"{report.embedding_max_abs_diff:.2e}", f"{report.embedding_scale:.2f}",
                  f"{atol + rtol * report.embedding_scale:.1e}")
    table.add_row("mask logits", f"{report.masks_max_abs_diff:.2e}", f"{report.masks_scale:.2f}",
                  f"{atol + rtol * report.masks_scale:.1e}")
    return table


def register(app: typer.Typer) -> None:
    @app.command("merge")
    @with_options(merge=MergeOptions, peft=PeftOverride)
    def merge_cmd(
        checkpoint: str = typer.Argument(..., help="Training checkpoint: peft-export's own, or micro-sam's."),
        output: Path = typer.Option(..., "--output", "-o", help="Merged weights (.pt): a plain SAM state dict."),
        force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
        json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
        *, merge: MergeOptions, peft: PeftOverride,
    ):
        """Fold LoRA / FacT / SSF / selective-method weights into plain SAM weights, and prove it.

        The merged model is compared with the unmerged one on a sample input (image embedding and masks for a
        few prompts); the max difference is printed and a failure is an error (nothing is written).
        The output is a plain state dict: for ViT models it loads strictly into segment_anything's
        [bold]sam_model_registry[type](checkpoint=...)[/]; provenance goes to OUTPUT.json beside it. A run
        trained with --instance-decoder also gets OUTPUT_STEM.decoder.pt ({"decoder_state": ...}, micro-sam's key).
        AdaptFormer cannot be folded (nonlinear branch): merge says so and writes a peft-export checkpoint that
        keeps the adapter modules (export handles it).

        micro-sam checkpoints do not store their PEFT settings; give them, e.g.
        [bold]peft-export merge best.pt --from micro-sam --model vit_b --peft lora --rank 32 --blocks 6-11
        -o merged.pt[/]
        """
        from peft_export.loading import load_for_merge
        from peft_export.peft.merge import check_merge_output, decoder_path, merge_to_file, sidecar_path

        check_merge_output(output, checkpoint)  # never the checkpoint itself, even with --force
        common.refuse_overwrite(output, force, "output")
        for beside in (sidecar_path(output), decoder_path(output)):
            if beside.exists() and not force:
                raise UsageError(f"{beside} already exists; pass --force to overwrite it")
        loaded = load_for_merge(checkpoint, source=merge.source, model=merge.model, peft=peft.peft,
                                blocks=peft.blocks, options=peft.method_options(), warn=common.warn)
        atol, rtol = merge.merge_atol, merge.merge_rtol
        result, report = merge_to_file(loaded, output, checkpoint, atol=atol, rtol=rtol)
        if json_out:
            common.print_json(result)
        elif report is None:
            common.warn(result["reason"])
        else:
            common.out.print(_check_table(report, atol, rtol))
            common.out.print(f"[green]merged[/] {loaded.spec.name} with {result['how']} -> {output}")
            if result["instance_decoder"]:
                common.out.print(f"instance decoder (not part of SAM's state dict) -> {result['instance_decoder']}")
