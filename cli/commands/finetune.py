"""`peft-export finetune`."""

from __future__ import annotations

import typer
from peft_export_cli.commands._notbuilt import register_placeholder


def register(app: typer.Typer) -> None:
    register_placeholder(app, "finetune", "PEFT finetuning of SAM with a chosen block placement.", 4)
