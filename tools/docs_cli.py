"""The CLI and option-family reference pages, generated from the Typer app at site build time.

Nothing here is written by hand about a command or an option: the commands come from walking the app
(``typer.main.get_command``), each command's family flags from the ``option_families`` that
``peft_export_cli.options.with_options`` stores on its callback, and every flag's help, type and default from the
family's pydantic model (:meth:`peft_export.options.Options.cli_fields`). A new command or option shows up in the
site when it is registered in the app or declared on its family; nothing here changes.

Typer vendors click (``typer._click``), so the app is walked with duck typing, as ``tests/test_options.py`` does.
"""

from __future__ import annotations

import enum
import inspect
import re
from dataclasses import dataclass, field
from typing import Any

PROG = "peft-export"


@dataclass
class Command:
    path: str  # "benchmark study"
    cmd: Any  # the click command
    families: dict[str, type] = field(default_factory=dict)  # parameter name -> Options subclass

    @property
    def title(self) -> str:
        return f"{PROG} {self.path}"

    @property
    def anchor(self) -> str:
        return anchor_of(self.path)


def anchor_of(path: str) -> str:
    """The reference page's anchor of a command ("benchmark study" -> "benchmark-study")."""
    return path.replace(" ", "-")


def commands() -> tuple[Any, list[Command]]:
    """The root click command and every leaf command of the app, in registration order."""
    import typer

    from peft_export_cli.app import app

    root = typer.main.get_command(app)
    out: list[Command] = []

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, (*path, name))
        else:
            out.append(Command(" ".join(path), cmd, dict(getattr(cmd.callback, "option_families", {}) or {})))

    walk(root, ())
    return root, out


def groups(root) -> list[tuple[str, Any]]:
    """Sub-command groups (``benchmark``) with their click group."""
    return [(name, sub) for name, sub in root.commands.items() if hasattr(sub, "commands")]


# ---- text helpers ------------------------------------------------------------------------------------------------

_RICH = re.compile(r"\[/?(?:bold|cyan|dim|red|green|yellow|italic|magenta|blue)?\]")


def plain(text: str | None) -> str:
    """Help text as the terminal shows it: rich markup and Typer's escapes removed."""
    text = inspect.cleandoc(text or "")
    return _RICH.sub("", text).replace("\\[", "[")


def md_escape(text: str) -> str:
    """Markdown-safe prose (code spans kept as they are)."""
    parts = re.split(r"(`[^`]*`)", text)
    for i in range(0, len(parts), 2):
        p = parts[i].replace("\\", "\\\\").replace("<", "&lt;").replace(">", "&gt;")
        p = re.sub(r"([*_\[\]|])", r"\\\1", p)
        parts[i] = p
    return "".join(parts)


def cell(text: str) -> str:
    """One table cell: escaped, on one line."""
    return md_escape(" ".join(str(text).split()))


def help_block(text: str | None) -> str:
    """A command's help as Markdown: paragraphs as prose, example command lines in a shell block."""
    out = []
    for para in re.split(r"\n\s*\n", plain(text)):
        lines = [ln.strip() for ln in para.strip().splitlines() if ln.strip()]
        if not lines:
            continue
        if all(ln.startswith(PROG + " ") for ln in lines):
            out.append("```bash\n" + "\n".join(lines) + "\n```")
        else:
            out.append(md_escape(" ".join(lines)))
    return "\n\n".join(out)


def type_name(p) -> str:
    desc = getattr(p, "type_descriptor", None)
    ann = getattr(desc, "annotation", None)
    if ann is None:
        t = getattr(p, "type", None)
        return getattr(t, "name", "") or ""
    if getattr(p, "is_flag", False):
        return "flag"
    name = getattr(ann, "__name__", str(ann))
    return {"Path": "path", "str": "text", "int": "integer", "float": "number", "bool": "flag"}.get(name, name)


# ---- option families ---------------------------------------------------------------------------------------------

