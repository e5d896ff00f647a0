"""What ``predict`` writes, and whether it may (torch-free).

Every label image gets a *summary* beside it (``labels/a.tif`` -> ``labels/a.json``, also for a single image):
the provenance record. It names the export that made the labels (the sha256 of the export's ``manifest.json``, or
of a package's ``rdf.yaml``), the settings (mode, prompts file sha256, automatic-segmentation parameters, tiling)
and the size and sha256 of each file it describes (labels, overlay). The label image, its overlay and its summary
are written together (:func:`peft_export.files.together`): the summary lands first, so a crash leaves either a
complete output or a summary whose labels are missing (not done: redone by the next run).

Before a run (:func:`check_outputs`):

- an output that would overwrite an input (the image, a prompt file) or land inside the export folder or the
  embedding cache is refused, whatever ``--force`` says (:func:`peft_export.paths.refuse_inputs`);
- two inputs whose outputs would have one name (``a.tif`` and ``a.png``: label images are named like their image
  with ``.tif``, so that they pair with it by name) are refused with one line (:func:`check_unique_outputs`);
- a file in the way that this tool did not write (no summary of ours names it, or its size differs from the
  record) is refused unless ``--force``;
- outputs of ours are refused unless ``--skip-existing`` (keep them) or ``--force`` (redo them); with
  ``--skip-existing`` an output made by another export or other settings is refused (``--force`` redoes it).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from peft_export.data.samples import sha256_file
from peft_export.errors import PeftExportError, UsageError
from peft_export.manifest import MANIFEST_NAME
from peft_export.paths import refuse_inputs
from peft_export.runtime.package import RDF_NAMES, is_package
from peft_export.runtime.sources import InputItem, Inputs, output_path, prompt_file, summary_path

LABELS_FORMAT = "peft-export-labels"
LABELS_FORMAT_VERSION = 1


# ---- which export -------------------------------------------------------------------------------------------

def export_record(source: str | os.PathLike | None) -> dict:
    """Which export: ``{"source", "document", "sha256"}``, the sha256 of the document the runtime verifies (an
    export folder's ``manifest.json``, which lists every graph's sha256; a package's ``rdf.yaml``, which lists its
    weights' sha256)."""
    if source is None:
        return {"source": None, "document": None, "sha256": None}
    p = Path(source)
    data, doc = None, MANIFEST_NAME
    try:
        if is_package(p) and p.is_file() and p.suffix.lower() == ".zip":
            with zipfile.ZipFile(p) as zf:
                names = set(zf.namelist())
                doc = next((n for n in RDF_NAMES if n in names), RDF_NAMES[0])
                data = zf.read(doc) if doc in names else None
        elif is_package(p):
            folder = p.parent if p.is_file() else p
            doc = next((n for n in RDF_NAMES if (folder / n).is_file()), RDF_NAMES[0])
            data = (folder / doc).read_bytes()
        elif (p / MANIFEST_NAME).is_file():
            data = (p / MANIFEST_NAME).read_bytes()
    except (OSError, zipfile.BadZipFile):
        data = None
    return {"source": str(p), "document": doc, "sha256": hashlib.sha256(data).hexdigest() if data else None}


# ---- which settings -----------------------------------------------------------------------------------------

def run_settings(req, tiling, prompt_file: Path | None) -> dict:
    """What else determines the labels besides the export and the image: recorded in every summary; their sha256
    (without the prompt file's path) is compared by ``--skip-existing``."""
    s: dict = {"mode": req.mode, "tiling": tiling.to_dict()}
    if req.mode == "auto":  # the strategy chosen for the run, and its own settings
        auto = req.auto.to_dict()
        s["method"] = req.method or auto["method"]
        if s["method"] in auto:
            s[s["method"]] = auto[s["method"]]
    elif prompt_file is not None:
        s["prompts"] = {"file": str(prompt_file), "sha256": sha256_file(prompt_file)}
    return s


def settings_sha256(settings: dict) -> str:
    key = {k: ({"sha256": v.get("sha256")} if k == "prompts" else v) for k, v in settings.items()}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def file_record(path: Path, name: str) -> dict:
    return {"name": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


# ---- what is already there ----------------------------------------------------------------------------------

def output_files(item: InputItem, out: Path, single: bool, overlay: Path | None) -> tuple[Path, Path, Path | None]:
    """(labels, summary, overlay or None) of one input."""
    labels = output_path(item, out, single)
    ov = None
    if overlay is not None and single:
        ov = overlay / item.rel.with_suffix(".png").name if overlay.is_dir() else overlay
    elif overlay is not None:
        ov = overlay / item.rel.with_suffix(".png")
    return labels, summary_path(labels), ov


def read_record(path: Path) -> dict | bool | None:
    """A summary: its dict when this tool wrote it, None when there is none, False for a file that is not ours."""
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    if data.get("format") == LABELS_FORMAT:
        return data
    if {"input", "output", "mode", "backend"} <= set(data):  # written before summaries carried a format tag
        return {**data, "legacy": True}
    return False


def _describes(record: dict, role: str, path: Path) -> bool:
    """Whether ``record`` (ours) names ``path`` as its ``role`` file with the size it has now."""
    if record.get("legacy"):
        key = "output" if role == "labels" else role
        return Path(str(record.get(key, ""))).name == path.name
    entry = (record.get("files") or {}).get(role)
    try:
        return isinstance(entry, dict) and entry.get("name") == path.name and entry.get("bytes") == path.stat().st_size
    except OSError:
        return False


@dataclass
class Existing:
    """Outputs already on disk: complete ones of ours (label path -> its record) and files in the way that this
    tool did not write."""

    ours: dict[Path, dict] = field(default_factory=dict)
    foreign: list[Path] = field(default_factory=list)


def survey(inputs: Inputs, out: Path, overlay: Path | None = None) -> Existing:
    found = Existing()
    for item in inputs.items:
        labels, summary, ov = output_files(item, out, inputs.single, overlay)
        record = read_record(summary)
        if record is False:
            found.foreign.append(summary)
            continue
        present = [p for p in (labels, ov) if p is not None and (p.exists() or p.is_symlink())]
        if record is None:
            found.foreign += present[:1]
            continue
        strangers = [p for p, role in ((labels, "labels"), (ov, "overlay")) if p in present
                     and not _describes(record, role, p)]
        if strangers:
            found.foreign.append(strangers[0])
        elif labels in present:
            found.ours[labels] = record
    return found


# ---- the checks ---------------------------------------------------------------------------------------------

def check_unique_outputs(inputs: Inputs) -> None:
    """Two inputs may not share an output: ``a.tif`` and ``a.png`` in one folder (labels keep the image's name,
    with .tif), or names that differ only in case (one file on macOS and Windows). One line naming both."""
    if inputs.single:
        return
    seen: dict[str, InputItem] = {}
    for item in inputs.items:
        key = str(item.rel.with_suffix("")).casefold()
        if key in seen:
            a, b = seen[key].path, item.path
            raise UsageError(f"{a} and {b} would both write {item.rel.with_suffix('.tif')} (label images are named "
                             "like their image, with .tif): rename or move one of them")
        seen[key] = item


def check_outputs(inputs: Inputs, out: Path, req, *, export: dict | None = None, tiling=None,
                  protect: tuple = ()) -> set[Path]:
    """Refuse what must not be written (see the module docstring); returns the label paths to skip
    (``--skip-existing``: complete outputs of this export and these settings). ``export``/``tiling``: this run's
    (None before the export is opened: then outputs of ours are not compared yet). ``protect``: input folders
    nothing may be written into (the export folder or package, the embedding cache)."""
    check_unique_outputs(inputs)
    images = [item.path for item in inputs.items]
    prompts = [req.prompts] if req.prompts is not None and not Path(req.prompts).is_dir() else []
    for item in inputs.items:
        labels, summary, ov = output_files(item, out, inputs.single, req.overlay)
        names = [labels, summary, *([ov] if ov is not None else [])]
        refuse_inputs(names, [item.path, *prompts], folders=protect)
        if ov is not None:  # the overlay would replace this run's own labels or summary (same file after links)
            for own, what in ((labels, "label image"), (summary, "summary")):
                if os.path.realpath(ov) == os.path.realpath(own):
                    raise UsageError(f"--overlay {ov} is the {what} this run writes ({own}): give the overlay "
                                     "another name (a .png)")
        if req.prompts is not None and Path(req.prompts).is_dir():
            refuse_inputs(names, [Path(req.prompts) / item.rel.with_suffix(s) for s in (".json", ".csv")])
    if len(images) > 1:  # an output that is another input (e.g. -o into the image folder, names mirrored)
        refuse_inputs([p for item in inputs.items for p in output_files(item, out, False, None)[:2]], images)
    found = survey(inputs, out, req.overlay)
    if found.foreign and not req.force:
        first = found.foreign[0]
        if inputs.single:
            raise UsageError(f"output {first} already exists and was not written by peft-export (no summary of ours "
                             "describes it); pass --force to overwrite it")
        raise UsageError(f"{len(found.foreign)} file(s) in the way were not written by peft-export (first: {first}; "
                         "no summary of ours describes it): move them, or pass --force to overwrite them")
    if not found.ours:
        return set()
    if not (req.skip_existing or req.force):
        first = next(iter(found.ours))
        if inputs.single:
            raise UsageError(f"output {first} already exists; pass --force to overwrite it (or --skip-existing)")
        raise UsageError(f"{len(found.ours)} of {len(inputs.items)} outputs already exist (first: {first}): pass "
                         "--skip-existing to resume, or --force to overwrite them")
    if not req.skip_existing:
        return set()
    if export is None:
        return set(found.ours)
    keep, other = set(), []
    for item in inputs.items:
        labels = output_files(item, out, inputs.single, None)[0]
        record = found.ours.get(labels)
        if record is None:
            continue
        why = _differs(record, req, item, export, tiling)
        if why is None:
            keep.add(labels)
        elif not req.force:
            other.append((labels, why))
    if other:
        labels, why = other[0]
        raise UsageError(f"--skip-existing: {len(other)} existing output(s) were made by {why} (first: {labels}): use "
                         "another output folder, or add --force to redo them")
    return keep


def _differs(record: dict, req, item: InputItem, export: dict, tiling) -> str | None:
    """Why an output of ours does not answer this run (another export, other settings), or None."""
    theirs = (record.get("export") or {}).get("sha256")
    if theirs is None:
        return "an earlier peft-export that did not record its export"
    if export.get("sha256") is not None and theirs != export["sha256"]:
        return f"another export ({record['export'].get('source')}, {theirs[:12]}…; this one: {export['sha256'][:12]}…)"
    if tiling is None:
        return None
    try:
        mine = settings_sha256(run_settings(req, tiling, prompt_file(req.prompts, item)))
    except PeftExportError:
        return None  # e.g. its prompt file is gone: the run says so for that input
    if record.get("settings_sha256") != mine:
        return "other settings (" + ", ".join(_changed(record.get("settings") or {}, req, tiling, item)) + ")"
    return None


def _changed(theirs: dict, req, tiling, item) -> list[str]:
    mine = run_settings(req, tiling, prompt_file(req.prompts, item))
    keys = sorted(k for k in set(mine) | set(theirs) if json.dumps(mine.get(k), sort_keys=True, default=str) !=
                  json.dumps(theirs.get(k), sort_keys=True, default=str) and not (
                      k == "prompts" and (mine.get(k) or {}).get("sha256") == (theirs.get(k) or {}).get("sha256")))
    return keys or ["settings"]
