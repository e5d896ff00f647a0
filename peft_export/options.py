"""Options: every family declared once, typed, with its help, as a pydantic model.

    class TilingOptions(Options):
        tile: int | None = option(None, "Tile size in pixels ...", ge=16, default_text="the model input")

Everything else is derived from the models (as Hugging Face peft derives from ``LoraConfig``'s fields):

- defaults and validation, with one clear error line naming the flag (:meth:`Options.parse`);
- the command-line flags of every command that uses a family: name (``--<field>`` unless ``cli=`` says
  otherwise), type, help with the model's default, help panel (``peft_export_cli.options`` builds them);
- configuration-file keys (the field names) and their round trip (:meth:`Options.to_dict` / :meth:`Options.parse`).

A field's ``default_text`` is what ``--help`` shows as its default when the value is computed at run time
(``None`` meaning "the model input", "from the recipe", ...). Families compose other families' fields without
restating them (:func:`inherit`). Torch-free: the runtime's families live here too.
"""

from __future__ import annotations

import enum
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from peft_export.errors import UsageError

__all__ = ["OptionField", "Options", "comma_list", "inherit", "option", "split_commas"]


def option(default: Any, help: str, *, cli: str | bool | None = None, short: str | None = None,
           panel: str | None = None, default_text: str | None = None, repeat: bool = False,
           **constraints: Any) -> Any:
    """One option: its default, help text, CLI name where it differs from ``--<field>`` (a bool field gets
    ``--x/--no-x`` unless ``cli`` names one flag; ``cli=False``: not a flag, e.g. ``force``, which each command
    declares as its own I/O flag), a short alias (``-p``), the help panel (default: the family's), the default as
    ``--help`` shows it when it is computed at run time, whether a list is given by repeating the flag (``repeat``;
    otherwise as one comma-separated value), and pydantic constraints (ge, le, ...)."""
    extra = {k: v for k, v in (("cli", cli), ("short", short), ("panel", panel), ("default_text", default_text),
                               ("repeat", repeat or None)) if v is not None}
    return Field(default, description=help, json_schema_extra=extra or None, **constraints)


def split_commas(value: Any) -> Any:
    """'a, b' -> ['a', 'b']; 'none' -> [] (configuration files and the command line write lists so)."""
    if not isinstance(value, str):
        return value
    return [] if value.strip().lower() == "none" else [t.strip() for t in value.split(",") if t.strip()]


def comma_list(kind: Any, *, unique: bool = False) -> Any:
    """``list[kind]`` that also accepts one comma-separated string (the command line's form); ``unique``: a value
    given twice is kept once, in first-given order."""
    from typing import Annotated

    from pydantic import AfterValidator, BeforeValidator

    if unique:
        return Annotated[list[kind], BeforeValidator(split_commas), AfterValidator(lambda v: list(dict.fromkeys(v)))]
    return Annotated[list[kind], BeforeValidator(split_commas)]


@dataclass(frozen=True)
class OptionField:
    """One field of a family as the command line sees it."""

    name: str  # field name = configuration key
    flag: str  # "--tile"; a bool may be "--x/--no-x"
    short: str | None
    kind: type  # int, float, bool, str or Path (lists, unions and choices are given as text)
    default: Any
    help: str  # the declared help
    panel: str | None
    default_text: str | None
    choices: tuple[str, ...] | None
    required: bool = False
    repeat: bool = False  # a list given by repeating the flag

    @property
    def flags(self) -> tuple[str, ...]:
        return (self.flag, self.short) if self.short else (self.flag,)

    @property
    def primary_flag(self) -> str:
        return self.flag.split("/")[0]

    def shown_default(self) -> str | None:
        """The default as ``--help`` prints it (None: nothing to print)."""
        if self.default_text is not None:
            return self.default_text
        d = self.default
        if d is None or self.required:
            return None
        if isinstance(d, bool):
            if "/" in self.flag:
                return self.flag.split("/")[0 if d else 1].removeprefix("--")
            return "on" if d else "off"
        if isinstance(d, (list, tuple)):
            return ",".join(str(v) for v in d) or "none"
        if isinstance(d, enum.Enum):
            return str(d.value)
        return str(d)


def _extra(info: FieldInfo) -> dict:
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


def _choices(annotation: Any) -> tuple[str, ...] | None:
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        return tuple(str(a) for a in args)
    if get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        found = [c for a in args if a is not type(None) for c in (_choices(a) or ())]
        return tuple(found) or None
    return None


def _cli_kind(annotation: Any) -> type:
    if annotation in (int, float, bool, str, Path):
        return annotation
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is not Literal and len(args) == 1 and args[0] in (int, float, bool, str, Path):
        return args[0]  # X | None
    return str


