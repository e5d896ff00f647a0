"""``peft-export embed``: precompute image embeddings (per image, per tile) into a cache folder (torch-free)."""

from __future__ import annotations

from pathlib import Path

import typer

from peft_export.paths import refuse_inputs
from peft_export.runtime.backends import RuntimeOptions, explain_run
from peft_export.runtime.cpu import describe_run
from peft_export.runtime.segmenter import Segmenter
from peft_export.runtime.tiling import Tiling
from peft_export_cli import common
from peft_export_cli.options import with_options


def register(app: typer.Typer) -> None:
    @app.command("embed")
    @with_options(tiling=Tiling, runtime=RuntimeOptions)
    def embed_cmd(
        export: Path = typer.Argument(..., metavar="EXPORT", help="Export folder (from `peft-export export` / "
                                      "`merge-and-export`)."),
        images: str = typer.Argument(..., help="An image, a stack, a folder (searched recursively) or a quoted glob."),
        output: Path = typer.Option(..., "--output", "-o", help="Cache folder (created; one per export)."),
        shard: str = typer.Option(None, "--shard", help="K/N: embed every N-th input starting at K (0 <= K < N)."),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
        *, tiling: Tiling, runtime: RuntimeOptions,
    ):
        """Embed IMAGES once and keep the embeddings, so that prompting them later costs only the decoder.

        Entries are keyed by the image content, the tiling (--tile/--halo/--scale) and the sha256 of the export's
        encoder; a cache folder made with another export is refused. Images already in the cache are not embedded
        again (so an interrupted run just continues). Use the cache with
        [bold]peft-export predict EXPORT IMAGE --embeddings CACHE ...[/] or [bold]Segmenter(EXPORT, cache=CACHE)[/],
        with the same tiling options. Example:

        [bold]peft-export embed export/ plates/ -o plates_embeddings/ --batch-size 8[/]
        """
        from peft_export.runtime.batch import run_embed
        from peft_export.runtime.outputs import export_record
        from peft_export.runtime.sources import parse_shard, resolve_inputs, take_shard

        inputs = take_shard(resolve_inputs(images, exclude=output), parse_shard(shard))
        refuse_inputs([output], [item.path for item in inputs.items], folders=[export], replaces=True)
        seg = Segmenter(export, runtime=runtime, tiling=tiling, cache=output)
        note = (lambda msg: common.info(f"note: {msg}")) if not quiet else None
        with common.progress_bar("embedding", len(inputs.items), enabled=not (quiet or json_out)) as bar:
            seg.on_tiles = bar.tiles  # a row for the tiles of a large image
            report = run_embed(seg, inputs, on_image=lambda item: bar.advance(), on_note=note)
        if report.done and note is not None and (runtime.backend == "auto" or seg.info.name == "openvino"):
            note(explain_run(seg.info))  # which backend ran, why, and in what arithmetic (once it worked)
        images_n = sum(d["images"] for d in report.done)
        cached = sum(d["cached_before"] for d in report.done)
        summary = {"cache": str(output), "export": export_record(export), "inputs": len(inputs.items),
                   "images": images_n, "already_cached": cached, "tiles": sum(d["tiles"] for d in report.done),
                   **report.to_dict(), "runtime": describe_run(seg.info)}
        if json_out:
            common.print_json(summary)
        else:
            common.out.print(f"[green]{images_n - cached} image(s) embedded[/], {cached} already cached -> {output}"
                             + (f"; [red]{len(report.failed)} failed[/]" if report.failed else ""))
        report.raise_if_failed(len(inputs.items))
