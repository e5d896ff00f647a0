"""Torch-free inference: export folders and bioimage.io packages on ONNX Runtime / OpenVINO / TensorRT, tiling,
automatic segmentation, evaluation.

    from peft_export.runtime import Segmenter
    seg = Segmenter("export_dir/")     # or model.zip; backend="auto" (default), "onnxruntime", "tensorrt", ...
"""

from peft_export.runtime.backends import RuntimeOptions, open_model
from peft_export.runtime.segmenter import Prediction, Segmenter
from peft_export.runtime.strategies import AutoOptions
from peft_export.runtime.tiling import Tiling

__all__ = ["AutoOptions", "Prediction", "RuntimeOptions", "Segmenter", "Tiling", "open_model"]
