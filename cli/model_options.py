"""Command-line options generated from a pydantic options model (one flag per field; nothing restated here).

    @with_model_options(AutoOptions, "auto_options", panel="Automatic segmentation")
    def predict_cmd(..., auto_options: AutoOptions): ...

Each field becomes ``--field-name`` (or the field's ``json_schema_extra["cli"]``), a bool a ``--x/--no-x`` pair,
with the field's description as help; every flag defaults to None (not given), so the model's own default applies,
and the command receives one validated model (``Model.build(**given)``: one clear line for a bad value).
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import get_type_hints

import typer


def _plain(annotation):
    """``float | None`` -> float."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def _escape(text: str) -> str:
    return text.replace("[", "\\[")  # "[default: x]" would be read as rich markup and vanish from --help


def option_params(model, panel: str | None = None) -> list[inspect.Parameter]:
    params = []
    for name, info in model.model_fields.items():
        kind = _plain(info.annotation)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        flag = extra.get("cli") or "--" + name.replace("_", "-")
        decl = f"{flag}/--no-{flag[2:]}" if kind is bool else flag
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind | None,
                                        default=typer.Option(None, decl, help=_escape(info.description or ""),
                                                             rich_help_panel=panel)))
    return params


def with_model_options(model, param: str, *, panel: str | None = None) -> Callable[[Callable], Callable]:
    """Decorator: the command gets ``model``'s fields as options and one built ``model`` as ``param``."""
    def decorate(command: Callable) -> Callable:
        hints = get_type_hints(command)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(command).parameters.values() if p.name != param]
        added = option_params(model, panel)
        keys = [p.name for p in added]

        @functools.wraps(command)
        def wrapper(**kwargs):
            given = {k: kwargs.pop(k) for k in keys}
            return command(**kwargs, **{param: model.build(**given)})

        wrapper.__signature__ = inspect.Signature([*own, *added])
        wrapper.__annotations__ = {p.name: p.annotation for p in (*own, *added)}
        return wrapper

    return decorate