def family_rows(model: type, prefix: str = "") -> list[dict]:
    """Every field of a family, nested families flattened (dotted keys), CLI-less fields included."""
    from peft_export.options import Options

    by_name = {f.name: f for f in model.cli_fields()}
    rows = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, Options):
            rows += family_rows(ann, f"{prefix}{name}.")
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        key = prefix + name
        f = by_name.get(name)
        if extra.get("cli") is False or f is None:
            default = None if info.is_required() else info.get_default(call_default_factory=True)
            rows.append({"key": key, "flags": "", "type": _ann_text(ann), "default": _value(default, extra),
                         "help": info.description or "", "constraints": _constraints(info), "cli": False})
            continue
        rows.append({"key": key, "flags": ", ".join(f"`{x}`" for x in _flag_forms(f)), "type": _kind_text(f),
                     "default": f.shown_default() or "", "help": f.help, "constraints": _constraints(info),
                     "cli": True, "field": f})
    return rows


def _flag_forms(f) -> list[str]:
    forms = f.flag.split("/")
    return [*forms, f.short] if f.short else forms


def _kind_text(f) -> str:
    if f.choices:
        return " | ".join(f.choices)
    base = {int: "integer", float: "number", bool: "flag", str: "text"}.get(f.kind, getattr(f.kind, "__name__", "?"))
    if f.repeat:
        return f"{base} (repeat the flag)"
    return base


def _ann_text(ann) -> str:
    text = getattr(ann, "__name__", None) or str(ann)
    return text.replace("typing.", "")


def _value(default, extra: dict) -> str:
    if extra.get("default_text"):
        return str(extra["default_text"])
    if default is None:
        return ""
    if isinstance(default, enum.Enum):
        return str(default.value)
    return str(default)


_OPS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥", "max_length": "length ≤"}


def _constraints(info) -> str:
    found = []
    for m in info.metadata:
        for attr, sign in _OPS.items():
            v = getattr(m, attr, None)
            if v is not None:
                found.append(f"{sign} {v}")
    return ", ".join(found)


def family_anchor(model: type) -> str:
    return model.__name__.lower()


def all_families(cmds: list[Command]) -> dict[type, list[str]]:
    """Each family model -> the commands that take it (first use order)."""
    found: dict[type, list[str]] = {}
    for c in cmds:
        for model in c.families.values():
            found.setdefault(model, []).append(c.path)
    return found


# ---- pages -------------------------------------------------------------------------------------------------------

