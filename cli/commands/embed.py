"""``peft-export embed``: precompute image embeddings (per image, per tile) into a cache folder (torch-free)."""

from __future__ import annotations

from pathlib import Path

import typer

from peft_export_cli import common
from peft_export_cli import runtime_options as ro
from peft_export_cli.commands.predict import (
    BATCH_HELP,
    HALO_HELP,
    NO_TILE_HELP,
    SCALE_HELP,
    TILE_HELP,
    tiling_options,
)


def register(app: typer.Typer) -> None:
    @app.command("embed")
    def embed_cmd(
        out_dir: Path = typer.Argument(..., help="Export folder (from `peft-export export` / `merge-and-export`)."),
        images: str = typer.Argument(..., help="An image, a stack, a folder (searched recursively) or a quoted glob."),
        output: Path = typer.Option(..., "--output", "-o", help="Cache folder (created; one per export)."),
        tile: int = typer.Option(None, "--tile", help=TILE_HELP),
        halo: int = typer.Option(None, "--halo", help=HALO_HELP),
        scale: float = typer.Option(None, "--scale", help=SCALE_HELP),
        no_tile: bool = typer.Option(False, "--no-tile", help=NO_TILE_HELP),
        batch_size: int = typer.Option(None, "--batch-size", help=BATCH_HELP),
        shard: str = typer.Option(None, "--shard", help="K/N: embed every N-th input starting at K (0 <= K < N)."),
        backend: str = typer.Option("onnxruntime", help=ro.BACKEND_HELP),
        inference_precision: str = ro.PRECISION_OPTION,
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    ):
        """Embed IMAGES once and keep the embeddings, so that prompting them later costs only the decoder.

        Entries are keyed by the image content, the tiling (--tile/--halo/--scale) and the sha256 of the export's
        encoder; a cache folder made with another export is refused. Images already in the cache are not embedded
        again (so an interrupted run just continues). Use the cache with
        [bold]peft-export predict EXPORT IMAGE --embeddings CACHE ...[/] or [bold]Segmenter(EXPORT, cache=CACHE)[/],
        with the same tiling options. Example:

        [bold]peft-export embed export/ plates/ -o plates_embeddings/ --batch-size 8[/]
        """
        from peft_export.runtime.backend_choice import runtime_summary
        from peft_export.runtime.batch import run_embed
        from peft_export.runtime.segmenter import Segmenter
        from peft_export.runtime.sources import parse_shard, resolve_inputs, take_shard

        ro.check_backend(backend)
        tiling = tiling_options(tile, halo, scale, no_tile)
        inputs = take_shard(resolve_inputs(images, exclude=output), parse_shard(shard))
        note = (lambda msg: common.info(f"note: {msg}")) if not quiet else None
        seg = Segmenter(backend=ro.open_runtime(out_dir, backend, inference_precision, note), tiling=tiling,
                        batch_size=batch_size, cache=output)
        with common.progress_bar("embedding", len(inputs.items), enabled=not (quiet or json_out)) as bar:
            report = run_embed(seg, inputs, on_image=lambda item: bar.advance(), on_note=note)
        images_n = sum(d["images"] for d in report.done)
        cached = sum(d["cached_before"] for d in report.done)
        summary = {"cache": str(output), "inputs": len(inputs.items), "images": images_n, "already_cached": cached,
                   "tiles": sum(d["tiles"] for d in report.done), **report.to_dict(),
                   "runtime": runtime_summary(seg.backend)}
        if json_out:
            common.print_json(summary)
        else:
            common.out.print(f"[green]{images_n - cached} image(s) embedded[/], {cached} already cached -> {output}"
                             + (f"; [red]{len(report.failed)} failed[/]" if report.failed else ""))
        report.raise_if_failed(len(inputs.items))
