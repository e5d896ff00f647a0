"""``--backend auto`` and what every run summary says about the backend (torch-free).

``auto`` picks the fastest runtime backend installed for this device, and says why:

- a usable NVIDIA GPU and an ONNX Runtime build with CUDA: ``onnxruntime`` (CUDA; TensorRT engines are never
  picked implicitly: they are built per GPU with ``build-engine`` and asked for with ``--backend tensorrt``);
- an fp16 / int8 export (its reduced-precision gate ran with ONNX Runtime): ``onnxruntime``;
- else OpenVINO when installed: on CPUs it ran the LiteMedSAM encoder at 0.80–0.87x of ONNX Runtime's fp32 latency
  even in f32 (AMD EPYC Zen 4; benchmarks/cpu_backends.py), and faster in a gated reduced precision;
- else ONNX Runtime (CPU); with neither installed, one line naming the extras.
"""

from __future__ import annotations

import importlib.util

from peft_export.errors import MissingDependencyError

AUTO = "auto"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def ort_has_cuda() -> bool:
    """An ONNX Runtime build with the CUDA provider and a GPU device node (without importing it when absent)."""
    if not _installed("onnxruntime"):
        return False
    from peft_export.runtime.onnx_backend import _cuda_usable, _import_ort

    return "CUDAExecutionProvider" in _import_ort().get_available_providers() and _cuda_usable()


def auto_backend(out_dir=None) -> tuple[str, str]:
    """(backend name, why) for ``--backend auto`` (on the export folder ``out_dir``, when given)."""
    has_ort, has_ov = _installed("onnxruntime"), _installed("openvino")
    if has_ort and ort_has_cuda():
        return "onnxruntime", "an NVIDIA GPU and ONNX Runtime with CUDA"
    precision = _export_precision(out_dir) if out_dir is not None else "fp32"
    if has_ort and precision != "fp32":
        return "onnxruntime", f"a {precision} export: its gate was measured with ONNX Runtime"
    if has_ov:
        return "openvino", "a CPU and OpenVINO installed (faster than ONNX Runtime on CPUs)"
    if has_ort:
        return "onnxruntime", "OpenVINO is not installed (pip install 'peft-export[openvino]' for faster CPU runs)"
    raise MissingDependencyError("no runtime engine is installed: pip install 'peft-export[cpu]' (ONNX Runtime) or "
                                 "'peft-export[openvino]' on a CPU PC, 'peft-export[gpu]' on an NVIDIA GPU machine")


def _export_precision(out_dir) -> str:
    from peft_export.manifest import read_manifest

    return read_manifest(out_dir, verify_files=False).precision  # the backend checks the files when it opens them


def ort_conflict() -> str | None:
    """A warning when both ONNX Runtime builds are installed (they share one folder: whichever was installed last
    wins, and uninstalling either breaks the other)."""
    import importlib.metadata as md

    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            md.distribution(dist)
            found.append(dist)
        except md.PackageNotFoundError:
            pass
    if len(found) < 2:
        return None
    return ("both onnxruntime and onnxruntime-gpu are installed (they overwrite each other's files): pip uninstall -y "
            "onnxruntime onnxruntime-gpu, then pip install 'peft-export[cpu]' or 'peft-export[gpu]'")


def runtime_summary(backend) -> dict:
    """What ran, for run summaries: backend, stored precision, compute precision, and for CPU runs the CPU model,
    kind and flags. Any backend (OpenVINO's ``info``; others from their manifest and providers)."""
    from peft_export.runtime.backend import on_gpu
    from peft_export.runtime.cpu import cpu_features

    info = getattr(backend, "info", None)
    if info is not None and hasattr(info, "summary"):
        out = info.summary()
    else:
        m = getattr(backend, "manifest", None)
        precision = m.precision if m is not None else "fp32"
        out = {"backend": getattr(backend, "name", type(backend).__name__), "precision": precision,
               "compute": precision, "details": {}}
        providers = getattr(backend, "providers", None)
        if providers:
            out["details"]["providers"] = list(providers)
    cpu = out["details"].pop("cpu", None)
    if not on_gpu(backend):
        features = cpu_features()
        out["cpu"] = cpu or {k: features[k] for k in ("model", "kind", "flags")}
    return out
