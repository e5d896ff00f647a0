"""The PEFT options of `finetune`, `merge` and `merge-and-export`, built from the methods' options classes.

Nothing about an option is written here: names, types, help and the methods each applies to come from
:func:`peft_export.peft.options.cli_options`. :func:`with_peft_options` adds ``--peft``, ``--blocks`` and every
method option to a command's signature (Typer reads it; ``--help`` shows them under the "PEFT" panel) and
hands the command one :class:`PeftArgs` as its ``peft_args`` parameter.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import typer

from peft_export.peft.options import OPTIONS, cli_options

PANEL = "PEFT"
BLOCKS_HELP = ("Encoder blocks that get the method: all, late:N (last N), late:50%, 6-11, 0,3,9. "
               "Indices count ViT blocks, or TinyViT's attention blocks.")


@dataclass
class PeftArgs:
    """What the user gave: ``--peft``, ``--blocks`` and the method options by configuration key (only those
    given)."""

    method: str | None = None
    blocks: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def config_values(self) -> dict[str, Any]:
        """As training-configuration values (``peft``, ``blocks``, ``rank``, ...), without the ones not given."""
        given = {"peft": self.method, "blocks": self.blocks, **self.options}
        return {k: v for k, v in given.items() if v is not None}


def _option_params(defaults_note: bool) -> list[inspect.Parameter]:
    def note(text: str) -> str:  # "[default: x]" would be read as rich markup and vanish from --help
        return f" \\[default: {text}]" if defaults_note else ""

    def param(name: str, kind: type, *decls: str, help: str) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                 default=typer.Option(None, *decls, help=help, rich_help_panel=PANEL))

    params = [param("peft", str, "--peft", help=f"PEFT method: {', '.join(OPTIONS)}.{note('lora')}"),
              param("blocks", str, "--blocks", help=BLOCKS_HELP + note("all"))]
    for opt in cli_options():
        flag = f"{opt.flag}/--no-{opt.flag[2:]}" if opt.type is bool else opt.flag
        params.append(param(opt.key, opt.type, flag, help=opt.help))
    return params


def with_peft_options(*, defaults_note: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: the command gets the PEFT options; its own ``peft_args`` parameter receives a :class:`PeftArgs`.

    ``defaults_note``: say ``[default: lora]`` / ``[default: all]`` in the help (finetune, whose options may also
    come from a config file, so they default to None).
    """
    def decorate(command: Callable) -> Callable:
        hints = get_type_hints(command)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(command).parameters.values() if p.name != "peft_args"]
        added = _option_params(defaults_note)
        keys = [p.name for p in added[2:]]

        @functools.wraps(command)
        def wrapper(**kwargs):
            method, blocks = kwargs.pop("peft"), kwargs.pop("blocks")
            given = {k: kwargs.pop(k) for k in keys}
            args = PeftArgs(method, blocks, {k: v for k, v in given.items() if v is not None})
            return command(**kwargs, peft_args=args)

        wrapper.__signature__ = inspect.Signature([*own, *added])
        wrapper.__annotations__ = {p.name: p.annotation for p in (*own, *added)}
        return wrapper

    return decorate
