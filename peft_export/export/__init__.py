"""ONNX export of merged SAM models, with a parity gate; TensorRT engines.

    from peft_export.export import ExportOptions, export_model, prepare_for_export
    from peft_export.models.loading import load_model

    prepared = prepare_for_export(load_model("run/best.pt"))  # PEFT merged (and verified) first
    export_model(prepared, "export_dir", ExportOptions(precision="fp16"))

Modules: ``exporter`` (the folder, manifest, atomic write), ``onnx_export`` (torch -> ONNX, dynamo exporter),
``graphs`` (hand-written ONNX: baked preprocessing, Meta's decoder signature; torch-free), ``precision``
(fp16 / int8 / onnxslim; torch-free), ``parity`` (the gate). Importing this package does not import torch.
"""

from __future__ import annotations

MIN_OPSET = 18  # the dynamo exporter's floor (asked for 17 it gives 18)
DEFAULT_OPSET = 20  # ONNX's Gelu op: ONNX Runtime runs one fused kernel instead of Div/Erf/Add/Mul (CPU: ~1.4x)

_LAZY = {
    "ExportOptions": "peft_export.export.exporter",
    "ExportResult": "peft_export.export.exporter",
    "Prepared": "peft_export.export.exporter",
    "export_model": "peft_export.export.exporter",
    "prepare_for_export": "peft_export.export.exporter",
    "Thresholds": "peft_export.export.parity",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
