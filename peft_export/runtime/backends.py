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
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator

from peft_export.errors import DataError, UsageError
from peft_export.manifest import MANIFEST_NAME, not_an_export, read_manifest
from peft_export.options import Options, option
from peft_export.runtime.onnx_backend import _import_ort, default_providers
from peft_export.runtime.package import is_package, package_backend

log = logging.getLogger(__name__)

# name -> "module:Class", in the order ``--backend auto`` prefers them (the first that can run the export wins, see
# choose_backend for the measured exceptions)
BACKENDS: dict[str, str] = {
    "tensorrt": "peft_export.runtime.tensorrt_backend:TensorRTBackend",
    "openvino": "peft_export.runtime.openvino_backend:OpenVinoBackend",
    "onnxruntime": "peft_export.runtime.onnx_backend:OnnxBackend",
}
# OpenVINO's inference precisions (peft_export.runtime.openvino_backend): reduced ones only after `peft-export cpu-gate`
OPENVINO_PRECISIONS = ("auto", "f32", "bf16", "bf16-mixed", "int8")


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
    inference_precision: Literal[OPENVINO_PRECISIONS] = option(
        "auto", "OpenVINO backend: the inference precision. auto: the fastest option that passed the export's CPU "
        "gate (`peft-export cpu-gate`) and that this CPU runs, else f32; bf16 and bf16-mixed need AVX512-BF16 or "
        "AMX; reduced precisions only after the gate.")
    openvino_cache: str = option(
        "user", "OpenVINO backend: where compiled models are cached. user (~/.cache/peft-export/openvino/<encoder "
        "sha256>), beside (EXPORT/.openvino_cache), off, or a folder.")


def backend_class(name: str) -> Any:
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def is_export_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an export folder (a manifest, or at least ONNX files) rather than a model."""
    p = Path(path)
    return p.is_dir() and ((p / MANIFEST_NAME).exists() or any(p.glob("*.onnx")))




def _ort_has_cuda() -> bool:
    """An ONNX Runtime build with the CUDA provider and a GPU device node (onnxruntime is not imported when absent)."""
    import importlib.util

    try:
        if importlib.util.find_spec("onnxruntime") is None:
            return False
    except (ImportError, ValueError):
        return False
    return "CUDAExecutionProvider" in default_providers(_import_ort())


def auto_passes_over(name: str, manifest) -> str | None:
    """Why ``--backend auto`` passes over a backend that could run the export (None: it does not). Measured
    choices (benchmarks/cpu_backends.py, docs/how-to/cpu-speed.md): OpenVINO ran the fp32 LiteMedSAM encoder at
    0.80-0.87x of ONNX Runtime's latency on a CPU even in f32, but an fp16 / int8 export's gate was measured with
    ONNX Runtime, and on a GPU machine ONNX Runtime with CUDA runs it."""
    if name != "openvino":
        return None
    if manifest.precision != "fp32":
        return f"a {manifest.precision} export (its gate was measured with ONNX Runtime)"
    if _ort_has_cuda():
        return "an NVIDIA GPU with ONNX Runtime's CUDA provider"
    return None


def choose_backend(folder: Path, manifest, name: str) -> tuple[str, str]:
    """(backend, why). ``auto``: the first registered backend that can run the export here (and that
    :func:`auto_passes_over` keeps); a named one must be able to."""
    if name != "auto":
        why = backend_class(name).unavailable(folder, manifest)
        if why:
            raise UsageError(f"--backend {name}: {why}")
        return name, "asked for"
    reasons = {}
    for candidate in BACKENDS:
        why = backend_class(candidate).unavailable(folder, manifest) or auto_passes_over(candidate, manifest)
        if not why:
            passed = "; ".join(f"not {k}: {v}" for k, v in reasons.items() if k != "tensorrt")
            return candidate, f"auto ({passed})" if passed else "auto (the first that can run it here)"
        reasons[candidate] = why
    raise UsageError("no backend can run this export here: " + "; ".join(f"{k}: {v}" for k, v in reasons.items()))


def explain_run(info) -> str:
    """One line for the command line: which backend runs, why, and in what arithmetic."""
    d = info.details
    chosen = f" ({d['chosen']})" if d.get("chosen") else ""
    text = f"backend {info.name}{chosen}: {info.precision} graphs, computing in {info.compute}"
    if "why" in d:  # OpenVINO: why this inference precision
        text += f" ({d['why']})"
    return text


def open_model(source: str | os.PathLike, options: RuntimeOptions | None = None):
    """A runtime backend for an export folder or a bioimage.io package (every file verified by its sha256)."""
    opts = options or RuntimeOptions()
    path = Path(source)
    if is_package(path):
        if opts.backend not in ("auto", "onnxruntime"):
            raise UsageError(f"a bioimage.io package runs with ONNX Runtime, not {opts.backend}")
        return package_backend(path, opts.providers, opts.threads)
    if not path.is_dir() or not (path / MANIFEST_NAME).is_file():
        raise DataError(not_an_export(path))  # a checkpoint or a run folder: says how to export it
    manifest = read_manifest(path)
    name, why = choose_backend(path, manifest, opts.backend)
    if opts.inference_precision != "auto" and name != "openvino":
        raise UsageError(f"--inference-precision {opts.inference_precision} applies to the OpenVINO backend, and "
                         f"{name} runs this export ({why}): use --backend openvino")
    backend = backend_class(name).open(path, manifest, opts)
    log.debug("backend %s: %s", name, why)
    backend.info = replace(backend.info, details={**backend.info.details, "chosen": why})
    return backend