def cli_page() -> str:
    root, cmds = commands()
    lines = [
        "# Command line reference",
        "",
        "!!! note \"Generated\"",
        "    This page is generated from the Typer app when the site is built (`tools/docs_cli.py`): every",
        "    command, argument and flag, with the help, type and default that `--help` prints. Option families",
        "    (the flags grouped under a panel) are declared once as pydantic models: see",
        "    [option families](options.md) for their configuration keys and constraints.",
        "",
        help_block(root.help),
        "",
        "Global options (before the command): "
        + ", ".join(f"`{' / '.join(p.opts)}` ({cell(plain(p.help))})" for p in root.params) + ".",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for c in cmds:
        first = plain(c.cmd.help).split("\n\n")[0].replace("\n", " ")
        lines.append(f"| [`{c.title}`](#{c.anchor}) | {cell(first)} |")
    for name, grp in groups(root):
        lines += ["", f"`{PROG} {name}` groups: " + ", ".join(f"`{n}`" for n in grp.commands) + ". "
                  + cell(plain(grp.help).split("\n\n")[0])]
    for c in cmds:
        lines += ["", command_section(c)]
    return "\n".join(lines) + "\n"


def command_section(c: Command) -> str:
    cmd = c.cmd
    ctx = cmd.context_class(cmd, info_name=c.title)
    usage = " ".join([c.title, *cmd.collect_usage_pieces(ctx)]).replace("{", "").replace("}", "")
    lines = [f"## {c.title} {{#{c.anchor}}}", "", "```text", usage, "```", "", help_block(cmd.help), ""]
    args = [p for p in cmd.params if getattr(p, "param_type_name", "") == "argument"]
    if args:
        lines += ["**Arguments**", "", "| argument | type | help |", "|---|---|---|"]
        for p in args:
            name = (getattr(p, "metavar", None) or p.name).upper()
            req = "" if p.required else " (optional)"
            lines.append(f"| `{name}`{req} | {type_name(p)} | {cell(plain(p.help))} |")
        lines.append("")
    fam_flags = {}  # primary flag -> (parameter name, model, OptionField)
    for pname, model in c.families.items():
        for f in model.cli_fields():
            fam_flags[f.primary_flag] = (pname, model, f)
    options = [p for p in cmd.params if getattr(p, "param_type_name", "") == "option"]
    own = [p for p in options if p.opts[0] not in fam_flags]
    if own:
        lines += ["**Options**", "", "| flag | type | default | help |", "|---|---|---|---|"]
        for p in own:
            flags = ", ".join(f"`{o}`" for o in (*p.opts, *p.secondary_opts))
            default = "required" if p.required else ("" if p.default in (None, False) else cell(str(p.default)))
            lines.append(f"| {flags} | {type_name(p)} | {default} | {cell(plain(p.help))} |")
        lines.append("")
    panels: dict[str, list] = {}
    for p in options:
        if p.opts[0] in fam_flags:
            panels.setdefault(getattr(p, "rich_help_panel", None) or "Options", []).append(fam_flags[p.opts[0]])
    for panel, entries in panels.items():
        models = list(dict.fromkeys(model for _, model, _ in entries))
        source = ", ".join(f"[`{m.__name__}`](options.md#{family_anchor(m)})" for m in models)
        lines += [f"**{panel}** (from {source})", "", "| flag | type | default | help | config key |",
                  "|---|---|---|---|---|"]
        for _, _, f in entries:
            flags = ", ".join(f"`{x}`" for x in _flag_forms(f))
            lines.append(f"| {flags} | {cell(_kind_text(f))} | {cell(f.shown_default() or '')} | {cell(f.help)} | "
                         f"`{f.name}` |")
        lines.append("")
    return "\n".join(lines)


def options_page() -> str:
    _, cmds = commands()
    lines = [
        "# Option families",
        "",
        "!!! note \"Generated\"",
        "    Generated from the pydantic models when the site is built (`tools/docs_cli.py`). Each family is",
        "    declared once (`peft_export.options.option(default, help, ...)`); its command-line flags, `--help`",
        "    lines, validation and configuration keys all come from the model. The **key** is the field name:",
        "    the key in a `--config` YAML/TOML file (finetune), in `RUN_DIR/config.yaml`, and the keyword of the",
        "    Python model (`Tiling(tile=512)`); nested families use dotted keys (`int8.mode`). Fields without a",
        "    flag are set from Python (or a configuration file) only.",
        "",
        "| family | model | commands |",
        "|---|---|---|",
    ]
    fams = all_families(cmds)
    for model, used in fams.items():
        cmd_links = ", ".join(f"[`{u}`](cli.md#{anchor_of(u)})" for u in used)
        lines.append(f"| {model.family} | [`{model.__name__}`](#{family_anchor(model)}) | {cmd_links} |")
    for model, used in fams.items():
        doc = plain(model.__doc__ or "")
        lines += ["", f"## {model.__name__} {{#{family_anchor(model)}}}", "",
                  f"`{model.__module__}.{model.__name__}` · family `{model.family}` · used by "
                  + ", ".join(f"[`{PROG} {u}`](cli.md#{anchor_of(u)})" for u in used), ""]
        if doc:
            lines += [md_escape(" ".join(doc.split("\n\n")[0].split())), ""]
        lines += ["| key | flag | type | default | help |", "|---|---|---|---|---|"]
        for r in family_rows(model):
            flags = r["flags"] or "*(Python / config only)*"
            kind = r["type"] + (f" ({r['constraints']})" if r["constraints"] else "")
            lines.append(f"| `{r['key']}` | {flags} | {cell(kind)} | {cell(r['default'])} | {cell(r['help'])} |")
    return "\n".join(lines) + "\n"
