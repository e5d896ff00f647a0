"""Placeholder for commands of the chain that are not built yet (listed in --help, no fake behaviour)."""

from __future__ import annotations

import typer

from peft_export.errors import UsageError


def register_placeholder(app: typer.Typer, name: str, summary: str, issue: int) -> None:
    @app.command(name, help=f"{summary}\n\n[yellow]Not built yet[/] (tracked as issue #{issue}).",
                 context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def _placeholder(ctx: typer.Context):
        raise UsageError(f"'peft-export {name}' is not built yet (issue #{issue})")
