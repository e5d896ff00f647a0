"""``peft-export``: the Typer application. Every command of the chain is registered here.

Command modules import at module level only what the command line itself needs (the option families, typer, rich);
their bodies import the library code that does the work, so that ``peft-export --help`` and one-line errors start
in about half a second instead of loading PyTorch and the ONNX stack. tests/test_options.py::
test_the_command_line_starts_without_the_heavy_stack holds that.
"""

from __future__ import annotations

import logging
import os
import sys

import click
import typer
from rich.markup import escape

from peft_export import __version__
from peft_export.errors import PeftExportError, first_line
from peft_export_cli import common
from peft_export_cli.commands import (
    benchmark,
    build_engine,
    cpu_gate,
    embed,
    evaluate,
    export,
    finetune,
    info,
    merge,
    package,
    predict,
)

HELP = """\
[bold]peft-export[/]: finetune SAM on microscopy images with parameter-efficient methods, fold the adapters
into plain SAM weights, export to ONNX / TensorRT, and run the result without PyTorch.

The chain: [cyan]finetune[/] → [cyan]merge[/] → [cyan]export[/] (or [cyan]merge-and-export[/]) → \
[cyan]build-engine[/] → [cyan]predict[/] / [cyan]evaluate[/];
[cyan]benchmark[/] measures cost and speed; [cyan]info[/] shows versions, devices and the bundled sample data.

Try it on the bundled real data (LiteMedSAM weights, DSB2018 nuclei): [bold]peft-export evaluate[/]
"""

app = typer.Typer(
    name="peft-export",
    help=HELP,
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        typer.echo(f"peft-export {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug messages."),
):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s",
                        handlers=[_RichWarnings()])


class _RichWarnings(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith("peft_export"):
            return
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            common.warn(msg)
        else:
            common.err.print(msg, highlight=False, style="dim")


for module in (finetune, merge, export, build_engine, cpu_gate, benchmark, predict, evaluate, embed, package, info):
    module.register(app)


# what the `train` extra installs (pyproject.toml); the runtime commands never import them
TRAINING_MODULES = {"torch", "torchvision", "segment_anything", "onnx", "onnxscript", "onnx_ir", "matplotlib"}
TRAIN_EXTRA = "'peft-export[train]' (with [cpu] or [gpu] for the export's ONNX Runtime checks)"

# typer >= 0.29 runs its own copy of click (typer._click): its exceptions are not click's, catch both
try:
    from typer._click import exceptions as _typer_click

    CLICK_ERRORS: tuple = (click.ClickException, _typer_click.ClickException)
except ImportError:  # pragma: no cover - older typer on click itself
    CLICK_ERRORS = (click.ClickException,)
EXITS = (click.exceptions.Exit, typer.Exit)
ABORTS = (click.exceptions.Abort, typer.Abort)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: user errors become one red line and a non-zero exit code."""
    from peft_export._malloc import tune_malloc

    tune_malloc()
    try:
        # typer turns Ctrl-C into Exit(130) and, outside standalone mode, *returns* exit codes instead of raising
        code = app(args=argv, prog_name="peft-export", standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code != 0:
            if code == 130:
                common.err.print("[bold red]interrupted[/]")
            return code
    except PeftExportError as exc:
        # escape: messages are plain text ("pip install 'peft-export[tensorrt]'" must not lose its brackets)
        common.err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return exc.exit_code
    except ModuleNotFoundError as exc:  # a training-side command on a runtime-only install: name the extra
        top = (exc.name or "").split(".")[0]
        if top not in TRAINING_MODULES:
            raise
        common.err.print(f"[bold red]error:[/] this command needs the training side ({top} is not installed): "
                         f"pip install {escape(TRAIN_EXTRA)}", highlight=False)
        return 2
    except EXITS as exc:
        return exc.exit_code
    except CLICK_ERRORS as exc:  # bad options: click's usage line, exit 2
        exc.show(file=sys.stderr)
        return exc.exit_code
    except (*ABORTS, KeyboardInterrupt):
        common.err.print("[bold red]interrupted[/]")
        return 130
    except OSError as exc:  # a full disk, a permission, ...: one line with the path and the free space there
        from peft_export.files import describe_os_error

        common.err.print(f"[bold red]error:[/] {escape(describe_os_error(exc))}", highlight=False)
        return 1
    except Exception as exc:  # a bug: still one line, unless debugging
        if os.environ.get("PEFT_EXPORT_DEBUG"):
            raise
        first = first_line(exc, default="")
        common.err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(first)} "
                         "(set PEFT_EXPORT_DEBUG=1 for the traceback and please report it)", highlight=False)
        return 1
    return 0


def run() -> None:  # pragma: no cover - thin wrapper for the console script
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
