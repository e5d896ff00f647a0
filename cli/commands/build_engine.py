"""`peft-export build-engine`."""

from __future__ import annotations

import typer
from peft_export_cli.commands._notbuilt import register_placeholder


def register(app: typer.Typer) -> None:
    register_placeholder(app, "build-engine", "Build TensorRT engines from an export folder.", 6)
