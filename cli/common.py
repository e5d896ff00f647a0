"""Shared CLI plumbing: consoles, JSON output, progress bars, refusal to overwrite."""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from peft_export.errors import UsageError

# Results go to stdout (plain JSON with --json); messages, tables and progress go to stderr.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(_clean(obj), indent=2) + "\n")
    sys.stdout.flush()


def info(msg: str, *, quiet: bool = False) -> None:
    if not quiet:
        err.print(msg, highlight=False)


def warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(msg)}", highlight=False)


@contextmanager
def progress_bar(description: str, total: int | None, *, enabled: bool = True, extra_fields: str = "",
                 **fields: Any):
    """A rich progress bar on stderr (a no-op object when disabled, e.g. with --json or --quiet).

    ``extra_fields`` is a column template such as ``"{task.fields[case]}"``; ``fields`` give their start values.
    """
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    if extra_fields:
        columns.append(TextColumn(extra_fields))
    prog = Progress(*columns, console=err, disable=not enabled, transient=False)
    with prog:
        task = prog.add_task(description, total=total, **fields)

        class _Handle:
            progress = prog
            sub = None  # a second row: the tiles of the image in progress

            def advance(self, n: int = 1, **fields):
                if self.sub is not None:  # the image is done: its tiles row goes
                    prog.remove_task(self.sub)
                    self.sub = None
                prog.update(task, advance=n, **fields)

            def update(self, **fields):
                prog.update(task, **fields)

            def skip(self, n: int = 1):
                """Items that need no work (resumed runs): out of the total, so the ETA counts only real work."""
                total = _task(prog, task).total
                if total is not None:
                    prog.update(task, total=max(0, total - n))

            def tiles(self, k: int, n: int):
                """k more of the current image's n tiles are embedded: a row of its own for images of many tiles."""
                if n <= 1 or not enabled:
                    return
                if self.sub is None:
                    self.sub = prog.add_task("  tiles", total=n, **fields)
                prog.update(self.sub, advance=k)

        yield _Handle()


def _task(prog: Progress, task_id):
    return next(t for t in prog.tasks if t.id == task_id)


def refuse_overwrite(path: Path, force: bool, what: str = "output") -> None:
    """Refuse to overwrite an existing file or non-empty folder unless --force."""
    if force:
        return
    if path.is_file() or (path.is_dir() and any(path.iterdir())):
        raise UsageError(f"{what} {path} already exists; pass --force to overwrite it")


def parse_list(value: str | None, allowed: tuple[str, ...] | None = None, what: str = "value") -> list[str]:
    items = [v.strip() for v in (value or "").split(",") if v.strip()]
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise UsageError(f"unknown {what} {bad[0]!r}; choose from {', '.join(allowed)}")
    return items
