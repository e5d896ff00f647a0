"""`peft-export export`."""

from __future__ import annotations

import typer
from peft_export_cli.commands._notbuilt import register_placeholder


def register(app: typer.Typer) -> None:
    register_placeholder(app, "export", "Export a model to ONNX (encoder + decoder) with a parity gate.", 5)
    register_placeholder(app, "merge-and-export", "Merge adapters and export to ONNX in one step.", 5)
