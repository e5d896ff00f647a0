"""Opening a backend: an export folder with ONNX Runtime, OpenVINO or TensorRT, or (for evaluation) a PyTorch model.

This module never imports torch itself: the PyTorch backend is imported only when a checkpoint or zoo model
is evaluated.
"""

from __future__ import annotations

import os
from pathlib import Path

from peft_export.errors import UsageError

RUNTIME_BACKENDS = ("onnxruntime", "openvino", "tensorrt")
EVALUATION_BACKENDS = ("auto", "torch", *RUNTIME_BACKENDS)


def open_backend(out_dir: str | os.PathLike, backend: str = "onnxruntime", providers: list[str] | None = None,
                 openvino=None):
    """A runtime backend for an export folder (``auto``: the fastest installed, see runtime/backend_choice.py;
    ``openvino``: an ``OpenVinoOptions`` for the OpenVINO backend)."""
    if backend == "auto":
        from peft_export.runtime.backend_choice import auto_backend

        backend = auto_backend(out_dir)[0]
    if backend == "openvino":
        from peft_export.runtime.openvino_backend import OpenVinoBackend, OpenVinoOptions

        return OpenVinoBackend(out_dir, **(openvino or OpenVinoOptions()).model_dump())
    if backend == "onnxruntime":
        from peft_export.runtime.onnx_backend import OnnxBackend

        return OnnxBackend(out_dir, providers)
    if backend == "tensorrt":
        from peft_export.runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(out_dir)
    raise UsageError(f"unknown runtime backend {backend!r}; choose auto, onnxruntime, openvino or tensorrt")


def is_export_folder(model: str | os.PathLike) -> bool:
    """Whether ``model`` names an export folder (a manifest, or at least ONNX files) rather than a model."""
    from peft_export.manifest import MANIFEST_NAME

    p = Path(model)
    return p.is_dir() and ((p / MANIFEST_NAME).exists() or any(p.glob("*.onnx")))


def make_backend(model: str, checkpoint: str | None, backend: str = "auto", device: str = "auto", openvino=None):
    """A backend for evaluation and a description of it: PyTorch for checkpoints and zoo names, a runtime backend
    (``auto``: the fastest installed, runtime/backend_choice.py) for export folders. Returns (backend, description
    dict)."""
    if backend not in EVALUATION_BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose from {', '.join(EVALUATION_BACKENDS)}")
    export = is_export_folder(model)
    if backend == "auto" and not export:
        backend = "torch"
    if export:
        from peft_export.runtime.backend_choice import runtime_summary

        if backend == "torch":
            raise UsageError(f"{model} is an export folder: evaluate it with --backend onnxruntime, openvino or "
                             "tensorrt")
        if checkpoint is not None:
            raise UsageError("--checkpoint does not apply to an export folder")
        be = open_backend(model, backend, openvino=openvino)
        m = be.manifest
        return be, {"model": m.model, "source": str(model), "peft": m.source.get("peft"), "backend": be.name,
                    "precision": m.precision, "runtime": runtime_summary(be)}
    if backend != "torch":
        raise UsageError(f"--backend {backend} runs export folders; export {model} first "
                         "(peft-export export / merge-and-export) or use --backend torch")
    from peft_export.devices import resolve_device
    from peft_export.models.loading import load_model
    from peft_export.models.torch_backend import TorchBackend

    loaded = load_model(model, checkpoint)
    be = TorchBackend(loaded.model, loaded.spec.preprocess, resolve_device(device), multimask=loaded.spec.multimask,
                      instance_decoder=loaded.instance_decoder)  # evaluate --auto with a checkpoint's decoder
    return be, {"model": loaded.spec.name, "source": loaded.source, "peft": loaded.peft, "backend": "torch",
                "precision": "fp32"}
