"""Command-line flags generated from the library's option families (:mod:`peft_export.options`).

Nothing about an option is written here: flag, type, help, default and help panel come from the family's
pydantic model. A command declares only its positionals and I/O flags and names the families it takes::

    @app.command("predict")
    @with_options(tiling=TilingOptions, auto=AutoOptions)
    def predict_cmd(export: Path = typer.Argument(...), ..., *, tiling: TilingOptions, auto: AutoOptions): ...

Each family's flags are added to the command's signature (Typer reads it; ``--help`` shows them in the
family's panels with the model's default); the command receives one validated model per family, whose
``model_fields_set`` holds the flags the user gave (so a configuration file can sit between the defaults and the
command line).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, get_type_hints

import typer

from peft_export.options import OptionField, Options, family_flags


def _help(f: OptionField) -> str:
    text = f.help.replace("[", "\\[")  # rich markup would eat "[...]"
    shown = f.shown_default()
    if shown is not None:
        text += f" \\[default: {shown.replace('[', '')}]"
    return text


def _param(family: str, f: OptionField) -> inspect.Parameter:
    kind: Any = list[str] if f.repeat else f.kind
    extra: dict[str, Any] = {}
    if f.choices and kind is str:
        extra["metavar"] = "[" + "|".join(f.choices) + "]"
    default = typer.Option(None, *f.flags, help=_help(f), rich_help_panel=f.panel, show_default=False, **extra)
    return inspect.Parameter(f"{family}__{f.name.replace('.', '__')}", inspect.Parameter.KEYWORD_ONLY,
                             annotation=kind | None,
                             default=default)


def with_options(**families: type[Options]) -> Callable[[Callable], Callable]:
    """Decorator: the command's keyword parameters named like ``families``' keys receive validated models."""
    family_flags(families.values())  # a flag declared by two families is a programming error

    def decorate(command: Callable) -> Callable:
        hints = get_type_hints(command)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(command).parameters.values() if p.name not in families]
        added = [_param(name, f) for name, fam in families.items() for f in fam.cli_fields()]

        @functools.wraps(command)
        def wrapper(**kwargs):
            built = {}
            for name, fam in families.items():
                prefix = f"{name}__"
                keys = [k for k in kwargs if k.startswith(prefix)]
                given = {k[len(prefix):].replace("__", "."): kwargs.pop(k) for k in keys}
                built[name] = fam.parse(given)
            return command(**kwargs, **built)

        wrapper.__signature__ = inspect.Signature([*own, *added])
        wrapper.__annotations__ = {p.name: p.annotation for p in (*own, *added)}
        wrapper.option_families = dict(families)  # for --help checks and the reference docs
        return wrapper

    return decorate
