"""The export folder's ``manifest.json``: what the runtime needs to run an export, and proof of what it is.

Torch-free: written by ``peft_export.export`` and read by ``peft_export.runtime`` (and ``build-engine``).

Layout of an export folder::

    encoder.onnx          image (1, 3, S, S) float32 -> image_embeddings (1, C, h, w)
                          (with baked preprocessing: image (h', w', 3) uint8, already resized)
    decoder.onnx          Meta's SamOnnxModel signature (existing SAM ONNX clients work unchanged)
    decoder_lowres.onnx   TensorRT-friendly: no orig_im_size; all four low-res masks and IoUs
    *.onnx.data           external weights where a graph exceeds 2 GB (vit_h)
    manifest.json         this file

``files`` maps a role (``encoder``, ``decoder``, ``decoder_lowres``, and any extra file such as external
data) to ``{"path", "sha256", "bytes"}`` plus, for graphs, ``inputs``/``outputs`` (name, shape, dtype).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peft_export.data.io import atomic_write
from peft_export.data.samples import sha256_file
from peft_export.errors import DataError, VerificationError, first_line
from peft_export.imaging import PreprocessSpec
from peft_export.paths import member_path, required_sha256

MANIFEST_NAME = "manifest.json"
FORMAT = "peft-export-onnx"
FORMAT_VERSION = 1


@dataclass
class Manifest:
    model: str
    preprocess: dict  # PreprocessSpec.to_dict()
    embedding: list[int]  # [C, h, w]
    mask_input_size: list[int]  # [4h, 4w]
    multimask: bool  # whether SAM's three multimask outputs are trained (False for LiteMedSAM)
    precision: str  # fp32 | fp16 | int8
    opset: int
    files: dict[str, dict[str, Any]]
    baked_preprocessing: bool = False
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint, kind, peft config, merged
    parity: dict[str, Any] = field(default_factory=dict)  # figures measured at export
    verified: bool = True  # False only with --no-verify
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.preprocess)

    def path_of(self, out_dir: str | os.PathLike, role: str) -> Path:
        """Where the ``role`` file is: always inside ``out_dir`` (:func:`peft_export.paths.member_path`)."""
        if role not in self.files:
            raise DataError(f"{out_dir}: the manifest lists no {role!r} file")
        entry = self.files[role]
        return member_path(out_dir, entry.get("path") if isinstance(entry, dict) else None, f"the {role} file")

    def to_dict(self) -> dict:
        return asdict(self)


def file_entry(path: Path, **extra) -> dict[str, Any]:
    return {"path": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size, **extra}


def write_manifest(out_dir: str | os.PathLike, manifest: Manifest) -> Path:
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n"
    return atomic_write(Path(out_dir) / MANIFEST_NAME, lambda tmp: tmp.write_text(text))


def read_json_document(path: Path, fmt: str, max_version: int, what: str) -> dict:
    """A peft-export JSON file (manifest, engine description): its dict, after checking its format tag and that
    this version can read it; otherwise one DataError line."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not valid JSON: {first_line(exc)}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise DataError(f"{path} is not a peft-export {what}")
    if int(data.get("format_version", 0)) > max_version:
        raise DataError(f"{path} was written by a newer peft-export (format {data['format_version']}); upgrade")
    return data


def read_manifest(out_dir: str | os.PathLike, *, verify_files: bool = True) -> Manifest:
    """Read and check ``OUT_DIR/manifest.json``; with ``verify_files`` every listed file's sha256 is checked."""
    out_dir = Path(out_dir)
    mpath = out_dir / MANIFEST_NAME
    if not mpath.is_file():
        raise DataError(not_an_export(out_dir))
    data = read_json_document(mpath, FORMAT, FORMAT_VERSION, "manifest")
    known = set(Manifest.__dataclass_fields__)
    try:
        manifest = Manifest(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise DataError(f"{mpath} is incomplete: {exc}") from None
    if verify_files:
        verify_manifest_files(out_dir, manifest)
    return manifest


def verify_manifest_files(out_dir: Path, manifest: Manifest) -> None:
    """Every file the manifest names lies inside ``out_dir`` (no absolute path, no ``..``, no link out of it), carries
    a sha256 and matches it; otherwise one line."""
    if not isinstance(manifest.files, dict) or not manifest.files:
        raise DataError(f"{out_dir}/{MANIFEST_NAME} lists no files")
    for role, entry in manifest.files.items():
        p = manifest.path_of(out_dir, role)
        want = required_sha256(entry, f"{out_dir}/{MANIFEST_NAME}", f"the {role} file")
        if not p.is_file():
            raise DataError(f"{out_dir}: {entry['path']} ({role}) listed in the manifest is missing")
        if sha256_file(p) != want:
            raise VerificationError(f"{p} does not match its sha256 in the manifest (modified or corrupt); "
                                    "re-export it")


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
RUN_CHECKPOINTS = ("best.pt", "latest.pt")


def export_command(checkpoint: str | os.PathLike) -> str:
    """The line that turns a training checkpoint into an export folder."""
    ck = Path(checkpoint)
    return f"peft-export merge-and-export {ck} -o {ck.parent / 'onnx'}"


def not_an_export(path: str | os.PathLike) -> str:
    """Why ``path`` is not an export folder, in one line: a checkpoint or a training run folder gets the command
    that makes an export of it."""
    p = Path(path)
    if p.is_file() and (p.suffix.lower() in CHECKPOINT_SUFFIXES or _torch_file(p)):
        return (f"{p} is a training checkpoint, not an export folder: export it first with `{export_command(p)}` "
                "(evaluate also takes the checkpoint itself)")
    if p.is_dir():
        runs = [p / n for n in RUN_CHECKPOINTS if (p / n).is_file()]
        if runs:
            return (f"{p} is a training run folder, not an export folder: export its checkpoint with "
                    f"`{export_command(runs[0])}`")
        return f"{p} has no {MANIFEST_NAME}: not a peft-export export folder"
    if p.is_file():
        return f"{p} is a file, not an export folder (from `peft-export export` / `merge-and-export`)"
    return f"export folder not found: {p}"


def _torch_file(p: Path) -> bool:
    """A torch.save file (zip with a data.pkl, or a pickle) whatever its name."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return (head == b"PK\x03\x04" and p.suffix.lower() != ".zip") or head[:1] == b"\x80"
