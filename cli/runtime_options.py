"""The runtime-backend options shared by predict, evaluate and embed (--backend, --inference-precision)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from peft_export.errors import UsageError

RUNTIME_CHOICES = ("auto", "onnxruntime", "openvino", "tensorrt")
BACKEND_HELP = ("auto (the fastest installed for this device: ONNX Runtime with CUDA on a GPU, else OpenVINO when "
                "installed, else ONNX Runtime; says which), onnxruntime, openvino (CPUs; pip install "
                "'peft-export[openvino]') or tensorrt (engines from build-engine).")


def _precision_field():
    # the OpenVINO options' pydantic model is the one source of the default and the help; read without importing
    # openvino (the model lives in the backend module, which imports it lazily)
    from peft_export.runtime.openvino_backend import OpenVinoOptions

    return OpenVinoOptions.model_fields["precision"]


PRECISION_OPTION = typer.Option(_precision_field().default, "--inference-precision",
                                help=_precision_field().description + " (OpenVINO backend only)")


def check_backend(backend: str) -> None:
    if backend not in RUNTIME_CHOICES:
        raise UsageError(f"unknown backend {backend!r}; choose {', '.join(RUNTIME_CHOICES)}")


def open_runtime(out_dir: Path, backend: str, precision: str, note: Callable[[str], None] | None = None):
    """The backend for an export folder (None for a bioimage.io package: the Segmenter opens it with ONNX
    Runtime); with ``auto`` say which was chosen and why; OpenVINO says which precision runs and why."""
    from peft_export.runtime.backend_choice import ort_conflict
    from peft_export.runtime.backends import open_backend
    from peft_export.runtime.openvino_backend import OpenVinoOptions

    check_backend(backend)
    conflict = ort_conflict()
    if conflict:
        from peft_export_cli import common

        common.warn(conflict)
    if precision != _precision_field().default and backend not in ("auto", "openvino"):
        raise UsageError("--inference-precision applies to the OpenVINO backend (--backend openvino or auto)")
    why = None
    if backend == "auto":
        from peft_export.runtime.backend_choice import auto_backend

        backend, why = auto_backend(out_dir)
    be = open_backend(out_dir, backend, openvino=OpenVinoOptions(precision=precision))
    if note is not None:
        if why is not None:
            note(f"backend: {be.name} (auto: {why})")
        info = getattr(be, "info", None)
        if info is not None and be.name == "openvino":
            note(f"OpenVINO computes in {info.compute} ({info.details.get('why')})")
    return be
