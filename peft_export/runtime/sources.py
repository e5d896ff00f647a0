"""What a run reads and writes: a file, a folder or a glob of images; shards of it; mirrored output paths
(torch-free).

- a file: that image (a 2D image or a stack);
- a folder: every image below it (``.tif .tiff .png .jpg .jpeg .bmp``, sub-folders included, hidden entries and
  the run's own output folder skipped), sorted by relative path;
- a glob (``'data/**/*.tif'``, quoted so that the shell leaves it alone): the matching image files, sorted.

``--shard K/N`` keeps items K, K + N, K + 2N, … (0 <= K < N) of that sorted list: N processes (a SLURM job array,
several GPUs) split one dataset with no coordination but the file system, and resume with ``--skip-existing``.
Outputs mirror the inputs' relative paths below the output folder.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

from peft_export.data.io import IMAGE_SUFFIXES
from peft_export.errors import DataError, UsageError

_MAGIC = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class InputItem:
    path: Path
    rel: Path  # relative to the input root: outputs mirror it


@dataclass(frozen=True)
class Inputs:
    items: list[InputItem]
    root: Path
    kind: str  # file | folder | glob

    @property
    def single(self) -> bool:
        return self.kind == "file"


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")


def _inside(p: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        p.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def resolve_inputs(spec: str | os.PathLike, *, exclude: str | os.PathLike | None = None) -> Inputs:
    """The images named by ``spec`` (file, folder or glob); ``exclude``: a folder to leave out (the outputs)."""
    text = str(spec)
    p = Path(text)
    skip = Path(exclude) if exclude is not None else None
    if p.is_file():
        return Inputs([InputItem(p, Path(p.name))], p.parent, "file")
    if p.is_dir():
        found = sorted(q for q in p.rglob("*") if _is_image(q) and not _inside(q, skip)
                       and not any(part.startswith(".") for part in q.relative_to(p).parts))
        if not found:
            raise DataError(f"{p}: no images in this folder ({', '.join(IMAGE_SUFFIXES)})")
        return Inputs([InputItem(q, q.relative_to(p)) for q in found], p, "folder")
    if _MAGIC.search(text):
        parts = Path(text).parts
        base = next((i for i, part in enumerate(parts) if _MAGIC.search(part)), len(parts))
        root = Path(*parts[:base]) if base else Path(".")
        found = sorted(Path(q) for q in glob.glob(text, recursive=True) if _is_image(Path(q))
                       and not _inside(Path(q), skip))
        if not found:
            raise DataError(f"no images match {text!r} ({', '.join(IMAGE_SUFFIXES)})")
        return Inputs([InputItem(q, q.relative_to(root) if _inside(q, root) else Path(q.name)) for q in found],
                      root, "glob")
    raise DataError(f"input not found: {text} (give an image file, a folder or a quoted glob)")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``K/N`` -> (K, N) with 0 <= K < N (None stays None)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if m is None:
        raise UsageError(f"--shard {text!r}: write it as K/N, e.g. 0/4 for the first of four shards")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= k < n:
        raise UsageError(f"--shard {text}: needs 0 <= K < N (shards are numbered from 0, like SLURM_ARRAY_TASK_ID "
                         "with --array=0-N-1)")
    return k, n


def take_shard(inputs: Inputs, shard: tuple[int, int] | None) -> Inputs:
    if shard is None:
        return inputs
    k, n = shard
    return Inputs(inputs.items[k::n], inputs.root, inputs.kind)


def output_path(item: InputItem, out: Path, single: bool, suffix: str = ".tif") -> Path:
    """Where an input's labels go: ``out`` itself for a single image (``out/<name>.tif`` when ``out`` is a
    folder), else ``out/<relative path>.tif``."""
    if single:
        return out / item.rel.with_suffix(suffix).name if out.is_dir() else out
    return out / item.rel.with_suffix(suffix)


def summary_path(label_path: Path) -> Path:
    return label_path.with_suffix(".json")


PROMPT_SUFFIXES = (".json", ".csv")


def prompt_file(prompts: Path | None, item: InputItem) -> Path | None:
    """The prompt file of ``item``: ``prompts`` itself, or for a folder of prompt files the one mirroring the
    input's relative path (``<name>.json`` or ``.csv``)."""
    if prompts is None or not prompts.is_dir():
        return prompts
    for suffix in PROMPT_SUFFIXES:
        p = prompts / item.rel.with_suffix(suffix)
        if p.is_file():
            return p
    raise DataError(f"no prompt file for {item.rel} in {prompts} ({item.rel.with_suffix('.json')} or .csv)")
