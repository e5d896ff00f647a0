"""``peft-export package``: a bioimage.io model package (ONNX weights) from an export folder."""

from __future__ import annotations

from pathlib import Path

import typer

from peft_export.package.options import PackageOptions
from peft_export_cli import common
from peft_export_cli.options import with_options

# bioimageio.core warnings every package from this tool gets, and why (printed beside them)
EXPLAINED = {
    "Missing `maintainers`": "no --github-user given: the zoo asks for a GitHub account to contact before upload",
}


def _explain(warning: str) -> str:
    for key, why in EXPLAINED.items():
        if key in warning:
            return f"{warning} ({why})"
    return warning


def register(app: typer.Typer) -> None:
    @app.command("package")
    @with_options(package=PackageOptions)
    def package_cmd(
        export: Path = typer.Argument(..., metavar="EXPORT", help="Export folder (from `peft-export export` / "
                                      "`merge-and-export`)."),
        output: Path = typer.Option(..., "--output", "-o", help="The package to write: model.zip."),
        force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
        *, package: PackageOptions,
    ):
        """Package an export folder for the BioImage Model Zoo (bioimage.io): one ONNX graph that runs with ONNX
        Runtime alone, its preprocessing in the spec's own steps, test tensors from the real DSB2018 tile, a
        cover, a README with the post-processing, citations, licence and the training record.

        The graph is the automatic instance segmentation path (encoder + instance decoder composed: image ->
        foreground / centre-distance / boundary-distance maps) when the export has [bold]instance_decoder.onnx[/],
        else the image encoder (image -> embedding; decoder.onnx attached for prompts).

        Nothing is written unless the package reproduces the export folder's own output and bioimageio.core's
        test passes (format + reproduction of the test output). Needs [bold]pip install
        'peft-export\\[bioimageio]'[/].

        Example: [bold]peft-export package lora_onnx/ -o lora.zip --author "Ada Lovelace"[/]

        Run it: [bold]peft-export predict lora.zip cells.tif --auto -o labels.tif[/], or any bioimage.io tool.
        """
        from peft_export.package import build_package

        opts = package.replace(force=force)
        steps = 3 + (1 if opts.validate_package else 0)
        with common.progress_bar(f"package {export.name}", steps, enabled=not (json_out or quiet)) as bar:
            def progress(msg: str) -> None:
                bar.update(description=msg)
                bar.advance(1)

            result = build_package(export, output, opts, progress=progress)
            bar.update(description="packaged", completed=steps)
        warnings = [_explain(w) for w in (result.validation or {}).get("warnings", [])]
        for w in warnings:
            common.warn(f"bioimageio.core: {w}")
        if json_out:
            data = result.to_dict()
            if data["validation"]:
                data["validation"] = {**data["validation"], "warnings": warnings}
                data["validation"].pop("report", None)
            common.print_json(data)
            return
        v = result.validation
        check = result.own_check
        common.out.print(f"[green]packaged[/] {result.name} ({result.kind}) -> {output}: own check max |diff| "
                         f"{check['max_abs_diff']:.2g} <= {check['limit']:.2g}; bioimageio.core "
                         + (f"{v['status']} (format {v['format_version']})" if v else "not run (--no-validate)"))
