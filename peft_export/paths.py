"""Paths that must not be trusted blindly (torch-free; the runtime uses it).

- :func:`refuse_inputs` refuses an output that is (resolved through symlinks) one of the command's inputs, holds
  one (a folder output replaces its content) or lies inside an input folder that must stay untouched;
  ``--force`` never overrides it.
- :func:`member_path` and :func:`required_sha256` check the files a manifest or an rdf names: a plain relative
  path that stays inside its folder, and a sha256 to verify it by.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from peft_export.errors import DataError, UsageError

# ---- inputs are never outputs ---------------------------------------------------------------------------------

def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(p)))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def refuse_inputs(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike | None] = (), *,
                  folders: Iterable[str | os.PathLike | None] = (), replaces: bool = False) -> None:
    """Refuse (UsageError, whatever ``--force`` says) an output that would destroy an input, paths compared after
    resolving symlinks: an output that *is* an input; with ``replaces`` (the output is a folder that is replaced
    as a whole) one that holds an input; one that lies inside any of ``folders`` (inputs nothing may be written
    into, e.g. the export folder a run reads)."""
    ins: dict[Path, Path] = {}
    for p in inputs:
        if p is not None:
            ins.setdefault(_real(p), Path(p))
    keep = [(Path(p), _real(p)) for p in folders if p is not None]
    for out in outputs:
        real = _real(out)
        if real in ins:
            raise UsageError(f"refusing to write {out}: it is the input {ins[real]}; choose another output path "
                             "(--force never overwrites an input)")
        for inp, shown in ins.items() if replaces else ():
            if _inside(inp, real):
                raise UsageError(f"refusing to write {out}: it holds the input {shown}, which replacing it would "
                                 "delete; choose another output path (--force never overwrites an input)")
        for shown, folder in keep:
            if _inside(real, folder):
                where = "is" if real == folder else f"lies inside {shown},"
                raise UsageError(f"refusing to write {out}: it {where} an input of this command; choose another "
                                 "output path (--force never overwrites an input)")


# ---- files named by a manifest ------------------------------------------------------------------------------

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def member_path(folder: str | os.PathLike, rel: object, what: str) -> Path:
    """The path of a file a manifest or an rdf names, refused (one DataError line) unless it is a plain relative
    path that stays inside ``folder`` after resolving symlinks: no absolute path, no ``..``, no link out."""
    folder = Path(folder)
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise DataError(f"{folder}: {what} has no usable file name ({rel!r})")
    parts = Path(rel).parts
    if Path(rel).is_absolute() or re.match(r"^[A-Za-z]:", rel) or ".." in parts:
        raise DataError(f"{folder}: {what} points outside its folder ({rel!r}): refused")
    p = folder / rel
    if not _inside(_real(p), _real(folder)):
        raise DataError(f"{folder}: {what} {rel} is a link that leaves its folder: refused")
    return p


def required_sha256(entry: object, where: str, what: str) -> str:
    """The sha256 a manifest/rdf entry must carry (64 lowercase hex digits), or one DataError line."""
    digest = entry.get("sha256") if isinstance(entry, dict) else None
    if not isinstance(digest, str) or not SHA256.match(digest):
        raise DataError(f"{where}: {what} has no sha256 (every file must carry one to be verified): refused")
    return digest
