"""Opening a model for the runtime: one opener for export folders and bioimage.io packages, one registry of
backends. Torch-free.

    backend = open_model("export_dir/")                    # --backend auto: the fastest one present here
    backend = open_model("model.zip", RuntimeOptions(backend="onnxruntime"))

Adding a backend is one file (a class with ``info``, ``embed``, ``decode``, ``instance_maps``, and the two class
methods below) and one line in :data:`BACKENDS`. Its module is imported only when it is chosen or asked whether
it can run (optional dependencies stay optional):

- ``Cls.unavailable(folder, manifest) -> str | None``: why it cannot run this export here (None: it can);
- ``Cls.open(folder, manifest, options) -> Backend``.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator

from peft_export.errors import DataError, UsageError
from peft_export.manifest import MANIFEST_NAME, not_an_export, read_manifest
from peft_export.options import Options, option

log = logging.getLogger(__name__)

# name -> "module:Class", in the order ``--backend auto`` prefers them (the first that can run the export wins)
BACKENDS: dict[str, str] = {
    "tensorrt": "peft_export.runtime.tensorrt_backend:TensorRTBackend",
    "onnxruntime": "peft_export.runtime.onnx_backend:OnnxBackend",
}


def _backend_name(value: str) -> str:
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"unknown backend {value!r}; choose auto or {', '.join(BACKENDS)}")
    return value


class RuntimeOptions(Options):
    """Which backend runs an export, and how (predict, evaluate, embed, the napari plugin)."""

    family = "runtime"
    panel = "Runtime"

    backend: Annotated[str, AfterValidator(_backend_name)] = option(
        "auto", f"auto (the fastest backend present here that can run the export), or {', '.join(BACKENDS)}.")
    batch_size: int | None = option(
        None, "Tiles per encoder call. Older exports without a batch axis run one at a time.", ge=1,
        default_text="1 on a CPU (batches gained at most ~5% there, for several times the memory), 4 on a GPU")
    providers: list[str] | None = option(None, "ONNX Runtime execution providers (Python API).", cli=False)
    threads: int | None = option(None, "Intra-op threads of the backend (Python API).", ge=1, cli=False)


def backend_class(name: str) -> Any:
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def is_export_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an export folder (a manifest, or at least ONNX files) rather than a model."""
    p = Path(path)
    return p.is_dir() and ((p / MANIFEST_NAME).exists() or any(p.glob("*.onnx")))




def choose_backend(folder: Path, manifest, name: str) -> str:
    """``auto``: the first registered backend that can run the export here; a named one must be able to."""
    if name != "auto":
        why = backend_class(name).unavailable(folder, manifest)
        if why:
            raise UsageError(f"--backend {name}: {why}")
        return name
    reasons = {}
    for candidate in BACKENDS:
        why = backend_class(candidate).unavailable(folder, manifest)
        if not why:
            return candidate
        reasons[candidate] = why
    raise UsageError("no backend can run this export here: " + "; ".join(f"{k}: {v}" for k, v in reasons.items()))


def open_model(source: str | os.PathLike, options: RuntimeOptions | None = None):
    """A runtime backend for an export folder or a bioimage.io package (every file verified by its sha256)."""
    from peft_export.runtime.package import is_package, package_backend

    opts = options or RuntimeOptions()
    path = Path(source)
    if is_package(path):
        if opts.backend not in ("auto", "onnxruntime"):
            raise UsageError(f"a bioimage.io package runs with ONNX Runtime, not {opts.backend}")
        return package_backend(path, opts.providers, opts.threads)
    if not path.is_dir() or not (path / MANIFEST_NAME).is_file():
        raise DataError(not_an_export(path))  # a checkpoint or a run folder: says how to export it
    manifest = read_manifest(path)
    name = choose_backend(path, manifest, opts.backend)
    backend = backend_class(name).open(path, manifest, opts)
    if opts.backend == "auto":
        log.debug("backend auto: %s", name)
    return backend
