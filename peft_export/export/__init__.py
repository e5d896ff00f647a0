"""ONNX export of merged SAM models, with a parity gate; TensorRT engines.

    from peft_export.export import ExportOptions, export_model, prepare_for_export
    from peft_export.loading import load_model

    prepared = prepare_for_export(load_model("run/best.pt"))  # PEFT merged (and verified) first
    export_model(prepared, "export_dir", ExportOptions(precision="fp16"))

Modules: ``exporter`` (the folder, manifest, atomic write), ``onnx_export`` (torch -> ONNX, dynamo exporter),
``graphs`` (hand-written ONNX: baked preprocessing, Meta's decoder signature; torch-free), ``precision``
(fp16 / int8 / onnxslim; torch-free), ``parity`` (the gate). Importing this package does not import torch.
"""

from __future__ import annotations

from peft_export.export.options import DEFAULT_OPSET, MIN_OPSET, ExportOptions, Int8Options, Thresholds
from peft_export.lazy import lazy_exports

__getattr__, _lazy = lazy_exports(__name__, dict.fromkeys(
    ("ExportResult", "PreparedModel", "export_model", "prepare_for_export"), "exporter"))
__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "ExportOptions", "Int8Options", "Thresholds", *_lazy]
