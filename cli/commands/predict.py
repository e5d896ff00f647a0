"""`peft-export predict`."""

from __future__ import annotations

import typer
from peft_export_cli.commands._notbuilt import register_placeholder


def register(app: typer.Typer) -> None:
    register_placeholder(app, "predict", "Segment an image with an exported model (torch-free).", 8)