class Options(BaseModel):
    """Base of every option family. ``panel``: the ``--help`` panel of its flags; ``family``: its name in
    messages and in configuration files that hold several families."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    family: ClassVar[str] = "options"
    panel: ClassVar[str | None] = None

    # ---- what the command line sees ------------------------------------------------------------------------
    @classmethod
    def flag_of(cls, name: str) -> str:
        extra = _extra(cls.model_fields[name])
        if isinstance(extra.get("cli"), str):
            return extra["cli"]
        flag = "--" + name.replace("_", "-")
        return f"{flag}/--no-{flag[2:]}" if cls.model_fields[name].annotation is bool else flag

    @classmethod
    def cli_fields(cls, prefix: str = "") -> list[OptionField]:
        """Every flag of the family, nested families' flags included (``name``: the dotted field path)."""
        out = []
        for name, info in cls.model_fields.items():
            extra = _extra(info)
            if extra.get("cli") is False:
                continue
            if isinstance(info.annotation, type) and issubclass(info.annotation, Options):
                out += info.annotation.cli_fields(f"{prefix}{name}.")
                continue
            out.append(OptionField(
                name=prefix + name, flag=cls.flag_of(name), short=extra.get("short"), kind=_cli_kind(info.annotation),
                default=None if info.is_required() else info.get_default(call_default_factory=True),
                help=info.description or "", panel=extra.get("panel", cls.panel),
                default_text=extra.get("default_text"), choices=_choices(info.annotation),
                required=info.is_required(), repeat=bool(extra.get("repeat"))))
        return out

    # ---- validation ----------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, values: Mapping[str, Any] | None = None, /, **more: Any):
        """``values`` (field names, dotted for nested families: ``int8.mode``; None = not given, the default)
        checked and completed; one clear line for a bad or unknown value. The fields given stay in
        ``model_fields_set``."""
        given: dict[str, Any] = {}
        for key, value in {**(values or {}), **more}.items():
            if value is None:
                continue
            head, _, rest = key.partition(".")
            if rest:
                given.setdefault(head, {})[rest] = value
            else:
                given[key] = value
        unknown = sorted(set(given) - set(cls.model_fields))
        if unknown:
            raise UsageError(f"{cls.family} has no option {unknown[0]!r} (options: {', '.join(cls.model_fields)})")
        for name, sub in list(given.items()):
            kind = cls.model_fields[name].annotation
            if isinstance(sub, dict) and isinstance(kind, type) and issubclass(kind, Options):
                given[name] = kind.parse(sub)
        try:
            return cls.model_validate(given)
        except ValidationError as exc:
            raise UsageError(cls.error_line(exc)) from None

    @classmethod
    def error_line(cls, exc: ValidationError) -> str:
        err = exc.errors()[0]
        loc = err["loc"]
        name = str(loc[0]) if loc else ""
        if name in cls.model_fields:
            flag = cls.flag_of(name).split("/")[0]
            mine = [e for e in exc.errors() if e["loc"][:1] == (name,)]
            if all(e["type"] == "literal_error" for e in mine):  # a choice: name the choices
                return f"{flag}: unknown value {err.get('input')!r}; choose from {_expected(err)}"
            why = " or ".join(dict.fromkeys(e["msg"] for e in mine))
            return f"{flag}: {why} (got {err.get('input')!r})"
        return f"{cls.family} options: {err['msg'].removeprefix('Value error, ')}"

    def replace(self, **changes: Any):
        """A copy with ``changes`` (validated)."""
        data = {**self.model_dump(), **changes}
        try:
            return type(self).model_validate(data)
        except ValidationError as exc:
            raise UsageError(type(self).error_line(exc)) from None

    # ---- configuration files -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain values by field name (JSON/YAML-ready); ``parse`` of it gives the same options back."""
        return self.model_dump(mode="json")

    def given(self) -> dict[str, Any]:
        """Only the fields that were given (not defaults)."""
        return {k: getattr(self, k) for k in self.model_fields_set}


def _expected(err: dict) -> str:
    """pydantic's "'a', 'b' or 'c'" as "a, b, c"."""
    text = str((err.get("ctx") or {}).get("expected", ""))
    return ", ".join(t.strip().strip("'") for t in text.replace(" or ", ",").split(",") if t.strip())


def inherit(source: type[Options], *names: str, **overrides: Any) -> dict[str, tuple[Any, FieldInfo]]:
    """Field definitions copied from another family (``pydantic.create_model`` form), so that a family composed of
    others declares nothing twice: ``create_model("S", __base__=Options, **inherit(TrainOptions, "lr"))``.
    ``overrides`` replace a field's default (``device="cpu"``; its ``default_text`` goes with the old default)."""
    out = {}
    for name in names:
        info = source.model_fields[name]
        changes: dict[str, Any] = {}
        if name in overrides:
            extra = {k: v for k, v in _extra(info).items() if k != "default_text"}
            changes = {"default": overrides[name], "json_schema_extra": extra or None}
        out[name] = (info.annotation, FieldInfo.merge_field_infos(info, **changes))
    return out


def family_flags(families: Iterable[type[Options]]) -> dict[str, str]:
    """flag -> family name for a set of families; a flag declared twice is a programming error."""
    seen: dict[str, str] = {}
    for fam in families:
        for f in fam.cli_fields():
            for flag in (*f.flag.split("/"), *((f.short,) if f.short else ())):
                if flag in seen:
                    raise TypeError(f"flag {flag} is declared by {seen[flag]} and {fam.family}")
                seen[flag] = fam.family
    return seen
