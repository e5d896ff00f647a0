"""Torch-free inference: ONNX Runtime / TensorRT backends, evaluation, automatic segmentation.

    from peft_export.runtime import Segmenter
    seg = Segmenter("export_dir/")     # reads manifest.json; backend="onnxruntime" (default) or "tensorrt"
"""

from peft_export.runtime.segmenter import Prediction, Segmenter, open_backend

__all__ = ["Prediction", "Segmenter", "open_backend"]
