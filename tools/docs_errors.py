"""The error-message index, generated from the source at site build time.

Every ``UsageError(...)``, ``DataError(...)``, ``CheckpointError(...)``, ``MissingDependencyError(...)`` and
``VerificationError(...)`` built in ``peft_export/`` and ``cli/`` is one line a user can meet (the CLI prints it
as ``error: <message>`` and exits non-zero). This walks the syntax trees, renders each message template (the
f-string's fields shown as ``{name}``) and groups them by area, so a new message is listed without anyone
writing it down.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from docs_cli import cell

ERRORS = {
    "UsageError": ("bad options or input files", 2),
    "MissingDependencyError": ("an optional package or device is missing", 2),
    "DataError": ("images, labels, prompts or folders are unusable", 1),
    "CheckpointError": ("a checkpoint cannot be read or does not fit the model", 1),
    "VerificationError": ("a numerical check failed (merge, parity gate, engine check, sha256)", 1),
}

AREAS = [  # module prefix -> title, in page order
    ("peft_export_cli", "Command line"),
    ("peft_export.options", "Options (any command)"),
    ("peft_export.train", "Finetuning"),
    ("peft_export.data", "Images, labels and sample data"),
    ("peft_export.models", "Models and checkpoints"),
    ("peft_export.loading", "Models and checkpoints"),
    ("peft_export.peft", "PEFT methods and merge"),
    ("peft_export.export.tensorrt", "TensorRT engines"),
    ("peft_export.export", "Export and parity gate"),
    ("peft_export.manifest", "Export folders"),
    ("peft_export.runtime.tensorrt", "TensorRT engines"),
    ("peft_export.runtime", "Runtime: predict, evaluate, embed"),
    ("peft_export.package", "bioimage.io packages"),
    ("peft_export.bench", "Benchmarks"),
    ("peft_export", "Other"),
]


@dataclass(frozen=True)
class Message:
    kind: str  # the error class
    text: str  # the template
    module: str  # dotted module
    line: int


def _template(node: ast.AST) -> str | None:
    """The message of an error call's first argument; None when it is not text we can read."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        out = []
        for v in node.values:
            if isinstance(v, ast.Constant):
                out.append(str(v.value))
            elif isinstance(v, ast.FormattedValue):
                out.append("{" + _short(v.value) + "}")
        return "".join(out)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _template(node.left), _template(node.right)
        if left is None and right is None:
            return None
        return (left if left is not None else "{…}") + (right if right is not None else "{…}")
    if isinstance(node, ast.IfExp):
        a, b = _template(node.body), _template(node.orelse)
        return a or b
    return None


def _short(expr: ast.AST) -> str:
    """A placeholder's name: the variable or attribute, without calls and indexing noise."""
    text = ast.unparse(expr)
    if len(text) > 30:
        names = [n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(expr)
                 if isinstance(n, (ast.Name, ast.Attribute))]
        text = names[-1] if names else "…"
    return text


def _module(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "cli":
        parts[0] = "peft_export_cli"
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def collect(root: Path) -> list[Message]:
    """Every error message template in the library and the CLI (sorted by module and line)."""
    found: list[Message] = []
    for top in ("peft_export", "cli"):
        for path in sorted((root / top).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Call) and node.args):
                    continue
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                if name not in ERRORS:
                    continue
                text = _template(node.args[0])
                if text and text.strip():
                    found.append(Message(name, " ".join(text.split()), _module(root, path), node.lineno))
    return sorted(found, key=lambda m: (m.module, m.line))


def area_of(module: str) -> str:
    for prefix, title in AREAS:
        if module == prefix or module.startswith((prefix + ".", prefix + "_")):
            return title
    return "Other"


def page(root: Path) -> str:
    msgs = collect(root)
    lines = [
        "# Error messages",
        "",
        "!!! note \"Generated\"",
        "    Every error line the code can print, collected from the source when the site is built",
        "    (`tools/docs_errors.py`: each `UsageError`, `DataError`, `CheckpointError`, `MissingDependencyError`",
        "    and `VerificationError` in `peft_export/` and `cli/`). `{name}` marks a value filled in at run time.",
        "    What the common ones mean and what to do: [FAQ and troubleshooting](../how-to/troubleshooting.md).",
        "",
        "The command line prints each as one line, `error: <message>`, writes nothing half-done, and exits with",
        "the code below. Option values that a family's model refuses read `--flag: <why> (got <value>)`, or",
        "`--flag: unknown value ...; choose from ...` for a choice.",
        "",
        "| error | meaning | exit code |",
        "|---|---|---|",
    ]
    for kind, (meaning, code) in ERRORS.items():
        lines.append(f"| `{kind}` | {meaning} | {code} |")
    lines += ["", f"{len(msgs)} messages in all.", ""]
    by_area: dict[str, list[Message]] = {}
    for m in msgs:
        by_area.setdefault(area_of(m.module), []).append(m)
    order = list(dict.fromkeys(title for _, title in AREAS))
    for title in order:
        rows = by_area.get(title)
        if not rows:
            continue
        lines += [f"## {title}", "", "| message | error | where |", "|---|---|---|"]
        seen = set()
        for m in rows:
            if (m.kind, m.text) in seen:
                continue
            seen.add((m.kind, m.text))
            lines.append(f"| {cell(m.text)} | `{m.kind}` | `{m.module}`:{m.line} |")
        lines.append("")
    return "\n".join(lines) + "\n"
