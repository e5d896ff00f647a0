"""`peft-export benchmark`."""

from __future__ import annotations

import typer
from peft_export_cli.commands._notbuilt import register_placeholder


def register(app: typer.Typer) -> None:
    register_placeholder(app, "benchmark", "Benchmark training cost and inference latency.", 7)
